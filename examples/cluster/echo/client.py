"""Client of the echo service: connects by name, sends each argument, prints replies.

    python3 examples/cluster/echo/client.py NAME "hello from dom0" [...]
        [--host-store DIR] [--tls-cert PEM --tls-ca PEM] [--require-tls] [--no-vchan]
        [--blocking]

``meshlink.connect`` picks vchan when the server is co-located, TLS or TCP
otherwise; each reply line starts with the transport it used.  With
``--blocking`` the same calls go through ``meshlink.connect_blocking``:
plain functions, no trio.
"""

from __future__ import annotations

import argparse

import trio

import meshlink
from meshlink.transport.tls import TLSConfig


async def main(args: argparse.Namespace) -> None:
    tls = TLSConfig.from_env(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    async with meshlink.connect(args.name, host_store=args.host_store, tls=tls,
                                require_tls=args.require_tls,
                                forbid_vchan=args.no_vchan) as conn:
        for line in args.lines:
            reply = await conn.call("echo", line)
            print(f"[{conn.transport}] {line!r} -> {reply!r}", flush=True)


def main_blocking(args: argparse.Namespace) -> None:
    tls = TLSConfig.from_env(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    with meshlink.connect_blocking(args.name, host_store=args.host_store, tls=tls,
                                   require_tls=args.require_tls,
                                   forbid_vchan=args.no_vchan) as conn:
        for line in args.lines:
            reply = conn.call("echo", line)
            print(f"[{conn.transport}] {line!r} -> {reply!r}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="client of the capitalising echo service")
    p.add_argument("name")
    p.add_argument("lines", nargs="+")
    p.add_argument("--host-store", default=None)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca")
    p.add_argument("--require-tls", action="store_true", help="never plain TCP")
    p.add_argument("--no-vchan", action="store_true", help="never shared memory")
    p.add_argument("--blocking", action="store_true",
                   help="use meshlink.connect_blocking (no trio) instead of meshlink.connect")
    args = p.parse_args()
    if args.blocking:
        main_blocking(args)
    else:
        trio.run(main, args)
