#!/usr/bin/env python3
"""Write the seed corpora for the fuzz targets (valid traffic, a few edges).

Usage: gen_corpus.py [OUTDIR]   (default: native/fuzz/corpus)

The seeds are small, hand-built inputs in each target's input format (see
the comment at the top of vchan_fuzz.c, blk_fuzz.c and ivshmem_fuzz.c): an honest peer's
control page followed by ordinary traffic, so the fuzzer starts from states
where the ring is actually used, and mutates from there.  Re-running this
script rewrites the same files byte for byte.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

# ---- vchan_fuzz ops (keep in step with run_ops in vchan_fuzz.c) ----------
READ, WRITE, RECV, SEND, READY, SPACE, ARM_R, ARM_W, PEEK, LIVE, CLOSE, NOTIFY = range(12)
P_JUMP_PROD, P_JUMP_CONS, P_PRODUCE, P_CONSUME, P_SCRIBBLE, P_NOTIFY, P_LIVE, P_ORDERS = range(
    12, 20
)
P_POKE, BURST = 20, 21


def ln(n: int) -> bytes:
    """take_len encoding: small, u16 or u32."""
    if n < 256:
        return bytes([0x00, n])
    if n < 65536:
        return bytes([0x40]) + struct.pack("<H", n)
    return bytes([0xC0]) + struct.pack("<I", n)


def hdr(lo: int, ro: int, lcons=0, lprod=0, rcons=0, rprod=0, cli_live=1, srv_live=1,
        cli_notify=0, srv_notify=1) -> bytes:
    return struct.pack("<IIIIHHBBBB", lcons, lprod, rcons, rprod, lo, ro, cli_live, srv_live,
                       cli_notify, srv_notify)


def heap(h: bytes, server: bool, real_layout: bool, ops: bytes, own_r=0, own_w=0,
         fill=0x5A) -> bytes:
    flags = (1 if server else 0) | (2 if real_layout else 0)
    return h + bytes([flags, fill]) + struct.pack("<II", own_r, own_w) + ops


def traffic(rsize: int, wsize: int) -> bytes:
    """A peer that produces and consumes honestly; we read, write, arm."""
    ops = b""
    ops += bytes([ARM_R])
    ops += bytes([P_PRODUCE]) + ln(100) + b"\x01"
    ops += bytes([READY, READ]) + ln(60) + bytes([PEEK, 1])
    ops += bytes([P_PRODUCE]) + ln(rsize) + b"\x07"  # fill the ring
    ops += bytes([RECV]) + ln(rsize // 2) + bytes([READ]) + ln(rsize)
    ops += bytes([WRITE]) + ln(wsize - 3) + bytes([SPACE, ARM_W])
    ops += bytes([P_CONSUME]) + ln(wsize) + bytes([SEND]) + ln(wsize)
    ops += bytes([P_NOTIFY, 3, 3]) + bytes([P_CONSUME]) + ln(wsize)
    ops += bytes([WRITE]) + ln(17) + bytes([P_PRODUCE]) + ln(9) + b"\x02" + bytes([READ]) + ln(9)
    ops += bytes([LIVE, BURST, NOTIFY, CLOSE, WRITE]) + ln(1) + bytes([READ]) + ln(1)
    return ops


def vchan_seeds() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    pairs = [(10, 11), (11, 10), (12, 12), (13, 13), (11, 14), (10, 12), (16, 16)]
    for lo, ro in pairs:
        for server in (True, False):
            rsize = 1 << (lo if server else ro)
            wsize = 1 << (ro if server else lo)
            name = f"traffic-{lo}-{ro}-{'srv' if server else 'cli'}"
            seeds[name] = heap(hdr(lo, ro), server, lo < 12 or ro < 12, traffic(rsize, wsize))
    # Indices near the u32 wrap: a transfer across 2^32.
    w = 0xFFFFFF00
    seeds["wrap-u32"] = heap(hdr(12, 12, lcons=w, lprod=w, rcons=w, rprod=w), True, False,
                             traffic(4096, 4096), own_r=w, own_w=w)
    # Hostile moves from an honest start.
    seeds["hostile-prod"] = heap(hdr(12, 13), True, False, bytes([P_JUMP_PROD]) +
                                 struct.pack("<I", 1 << 31) + bytes([READ]) + ln(10) +
                                 bytes([PEEK, 1, ARM_R]))
    seeds["hostile-cons"] = heap(hdr(12, 13), False, False, bytes([WRITE]) + ln(100) +
                                 bytes([P_JUMP_CONS]) + struct.pack("<I", 0xFFFFFFFF) +
                                 bytes([WRITE]) + ln(10) + bytes([SPACE, ARM_W]))
    seeds["hostile-orders"] = heap(hdr(11, 10), True, True, bytes([P_ORDERS, 1]) +
                                   struct.pack("<HH", 21, 9) + bytes([READY, SPACE, P_ORDERS, 0,
                                                                      READY]))
    seeds["hostile-scribble"] = heap(hdr(12, 12), True, False, bytes([P_SCRIBBLE]) +
                                     struct.pack("<II", 77, 99) + bytes([P_PRODUCE]) + ln(5) +
                                     b"\x00" + bytes([READ]) + ln(5) + bytes([P_LIVE, 9, 9, LIVE]))
    # The real client constructor over a memfd: orders 12/12, refs 1 and 2.
    memfd = hdr(12, 12) + bytes([4, 2, 2, 1, 2]) + traffic(4096, 4096)
    seeds["memfd-12-12"] = memfd
    seeds["memfd-10-11"] = hdr(10, 11) + bytes([4, 0, 0]) + traffic(2048, 1024)
    seeds["memfd-bad-ref"] = hdr(12, 13) + bytes([4, 3, 3, 0x81]) + struct.pack("<I", 1 << 31) + \
        bytes([1, 2])
    return seeds


# ---- blk_fuzz (keep in step with LLVMFuzzerTestOneInput in blk_fuzz.c) ----
F_REQ, F_RAW, F_PROD, F_EVENT, B_SERVE = 0, 2, 3, 4, 5
B_STEP, B_PUT_HELD, B_PUSH, B_FINAL, F_SEGPAGE = 6, 7, 8, 9, 10


def breq(op: int, segs: list[tuple[int, int, int]], rid: int, sector: int,
         discard: int | None = None) -> bytes:
    """A request in front_request's compact form; segs = (page, first, last)."""
    out = bytes([F_REQ, op, len(segs) if op != 5 else 0]) + struct.pack("<H", rid)
    out += bytes([sector]) if sector < 0x80 else b"\x80" + struct.pack("<Q", sector)
    if op == 5:
        return out + bytes([discard or 0])
    for page, first, last in segs:
        out += bytes([page])
        if first <= 7 and last <= 7:
            out += bytes([(first << 3) | last])
        else:
            out += bytes([0x80, first, last])
    return out


