"""A connection that outlives its transports, step by step.

    python3 examples/cluster/sessions.py [--calls 3000]

One process serves ``ledger`` on vchan and (plain, loopback-only) TCP; a
client connects by name and keeps calling ``append(i)`` while the server
does what clusters do to it:

1. it withdraws vchan (as before migrating away): the session moves to TCP;
2. it offers vchan again (the peer is co-located again): the session moves
   back onto vchan;
3. it drops every session's transport (a torn-down ring): the session
   resumes.

Every call is answered exactly once and in order; the ledger must hold
0, 1, 2, ... with nothing missing or repeated.  Exits 0 if so.  Nothing
listens beyond loopback and the private host store made here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial

import trio

import meshlink
from meshlink.bus import Handlers

NAME = "ledger"
SESSION = meshlink.SessionConfig(upgrade_interval=0.2)


def say(t0: float, text: str) -> None:
    print(f"t={time.monotonic() - t0:6.3f}s  {text}", flush=True)


async def main(calls: int) -> int:
    entries: list[int] = []
    h = Handlers()

    async def append(i: int) -> int:
        entries.append(i)
        return len(entries)

    h.add_method("append", append)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        os.mkdir(store, 0o700)
        async with trio.open_nursery() as nursery:
            server: meshlink.Server = await nursery.start(partial(
                meshlink.serve, NAME, h, host_store=store, allow_plaintext=True,
                handle_sigterm=False, session=SESSION))
            # Where the service is when the host store no longer offers it:
            # what DNS, zeroconf or a rules file would say on a real cluster.
            rules = trio.Path(tmp, "rules.toml")
            await rules.write_text(f'[names]\n"{NAME}" = ["tcp://127.0.0.1:{server.tcp_port}"]\n')
            t0 = time.monotonic()
            async with meshlink.connect(NAME, host_store=store, rules=rules,
                                        allow_plaintext=True, session=SESSION) as conn:
                say(t0, f"connected over {conn.transport} (session {conn.session_id[:8]})")
                steps = {calls // 4: "withdraw", calls // 2: "offer", 3 * calls // 4: "cut"}
                seen = (conn.transport, conn.resumes)
                for i in range(calls):
                    if await conn.call("append", i) != i + 1:
                        say(t0, f"call {i}: the ledger is out of step")
                        return 1
                    if (conn.transport, conn.resumes) != seen:
                        seen = (conn.transport, conn.resumes)
                        say(t0, f"call {i}: the session runs over {conn.transport} "
                                f"(resumes {conn.resumes}, moves {conn.moves})")
                    step = steps.get(i)
                    if step == "withdraw":
                        say(t0, f"call {i}: the server withdraws vchan")
                        await server.withdraw_vchan()
                    elif step == "offer":
                        say(t0, f"call {i}: the server offers vchan again")
                        await server.offer_vchan()
                    elif step == "cut":
                        assert server.sessions is not None
                        say(t0, f"call {i}: the server drops the transport "
                                f"({server.sessions.cut()} session)")
                    if step == "offer":
                        # The client looks for vchan every upgrade_interval:
                        # keep calling (each answered) until it has moved.
                        with trio.fail_after(10):
                            while conn.transport != "vchan":
                                await conn.call("append", -1)
                                entries.pop()  # the probe is not part of the ledger
                        seen = (conn.transport, conn.resumes)
                        say(t0, f"call {i}: the session runs over vchan "
                                f"(resumes {conn.resumes}, moves {conn.moves})")
                say(t0, f"{calls} calls answered; resumes {conn.resumes}, moves {conn.moves}; "
                        f"server counted resumes {server.stats.totals()['resumes']}, "
                        f"moves {server.stats.totals()['transport_moves']}")
            nursery.cancel_scope.cancel()
    ok = entries == list(range(calls))
    print(f"ledger: {'0..' + str(calls - 1) + ' once each, in order' if ok else 'WRONG'}")
    print(f"sessions: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    sys.exit(trio.run(main, ap.parse_args().calls))
