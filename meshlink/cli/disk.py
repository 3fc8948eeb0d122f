"""Command line: ``disk serve``, ``disk info`` and ``disk cp``.

``configure(parser)`` adds the subcommands to the ``meshlink disk`` parser,
or to the root parser of the standalone ``python -m meshlink.disk ...``;
entry, exit codes and error messages are :mod:`._app`'s (runtime failures,
such as a backend that cannot be opened or an address in use, exit 1).
``serve`` prints one ``ready <uri>`` line on stdout once it accepts
connections (not with ``--stdio``, where stdout is the protocol), and a clean
stop on SIGINT/SIGTERM is a success.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from ..disk import check_listen_address
from ..disk.backends import (
    BACKEND_KINDS,
    MAX_SIZE,
    SECTOR,
    Backend,
    check_options,
    open_backend,
)
from ..disk.nbd.server_listen import HANDSHAKE_TIMEOUT, MAX_CONNECTIONS
from ..errors import LocalProtocolError, MeshlinkError
from ._app import add_group, run_group
from ._common import CommandFailed, add_verbose
from ._daemon import Daemon, add_daemon_options
from ._disk_spec import DiskSpec, check_unique, parse_disk_spec
from ._serve_sync import serve_sync, trio_needed

if TYPE_CHECKING:
    import ssl

    from resolver import ZeroconfConfig

#: ``--tls`` choices: the values of ``nbd.server_handshake.TLSMode`` (spelled out so
#: that parsing does not load the NBD option phase; a test checks they agree).
TLS_MODES = ("off", "optional", "required")

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


def parse_disk_size(text: str) -> int:
    """Parse a disk size (as :func:`parse_size`): whole 512-byte sectors, at most 2**63-1.

    Raises:
        argparse.ArgumentTypeError: not a size, or not a valid disk size.
    """
    size = parse_size(text)
    if size > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is over the largest disk size "
                                         f"(2**63-1 bytes)")
    if size % SECTOR:
        raise argparse.ArgumentTypeError(
            f"{text!r} ({size} bytes) is not a whole number of {SECTOR}-byte sectors")
    return size


def parse_block_size(text: str) -> int:
    """Parse ``cp --block-size``: 1 byte .. 1 GiB (0 would never advance).

    Raises:
        argparse.ArgumentTypeError: not a size in that range.
    """
    size = parse_size(text)
    if not 1 <= size <= 1 << 30:
        raise argparse.ArgumentTypeError(f"{text!r}: the block size must be 1..1G")
    return size


def parse_listen(text: str) -> str:
    """Check a ``--listen`` address (port 0..65535) without binding anything.

    Raises:
        argparse.ArgumentTypeError: not an address :func:`check_listen_address` accepts.
    """
    try:
        check_listen_address(text)
    except LocalProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="export disk backends over the blk ring and/or NBD",
        description="Serve a disk backend (--backend and its options), or several "
                    "(--disk NAME:BACKEND[:OPTIONS], repeatable; NAME is then the SERVICE).  "
                    "By default over the blk ring to co-located "
                    "processes: NAME is SERVICE or SERVICE/DISK (disk 'disk0' if omitted), "
                    "published in the host store.  With --nbd, over NBD instead (add --blk "
                    "for both): the export name is NAME (with --disk, --blk or when "
                    "advertised on zeroconf: each DISK name); listens on --listen "
                    "(default 127.0.0.1:10809), or on a socket passed by systemd socket "
                    "activation (LISTEN_FDS), or talks NBD on stdin/stdout with --stdio.  "
                    "Ready when it prints 'ready ...' on stdout, or (for harnesses) when the "
                    "--pidfile appears; SIGINT/SIGTERM stop it cleanly.")
    p.add_argument("name", help="SERVICE[/DISK] for the blk ring; the export name for NBD "
                                "(with --disk: the SERVICE)")
    p.add_argument("--backend", choices=BACKEND_KINDS,
                   help="null, memory (sparse RAM), file, mmap, or cow (over --path)")
    p.add_argument("--disk", action="append", metavar="NAME:BACKEND[:OPTIONS]",
                   type=lambda text: parse_disk_spec(text, parse_disk_size),
                   help="serve this disk too (repeatable; instead of --backend): OPTIONS are "
                        "path=,size=,overlay=,description= and read-only,shrink,overlay-reset, "
                        "comma-separated, e.g. data:file:path=d.img,size=1G")
    p.add_argument("--path", help="file for file/mmap; the gold image for cow")
    p.add_argument("--size", type=parse_disk_size,
                   help="null/memory: the size (required); file/mmap: create or grow the "
                        "file to it (whole 512-byte sectors)")
    p.add_argument("--shrink", action="store_true",
                   help="file/mmap: allow --size to cut the end off a bigger file")
    p.add_argument("--overlay", help="cow: keep written blocks in this file, not RAM")
    p.add_argument("--overlay-reset", action="store_true",
                   help="cow: discard the contents of an existing, non-empty --overlay")
    p.add_argument("--read-only", action="store_true", help="refuse writes")
    p.add_argument("--description", default="", help="text shown by nbdinfo")
    p.add_argument("--nbd", action="store_true", help="serve over NBD (instead of the blk ring)")
    p.add_argument("--blk", action="store_true", help="with --nbd: also serve over the blk ring")
    p.add_argument("--host-store", help="host store directory for the blk ring")
    p.add_argument("--xen", action="store_true",
                   help="serve one disk as a Xen vbd to --frontend-domid (run in the backend "
                        "domain once the toolstack created the device); attach from the "
                        "frontend domain with 'disk cp xen://BACKEND_DOMID/DEVID ...'")
    p.add_argument("--frontend-domid", type=int, metavar="D", help="with --xen: the frontend")
    p.add_argument("--devid", type=int, default=51712, metavar="N",
                   help="with --xen: the vbd's device id (default 51712, xvda)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--listen", metavar="ADDR", type=parse_listen,
                       help="host:port, tcp:host:port or unix:/path")
    where.add_argument("--stdio", action="store_true",
                       help="serve one client on stdin/stdout (inetd style)")
    p.add_argument("--tls", choices=TLS_MODES, default="off",
                   help="off, optional or required (needs --tls-cert and --tls-key)")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-ca", help="CA for client certificates (makes them required)")
    p.add_argument("--handshake-timeout", type=_positive_float, default=HANDSHAKE_TIMEOUT,
                   metavar="SECONDS", help="NBD: drop a client that has not finished the "
                   f"option phase after this long (default {HANDSHAKE_TIMEOUT:g})")
    p.add_argument("--max-connections", type=_positive_int, default=MAX_CONNECTIONS,
                   metavar="N", help="NBD: open connections at once; more are closed at "
                   f"once (default {MAX_CONNECTIONS})")
    p.add_argument("--zeroconf", metavar="ADDRS", type=_zeroconf_arg, default=None,
                   help="NBD over TCP: advertise SERVICE.nbd by DNS-SD on these interface "
                        "addresses (comma-separated), 'all' or 'off' (default: "
                        "$MESHLINK_ZEROCONF, unset = off)")
    add_daemon_options(p)
    add_verbose(p)
    p.set_defaults(func=_cmd_serve, serve_parser=p)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _zeroconf_arg(value: str) -> ZeroconfConfig | bool:
    from resolver import ZeroconfConfig

    if value.lower() in ("off", "no", "0"):
        return False
    if value.lower() in ("all", "on", "1"):
        return True
    return ZeroconfConfig(tuple(v.strip() for v in value.split(",") if v.strip()))


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="show a served disk's size and capabilities",
                       description="Open a served disk (SERVICE/DISK over the blk ring, or "
                                   "an NBD URI) and print what the server advertises.")
    p.add_argument("url", help="SERVICE/DISK (blk ring), nbd://host[:port]/name, "
                               "nbd+unix:///name?socket=PATH, or nbds:// forms")
    p.add_argument("--host-store", help="host store directory for the blk ring")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tls-ca", help="CA to verify the server (nbds)")
    p.add_argument("--tls-cert", help="client certificate (PEM)")
    p.add_argument("--tls-key", help="client key (PEM)")
    p.set_defaults(func=_cmd_info)


def _add_cp(sub: Any) -> None:
    p = sub.add_parser("cp", help="copy between files and served disks",
                       description="Copy SRC to DST, each a local file or a served disk: "
                                   "blk://SERVICE/DISK (or SERVICE/DISK when no such file "
                                   "exists) over the blk ring, xen://BACKEND_DOMID/DEVID (a "
                                   "Xen vbd, from the frontend domain), or an nbd:// URI.  "
                                   "Shows a "
                                   "progress bar on stderr and the throughput at the end.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--host-store", help="host store directory for the blk ring")
    p.add_argument("--block-size", type=parse_block_size, default=4 << 20,
                   help="bytes per request batch (default 4M)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_cp)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``serve``, ``info`` and ``cp`` to a parser (``meshlink disk`` or standalone)."""
    parser.description = "Serve, inspect or copy disks over the blk ring or NBD."
    sub = parser.add_subparsers(dest="disk_command", metavar="{serve,info,cp}", required=True)
    _add_serve(sub)
    _add_info(sub)
    _add_cp(sub)