def blk_world(order: int, npages: int, sectors: int, ops: bytes, *, read_only=False,
              null=False, req_prod=0, rsp_prod=0) -> bytes:
    flags = (1 if read_only else 0) | (2 if null else 0)
    head = bytes([order, flags, npages, sectors, 0])
    head += struct.pack("<IIII", req_prod, 1, rsp_prod, 1)
    return head + ops


def blk_seeds() -> dict[str, bytes]:
    traffic = (
        breq(1, [(0, 0, 7), (1, 2, 5)], 1, 3)          # WRITE two segments
        + breq(0, [(2, 0, 7)], 2, 3)                   # READ it back
        + breq(3, [], 3, 0)                            # FLUSH
        + breq(5, [], 4, 8, discard=4)                 # DISCARD 4 sectors
        + breq(2, [], 5, 0)                            # empty WRITE_BARRIER
        + bytes([B_SERVE, B_FINAL])
        + breq(4, [], 6, 0)                            # unsupported op
        + breq(0, [(0, 3, 9)], 7, 0)                   # last_sect > 7
        + breq(0, [(0, 5, 2)], 8, 0)                   # first > last
        + breq(1, [(0, 0, 7)] * 11, 9, 0)              # eleven segments
        + breq(0, [(1, 0, 7)], 10, 63)                 # past the end of the disk
        + bytes([B_STEP, 0, B_STEP, 1, B_STEP, 0, B_PUT_HELD, 11, 0, B_PUSH, B_SERVE, B_FINAL])
    )
    # INDIRECT: a segment list of 3 in page 3, then a WRITE and a READ through it.
    seglist = bytes([F_SEGPAGE, 3, 3, 0, 0x07, 1, (1 << 3) | 6, 2, 0x00])
    indirect = (
        seglist
        + bytes([F_REQ, 6, 1]) + struct.pack("<H", 20) + bytes([4, 3, 3, 3])  # WRITE
        + bytes([F_REQ, 6, 0]) + struct.pack("<H", 21) + bytes([4, 3, 3, 3])  # READ
        + bytes([F_REQ, 6, 0]) + struct.pack("<H", 22) + bytes([4, 0x80, 0x00, 0x02, 3, 3])
        + bytes([B_SERVE, B_STEP, 0, B_FINAL])
    )
    seeds = {
        "traffic-order0": blk_world(0, 4, 64, traffic),
        "traffic-order2": blk_world(2, 8, 32, traffic),
        "traffic-readonly": blk_world(1, 3, 16, traffic, read_only=True),
        "traffic-null": blk_world(0, 4, 200, traffic, null=True),
        "wrap-u32": blk_world(0, 2, 64, traffic, req_prod=0xFFFFFFFE, rsp_prod=0xFFFFFFFE),
        "hostile-prod": blk_world(0, 2, 8, bytes([F_PROD]) + struct.pack("<I", 1 << 31) +
                                  bytes([B_SERVE, B_FINAL])),
        "full-ring": blk_world(0, 1, 8, breq(0, [(0, 0, 0)], 1, 0) * 33 + bytes([B_SERVE])),
        "bad-order": bytes([0x45]) + b"\x00" * 20,
        "indirect": blk_world(0, 4, 64, indirect),
    }
    return seeds


