"""meshlink bus vs pyzmq, two processes per measurement, one run.

Prints, for 64-byte messages:
  * one-way rate: meshlink notify over vchan, Unix socket and TCP, against
    pyzmq PUSH/PULL over ipc and tcp (rate measured at the receiver, first to
    last message);
  * two one-way floors over vchan: the bus's notify frame packed and decoded
    per message by msgpack on a raw vchan stream, with no bus (see
    ``floor_pull``): what any Python bus of this API shape costs at least;
  * RPC round trip p50/p99: meshlink call over vchan and TCP, closed-loop (one
    call at a time) and open-loop (calls started at a fixed rate, latency
    counted from the scheduled start so queueing is not hidden), against pyzmq
    REQ/REP over ipc (closed-loop: REQ is lock-step by design);
then the ratios the bus issue sets as goals.  Absolute figures drift on shared
machines; the ratios from one run are what count.

Usage: python3 -m bench.bench_bus [--messages N] [--calls N] [--rate R] [--repeat K]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import trio

from meshlink.bus import BusConfig, Connection, Handlers, serve_bus

try:
    from meshlink.transport.vchan import connect_vchan, open_vchan_listener

    HAVE_VCHAN = True
except ImportError:  # pragma: no cover - vchan not built
    HAVE_VCHAN = False

from ._figures import percentile, print_load_average
from ._peers import Child, child_argv, free_port

PAYLOAD = b"m" * 64
CHILD_PREFIX: list[str] = os.environ.get("BENCH_CHILD_PREFIX", "").split()
#: What a user gets: default limits, heartbeats on.
CONFIG = BusConfig()


# --- meshlink peer (child process) --------------------------------------------------


async def _listen(kind: str, where: str) -> trio.abc.Listener[Any]:
    if kind == "vchan":
        return await open_vchan_listener("bench-bus", host_store=where)
    if kind == "unix":
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(where)
        sock.listen(8)
        return trio.SocketListener(sock)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listeners[0]


async def _connect(kind: str, where: str) -> trio.abc.Stream:
    if kind == "vchan":
        return await connect_vchan("bench-bus", host_store=where)
    if kind == "unix":
        return await trio.open_unix_socket(where)
    return await trio.open_tcp_stream("127.0.0.1", int(where))


async def bus_peer(kind: str, where: str) -> None:
    """Serve ``m`` (count notifications), ``rate`` and ``echo`` on one connection."""
    h = Handlers()
    state = {"count": 0, "first": 0.0, "last": 0.0}
    reached = trio.Event()
    target = [0]

    async def m(payload: bytes) -> None:
        n = state["count"] = state["count"] + 1
        if n == 1:
            state["first"] = time.perf_counter()
        if n == target[0]:
            state["last"] = time.perf_counter()
            reached.set()

    async def arm(count: int) -> None:
        nonlocal reached
        target[0] = count
        state["count"] = 0
        reached = trio.Event()

    async def rate() -> float:
        await reached.wait()
        return (target[0] - 1) / (state["last"] - state["first"])

    async def echo(payload: bytes) -> bytes:
        return payload

    def echo_inline(payload: bytes) -> bytes:  # a plain def: run inline by the reader
        return payload

    h.add_method("m", m)
    h.add_method("rate", rate)
    h.add_method("arm", arm)
    h.add_method("echo", echo)
    h.add_method("echo_inline", echo_inline)
    listener = await _listen(kind, where)
    if isinstance(listener, trio.SocketListener) and kind == "tcp":
        print(f"READY {listener.socket.getsockname()[1]}", flush=True)
    else:
        print(f"READY {where}", flush=True)
    stream = await listener.accept()
    try:
        await serve_bus(stream, h, name="bench-peer", config=CONFIG)
    except Exception:
        pass  # deliberate: the bench closes connections abruptly at the end


# --- zmq peers (child process) -----------------------------------------------------


def zmq_pull(endpoint: str, count: int) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind(endpoint)
    print(f"READY {endpoint}", flush=True)
    s.recv()
    first = time.perf_counter()
    for _ in range(count - 1):
        s.recv()
    print(f"RATE {(count - 1) / (time.perf_counter() - first)}", flush=True)
    s.close(linger=0)
    ctx.term()


def zmq_rep(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.bind(endpoint)
    print(f"READY {endpoint}", flush=True)
    while True:
        s.send(s.recv())


# --- the floors: msgpack over a raw vchan stream, no bus (child and driver) ----------
#
# What any Python bus with this API costs at least, measured beside the peer:
# the bus's own notify frame ([5, method, [payload]]), packed per message and
# written in 32 KiB pieces, decoded per frame by msgpack's streaming unpacker.
# No flow control, no validation, no method lookup, no error isolation: none
# of what the bus must do.  Shape "plain" calls a function per message at each
# end; shape "await" awaits one, as `await conn.notify(...)` and an async
# handler do.


async def floor_pull(where: str, count: int, shape: str) -> None:
    import msgpack

    listener = await open_vchan_listener("bench-floor", host_store=where)
    print(f"READY {where}", flush=True)
    stream = await listener.accept()
    unpacker = msgpack.Unpacker()
    seen = [0]
    first = [0.0]

    def handler(payload: bytes) -> None:
        seen[0] += 1
        if seen[0] == 1:
            first[0] = time.perf_counter()

    async def ahandler(payload: bytes) -> None:
        handler(payload)

    while seen[0] < count:
        data = await stream.receive_some()
        if not data:
            raise SystemExit("floor: the sender closed early")
        unpacker.feed(data)
        if shape == "plain":
            for frame in unpacker:
                handler(*frame[2])
        else:
            for frame in unpacker:
                await ahandler(*frame[2])
    print(f"RATE {(count - 1) / (time.perf_counter() - first[0])}", flush=True)


def floor_oneway(shape: str, count: int) -> float:
    import msgpack

    with tempfile.TemporaryDirectory() as tmp:
        where = os.path.join(tmp, "store")
        os.mkdir(where, 0o700)
        child, _ = start_child("floor-pull", where, str(count), shape)
        try:

            async def main() -> float:
                stream = await connect_vchan("bench-floor", host_store=where)
                pack = msgpack.Packer().pack
                out = bytearray()

                def notify(method: str, *args: Any) -> None:
                    out.extend(pack((5, method, args)))

                async def anotify(method: str, *args: Any) -> None:
                    out.extend(pack((5, method, args)))
                    if len(out) >= 32768:
                        await stream.send_all(out)
                        out.clear()

                for _ in range(count):
                    if shape == "plain":
                        notify("m", PAYLOAD)
                        if len(out) >= 32768:
                            await stream.send_all(out)
                            out.clear()
                    else:
                        await anotify("m", PAYLOAD)
                await stream.send_all(out)
                line = (await trio.to_thread.run_sync(child.readline)).split()
                await stream.aclose()
                if len(line) != 2 or line[0] != "RATE":
                    raise RuntimeError(f"floor receiver failed: {line}")
                return float(line[1])

            return trio.run(main)
        finally:
            child.stop()


# --- driver ------------------------------------------------------------------------


def start_child(*args: str) -> tuple[Child, str]:
    """This script as a child playing role ``args``; returns it and where it listens."""
    child = Child(child_argv(__spec__.name, "--child", *args, prefix=CHILD_PREFIX))
    line = child.first_line.split()
    if not line or line[0] != "READY":
        child.stop()
        raise RuntimeError(f"child {args} failed to start")
    return child, line[1]


def _where(kind: str, tmp: str) -> str:
    return {"vchan": os.path.join(tmp, "store"), "unix": os.path.join(tmp, "bus.sock")}.get(
        kind, "0"
    )


def with_bus_peer(kind: str, fn: Callable[[Connection], Any]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        where = _where(kind, tmp)
        if kind == "vchan":
            os.mkdir(where, 0o700)
        child, address = start_child("bus", kind, where)
        try:

            async def main() -> Any:
                stream = await _connect(kind, address)
                async with Connection.open(stream, name="bench", config=CONFIG) as conn:
                    return await fn(conn)

            return trio.run(main)
        finally:
            child.stop()


def bus_oneway(kind: str, count: int) -> float:
    async def run(conn: Connection) -> float:
        await conn.call("arm", 2000)
        for _ in range(2000):  # warm-up
            await conn.notify("m", PAYLOAD)
        await conn.call("rate")
        await conn.call("arm", count)
        for _ in range(count):
            await conn.notify("m", PAYLOAD)
        return float(await conn.call("rate"))

    return float(with_bus_peer(kind, run))


def bus_rpc(
    kind: str, calls: int, rate: float, method: str = "echo"
) -> tuple[list[float], list[float]]:
    async def run(conn: Connection) -> tuple[list[float], list[float]]:
        for _ in range(500):  # warm-up
            await conn.call(method, PAYLOAD)
        closed: list[float] = []
        for _ in range(calls):
            t = time.perf_counter()
            await conn.call(method, PAYLOAD)
            closed.append(time.perf_counter() - t)
        opened: list[float] = []

        async def one() -> None:
            t = time.perf_counter()
            await conn.call(method, PAYLOAD)
            opened.append(time.perf_counter() - t)

        # Calls start on a fixed schedule whatever the replies do.  Latency is
        # counted from each call's actual start: trio's timer wakes up to 1 ms
        # late (epoll's millisecond timeout), which would swamp the figures.
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            for i in range(calls):
                await trio.sleep_until(start + i / rate)
                nursery.start_soon(one)
        return closed, opened

    closed, opened = with_bus_peer(kind, run)
    return closed, opened


def zmq_oneway(transport: str, count: int) -> float:
    import zmq

    with tempfile.TemporaryDirectory() as tmp:
        endpoint = (
            f"ipc://{tmp}/push.ipc" if transport == "ipc" else f"tcp://127.0.0.1:{free_port()}"
        )
        child, _ = start_child("zmq-pull", endpoint, str(count))
        ctx = zmq.Context()
        s = ctx.socket(zmq.PUSH)
        s.connect(endpoint)
        try:
            for _ in range(count):
                s.send(PAYLOAD)
            line = child.readline().split()
            return float(line[1])
        finally:
            s.close(linger=0)
            ctx.term()
            child.stop()


def zmq_reqrep(calls: int) -> list[float]:
    import zmq

    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/rep.ipc"
        child, _ = start_child("zmq-rep", endpoint)
        ctx = zmq.Context()
        s = ctx.socket(zmq.REQ)
        s.connect(endpoint)
        try:
            for _ in range(500):
                s.send(PAYLOAD)
                s.recv()
            out = []
            for _ in range(calls):
                t = time.perf_counter()
                s.send(PAYLOAD)
                s.recv()
                out.append(time.perf_counter() - t)
            return out
        finally:
            s.close(linger=0)
            ctx.term()
            child.stop()


def pct(samples: list[float], q: float) -> float:
    """Quantile ``q`` of ``samples`` (seconds) in microseconds."""
    return percentile(samples, q) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=300_000, help="one-way messages per run")
    ap.add_argument("--calls", type=int, default=5000, help="RPC calls per series")
    ap.add_argument("--rate", type=float, default=2000.0, help="open-loop calls per second")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (median kept)")
    ap.add_argument("--only", choices=["oneway", "rpc"], help="run one half of the bench")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        role, *rest = args.child
        if role == "bus":
            trio.run(bus_peer, rest[0], rest[1])
        elif role == "zmq-pull":
            zmq_pull(rest[0], int(rest[1]))
        elif role == "zmq-rep":
            zmq_rep(rest[0])
        elif role == "floor-pull":
            trio.run(floor_pull, rest[0], int(rest[1]), rest[2])
        return

    # Other jobs on a shared machine move every figure: say how loaded it was.
    print_load_average("start")
    na = "n/a (vchan not available)"
    rates: dict[str, float] = {}
    lat: dict[str, tuple[float, float]] = {}
    names = [
        "meshlink vchan closed",
        f"meshlink vchan open@{args.rate:g}/s",
        "meshlink tcp closed",
        f"meshlink tcp open@{args.rate:g}/s",
        "meshlink vchan closed, def handler",
        "meshlink tcp closed, def handler",
        "pyzmq REQ/REP ipc closed",
    ]
    if args.only in (None, "oneway"):
        kinds = ["vchan", "unix", "tcp"] if HAVE_VCHAN else ["unix", "tcp"]
        print(f"one-way, {len(PAYLOAD)}-byte messages, {args.messages} per run,", end=" ")
        print(f"median of {args.repeat}")
        for kind in kinds:
            rates[f"meshlink {kind}"] = statistics.median(
                bus_oneway(kind, args.messages) for _ in range(args.repeat)
            )
        for transport in ("ipc", "tcp"):
            rates[f"pyzmq PUSH/PULL {transport}"] = statistics.median(
                zmq_oneway(transport, args.messages) for _ in range(args.repeat)
            )
        if HAVE_VCHAN:
            for shape in ("plain", "await"):
                rates[f"floor vchan, {shape}"] = statistics.median(
                    floor_oneway(shape, args.messages) for _ in range(args.repeat)
                )
        for name in ["meshlink vchan", "meshlink unix", "meshlink tcp"] + [
            "pyzmq PUSH/PULL ipc",
            "pyzmq PUSH/PULL tcp",
            "floor vchan, plain",
            "floor vchan, await",
        ]:
            value = f"{rates[name] / 1e6:8.3f} M msg/s" if name in rates else na
            print(f"  {name:24s} {value}")

    if args.only in (None, "rpc"):
        print(f"\nRPC round trip, {len(PAYLOAD)}-byte argument, {args.calls} calls per series (us)")
        for kind in ("vchan", "tcp") if HAVE_VCHAN else ("tcp",):
            runs = [bus_rpc(kind, args.calls, args.rate) for _ in range(args.repeat)]
            lat[f"meshlink {kind} closed"] = (
                statistics.median(pct(c, 0.5) for c, _ in runs),
                statistics.median(pct(c, 0.99) for c, _ in runs),
            )
            lat[f"meshlink {kind} open@{args.rate:g}/s"] = (
                statistics.median(pct(o, 0.5) for _, o in runs),
                statistics.median(pct(o, 0.99) for _, o in runs),
            )
            # The same echo as a plain def: answered inline by the reader.
            runs = [bus_rpc(kind, args.calls, args.rate, "echo_inline") for _ in range(args.repeat)]
            lat[f"meshlink {kind} closed, def handler"] = (
                statistics.median(pct(c, 0.5) for c, _ in runs),
                statistics.median(pct(c, 0.99) for c, _ in runs),
            )
        zruns = [zmq_reqrep(args.calls) for _ in range(args.repeat)]
        lat["pyzmq REQ/REP ipc closed"] = (
            statistics.median(pct(z, 0.5) for z in zruns),
            statistics.median(pct(z, 0.99) for z in zruns),
        )
        for name in names:
            if name in lat:
                p50, p99 = lat[name]
                print(f"  {name:32s} p50 {p50:8.1f}   p99 {p99:8.1f}   p99/p50 {p99 / p50:5.2f}")
            else:
                print(f"  {name:32s} {na}")

    print("\nratios (goal in brackets)")

    def ratio(label: str, num: str, den: str, table: dict[str, Any], goal: str) -> None:
        if num in table and den in table:
            a, b = table[num], table[den]
            a = a[0] if isinstance(a, tuple) else a
            b = b[0] if isinstance(b, tuple) else b
            print(f"  {label:52s} {a / b:6.2f}x  [{goal}]")
        else:
            print(f"  {label:52s} {na}  [{goal}]")

    ratio(
        "one-way: meshlink vchan / pyzmq ipc",
        "meshlink vchan",
        "pyzmq PUSH/PULL ipc",
        rates,
        ">= 1.2x",
    )
    ratio(
        "one-way: meshlink unix / pyzmq ipc", "meshlink unix", "pyzmq PUSH/PULL ipc", rates, "info"
    )
    ratio("one-way floor, plain: no bus / pyzmq ipc", "floor vchan, plain",
          "pyzmq PUSH/PULL ipc", rates, "floor")
    ratio("one-way floor, await: no bus / pyzmq ipc", "floor vchan, await",
          "pyzmq PUSH/PULL ipc", rates, "floor")
    ratio(
        "one-way: meshlink tcp / pyzmq tcp", "meshlink tcp", "pyzmq PUSH/PULL tcp", rates, ">= 1.0x"
    )
    ratio(
        "RPC p50 closed: vchan / meshlink tcp",
        "meshlink vchan closed",
        "meshlink tcp closed",
        lat,
        "<= 0.3x",
    )
    ratio(
        "RPC p50 closed: vchan / pyzmq REQ/REP ipc",
        "meshlink vchan closed",
        "pyzmq REQ/REP ipc closed",
        lat,
        "<= 0.5x",
    )
    ratio(
        "RPC p50 closed, def handler: vchan / meshlink tcp",
        "meshlink vchan closed, def handler",
        "meshlink tcp closed, def handler",
        lat,
        "<= 0.3x",
    )
    ratio(
        "RPC p50 closed, def handler: vchan / pyzmq ipc",
        "meshlink vchan closed, def handler",
        "pyzmq REQ/REP ipc closed",
        lat,
        "<= 0.5x",
    )
    for name in names[:6]:
        if name in lat:
            p50, p99 = lat[name]
            print(f"  {'p99/p50 ' + name:52s} {p99 / p50:6.2f}x  [<= 3x]")
    print_load_average("end")


if __name__ == "__main__":
    main()
