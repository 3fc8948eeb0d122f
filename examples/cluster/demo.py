"""Run the echo cluster on this machine: one server and co-located clients.

Starts the echo server as its own process in a private host store, runs a
client process against it, prints what each saw, and stops the server with
SIGTERM (which withdraws the service).  Exit status 0 means every reply was
correct.

    python3 examples/cluster/demo.py
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "echo"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="meshlink-demo-") as store:
        server = subprocess.Popen(
            [sys.executable, str(HERE / "server.py"), "storage-node", "--host-store", store],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert server.stdout is not None
            print(server.stdout.readline().rstrip())
            lines = ["hello from dom0", "meshlink speaks vchan"]
            out = subprocess.run(
                [sys.executable, str(HERE / "client.py"), "storage-node", *lines,
                 "--host-store", store],
                capture_output=True, text=True, timeout=60,
            )
            sys.stdout.write(out.stdout)
            sys.stderr.write(out.stderr)
            ok = out.returncode == 0 and all(
                repr(line.upper()) in out.stdout for line in lines
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=10)
        print("demo:", "OK" if ok and server.returncode == 0 else "FAILED")
        return 0 if ok and server.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
