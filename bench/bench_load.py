"""One server, many clients: aggregate calls per second under load, and a memory soak.

One server process and ``--clients`` (16) client processes, each calling in a
loop (one call outstanding per client) for ``--seconds``; in one run:

  * meshlink over vchan: ``meshlink.serve(name, handlers)`` and
    ``meshlink.connect(name)`` with the defaults a user gets (sessions on,
    default ``BusConfig``, heartbeats), against a private host store;
  * meshlink over TCP (loopback), the same server (plain TCP allowed, the
    only setting that differs from the defaults) and ``pin=tcp://...``;
  * meshlink over vchan with ``meshlink.connect_blocking(name)`` clients (no
    trio in the clients; the same server);
  * the peer: a pyzmq ROUTER server, echoing, with REQ clients over ipc;
  * the floor of trio clients: a trio echo server and trio clients on raw
    vchan streams, with no bus, no session and no framing, one trio pass per
    call.  Not a competitor: it says what any trio client could reach on this
    machine in the same run, and how much of that the bus and session keep.

It prints the aggregate calls/s of each, the ratios against the goals (vchan
>= 1.0x pyzmq with either client; vchan ahead of TCP), the load average at
start and end, and
the CPU time per call of the server and of the clients (their resource usage
over the measured window: ``/proc`` for the server, ``getrusage`` in each
client), so that spinning shows as CPU spent per call.

``--soak SECONDS`` instead runs the vchan load for that long and samples the
server's resident set size every second: first, last, max, and the slope
(least squares, after the first tenth as warm-up); the goal is flat memory.

Usage: python3 -m bench.bench_load [--seconds S] [--clients N] [--repeat K]
       python3 -m bench.bench_load --soak 600
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import trio

from ._figures import print_load_average
from ._peers import Child, child_argv

PAYLOAD = b"c" * 64
NAME = "bench-load"
WARMUP_CALLS = 200
KINDS = ("pyzmq", "vchan", "tcp", "blocking", "floor")
_TICK = os.sysconf("SC_CLK_TCK")


# --- children ---------------------------------------------------------------------------


def _rusage_cpu() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def _wait_go() -> None:
    """Block until the driver writes the start line (every client is connected)."""
    select.select([sys.stdin], [], [])
    sys.stdin.readline()


def _report(calls: int, elapsed: float, cpu0: tuple[float, float], passes: int = 0,
            server_passes: int = -1) -> None:
    """Print what the window did: calls, seconds, user and system CPU seconds, trio
    scheduler passes here and in the server (-1: not counted)."""
    user, system = _rusage_cpu()
    print(f"DONE {calls} {elapsed} {user - cpu0[0]} {system - cpu0[1]} {passes} "
          f"{server_passes}", flush=True)


class Passes(trio.abc.Instrument):
    """Counts trio scheduler passes (one per I/O check): a figure the machine's
    load does not move, unlike time, which shows spinning and extra hops."""

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


async def _timed_calls(call: Callable[[], Awaitable[object]],
                       seconds: float) -> tuple[int, float, tuple[float, float], int]:
    """Await ``call()`` in a loop for ``seconds``: (calls, elapsed seconds, the CPU
    times at the start, trio scheduler passes), for :func:`_report`."""
    passes = Passes()
    trio.lowlevel.add_instrument(passes)
    calls = 0
    cpu0, t0 = _rusage_cpu(), time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        await call()
        calls += 1
    elapsed = time.perf_counter() - t0
    trio.lowlevel.remove_instrument(passes)
    return calls, elapsed, cpu0, passes.count


async def meshlink_server(store: str) -> None:
    import meshlink
    from meshlink.bus import Handlers

    h = Handlers()

    async def echo(payload: bytes) -> bytes:
        return payload

    passes = Passes()
    trio.lowlevel.add_instrument(passes)

    async def bench_passes() -> int:
        return passes.count

    h.add_method("echo", echo)
    h.add_method("bench_passes", bench_passes)
    async with trio.open_nursery() as nursery:
        srv = await nursery.start(partial(meshlink.serve, NAME, h, host_store=store,
                                          allow_plaintext=True))
        print(f"READY {srv.tcp_port}", flush=True)


async def meshlink_client(kind: str, store: str, port: int, seconds: float,
                          first: bool) -> None:
    import meshlink

    if kind == "vchan":
        opened = meshlink.connect(NAME, host_store=store)
    else:
        opened = meshlink.connect(NAME, host_store=store, allow_plaintext=True,
                                  pin=f"tcp://127.0.0.1:{port}")
    async with opened as conn:
        if conn.transport != kind:
            raise SystemExit(f"connected over {conn.transport}, not {kind}")
        for _ in range(WARMUP_CALLS):
            await conn.call("echo", PAYLOAD)
        print("READY", flush=True)
        await trio.to_thread.run_sync(_wait_go)
        server0 = int(await conn.call("bench_passes")) if first else 0
        calls, elapsed, cpu0, passes = await _timed_calls(partial(conn.call, "echo", PAYLOAD),
                                                          seconds)
        server1 = int(await conn.call("bench_passes")) if first else -1
        _report(calls, elapsed, cpu0, passes, server1 - server0)


def blocking_client(store: str, seconds: float) -> None:
    """``meshlink.connect_blocking`` with its defaults: no trio, a call is a function."""
    from meshlink.blocking import connect_blocking

    with connect_blocking(NAME, host_store=store) as conn:
        if conn.transport != "vchan":
            raise SystemExit(f"connected over {conn.transport}, not vchan")
        for _ in range(WARMUP_CALLS):
            conn.call("echo", PAYLOAD)
        print("READY", flush=True)
        _wait_go()
        calls = 0
        cpu0, t0 = _rusage_cpu(), time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            conn.call("echo", PAYLOAD)
            calls += 1
        _report(calls, time.perf_counter() - t0, cpu0)


async def floor_server(store: str) -> None:
    """The floor: a trio echo of 64-byte messages over raw vchan streams, no bus,
    no session, no framing: what trio clients and the ring alone cost per call,
    so that the trio clients' figure can be read against what any trio client
    could reach here."""
    from meshlink.errors import ConnectionLost
    from meshlink.transport.vchan import open_vchan_listener

    listener = await open_vchan_listener(NAME, host_store=store)
    print("READY 0", flush=True)

    async def echo(stream: trio.abc.Stream) -> None:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                ConnectionLost):
            pass  # deliberate: the bench ends clients abruptly

    async with trio.open_nursery() as nursery:
        while True:
            nursery.start_soon(echo, await listener.accept())


async def floor_client(store: str, seconds: float) -> None:
    """A trio client of :func:`floor_server`: send 64 bytes, read 64 back."""
    from meshlink.transport.vchan import connect_vchan

    stream = await connect_vchan(NAME, host_store=store)

    async def call() -> None:
        # Written without a schedule point when the ring has room (always,
        # here): one trio pass per call, the fewest a trio client can take.
        if stream.try_send(PAYLOAD) != len(PAYLOAD):
            raise SystemExit("floor: the ring was full")
        got = 0
        while got < len(PAYLOAD):
            got += len(await stream.receive_some())

    for _ in range(WARMUP_CALLS):
        await call()
    print("READY", flush=True)
    await trio.to_thread.run_sync(_wait_go)
    _report(*await _timed_calls(call, seconds))
    await stream.aclose()


def zmq_server(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    print("READY 0", flush=True)
    while True:
        s.send_multipart(s.recv_multipart())


def zmq_client(endpoint: str, seconds: float) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.REQ)
    s.connect(endpoint)
    for _ in range(WARMUP_CALLS):
        s.send(PAYLOAD)
        s.recv()
    print("READY", flush=True)
    _wait_go()
    calls = 0
    cpu0, t0 = _rusage_cpu(), time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        s.send(PAYLOAD)
        s.recv()
        calls += 1
    _report(calls, time.perf_counter() - t0, cpu0)
    s.close(linger=0)
    ctx.term()


def run_child(role: str, rest: Sequence[str]) -> None:
    out = os.environ.get("BENCH_LOAD_PROFILE")
    if out:  # where the time goes: one cProfile dump per child process
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            _run_role(role, rest)
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(out, f"{role}-{os.getpid()}.prof"))
    else:
        _run_role(role, rest)


def _run_role(role: str, rest: Sequence[str]) -> None:
    if role == "server":
        trio.run(meshlink_server, rest[0])
    elif role == "client":
        trio.run(meshlink_client, rest[0], rest[1], int(rest[2]), float(rest[3]),
                 rest[4] == "first")
    elif role == "blocking-client":
        blocking_client(rest[0], float(rest[1]))
    elif role == "floor-server":
        trio.run(floor_server, rest[0])
    elif role == "floor-client":
        trio.run(floor_client, rest[0], float(rest[1]))
    elif role == "zmq-server":
        zmq_server(rest[0])
    elif role == "zmq-client":
        zmq_client(rest[0], float(rest[1]))
    else:
        raise SystemExit(f"unknown role {role}")


# --- driver -----------------------------------------------------------------------------


def proc_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds (all threads) process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def proc_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def start(role: str, *args: str, stdin: bool = False) -> Child:
    child = Child(child_argv(__spec__.name, "--child", role, *args), stdin=stdin)
    if not child.first_line.startswith("READY"):
        child.stop()
        raise SystemExit(f"{role} {args} did not start: {child.first_line!r}")
    return child


@dataclass
class Figure:
    """One measured window: aggregate rate and CPU microseconds per call (user + system,
    and the system part of it)."""

    calls_s: float
    server_cpu_us: float
    server_sys_us: float
    client_cpu_us: float
    client_sys_us: float
    calls: int
    server_passes: float = float("nan")
    client_passes: float = float("nan")

    def cpu(self, side: str) -> str:
        total, system = ((self.server_cpu_us, self.server_sys_us) if side == "server"
                         else (self.client_cpu_us, self.client_sys_us))
        return f"{total:5.0f} us ({system:3.0f} sys)"


def load_window(server: Child, client_args: Callable[[bool], list[str]], clients: int,
                seconds: float, during: Callable[[], None] | None = None) -> Figure:
    """Start ``clients`` clients, release them together, and measure one window."""
    procs: list[Child] = []
    try:
        for i in range(clients):  # one after another: each one's READY is its handshake done
            procs.append(start(*client_args(i == 0), stdin=True))
        cpu0 = proc_cpu(server.proc.pid)
        for c in procs:
            c.write("GO\n")
        if during is not None:
            during()
        done = [c.readline().split() for c in procs]
        cpu1 = proc_cpu(server.proc.pid)
        for c in procs:  # they exit on their own once they reported
            c.proc.wait(timeout=30)
    finally:
        for c in procs:
            c.stop()
    if any(not d or d[0] != "DONE" for d in done):
        raise SystemExit(f"a client failed: {done}")
    calls = sum(int(d[1]) for d in done)
    rate = sum(int(d[1]) / float(d[2]) for d in done)
    client_user = sum(float(d[3]) for d in done)
    client_sys = sum(float(d[4]) for d in done)
    server_user, server_sys = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    per = 1e6 / calls
    client_passes = sum(int(d[5]) for d in done) / calls
    server_passes = int(done[0][6]) / calls if int(done[0][6]) >= 0 else float("nan")
    return Figure(rate, (server_user + server_sys) * per, server_sys * per,
                  (client_user + client_sys) * per, client_sys * per, calls,
                  server_passes, client_passes)


def measure(kind: str, clients: int, seconds: float, tmp: str) -> Figure:
    if kind == "pyzmq":
        endpoint = f"ipc://{tmp}/load.ipc"
        with start("zmq-server", endpoint) as server:
            return load_window(server, lambda _: ["zmq-client", endpoint, str(seconds)],
                               clients, seconds)
    store = os.path.join(tmp, "store")
    os.makedirs(store, 0o700, exist_ok=True)
    if kind == "floor":
        with start("floor-server", store) as server:
            return load_window(server, lambda _: ["floor-client", store, str(seconds)],
                               clients, seconds)
    with start("server", store) as server:
        port = server.first_line.split()[1]
        if kind == "blocking":
            return load_window(server, lambda _: ["blocking-client", store, str(seconds)],
                               clients, seconds)
        return load_window(server, lambda first: ["client", kind, store, port, str(seconds),
                                                  "first" if first else "other"],
                           clients, seconds)


def slope_kib_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) samples, in KiB per minute."""
    ts = [t for t, _ in samples]
    vs = [v for _, v in samples]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    den = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (v - mv) for t, v in samples) / den if den else 0.0


