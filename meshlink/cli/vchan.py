"""``meshlink vchan server|client``: a vchan end on stdin/stdout, like Xen's xencat.

Copies standard input into the channel and the channel to standard output
until both have ended: when standard input ends, our side of the channel is
half-closed (the peer reads EOF) and we keep printing what the peer sends
until it closes.  A libxenvchan peer stops reading once it closes (and stops
writing once we half-close); input we cannot deliver is an error.  So any
vchan peer (libxenvchan's vchan-node1/xencat, MirageOS, another meshlink)
can be exercised by hand::

    meshlink vchan server --domid 5 --path data/vchan/5/demo   # in dom0
    meshlink vchan client --domid 0 --path demo                 # in dom5

``--domid`` is always the *other* end's domain.  ``--path`` is read as
libxenvchan reads it: an absolute XenStore path as is, a relative one
(``data/vchan/5/demo``) under our own ``/local/domain/<self>``, and a single
word as a port name under the conventional
``/local/domain/<server>/data/vchan/<client>/<port>``.  The provider is Xen
when ``/dev/xen`` exists (or ``--xen`` / ``MESHLINK_PROVIDER=xen``), else
local; ``--local`` maps the path onto a host-store service name
(``vchan-<path>``) so the same commands work between two processes here.

Also runnable as ``python -m meshlink.cli.vchan server|client ...``; entry,
exit codes and error messages are :mod:`._app`'s.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import trio

from ..errors import ServiceNotFound
from ..transport.vchan import (
    DEFAULT_RING_SIZE,
    MAX_RING_SIZE,
    connect_vchan,
    open_vchan_listener,
)
from ..transport.vchan.xen import connect_xen_vchan, open_xen_vchan_server, select_provider
from ._app import add_group, run_group

__all__ = ["add_vchan_commands", "configure", "local_service_name", "main"]

_CHUNK = 1 << 16


def local_service_name(path: str) -> str:
    """The host-store service name ``--local`` uses for a vchan path."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.strip("/")) or "default"
    return ("vchan-" + name)[:128]


def _size(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= MAX_RING_SIZE:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_RING_SIZE}]")
    return value


def _domid(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a domain id: {text!r}") from None
    if not 0 <= value < 0x7FF0:
        raise argparse.ArgumentTypeError("domain ids are 0..32751")
    return value


def _add_common(p: argparse.ArgumentParser, role: str) -> None:
    other = "client" if role == "server" else "server"
    p.add_argument("--domid", type=_domid, required=True,
                   help=f"domain id of the {other} (the other end)")
    p.add_argument("--path", required=True,
                   help="XenStore path of the channel: absolute, relative to "
                        "/local/domain/<self> (as libxenvchan reads it), or one word: a "
                        "port name under /local/domain/<server>/data/vchan/<client>/")
    prov = p.add_mutually_exclusive_group()
    prov.add_argument("--xen", dest="provider", action="store_const", const="xen",
                      help="use Xen grants, event channels and XenStore (fail if absent)")
    prov.add_argument("--local", dest="provider", action="store_const", const="local",
                      help="use the local provider through the host store")
    p.add_argument("--host-store", metavar="DIR",
                   help="host store directory for --local (default: see resolver.hoststore)")
    p.set_defaults(func=_cmd, role=role)


def _add_roles(sub: Any) -> None:
    p = sub.add_parser("server", help="share a vchan with a domain and wait for it",
                       description="Publish a vchan for --domid at --path, wait for the "
                                   "client, then copy stdin to it and it to stdout.")
    _add_common(p, "server")
    p.add_argument("--read-min", type=_size, default=DEFAULT_RING_SIZE,
                   help="minimum size of the ring we read (bytes, <= 1 MiB)")
    p.add_argument("--write-min", type=_size, default=DEFAULT_RING_SIZE,
                   help="minimum size of the ring we write (bytes, <= 1 MiB)")
    p = sub.add_parser("client", help="connect to a domain's vchan",
                       description="Connect to the vchan --domid published at --path, then "
                                   "copy stdin to it and it to stdout.")
    _add_common(p, "client")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="keep trying this long while the server is not there yet")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``server`` and ``client`` to a parser (``meshlink vchan`` or standalone)."""
    parser.description = __doc__.split("\n\n")[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="vchan_role", metavar="{server,client}", required=True)
    _add_roles(sub)


def add_vchan_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``vchan server|client`` under an argparse subparsers object.

    Returns:
        The ``vchan`` parser.
    """
    return add_group(subparsers, "vchan")


async def _open(args: argparse.Namespace, provider: str) -> trio.abc.HalfCloseableStream:
    if provider == "xen":
        if args.role == "server":
            return await open_xen_vchan_server(args.domid, args.path, read_min=args.read_min,
                                               write_min=args.write_min)
        return await _retry(args, lambda: connect_xen_vchan(args.domid, args.path))
    name = local_service_name(args.path)
    if args.role == "server":
        listener = await open_vchan_listener(name, host_store=args.host_store,
                                             read_min=args.read_min, write_min=args.write_min)
        try:
            return await listener.accept()
        finally:
            await listener.aclose()
    return await _retry(args, lambda: connect_vchan(name, host_store=args.host_store))


async def _retry(args: argparse.Namespace, connect: Any) -> trio.abc.HalfCloseableStream:
    deadline = trio.current_time() + args.wait
    while True:
        try:
            stream: trio.abc.HalfCloseableStream = await connect()
            return stream
        except ServiceNotFound:
            if trio.current_time() >= deadline:
                raise
        await trio.sleep(0.05)


def _write_out(data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = os.write(1, view)
        view = view[n:]


async def _copy(stream: trio.abc.HalfCloseableStream) -> None:
    async with trio.open_nursery() as nursery:

        async def stdin_to_channel() -> None:
            while True:
                data = await trio.to_thread.run_sync(os.read, 0, _CHUNK, abandon_on_cancel=True)
                if not data:
                    await stream.send_eof()
                    return
                await stream.send_all(data)

        nursery.start_soon(stdin_to_channel)
        while data := await stream.receive_some(_CHUNK):
            await trio.to_thread.run_sync(_write_out, data)
        # The peer sent EOF; it may still be reading (a meshlink peer
        # half-closes), so the rest of stdin still goes to it.


async def _run(args: argparse.Namespace) -> None:
    provider = select_provider(args.provider)
    stream = await _open(args, provider)
    try:
        await _copy(stream)
    finally:
        await stream.aclose()


def _cmd(args: argparse.Namespace) -> int:
    trio.run(_run, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m meshlink.cli.vchan server|client ...``; returns the exit code."""
    return run_group("vchan", "python -m meshlink.cli.vchan", argv)


if __name__ == "__main__":
    sys.exit(main())
