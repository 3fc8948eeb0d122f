"""What every command group of the ``meshlink`` command shares.

The exit-code epilog, the one exception a handler raises to fail with a
message (exit 1), and the per-subcommand ``-v``.  The entry point
(:mod:`._app`) and the groups both import this; it imports nothing of them.
"""

from __future__ import annotations

import argparse

__all__ = ["EXIT_CODES", "CommandFailed", "add_verbose"]

EXIT_CODES = "exit codes: 0 ok, 1 failed (message on stderr), 2 usage, 130 interrupted"


class CommandFailed(Exception):
    """The command failed for a reason its message says in one line (exit 1)."""


def add_verbose(p: argparse.ArgumentParser) -> None:
    """``-v`` on a subcommand too (``meshlink call -v ...``), adding to the root's count."""
    # SUPPRESS: an absent -v here must not reset what the root parser counted.
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="log more (-vv: debug)")
