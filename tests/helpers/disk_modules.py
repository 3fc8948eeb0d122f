"""Run ``meshlink ARGS...`` in this process, then write the modules it loaded to OUT.

``python disk_modules.py OUT ARGS...``: the start-up guard of
``tests/test_disk_daemon.py`` reads OUT (one module name a line) after the
command exits, so it sees every module the command imported, shutdown
included.
"""

from __future__ import annotations

import sys

from meshlink.cli import main

out, argv = sys.argv[1], sys.argv[2:]
code = main(argv)
with open(out, "w") as f:
    f.write("\n".join(sorted(sys.modules)))
sys.exit(code)
