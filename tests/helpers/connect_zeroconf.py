"""Zeroconf peer for the tests, run inside a network namespace.

Usage:
    connect_zeroconf.py register IFADDR NAME HOSTID TLSPORT   prints "ready", withdraws
                                                              when stdin closes, prints "gone"
    connect_zeroconf.py lookup IFADDR NAME                    prints the endpoints as JSON
    connect_zeroconf.py browse IFADDR                         prints every service as JSON
"""

from __future__ import annotations

import json
import sys

import trio

from resolver.zeroconf import Advertisement, ZeroconfConfig, browse, lookup, register


async def main(argv: list[str]) -> None:
    mode, ifaddr = argv[0], argv[1]
    cfg = ZeroconfConfig((ifaddr,), timeout=2.0)
    if mode == "register":
        name, host_id, port = argv[2], argv[3], int(argv[4])
        ad = Advertisement(name, host_id, ("vchan", "tls"), (ifaddr,), tls_port=port,
                           fingerprint="ab" * 32)
        reg = await register(ad, cfg)
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        await reg.withdraw()
        print("gone", flush=True)
    elif mode == "lookup":
        ads = await lookup(argv[2], cfg)
        print(json.dumps([{"url": ep.url, "host_id": ep.host_id, "fp": ep.fingerprint}
                          for ad in ads for ep in ad.endpoints()]))
    else:
        ads = await browse(cfg)
        print(json.dumps([{"name": ad.name, "transports": list(ad.transports),
                           "addresses": list(ad.addresses), "tls": ad.tls_port}
                          for ad in ads]))


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
