"""The ``meshlink`` command's one entry and its one policy for exit codes, errors and logging.

The command groups only add subcommands and their handlers: ``cli/service.py``
(serve-echo, resolve, ls, connect, call), ``cli/disk.py`` (``disk ...``) and
``cli/vchan.py`` (``vchan ...``).  This module builds the root parser, turns
``-v`` into the logging level, runs the chosen handler (``args.func(args) ->
int``) and maps what it raises to the exit code, the same for every command
and for the standalone ``python -m meshlink.disk`` / ``python -m
meshlink.cli.vchan`` forms:

    0    success (a server stopped by SIGINT or SIGTERM included)
    1    the operation failed: one line ``error: ...`` on stderr
    2    usage error (argparse prints the usage)
    130  interrupted

A group's module is imported only when its command runs, so ``meshlink disk
...`` does not import the bus and ``meshlink call`` not the disk code; the
root help lists the groups from the table below without importing them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from resolver import ResolverError

from ..errors import MeshlinkError
from ._common import EXIT_CODES, CommandFailed, add_verbose

__all__ = ["EXIT_CODES", "CommandFailed", "add_group", "add_verbose", "main", "run_group"]

#: name -> (module, one-line summary): the groups of ``meshlink GROUP ...``.
#: Each module has ``configure(parser)``, which adds the group's subcommands.
_GROUPS: dict[str, tuple[str, str]] = {
    "disk": ("meshlink.cli.disk", "serve, inspect or copy disks (blk ring, NBD)"),
    "vchan": ("meshlink.cli.vchan", "a vchan end on stdin/stdout (like xencat)"),
}


class _VersionAction(argparse.Action):
    """``--version``; reads the installed version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                         nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("meshlink")
        except PackageNotFoundError:  # run from a source tree that was never installed
            text = "unknown (not installed)"
        print(f"{parser.prog} {text}")  # on stdout, as argparse's own version action
        parser.exit()


def _new_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_CODES)
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-vv: debug)")
    return parser


def _configure(name: str) -> Callable[[argparse.ArgumentParser], None]:
    module = importlib.import_module(_GROUPS[name][0])
    configure: Callable[[argparse.ArgumentParser], None] = module.configure
    return configure


def add_group(subparsers: Any, name: str) -> argparse.ArgumentParser:
    """Add command group ``name`` (``"disk"``, ``"vchan"``) with all its subcommands.

    Returns:
        The group's parser.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=_GROUPS[name][1])
    _configure(name)(parser)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command word: the first argument that is not an option (no root option
    takes a value)."""
    for arg in argv:
        if arg == "--" or not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``meshlink`` parser; of the groups, only the one ``argv`` names is loaded.

    The root commands (``cli/service.py``, which import trio and the bus) are
    left out when ``argv`` names a group: they could not be parsed then, and
    ``disk serve`` must start without trio.
    """
    parser = _new_parser("meshlink", "Serve and reach meshlink services by name: vchan "
                                     "shared memory when co-located, TLS or TCP otherwise.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = _command(argv)
    if wanted is None and "--version" in argv and not {"-h", "--help"} & set(argv):
        # argparse acts on --version as soon as it meets it: no command is
        # parsed, so the root commands (and trio, which they import) are not
        # needed.  `meshlink --version` took 0.2 s with them, 0.05 s without.
        # (A help flag may come first, and its help lists those commands.)
        return parser
    if wanted not in _GROUPS:
        from . import service

        service.add_service_commands(sub)
    for name, (_, summary) in _GROUPS.items():
        if name == wanted:
            add_group(sub, name)
        else:  # listed in --help; never parsed, since the command is another one
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def _single(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups, else the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _message(exc: BaseException) -> str:
    # A RemoteError can only come from a loaded bus: no import of it otherwise.
    if "meshlink.bus" in sys.modules:
        from ..bus import RemoteError

        if isinstance(exc, RemoteError):
            return f"the service raised {exc}"
    return str(exc)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        try:
            code: int = args.func(args)
        except BaseExceptionGroup as group:
            raise _single(group) from None
    except KeyboardInterrupt:
        return 130
    # ResolverError: `resolve` and `ls` ask the resolver directly.
    except (CommandFailed, MeshlinkError, ResolverError, OSError) as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not _broken_stream(exc):
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 1
    return code


def _broken_stream(exc: BaseException) -> bool:
    """Whether ``exc`` is trio's BrokenResourceError (trio is not imported to ask:
    a command that never loaded it, such as ``disk serve``'s fast path, cannot
    have raised it)."""
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(exc, trio.BrokenResourceError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``meshlink`` command.

    Returns:
        The exit code (0 ok, 1 failed, 2 usage, 130 interrupted).
    """
    return _run(build_parser(sys.argv[1:] if argv is None else argv), argv)


def run_group(name: str, prog: str, argv: Sequence[str] | None = None) -> int:
    """Run one group as a command of its own (``python -m meshlink.disk ...``).

    Returns:
        The exit code, as for :func:`main`.
    """
    parser = _new_parser(prog)
    _configure(name)(parser)
    return _run(parser, argv)