def soak(clients: int, seconds: float, tmp: str) -> None:
    store = os.path.join(tmp, "store")
    os.mkdir(store, 0o700)
    samples: list[tuple[float, int]] = []
    with start("server", store) as server:
        port = server.first_line.split()[1]
        pid = server.proc.pid

        def sample() -> None:
            t0 = time.monotonic()
            for i in range(int(seconds) + 1):
                samples.append((time.monotonic() - t0, proc_rss_kib(pid)))
                # A sampling period, not a synchronisation: the clients run
                # on their own clock and report when their time is up.
                time.sleep(max(0.0, t0 + i + 1 - time.monotonic()))

        fig = load_window(server, lambda first: ["client", "vchan", store, port, str(seconds),
                                                 "first" if first else "other"],
                          clients, seconds, during=sample)
    rss = [v for _, v in samples]
    steady = samples[len(samples) // 10:]
    print(f"\nsoak: {clients} vchan clients for {seconds:.0f} s, "
          f"{fig.calls_s:,.0f} calls/s, {fig.calls:,} calls")
    print(f"server RSS KiB: first {rss[0]:,}  last {rss[-1]:,}  max {max(rss):,}  "
          f"(after warm-up: first {steady[0][1]:,})")
    print(f"slope after the first tenth: {slope_kib_per_min(steady):+.1f} KiB/min "
          f"(goal: flat, ~0)")
    print(f"CPU per call: server {fig.cpu('server')}, clients {fig.cpu('clients')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each window")
    ap.add_argument("--clients", type=int, default=16, help="client processes")
    ap.add_argument("--repeat", type=int, default=1,
                    help="windows per figure, alternating (median kept)")
    ap.add_argument("--only", choices=KINDS, action="append",
                    help="measure only this (repeatable; ratios need all five)")
    ap.add_argument("--soak", type=float, metavar="SECONDS",
                    help="run the vchan load this long, sampling the server's RSS")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1:])
        return
    print_load_average("start")
    print(f"{os.cpu_count()} CPUs, {args.clients} client processes, "
          f"{args.seconds:.0f} s windows, 64-byte echo calls", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.soak:
            soak(args.clients, args.soak, tmp)
            print_load_average("end")
            return
        runs: dict[str, list[Figure]] = {}
        for _ in range(args.repeat):
            for kind in args.only or KINDS:
                runs.setdefault(kind, []).append(measure(kind, args.clients, args.seconds, tmp))
    figs = {k: Figure(*(statistics.median(getattr(f, a) for f in v) for a in
                        ("calls_s", "server_cpu_us", "server_sys_us", "client_cpu_us",
                         "client_sys_us", "calls", "server_passes", "client_passes")))
            for k, v in runs.items()}
    print(f"\n{'':28} {'calls/s':>10} {'server CPU/call':>20} {'clients CPU/call':>20}"
          f"  trio passes/call: server, client")
    for kind, label in (("pyzmq", "pyzmq ROUTER + REQ, ipc"), ("vchan", "meshlink vchan"),
                        ("tcp", "meshlink TCP"), ("blocking", "meshlink vchan, blocking"),
                        ("floor", "floor: trio, raw vchan")):
        if kind not in figs:
            continue
        f = figs[kind]
        passes = (f"  {f.server_passes:5.2f} {f.client_passes:5.2f}"
                  if kind in ("vchan", "tcp", "floor") else "")
        print(f"{label:28} {f.calls_s:10,.0f} {f.cpu('server'):>20} {f.cpu('clients'):>20}"
              f"{passes}")
    if len(figs) < len(KINDS):
        print_load_average("end")
        return
    peer, vchan, tcp = figs["pyzmq"].calls_s, figs["vchan"].calls_s, figs["tcp"].calls_s
    print(f"\n{'ratio':40} {'peer':>10} {'ours':>10} {'ratio':>7}  goal")
    print(f"{'vchan / pyzmq ipc, calls/s':40} {peer:10,.0f} {vchan:10,.0f} "
          f"{vchan / peer:6.2f}x  >= 1.0x")
    print(f"{'vchan / meshlink TCP, calls/s':40} {tcp:10,.0f} {vchan:10,.0f} "
          f"{vchan / tcp:6.2f}x  > 1.0x")
    blocking = figs["blocking"].calls_s
    print(f"{'vchan, blocking client / pyzmq ipc':40} {peer:10,.0f} {blocking:10,.0f} "
          f"{blocking / peer:6.2f}x  >= 1.0x")
    floor = figs["floor"].calls_s
    print(f"{'floor: trio, raw vchan / pyzmq ipc':40} {peer:10,.0f} {floor:10,.0f} "
          f"{floor / peer:6.2f}x  (the floor of trio clients)")
    print(f"{'vchan, trio client / floor':40} {floor:10,.0f} {vchan:10,.0f} "
          f"{vchan / floor:6.2f}x  (what the bus and session keep)")
    print_load_average("end")


if __name__ == "__main__":
    main()
