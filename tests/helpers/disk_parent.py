"""A harness in miniature: start ``meshlink disk serve ARGS...``, print its pid, then wait.

The test kills this process (SIGKILL) to check that a server started with
``--exit-with-parent`` does not outlive it.  It waits on stdin, which the
test never closes first.
"""

from __future__ import annotations

import subprocess
import sys

server = subprocess.Popen([sys.executable, "-m", "meshlink.cli", "disk", "serve", *sys.argv[1:]],
                          stdout=subprocess.DEVNULL)
print(server.pid, flush=True)
sys.stdin.read()
server.terminate()
server.wait()