def add_disk_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``disk serve|info|cp`` under an argparse subparsers object.

    Returns:
        The ``disk`` parser.
    """
    return add_group(subparsers, "disk")


def _ignored_option(args: argparse.Namespace, specs: Sequence[DiskSpec]) -> str | None:
    """Why an option given to ``serve`` would be ignored by the chosen front ends, or None."""
    nbd_only = {"--listen": args.listen, "--stdio": args.stdio, "--tls": args.tls != "off",
                "--tls-cert": args.tls_cert, "--tls-key": args.tls_key,
                "--tls-ca": args.tls_ca,
                "--description": any(spec.description for spec in specs)}
    for flag, given in nbd_only.items():
        if given and not args.nbd:
            return f"{flag} applies to NBD only: add --nbd (and --blk to keep the blk ring)"
    if args.host_store and args.nbd and not args.blk:
        return "--host-store applies to the blk ring only: add --blk to serve it too"
    if args.tls == "off" and (args.tls_cert or args.tls_key or args.tls_ca):
        return "--tls-cert/--tls-key/--tls-ca need --tls optional or --tls required"
    return None


_SINGLE_DISK_FLAGS = ("backend", "path", "size", "shrink", "overlay", "overlay_reset",
                      "read_only", "description")


def _disk_specs(args: argparse.Namespace) -> list[DiskSpec]:
    """The disks to serve: every ``--disk``, or the one of the single-disk flags."""
    if args.disk:
        given = [f"--{f.replace('_', '-')}" for f in _SINGLE_DISK_FLAGS if getattr(args, f)]
        if given:
            args.serve_parser.error(f"{', '.join(given)} describe the one disk of the "
                                    f"single-disk form: with --disk, put each disk's options "
                                    f"in its --disk (e.g. data:file:path=d.img,read-only)")
        if "/" in args.name:
            args.serve_parser.error(f"with --disk, NAME is the SERVICE alone, not "
                                    f"{args.name!r}: the disks are named by --disk")
        duplicate = check_unique(args.disk)
        if duplicate is not None:
            args.serve_parser.error(duplicate)
        return list(args.disk)
    if not args.backend:
        args.serve_parser.error("give --backend (one disk) or --disk NAME:BACKEND[:OPTIONS] "
                                "(repeatable)")
    disk_name = args.name.partition("/")[2] or "disk0"
    return [DiskSpec(disk_name, args.backend, args.path, args.size, args.shrink, args.overlay,
                     args.overlay_reset, args.read_only, args.description)]


def _zeroconf(args: argparse.Namespace, service: str) -> ZeroconfConfig | None:
    """The zeroconf config to advertise ``SERVICE.nbd`` with, or None (usage errors exit 2)."""
    from resolver import ResolverError, validate_service_name

    from ..disk.advertise import NBD_NAME_SUFFIX, zeroconf_config

    zc, explicit = zeroconf_config(args.zeroconf)
    if zc is None:
        return None
    why = ("it advertises NBD endpoints: add --nbd" if not args.nbd else
           "--stdio has no endpoint to advertise" if args.stdio else
           "Unix sockets are not advertised"
           if args.listen and args.listen.startswith("unix:") else None)
    if why is not None:
        if explicit:
            args.serve_parser.error(f"--zeroconf: {why}")
        logging.getLogger("meshlink.disk").info("$MESHLINK_ZEROCONF set, but not "
                                                "advertising: %s", why)
        return None
    try:
        validate_service_name(service + NBD_NAME_SUFFIX)
    except ResolverError as exc:
        args.serve_parser.error(f"--zeroconf: {exc}")
    return zc


def _open_backends(args: argparse.Namespace, specs: Sequence[DiskSpec]) -> dict[str, Backend]:
    """Open every disk's backend, or none: those already open are closed on a failure."""
    def label(spec: DiskSpec) -> str:
        return f"disk {spec.name!r}: " if args.disk else ""

    backends: dict[str, Backend] = {}
    try:
        for spec in specs:
            try:
                backends[spec.name] = open_backend(
                    spec.backend, path=spec.path, size=spec.size, read_only=spec.read_only,
                    overlay_path=spec.overlay, shrink=spec.shrink, reset=spec.overlay_reset)
            except LocalProtocolError as exc:  # refused by what is on disk: usage
                args.serve_parser.error(f"{label(spec)}cannot open the {spec.backend} "
                                        f"backend: {exc}")
            except MeshlinkError as exc:
                raise CommandFailed(f"{label(spec)}cannot open the {spec.backend} "
                                    f"backend: {exc}") from exc
    except BaseException:
        for backend in backends.values():
            backend.close()
        raise
    return backends


