"""The capitalising echo service ("hello from dom0" -> "HELLO FROM DOM0").

Serves one name with ``meshlink.serve``: vchan through the host store for
co-located clients, TLS (when certificates are given) for the others, and
plain TCP (unauthenticated) only with ``--tcp``.  SIGTERM or Ctrl-C withdraws
every registration.

    python3 examples/cluster/echo/server.py NAME [--host-store DIR]
        [--tls-cert PEM --tls-ca PEM] [--require-tls | --tcp]

TLS files may also come from MESHLINK_TLS_CERT / MESHLINK_TLS_KEY / MESHLINK_TLS_CA.
"""

from __future__ import annotations

import argparse
from functools import partial

import trio

import meshlink
from meshlink.bus import Handlers
from meshlink.transport.tls import TLSConfig

handlers = Handlers()


@handlers.method
async def echo(line: str) -> str:
    return line.upper()


async def main(args: argparse.Namespace) -> None:
    tls = TLSConfig.from_env(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(
                meshlink.serve, args.name, handlers, host_store=args.host_store, tls=tls,
                require_tls=args.require_tls, allow_plaintext=args.tcp))
            print(f"echo server {args.name!r}: "
                  + " ".join(ep.url for ep in server.endpoints), flush=True)
    except KeyboardInterrupt:
        pass  # deliberate: Ctrl-C; serve has already withdrawn everything


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="capitalising echo service (meshlink.serve)")
    p.add_argument("name")
    p.add_argument("--host-store", default=None)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca")
    p.add_argument("--require-tls", action="store_true")
    p.add_argument("--tcp", action="store_true", help="also serve plain TCP (no authentication)")
    trio.run(main, p.parse_args())
