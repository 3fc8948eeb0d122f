"""A hostile vchan client: handshakes properly, then corrupts the control page.

Usage: vchan_hostile.py STORE SERVICE MODE

Modes (offsets from docs/vchan.md section 1):
  prod   left.prod jumps far beyond left.cons (data count above ring size)
  cons   right.cons jumps ahead of right.prod (server's write ring corrupt)
  order  left_order becomes 30 (out of range)
  live   cli_live becomes 0x5a (not a live value)
After corrupting it signals the server's eventfd, prints "done", and waits
for stdin to close, holding the connection open (so only the corruption,
not a crashed peer, can explain an error on the server).
"""

from __future__ import annotations

import array
import json
import mmap
import os
import socket
import struct
import sys


def main() -> None:
    store, service, mode = sys.argv[1:4]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(store, service + ".sock"))
    hello = json.dumps({"meshlink": "vchan", "version": 1, "read_min": 65536,
                        "write_min": 65536}).encode()
    s.sendall(struct.pack(">I", len(hello)) + hello)
    data, anc, _, _ = s.recvmsg(8192, socket.CMSG_SPACE(12))
    fds = array.array("i")
    for _level, _kind, payload in anc:
        fds.frombytes(payload)
    memfd, _own, peer = fds
    page = mmap.mmap(memfd, 4096)
    if mode == "prod":
        cons = struct.unpack_from("<I", page, 0)[0]
        struct.pack_into("<I", page, 4, (cons + 0x10000000) & 0xFFFFFFFF)
    elif mode == "cons":
        prod = struct.unpack_from("<I", page, 12)[0]
        struct.pack_into("<I", page, 8, (prod + 12345) & 0xFFFFFFFF)
    elif mode == "order":
        struct.pack_into("<H", page, 16, 30)
    elif mode == "live":
        page[20] = 0x5A
    else:
        raise SystemExit(f"unknown mode {mode}")
    os.write(peer, struct.pack("<Q", 1))
    print("done", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
