"""Disk server and client for the zeroconf tests, each run inside a network namespace.

Usage:
    disk_zeroconf.py serve IFADDR STORE CERT CA   meshlink.disk.serve: disk0 over NBD with TLS
                                                  required on IFADDR, advertised as
                                                  storage-node.nbd; prints "ready", withdraws
                                                  when stdin closes, prints "gone"
    disk_zeroconf.py open IFADDR STORE CERT CA    meshlink.disk.open("storage-node/disk0")
                                                  found by zeroconf; writes, flushes, reads
                                                  back on a second connection; prints JSON
"""

from __future__ import annotations

import json
import os
import sys

import trio

from meshlink.disk import BlkDisk, MemoryBackend, TLSMode, serve
from meshlink.disk import open as open_disk
from meshlink.transport.tls import TLSConfig
from resolver import Policy, Resolver, ZeroconfConfig

NAME = "storage-node"


async def main(argv: list[str]) -> None:
    mode, ifaddr, store, cert, ca = argv
    zc = ZeroconfConfig((ifaddr,), timeout=5.0)
    if mode == "serve":
        tls = TLSConfig(cert, None, ca)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(
                {"disk0": MemoryBackend(4 << 20)}, f"{ifaddr}:0", service=NAME, blk=False,
                host_store=store, tls=TLSMode.REQUIRED, ssl_context=tls.server_context(),
                zeroconf=zc, fingerprint=tls.fingerprint(), task_status=task_status))
            print("ready", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()
        print("gone", flush=True)
        return
    tls = TLSConfig(cert, None, ca)
    choices = await Resolver(host_store=store, zeroconf=zc).resolve(
        NAME + ".nbd", Policy(require_tls=True, forbid_vchan=True))
    data = os.urandom(256 << 10)
    async with open_disk(f"{NAME}/disk0", host_store=store, zeroconf=zc, tls=tls) as disk:
        assert not isinstance(disk, BlkDisk)
        size = disk.size
        await disk.write(1 << 20, data)
        await disk.flush()
        same = await disk.read(1 << 20, len(data)) == data
    async with open_disk(f"{NAME}/disk0", host_store=store, zeroconf=zc, tls=tls) as disk:
        again = await disk.read(1 << 20, len(data)) == data
    print(json.dumps({"urls": [c.endpoint.url for c in choices], "size": size,
                      "same": same, "again": again}))


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