def ivshmem_seeds() -> dict[str, bytes]:
    """ivshmem_fuzz: a stamped region and a listener, then traffic and hostile patches."""

    def patch(off: int, data: bytes) -> bytes:
        return struct.pack("<HB", off, len(data)) + data

    phase = struct.pack("<HB", 0xFFFF, 0)
    # flags: stamp + listen, 16 pages; 2 slots; orders 12/12 (2 + 2 * 11 = 24).
    honest = bytes([1 | (14 << 1), 1, 24]) + phase + phase + phase + b"hello" * 8
    return {
        "honest": honest,
        "inpage-rings": bytes([1 | (2 << 1), 3, 0]) + phase + phase + phase + b"x" * 40,
        "bad-magic": bytes([1 | (4 << 1), 1, 24]) + patch(0, b"AAAAAAAA"),
        "slot-size-huge": bytes([1 | (4 << 1), 1, 24]) + patch(24, struct.pack("<Q", 1 << 40)),
        "ctrl-outside": bytes([1 | (14 << 1), 1, 24]) + phase
        + patch(128 + 16, struct.pack("<Q", 4096 * 15)),
        "scribble-prod": bytes([1 | (14 << 1), 1, 24]) + phase + phase
        + patch(4096 + 12, b"\xff\xff\xff\x7f") + phase + b"data" * 4,
        "raw": bytes([0, 0, 0]) + patch(0, b"MLLVSHM1"),
    }


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "native" / "fuzz" / "corpus"
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    targets = {"vchan_fuzz": vchan_seeds()}
    targets["blk_fuzz"] = blk_seeds()
    targets["ivshmem_fuzz"] = ivshmem_seeds()
    for target, seeds in targets.items():
        d = out / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (d / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds in {d}")


if __name__ == "__main__":
    main()
