"""Command line: ``disk serve`` and ``disk info``.

``add_disk_commands(subparsers)`` registers ``disk serve ...`` / ``disk info ...``
under a parent parser (the ``meshlink`` console script); ``main(argv)`` is the
standalone form behind ``python -m meshlink.disk serve ...``.  Each
subcommand stores its handler as ``args.func(args) -> int``.

Exit codes: 0 success (including a clean stop on SIGINT/SIGTERM), 1 runtime
failure (cannot open the backend, address in use, server refused), 2 usage.
Errors go to stderr.  ``serve`` prints one ``ready <uri>`` line on stdout once
it accepts connections (not with ``--stdio``, where stdout is the protocol).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Any

import trio

from .._errors import MeshlinkError
from .backends import BACKEND_KINDS, open_backend
from .nbd import (
    Export,
    NBDServer,
    TLSMode,
    activation_listeners,
    open_listeners,
    open_nbd,
    parse_listen_address,
    server_ssl_context,
)
from .nbd import _const as c

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``4096``, ``64k``, ``1M``, ``2GiB`` (binary multiples).

    Raises:
        argparse.ArgumentTypeError: not a size.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M or 1G)")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number << (10 * " kmgtpe".index(unit)) if unit else number


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="export a disk backend over NBD",
        description="Serve a disk backend over NBD.  Listens on --listen (default "
                    "127.0.0.1:10809), or on a socket passed by systemd socket activation "
                    "(LISTEN_FDS), or talks NBD on stdin/stdout with --stdio.")
    p.add_argument("name", help="export name (also served as the default export)")
    p.add_argument("--backend", choices=BACKEND_KINDS, required=True,
                   help="null, memory (sparse RAM), file, mmap, or cow (over --path)")
    p.add_argument("--path", help="file for file/mmap; the gold image for cow")
    p.add_argument("--size", type=parse_size,
                   help="size for null/memory; creates/resizes a file for file/mmap")
    p.add_argument("--overlay", help="cow: keep written blocks in this file, not RAM")
    p.add_argument("--read-only", action="store_true", help="refuse writes")
    p.add_argument("--description", default="", help="text shown by nbdinfo")
    p.add_argument("--nbd", action="store_true", help="serve with NBD (the only front end "
                   "today; required)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--listen", metavar="ADDR",
                       help="host:port, tcp:host:port or unix:/path")
    where.add_argument("--stdio", action="store_true",
                       help="serve one client on stdin/stdout (inetd style)")
    p.add_argument("--tls", choices=[m.value for m in TLSMode], default="off",
                   help="off, optional or required (needs --tls-cert and --tls-key)")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-ca", help="CA for client certificates (makes them required)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    p.set_defaults(func=_cmd_serve)


def _add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="show an NBD export's size and flags",
                       description="Connect to an NBD URI and print what the server "
                                   "advertises for the export.")
    p.add_argument("url", help="nbd://host[:port]/name, nbd+unix:///name?socket=PATH, "
                               "or nbds:// forms")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tls-ca", help="CA to verify the server (nbds)")
    p.add_argument("--tls-cert", help="client certificate (PEM)")
    p.add_argument("--tls-key", help="client key (PEM)")
    p.set_defaults(func=_cmd_info)


def add_disk_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``disk serve`` and ``disk info`` under an argparse subparsers object.

    Returns:
        The ``disk`` parser.
    """
    disk = subparsers.add_parser("disk", help="serve or inspect disks (NBD)",
                                 description="Serve or inspect disks over NBD.")
    sub = disk.add_subparsers(dest="disk_command", metavar="{serve,info}", required=True)
    _add_serve(sub)
    _add_info(sub)
    return disk  # type: ignore[no-any-return]


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.nbd:
        return _fail("choose a front end: --nbd")
    ssl_context: ssl.SSLContext | None = None
    if args.tls != "off":
        if not (args.tls_cert and args.tls_key):
            return _fail("--tls optional/required needs --tls-cert and --tls-key")
        try:
            ssl_context = server_ssl_context(args.tls_cert, args.tls_key, args.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            return _fail(f"cannot load TLS files: {exc}")
    if args.listen:
        try:
            parse_listen_address(args.listen)
        except ValueError as exc:
            return _fail(str(exc))
    try:
        backend = open_backend(args.backend, path=args.path, size=args.size,
                               read_only=args.read_only, overlay_path=args.overlay)
    except (ValueError, MeshlinkError) as exc:
        return _fail(f"cannot open the {args.backend} backend: {exc}")
    server = NBDServer([Export(args.name, backend, args.description, args.read_only)],
                       tls=args.tls, ssl_context=ssl_context)
    try:
        return trio.run(_serve, server, args)
    except KeyboardInterrupt:
        return 0
    finally:
        backend.close()


async def _serve(server: NBDServer, args: argparse.Namespace) -> int:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        if args.stdio:
            await server.serve_stdio()
            nursery.cancel_scope.cancel()
            return 0
        listeners = activation_listeners()
        activated = bool(listeners)
        if not activated:
            try:
                listeners = await open_listeners(args.listen or "127.0.0.1:10809")
            except (OSError, MeshlinkError) as exc:
                nursery.cancel_scope.cancel()
                return _fail(f"cannot listen on {args.listen}: {exc}")
        await nursery.start(server.serve_listeners, listeners)
        for uri in _uris(listeners, args.name):
            if activated:  # our parent speaks NBD to us; keep stdout quiet
                logging.getLogger("meshlink.disk.nbd").info("ready %s", uri)
            else:
                print(f"ready {uri}", flush=True)
    return 0


def _uris(listeners: Sequence[trio.SocketListener], name: str) -> list[str]:
    out = []
    for listener in listeners:
        addr = listener.socket.getsockname()
        if isinstance(addr, str):
            out.append(f"nbd+unix:///{name}?socket={addr}")
        else:
            host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            out.append(f"nbd://{host}:{addr[1]}/{name}")
    return out


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def _cmd_info(args: argparse.Namespace) -> int:
    ctx: ssl.SSLContext | None = None
    if args.url.startswith("nbds"):
        ctx = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        info = trio.run(_info, args.url, ctx)
    except (ValueError, MeshlinkError, OSError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0


_FLAG_NAMES = [(c.TF_READ_ONLY, "read_only"), (c.TF_SEND_FLUSH, "can_flush"),
               (c.TF_SEND_FUA, "can_fua"), (c.TF_SEND_TRIM, "can_trim"),
               (c.TF_SEND_WRITE_ZEROES, "can_zero"), (c.TF_SEND_FAST_ZERO, "can_fast_zero"),
               (c.TF_SEND_DF, "can_df"), (c.TF_CAN_MULTI_CONN, "can_multi_conn"),
               (c.TF_SEND_CACHE, "can_cache"), (c.TF_ROTATIONAL, "rotational")]


async def _info(url: str, ctx: ssl.SSLContext | None) -> dict[str, Any]:
    async with open_nbd(url, ssl_context=ctx) as disk:
        info = disk.info
        out: dict[str, Any] = {"export": info.name, "size": info.size,
                               "structured_replies": info.structured,
                               "contexts": sorted(info.contexts.values())}
        for flag, name in _FLAG_NAMES:
            out[name] = bool(info.flags & flag)
        out.update(block_size_minimum=info.min_block,
                   block_size_preferred=info.preferred_block,
                   block_size_maximum=info.max_block)
        if info.description:
            out["description"] = info.description
        return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshlink.disk {serve,info} ...``.

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(prog="python -m meshlink.disk",
                                     description="Serve or inspect meshlink disks over NBD.")
    sub = parser.add_subparsers(dest="disk_command", metavar="{serve,info}", required=True)
    _add_serve(sub)
    _add_info(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
