"""The cost of one bus call with both ends in one process: time, task steps,
scheduler passes.

No second process, no transport worth the name: what is left is the bus's own
work and its hops through the trio scheduler, which is what the call path
changes of issue 15 cut.  Default ``BusConfig`` (heartbeats on), 64-byte
argument, one call at a time after a warm-up.

Prints p50/p99 of the round trip and, for one steady-state call, the trio
task steps and scheduler passes (``tests/test_bus_steps.py`` guards the same
counts).  For an instruction count that load on a shared machine does not
move, run a fixed number of calls under callgrind twice and take the
difference, e.g. with the real interpreter (not a pyenv shim)::

    valgrind --tool=callgrind python3 -m bench.bench_bus_call --handler async --calls 200 --quiet
    valgrind --tool=callgrind python3 -m bench.bench_bus_call --handler async --calls 1200 --quiet

(instructions per call = difference of the two totals / 1000).

Usage: python3 -m bench.bench_bus_call [--transport socket|memory] [--calls N]
       [--handler async|def|both] [--quiet]
"""

from __future__ import annotations

import argparse
import socket
import time

import trio
import trio.testing

from meshlink.bus import Connection, Handlers

from ._figures import percentile

PAYLOAD = b"m" * 64
WARMUP = 500


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0
        self.passes = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def after_io_wait(self, timeout: float) -> None:
        self.passes += 1


def _pair(kind: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    if kind == "memory":
        return trio.testing.memory_stream_pair()
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(
        trio.socket.from_stdlib_socket(b)
    )


async def run(kind: str, calls: int, method: str) -> tuple[list[float], int, int]:
    """(round trips in seconds, task steps, scheduler passes of one call) of
    ``method``: ``echo`` (async) or ``echo_def`` (a plain def, run inline)."""
    handlers = Handlers()

    @handlers.method
    async def echo(x: bytes) -> bytes:
        return x

    @handlers.method
    def echo_def(x: bytes) -> bytes:
        return x

    a, b = _pair(kind)
    samples: list[float] = []
    async with trio.open_nursery() as nursery:
        up = trio.Event()
        done = trio.Event()

        async def server() -> None:
            async with Connection.open(b, handlers, name="srv"):
                up.set()
                await done.wait()

        nursery.start_soon(server)
        async with Connection.open(a, name="bench") as conn:
            await up.wait()
            for _ in range(WARMUP):
                await conn.call(method, PAYLOAD)
            for _ in range(calls):
                t = time.perf_counter()
                await conn.call(method, PAYLOAD)
                samples.append(time.perf_counter() - t)
            await trio.testing.wait_all_tasks_blocked()
            steps = _Steps()
            trio.lowlevel.add_instrument(steps)
            try:
                await conn.call(method, PAYLOAD)
            finally:
                trio.lowlevel.remove_instrument(steps)
        done.set()
    return samples, steps.steps, steps.passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", choices=["socket", "memory"], default="socket")
    ap.add_argument("--calls", type=int, default=5000, help="timed calls after the warm-up")
    ap.add_argument("--handler", choices=["async", "def", "both"], default="both",
                    help="async def handler, plain def (run inline), or both in turn")
    ap.add_argument("--quiet", action="store_true", help="print nothing (for callgrind)")
    args = ap.parse_args()
    kinds = ["async", "def"] if args.handler == "both" else [args.handler]
    for kind in kinds:
        method = "echo" if kind == "async" else "echo_def"
        samples, steps, passes = trio.run(run, args.transport, args.calls, method)
        if args.quiet:
            continue
        p50 = percentile(samples, 0.5) * 1e6
        p99 = percentile(samples, 0.99) * 1e6
        print(
            f"bus call ({kind} handler) in one process over {args.transport}, {args.calls} "
            f"calls: p50 {p50:.1f} us, p99 {p99:.1f} us; "
            f"one call: {steps} task steps, {passes} scheduler passes"
        )


if __name__ == "__main__":
    main()