def _cmd_serve_xen(args: argparse.Namespace, specs: Sequence[DiskSpec]) -> int:
    import trio

    from ..disk.blk.xen import serve_xen_blk

    if args.frontend_domid is None or args.nbd or len(specs) != 1:
        args.serve_parser.error("--xen serves one disk (no --nbd) and needs --frontend-domid")
    backends = _open_backends(args, specs)
    try:
        async def run() -> None:
            async with trio.open_nursery() as n:
                paths = await n.start(serve_xen_blk, next(iter(backends.values())),
                                      args.frontend_domid, args.devid)
                print(f"ready xen:{paths.backend}", flush=True)
        trio.run(run)
        return 0
    finally:
        for backend in backends.values():
            backend.close()


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.xen:
        return _cmd_serve_xen(args, _disk_specs(args))
    if args.blk and not args.nbd:
        raise CommandFailed("--blk is the default; combine it only with --nbd")
    # Usage errors (exit 2), all found before anything is opened or created.
    specs = _disk_specs(args)
    ignored = _ignored_option(args, specs)
    if ignored is not None:
        args.serve_parser.error(ignored)
    for spec in specs:
        try:
            check_options(spec.backend, path=spec.path, size=spec.size,
                          read_only=spec.read_only, overlay_path=spec.overlay,
                          shrink=spec.shrink, reset=spec.overlay_reset)
        except LocalProtocolError as exc:
            args.serve_parser.error(f"disk {spec.name!r}: {exc}" if args.disk else str(exc))
    service = args.name.partition("/")[0]
    # Zeroconf is decided (and its usage errors given) only when asked for:
    # deciding imports the advertiser, which the trio-free path must not.
    asked = args.zeroconf is not None or os.environ.get("MESHLINK_ZEROCONF")
    args.zc = _zeroconf(args, service) if asked else None
    ssl_context = _tls_context(args)
    # The export is the whole NAME only for the one disk served over NBD
    # alone and not advertised: otherwise clients ask for SERVICE/DISK's DISK.
    whole = not args.disk and args.nbd and not args.blk and args.zc is None
    args.exports = [args.name] if whole else [spec.name for spec in specs]
    args.service = service
    args.daemon = daemon = Daemon.from_args(args)
    if not daemon.start():
        return 0  # --exit-with-parent, and the parent is already gone
    backends = _open_backends(args, specs)
    try:
        args.blk_disks = backends if (args.blk or not args.nbd) else None
        why = trio_needed(args, backends)
        if why is None:
            return serve_sync(args, specs, backends)
        logging.getLogger("meshlink.disk").info("serving on trio: %s", why)
        return _serve_on_trio(args, specs, backends, ssl_context)
    except KeyboardInterrupt:  # Ctrl-C before a handler is in: still a clean stop
        return 0
    finally:
        daemon.close()
        for backend in backends.values():
            backend.close()


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context (None when ``--tls off``); sets ``args.fingerprint``."""
    args.fingerprint = None
    if args.tls == "off":
        return None
    from ..disk.nbd import server_ssl_context
    from ..transport.tls import TLSConfig

    if not (args.tls_cert and args.tls_key):
        raise CommandFailed("--tls optional/required needs --tls-cert and --tls-key")
    try:
        context = server_ssl_context(args.tls_cert, args.tls_key, args.tls_ca)
        args.fingerprint = TLSConfig(args.tls_cert).fingerprint()
    except MeshlinkError as exc:
        raise CommandFailed(f"cannot load TLS files: {exc}") from exc
    return context


def _serve_on_trio(args: argparse.Namespace, specs: Sequence[DiskSpec],
                   backends: dict[str, Backend], ssl_context: ssl.SSLContext | None) -> int:
    """``serve`` on trio: every option (see :mod:`._serve_sync` for the other path)."""
    import trio

    from ..disk.nbd import Export, NBDServer
    from ._serve_trio import serve_trio

    server = NBDServer([Export(export, backends[spec.name], spec.description, spec.read_only)
                        for export, spec in zip(args.exports, specs, strict=True)],
                       tls=args.tls, ssl_context=ssl_context,
                       handshake_timeout=args.handshake_timeout,
                       max_connections=args.max_connections)
    return trio.run(serve_trio, server, args)


def _is_nbd(url: str) -> bool:
    return url.startswith(("nbd://", "nbds://", "nbd+unix://", "nbds+unix://"))


def _cmd_info(args: argparse.Namespace) -> int:
    import trio

    if not _is_nbd(args.url):
        try:
            info = trio.run(_blk_info, args.url.removeprefix("blk://"), args.host_store)
        except ValueError as exc:  # a malformed SERVICE/DISK
            raise CommandFailed(str(exc)) from exc
        _print_info(info, args.json)
        return 0
    ctx: ssl.SSLContext | None = None
    if args.url.startswith("nbds"):
        import ssl

        ctx = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        info = trio.run(_info, args.url, ctx)
    except ValueError as exc:  # a malformed URI
        raise CommandFailed(str(exc)) from exc
    _print_info(info, args.json)
    return 0


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        import json  # here: `disk serve` must not pay for it at start-up

        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")


async def _blk_info(target: str, host_store: str | None) -> dict[str, Any]:
    from ..disk.blk import open_blk

    async with open_blk(target, host_store=host_store) as disk:
        return {"disk": target, "transport": "blk ring", "size": disk.size,
                "sector_size": disk.sector_size, "read_only": disk.read_only,
                "ring_entries": disk.ring_entries, **{f"can_{k}": v for k, v in
                                                      disk.features.items()}}


# --- cp ----------------------------------------------------------------------


class _FileSide:
    """A local file as one side of ``disk cp``."""

    def __init__(self, path: str, write: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT if write else os.O_RDONLY
        self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        self.size = os.fstat(self.fd).st_size

    async def read(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    async def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    async def finish(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        os.fsync(self.fd)
        os.close(self.fd)


def _is_served(spec: str) -> bool:
    if spec.startswith(("blk://", "xen://")) or _is_nbd(spec):
        return True
    return (spec.count("/") == 1 and not spec.startswith((".", "/"))
            and not os.path.exists(spec))


@contextlib.asynccontextmanager
async def _open_side(spec: str, write: bool, host_store: str | None
                     ) -> AsyncIterator[tuple[Any, int]]:
    if _is_nbd(spec):
        from ..disk.nbd import open_nbd  # the client: not loaded to serve

        async with open_nbd(spec) as nbd_disk:
            yield nbd_disk, nbd_disk.size
    elif spec.startswith("xen://"):
        from ..disk.blk.xen import open_xen_blk

        dom, _, dev = spec.removeprefix("xen://").partition("/")
        if not dom.isdigit() or not dev.isdigit():
            raise CommandFailed(f"{spec!r}: expected xen://BACKEND_DOMID/DEVID")
        async with open_xen_blk(int(dom), int(dev)) as xen_disk:
            yield xen_disk, xen_disk.size
    elif _is_served(spec):
        from ..disk.blk import open_blk

        async with open_blk(spec.removeprefix("blk://"), host_store=host_store) as blk_disk:
            yield blk_disk, blk_disk.size
    else:
        side = _FileSide(spec, write)
        try:
            yield side, side.size
        finally:
            if not write:
                os.close(side.fd)


def _bar(done: int, total: int, started: float) -> str:
    width = 30
    frac = done / total if total else 1.0
    rate = done / max(time.perf_counter() - started, 1e-9) / (1 << 20)
    filled = int(frac * width)
    return (f"\r[{'#' * filled}{' ' * (width - filled)}] {frac * 100:5.1f}% "
            f"{done >> 20}/{total >> 20} MiB {rate:8.1f} MiB/s")


async def _copy(args: argparse.Namespace) -> tuple[int, float]:
    async with contextlib.AsyncExitStack() as stack:
        src, size = await stack.enter_async_context(_open_side(args.src, False, args.host_store))
        dst, dst_size = await stack.enter_async_context(_open_side(args.dst, True,
                                                                   args.host_store))
        if not isinstance(dst, _FileSide) and dst_size < size:
            raise MeshlinkError(f"{args.dst} holds {dst_size} bytes, {args.src} has {size}")
        show = not args.quiet
        started = time.perf_counter()
        offset = 0
        last_shown = 0.0
        while offset < size:
            n = min(args.block_size, size - offset)
            data = await src.read(offset, n)
            if len(data) != n:
                raise MeshlinkError(f"short read from {args.src} at {offset}")
            await dst.write(offset, data)
            offset += n
            now = time.perf_counter()
            if show and (now - last_shown > 0.1 or offset == size):
                print(_bar(offset, size, started), end="", file=sys.stderr, flush=True)
                last_shown = now
        if isinstance(dst, _FileSide):
            await dst.finish(size)
        else:
            await dst.flush()
        elapsed = time.perf_counter() - started
        if show:
            print(file=sys.stderr)
        return size, elapsed


def _cmd_cp(args: argparse.Namespace) -> int:
    import trio

    try:
        size, elapsed = trio.run(_copy, args)
    except ValueError as exc:  # a malformed disk spec
        raise CommandFailed(str(exc)) from exc
    print(f"copied {size} bytes in {elapsed:.2f} s "
          f"({size / max(elapsed, 1e-9) / (1 << 20):.1f} MiB/s)", file=sys.stderr)
    return 0


def _flag_names() -> list[tuple[int, str]]:
    """``disk info``'s name for each transmission flag (wire is loaded when asked for)."""
    from ..disk.nbd import wire as c

    return [(c.TF_READ_ONLY, "read_only"), (c.TF_SEND_FLUSH, "can_flush"),
            (c.TF_SEND_FUA, "can_fua"), (c.TF_SEND_TRIM, "can_trim"),
            (c.TF_SEND_WRITE_ZEROES, "can_zero"), (c.TF_SEND_FAST_ZERO, "can_fast_zero"),
            (c.TF_SEND_DF, "can_df"), (c.TF_CAN_MULTI_CONN, "can_multi_conn"),
            (c.TF_SEND_CACHE, "can_cache"), (c.TF_ROTATIONAL, "rotational")]


async def _info(url: str, ctx: ssl.SSLContext | None) -> dict[str, Any]:
    from ..disk.nbd import open_nbd  # the client: not loaded to serve

    async with open_nbd(url, ssl_context=ctx) as disk:
        info = disk.info
        out: dict[str, Any] = {"export": info.name, "size": info.size,
                               "structured_replies": info.structured,
                               "contexts": sorted(info.contexts.values())}
        for flag, name in _flag_names():
            out[name] = bool(info.flags & flag)
        out.update(block_size_minimum=info.min_block,
                   block_size_preferred=info.preferred_block,
                   block_size_maximum=info.max_block)
        if info.description:
            out["description"] = info.description
        return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshlink.disk serve|info|cp ...``: this group as a command of its own.

    Returns:
        The process exit code.
    """
    return run_group("disk", "python -m meshlink.disk", argv)
