"""``meshlink stats [NAME]`` and ``meshlink top [NAME]``: what services are doing.

Both connect to the service by name exactly as ``meshlink call`` does (same
options: host store, rules, TLS...) and call its built-in ``meshlink.stats``
method, so they see only what a client allowed to connect may see.  Without
NAME they ask every live service of the host store.  ``top`` redraws the
table every second with plain ANSI escapes until Ctrl-C (or
``--iterations N``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import trio

from ._common import CommandFailed

__all__ = ["add_stats_commands", "format_table"]

_CLEAR = "\x1b[H\x1b[2J"


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def format_table(snaps: list[tuple[str, dict[str, Any] | str]]) -> str:
    """One block per service: its totals, then one line per open connection."""
    lines = [f"{'SERVICE/PEER':<24} {'TRANSPORT':<14} {'MSG IN':>8} {'MSG OUT':>8} "
             f"{'BYTES IN':>9} {'BYTES OUT':>9} {'CALLS':>7} {'INFL':>5} {'ERR':>5}  RING"]
    for name, snap in snaps:
        if isinstance(snap, str):
            lines.append(f"{name:<24} error: {snap}")
            continue
        t = snap["totals"]
        opened = ",".join(f"{k}:{v['open']}" for k, v in snap["transports"].items()
                          if v["open"] or v["total"])
        lines.append(f"{name:<24} {opened or '-':<14} {_human(t['messages_in']):>8} "
                     f"{_human(t['messages_out']):>8} {_human(t['bytes_in']):>9} "
                     f"{_human(t['bytes_out']):>9} {_human(t['calls_done']):>7} "
                     f"{t['calls_in_flight']:>5} {t['errors']:>5}  "
                     f"up {snap['uptime']:.0f}s")
        for c in snap["connections"]:
            ring = c.get("ring")
            fill = f"{_human(ring['readable'])} rd/{_human(ring['free'])} free" if ring else ""
            lines.append(f"  {c['peer'] or '?':<22} {c['transport']:<14} "
                         f"{_human(c['messages_in']):>8} {_human(c['messages_out']):>8} "
                         f"{_human(c['bytes_in']):>9} {_human(c['bytes_out']):>9} "
                         f"{_human(c['calls_done']):>7} {c['calls_in_flight']:>5} "
                         f"{c['errors']:>5}  {fill}".rstrip())
    return "\n".join(lines)


def _names(args: argparse.Namespace) -> list[str]:
    """NAME, or every live service of the host store."""
    if args.name:
        return [args.name]
    import os

    from resolver import HostStore, HostStoreSource
    from resolver.hoststore import default_store_path

    from ..errors import resolver_errors

    path = default_store_path(args.host_store)
    if not os.path.lexists(path):
        return []
    with resolver_errors():
        store = HostStore(path, create=False)
    return sorted(name for name, live, _ in HostStoreSource(store).services() if live)


async def _open_all(stack: AsyncExitStack, names: list[str],
                    kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    """Connect to each name; a failure becomes its row's error (one name: raised)."""
    from ..client import connect
    from ..errors import MeshlinkError

    conns: list[tuple[str, Any]] = []
    for name in names:
        try:
            conns.append((name, await stack.enter_async_context(connect(name, **kwargs))))
        except (MeshlinkError, OSError) as exc:
            if len(names) == 1:
                raise
            conns.append((name, f"{type(exc).__name__}: {exc}"))
    return conns


async def _ask(conns: list[tuple[str, Any]]) -> list[tuple[str, dict[str, Any] | str]]:
    from ..errors import MeshlinkError
    from ..stats import STATS_METHOD

    out: list[tuple[str, dict[str, Any] | str]] = []
    for name, conn in conns:
        if isinstance(conn, str):
            out.append((name, conn))
            continue
        try:
            out.append((name, await conn.call(STATS_METHOD, timeout=10)))
        except (MeshlinkError, OSError, trio.TooSlowError, trio.ClosedResourceError) as exc:
            out.append((name, f"{type(exc).__name__}: {exc}"))
    return out


def _cmd_stats(args: argparse.Namespace, connect_kwargs: Callable[[Any], dict[str, Any]]) -> int:
    names = _names(args)
    if not names:
        raise CommandFailed("no live service in the host store")

    async def run() -> list[tuple[str, dict[str, Any] | str]]:
        async with AsyncExitStack() as stack:
            return await _ask(await _open_all(stack, names, connect_kwargs(args)))

    snaps = trio.run(run)
    if args.json:
        print(json.dumps(snaps[0][1] if args.name else dict(snaps), indent=1))
    else:
        print(format_table(snaps))
    if args.name and isinstance(snaps[0][1], str):
        raise CommandFailed(snaps[0][1])
    return 0


def _cmd_top(args: argparse.Namespace, connect_kwargs: Callable[[Any], dict[str, Any]]) -> int:
    names = _names(args)
    if not names:
        raise CommandFailed("no live service in the host store")

    async def run() -> None:
        async with AsyncExitStack() as stack:
            conns = await _open_all(stack, names, connect_kwargs(args))
            n = 0
            while args.iterations is None or n < args.iterations:
                if n:
                    await trio.sleep(args.interval)
                table = format_table(await _ask(conns))
                sys.stdout.write(_CLEAR + table + "\n")
                sys.stdout.flush()
                n += 1

    try:
        trio.run(run)
    except KeyboardInterrupt:  # Ctrl-C is how top is meant to end
        print()
    return 0


def add_stats_commands(sub: Any, add_client: Callable[[argparse.ArgumentParser], None],
                       connect_kwargs: Callable[[Any], dict[str, Any]]) -> None:
    """Add ``stats`` and ``top`` to the root's subparsers."""
    p = sub.add_parser("stats", help="counters of a service (or of every live one)",
                       description="Connect to NAME (as 'meshlink call' does) and print its "
                                   "counters: messages, bytes, calls, errors, connections per "
                                   "transport.  Without NAME: every live service in the host "
                                   "store.")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true",
                   help="print the raw snapshot as JSON (a dict by name without NAME)")
    add_client(p)
    p.set_defaults(func=lambda a: _cmd_stats(a, connect_kwargs))

    p = sub.add_parser("top", help="a live table of service counters (Ctrl-C ends)",
                       description="Like 'meshlink stats', redrawn every second until Ctrl-C.")
    p.add_argument("name", nargs="?")
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="stop after N tables (default: until Ctrl-C)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between tables (1)")
    add_client(p)
    p.set_defaults(func=lambda a: _cmd_top(a, connect_kwargs))
