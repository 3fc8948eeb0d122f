"""Run the echo cluster on this machine: one server, a co-located client, a TLS client.

Makes a throwaway CA and certificates (with ``trustme``, installed by the
README's ``.[test,bench]``), starts the echo server as its own process with
``meshlink.serve`` in a private host store (vchan + mutual TLS; no plain TCP), then runs
three client processes that connect *by name*:

* a co-located client: the resolver finds the name in the host store with our
  host id, the vchan handshake proves co-location, so it talks over vchan;
* a client told to forbid vchan and require TLS: it uses mutual TLS;
* a co-located client without trio (``meshlink.connect_blocking``): vchan.

Each prints the transport it used.  The server is stopped with SIGTERM (which
withdraws it).  Exit status 0 means every reply was correct.

    python3 examples/cluster/demo.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "echo"
NAME = "storage-node"
LINES = ["hello from dom0", "meshlink picks the fastest safe channel"]


def make_certs(d: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A CA, a server certificate naming the service, a client certificate."""
    try:
        import trustme
    except ImportError:
        sys.exit("the demo makes its certificates with trustme: "
                 "python3 -m pip install -e '.[test,bench]'")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ca.issue_cert(NAME).private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    ca.issue_cert("demo-client").private_key_and_cert_chain_pem.write_to_path(
        str(d / "client.pem"))
    server = {"MESHLINK_TLS_CERT": str(d / "server.pem"), "MESHLINK_TLS_CA": str(d / "ca.pem")}
    client = {"MESHLINK_TLS_CERT": str(d / "client.pem"), "MESHLINK_TLS_CA": str(d / "ca.pem")}
    return server, client


def run_client(store: str, env: dict[str, str], *flags: str) -> tuple[bool, str]:
    out = subprocess.run(
        [sys.executable, str(HERE / "client.py"), NAME, *LINES, "--host-store", store, *flags],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    ok = out.returncode == 0 and all(repr(line.upper()) in out.stdout for line in LINES)
    return ok, out.stdout


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="meshlink-demo-") as tmp:
        d = Path(tmp)
        store = str(d / "store")
        server_env, client_env = make_certs(d)
        server = subprocess.Popen(
            [sys.executable, str(HERE / "server.py"), NAME, "--host-store", store],
            stdout=subprocess.PIPE, text=True, env={**os.environ, **server_env},
        )
        try:
            assert server.stdout is not None
            print(server.stdout.readline().rstrip(), flush=True)
            print("co-located client:", flush=True)
            ok1, out1 = run_client(store, client_env)
            print("client forced through TLS (--no-vchan --require-tls):", flush=True)
            ok2, out2 = run_client(store, client_env, "--no-vchan", "--require-tls")
            print("co-located client without trio (--blocking):", flush=True)
            ok3, out3 = run_client(store, client_env, "--blocking")
            ok = (ok1 and ok2 and ok3 and out1.startswith("[vchan]")
                  and out2.startswith("[tls]") and out3.startswith("[vchan]"))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=20)
        ok = ok and server.returncode == 0 and not any(Path(store).iterdir())
        print("demo:", "OK" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
