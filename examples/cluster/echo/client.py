"""Client of the echo service: sends each argument as a line, prints replies.

    python3 examples/cluster/echo/client.py NAME "hello from dom0" [...] [--host-store DIR]
"""

from __future__ import annotations

import argparse

import trio

from meshlink.vchan import connect_vchan


async def main(name: str, lines: list[str], host_store: str | None) -> None:
    async with await connect_vchan(name, host_store=host_store) as stream:
        for line in lines:
            msg = (line + "\n").encode()
            await stream.send_all(msg)
            reply = b""
            while len(reply) < len(msg):
                reply += await stream.receive_some(len(msg) - len(reply))
            print(f"[vchan, ring {stream.write_size}/{stream.read_size} B] "
                  f"{line!r} -> {reply.decode().rstrip()!r}", flush=True)
        await stream.send_eof()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="client of the capitalising echo service")
    p.add_argument("name")
    p.add_argument("lines", nargs="+")
    p.add_argument("--host-store", default=None)
    a = p.parse_args()
    trio.run(main, a.name, a.lines, a.host_store)
