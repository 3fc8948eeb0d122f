"""Both ends of the session chaos test, as processes.

``server STORE NAME BIND``: ``meshlink.serve`` on vchan, TLS (certificates
from ``MESHLINK_TLS_*``) and plain TCP on BIND; prints ``ready TLS TCP``.
SIGUSR1 drops the transport of every session (a vchan ring torn down from
this side); SIGUSR2 withdraws vchan, or offers it again (each line
``vchan off``/``vchan on`` once done).  It records every numbered message in
arrival order.

``client STORE NAME COUNT [PIN]``: connects (by name, or to PIN), sends
numbered messages -- every tenth a call, the rest notifies -- at least
COUNT and until the session was resumed MIN_RESUMES times, then
asks the server what it saw and prints one JSON line: ``{"ok": ...}`` with
what went wrong, if anything.
"""

from __future__ import annotations

import json
import signal
import sys
from functools import partial
from typing import Any

import trio

import meshlink
from meshlink.bus import Handlers, current_connection

#: The client goes on past COUNT until the session was resumed this often.
MIN_RESUMES = 10
FAST = meshlink.SessionConfig(keepalive_interval=0.1, keepalive_timeout=0.4,
                              resume_timeout=60.0, backoff_min=0.01, backoff_max=0.2,
                              upgrade_interval=None)


async def server(store: str, name: str, bind: str) -> None:
    # Per connection (one per client session): several clients run in turn.
    orders: dict[int, list[int]] = {}
    runs: dict[int, int] = {}
    h = Handlers()

    def mine() -> list[int]:
        return orders.setdefault(id(current_connection()), [])

    async def note(i: int) -> None:
        mine().append(i)

    async def call(i: int) -> int:
        key = id(current_connection())
        runs[key] = runs.get(key, 0) + 1
        mine().append(i)
        return 2 * i

    async def report() -> dict[str, Any]:
        order = mine()
        expected = list(range(len(order)))
        pairs = enumerate(zip(order, expected, strict=True))
        first_bad = next((k for k, (a, b) in pairs if a != b), -1)
        return {"count": len(order), "in_order": order == expected, "first_bad": first_bad,
                "around": order[max(0, first_bad - 3):first_bad + 3] if first_bad >= 0 else [],
                "call_runs": runs.get(id(current_connection()), 0)}

    for fn in (note, call, report):
        h.add_method(fn.__name__, fn)
    with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
        async with trio.open_nursery() as nursery:
            srv = await nursery.start(partial(
                meshlink.serve, name, h, host_store=store, bind=bind, allow_plaintext=True,
                session=FAST, handle_sigterm=True))
            print(f"ready {srv.tls_port} {srv.tcp_port}", flush=True)
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    srv.sessions.cut()
                elif "vchan" in srv.transports:
                    await srv.withdraw_vchan()
                    print("vchan off", flush=True)
                else:
                    await srv.offer_vchan()
                    print("vchan on", flush=True)


async def client(store: str, name: str, count: int, pin: str | None) -> None:
    problems: list[str] = []
    async with meshlink.connect(name, host_store=store, pin=pin, session=FAST,
                                allow_plaintext=True, attempt_timeout=1.0) as conn:
        print(f"connected {conn.transport}", flush=True)
        # At least ``count`` messages, and on until the session has been
        # resumed MIN_RESUMES times (so the exchange surely ran under fire;
        # bounded: at most 20 times ``count``).
        i = 0
        while (i < count or conn.resumes < MIN_RESUMES) and i < 20 * count:
            if i % 10 == 9:
                got = await conn.call("call", i)
                if got != 2 * i:
                    problems.append(f"call {i} answered {got}")
            else:
                await conn.notify("note", i)
            i += 1
        count = i
        seen = await conn.call("report")
        calls = count // 10
        if seen["count"] != count:
            problems.append(f"server saw {seen['count']} messages, not {count}")
        if not seen["in_order"]:
            problems.append(f"out of order or repeated at {seen['first_bad']}: {seen['around']}")
        if seen["call_runs"] != calls:
            problems.append(f"{seen['call_runs']} call handler runs for {calls} calls")
        print(json.dumps({"ok": not problems, "problems": problems, "messages": count,
                          "resumes": conn.resumes, "sessions": conn.sessions,
                          "transport": conn.transport}), flush=True)


async def mover(store: str, name: str, rules: str) -> None:
    """Call in a loop; print ``moved T`` each time the session changes transport
    (at most two moves, at most 60 s), then the verdict."""
    problems: list[str] = []
    session = meshlink.SessionConfig(keepalive_interval=0.1, keepalive_timeout=0.4,
                                     resume_timeout=20.0, backoff_min=0.01,
                                     backoff_max=0.2, upgrade_interval=0.1)
    async with meshlink.connect(name, host_store=store, rules=rules, session=session,
                                attempt_timeout=2.0) as conn:
        print(f"connected {conn.transport}", flush=True)
        last, moves, i = conn.transport, 0, 0
        with trio.move_on_after(60):
            while moves < 2:
                if await conn.call("call", i) != 2 * i:
                    problems.append(f"call {i} answered wrongly")
                i += 1
                if conn.transport != last:
                    last, moves = conn.transport, moves + 1
                    print(f"moved {last}", flush=True)
        seen = await conn.call("report")
        if seen["count"] != i or not seen["in_order"] or seen["call_runs"] != i:
            problems.append(f"sent {i} calls, server saw {seen}")
        print(json.dumps({"ok": not problems and moves == 2, "problems": problems,
                          "moves": conn.moves, "resumes": conn.resumes, "calls": i}),
              flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        trio.run(server, sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "mover":
        trio.run(mover, sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        trio.run(client, sys.argv[2], sys.argv[3], int(sys.argv[4]),
                 sys.argv[5] if len(sys.argv) > 5 else None)
