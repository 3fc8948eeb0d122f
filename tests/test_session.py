"""Sessions under meshlink.connect: resume after cuts, calls in flight, failover
(vchan withdrawn: TLS), upgrade (TLS, then vchan offered: moved), and a
restarted server (new session, calls in flight fail, subscriptions renewed)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from meshlink import Server, SessionConfig, SessionLost, connect, serve
from meshlink.bus import Handlers, current_connection

from .helpers.connect_certs import Certs, make_certs
from .helpers.proxy import Proxy

NAME = "session-node"
FAST = SessionConfig(keepalive_interval=0.05, keepalive_timeout=0.5, resume_timeout=10.0,
                     backoff_min=0.01, backoff_max=0.1, upgrade_interval=0.05)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MESHLINK_TLS_CERT", "MESHLINK_TLS_KEY", "MESHLINK_TLS_CA", "MESHLINK_RULES",
                "MESHLINK_ZEROCONF", "MESHLINK_HOST_ID", "MESHLINK_HOST_STORE",
                "MESHLINK_DNS", "MESHLINK_ALLOW_PLAINTEXT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), NAME)


class Ledger:
    """The server's record of what arrived: numbered notifies and calls, in order."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.calls = 0
        self.release = trio.Event()
        self.slow_runs = 0

    def handlers(self) -> Handlers:
        h = Handlers()

        async def note(i: int) -> None:
            self.order.append(i)

        async def call(i: int) -> int:
            self.calls += 1
            self.order.append(i)
            return i * 2

        async def slow(i: int) -> int:
            self.slow_runs += 1
            await self.release.wait()
            return i

        async def seen() -> list[int]:
            return self.order

        h.add_method("note", note)
        h.add_method("call", call)
        h.add_method("slow", slow)
        h.add_method("seen", seen)
        return h


@pytest.fixture
async def tcp_server(store: Path) -> AsyncIterator[tuple[Server, Ledger, Proxy]]:
    """An in-process server on plain TCP (vchan off) behind a proxy that can reset."""
    ledger = Ledger()
    async with trio.open_nursery() as nursery:
        srv: Server = await nursery.start(partial(
            serve, NAME, ledger.handlers(), host_store=store, vchan=False,
            allow_plaintext=True, handle_sigterm=False, session=FAST))
        proxy: Proxy = await nursery.start(Proxy(srv.tcp_port).run)
        yield srv, ledger, proxy
        nursery.cancel_scope.cancel()


async def test_resets_lose_and_repeat_nothing(tcp_server: tuple[Server, Ledger, Proxy],
                                              store: Path) -> None:
    srv, ledger, proxy = tcp_server
    rng = random.Random(5)
    total, cuts = 20_000, 0
    cut_at = set(rng.sample(range(100, total), 12))
    async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{proxy.port}",
                       allow_plaintext=True, session=FAST) as conn:
        assert conn.transport == "tcp" and conn.session_id
        for i in range(total):
            if i % 10 == 9:
                assert await conn.call("call", i) == 2 * i
            else:
                await conn.notify("note", i)
            if i in cut_at:
                cuts += proxy.cut()
        assert await conn.call("seen") == list(range(total))
        assert conn.resumes == cuts == 12
        assert conn.sessions == 1 and conn.moves == 0
    assert ledger.calls == total // 10
    assert srv.sessions is not None and srv.sessions.resumed == 12


async def test_publishes_and_stream_messages_cross_resets_exactly_once(
        store: Path) -> None:
    """Not only notifies and calls: a subscription fed by the server and a
    message stream both ways keep every message, once, in order."""
    h = Handlers()

    async def feed(topic: str, count: int) -> None:
        conn = current_connection()
        for i in range(count):
            await conn.publish(topic, i)

    async def echo_stream(stream: Any) -> None:
        async for message in stream:
            await stream.send(message)
        await stream.send_eof()

    h.add_method("feed", feed)
    h.add_stream("echo_stream", echo_stream)
    async with trio.open_nursery() as nursery:
        srv: Server = await nursery.start(partial(
            serve, NAME, h, host_store=store, vchan=False, allow_plaintext=True,
            handle_sigterm=False, session=FAST))
        proxy: Proxy = await nursery.start(Proxy(srv.tcp_port).run)
        async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{proxy.port}",
                           allow_plaintext=True, session=FAST) as conn:
            count, cuts = 3000, 0
            async with conn.subscribe("n.") as sub:
                await conn.notify("feed", "n.x", count)
                got = []
                async for _topic, value in sub:
                    got.append(value)
                    if value % 500 == 250:
                        cuts += proxy.cut()
                    if len(got) == count:
                        break
                assert got == list(range(count))
            async with conn.open_stream("echo_stream") as stream:
                back = []
                for i in range(count):
                    await stream.send(i)
                    if i % 500 == 100:
                        cuts += proxy.cut()
                    if i % 100 == 99:  # read back as we go (the window is bounded)
                        while len(back) < i + 1:
                            back.append(await stream.receive())
                await stream.send_eof()
                async for value in stream:
                    back.append(value)
                assert back == list(range(count))
            assert conn.resumes == cuts >= 4
        nursery.cancel_scope.cancel()


async def test_call_in_flight_is_answered_after_the_resume(
        tcp_server: tuple[Server, Ledger, Proxy], store: Path) -> None:
    srv, ledger, proxy = tcp_server
    async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{proxy.port}",
                       allow_plaintext=True, session=FAST) as conn:
        async with trio.open_nursery() as nursery:
            result: list[int] = []

            async def caller() -> None:
                result.append(await conn.call("slow", 7))

            nursery.start_soon(caller)
            while ledger.slow_runs == 0:  # the request reached the handler
                await trio.testing.wait_all_tasks_blocked()
            assert proxy.cut() == 1
            old = proxy.accepted
            while proxy.accepted == old or conn.session is None or \
                    conn.session.transport is None:
                await trio.testing.wait_all_tasks_blocked()
            ledger.release.set()
        assert result == [7] and ledger.slow_runs == 1
        assert conn.resumes == 1


async def test_a_link_that_goes_silent_is_detected_by_the_keepalive(
        tcp_server: tuple[Server, Ledger, Proxy], store: Path) -> None:
    """No reset at all: the proxy stops forwarding; the keepalive notices, the
    session resumes on a new connection through it."""
    srv, ledger, proxy = tcp_server
    async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{proxy.port}",
                       allow_plaintext=True, session=FAST) as conn:
        await conn.notify("note", 1)
        assert await conn.call("call", 2) == 4
        # Freeze: keep the sockets open but stop the pumps from moving bytes.
        [(client_side, server_side)] = list(proxy._pairs)
        frozen = trio.Event()

        async def stall(*_: Any) -> None:
            await frozen.wait()

        client_side.send_all = stall  # type: ignore[method-assign]
        server_side.send_all = stall  # type: ignore[method-assign]
        with trio.fail_after(5):
            assert await conn.call("call", 3) == 6
        frozen.set()
        assert conn.resumes >= 1
        assert await conn.call("seen") == [1, 2, 3]


@asynccontextmanager
async def tls_server(store: Path, certs: Certs, rules: Path, *, vchan: bool
                     ) -> AsyncIterator[tuple[Server, Ledger]]:
    """An in-process server on TLS (and vchan if asked); ``rules`` names its TLS endpoint."""
    ledger = Ledger()
    async with trio.open_nursery() as nursery:
        srv: Server = await nursery.start(partial(
            serve, NAME, ledger.handlers(), host_store=store, tls=certs.server_tls(),
            vchan=vchan, handle_sigterm=False, session=FAST))
        rules.write_text(f'[names]\n"{NAME}" = ["tls://127.0.0.1:{srv.tls_port}"]\n')
        yield srv, ledger
        nursery.cancel_scope.cancel()


@pytest.fixture
async def both(store: Path, certs: Certs, tmp_path: Path
               ) -> AsyncIterator[tuple[Server, Ledger, Path]]:
    """A server on vchan and TLS, and a rules file naming its TLS endpoint."""
    rules = tmp_path / "rules.toml"
    async with tls_server(store, certs, rules, vchan=True) as (srv, ledger):
        yield srv, ledger, rules


async def test_failover_vchan_withdrawn_moves_to_tls(
        both: tuple[Server, Ledger, Path], store: Path, certs: Certs) -> None:
    srv, ledger, rules = both
    async with connect(NAME, host_store=store, rules=rules, tls=certs.client_tls(),
                       session=FAST) as conn:
        assert conn.transport == "vchan"
        for i in range(100):
            await conn.notify("note", i)
        await srv.withdraw_vchan()
        for i in range(100, 200):
            await conn.notify("note", i)
        assert await conn.call("call", 200) == 400
        assert conn.transport == "tls" and conn.moves == 1
        assert await conn.call("seen") == list(range(201))
        snap = srv.stats.snapshot()  # what `meshlink stats` and /metrics report
        assert snap["totals"]["resumes"] == 1 and snap["totals"]["transport_moves"] == 1
        assert [c["transport"] for c in snap["connections"]] == ["tls"]
    assert srv.sessions is not None and srv.sessions.moved == 1


async def test_upgrade_from_tls_to_vchan_when_offered(
        store: Path, certs: Certs, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    async with tls_server(store, certs, rules, vchan=False) as (srv, ledger):
        async with connect(NAME, host_store=store, rules=rules, tls=certs.client_tls(),
                           session=FAST) as conn:
            assert conn.transport == "tls"
            await srv.offer_vchan()
            # Calls keep going while the session moves; each answer must be right.
            with trio.fail_after(10):
                i = 0
                while conn.transport != "vchan":
                    assert await conn.call("call", i) == 2 * i
                    i += 1
            assert conn.moves == 1
            assert await conn.call("seen") == list(range(ledger.calls))


async def test_forbid_vchan_is_never_upgraded(store: Path, certs: Certs,
                                              tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    async with tls_server(store, certs, rules, vchan=False) as (srv, _ledger):
        async with connect(NAME, host_store=store, rules=rules, tls=certs.client_tls(),
                           forbid_vchan=True, session=FAST) as conn:
            await srv.offer_vchan()
            for i in range(40):  # 40 calls span many upgrade intervals
                assert await conn.call("call", i) == 2 * i
                await trio.sleep(FAST.upgrade_interval / 4)
            assert conn.transport == "tls" and conn.moves == 0


SERVER = """
import sys, trio, meshlink
from functools import partial
from meshlink.bus import Handlers, current_connection

async def main(store):
    h = Handlers()
    async def block():
        await trio.sleep_forever()
    async def ping(i):
        return i
    async def publish(topic, value):
        await current_connection().publish(topic, value)
    h.add_method("block", block)
    h.add_method("ping", ping)
    h.add_method("publish", publish)
    async with trio.open_nursery() as n:
        await n.start(partial(meshlink.serve, sys.argv[2], h, host_store=store))
        print("ready", flush=True)
trio.run(main, sys.argv[1])
"""


def _start_server(store: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(store), NAME],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


async def test_restarted_server_gives_a_new_session(store: Path) -> None:
    first = _start_server(store)
    renewed: list[str] = []
    told = trio.Event()
    try:
        async def on_new(conn: Any) -> None:
            renewed.append(conn.session_id)
            told.set()

        async with connect(NAME, host_store=store, session=FAST,
                           on_new_session=on_new) as conn:
            old_id = conn.session_id
            async with conn.subscribe("t.") as sub:
                await conn.call("publish", "t.a", 1)
                assert await sub.__anext__() == ("t.a", 1)
                async with trio.open_nursery() as nursery:
                    failed: list[BaseException] = []

                    async def blocked() -> None:
                        try:
                            await conn.call("block")
                        except SessionLost as exc:
                            failed.append(exc)

                    nursery.start_soon(blocked)
                    await trio.testing.wait_all_tasks_blocked()
                    first.send_signal(signal.SIGKILL)
                    await trio.to_thread.run_sync(first.wait)
                    second = await trio.to_thread.run_sync(_start_server, store)
                try:
                    assert len(failed) == 1 and "restarted" in str(failed[0])
                    assert await conn.call("ping", 4) == 4  # waits for the new session
                    with trio.fail_after(5):
                        await told.wait()
                    assert renewed == [conn.session_id] and conn.session_id != old_id
                    assert conn.sessions == 2
                    assert await conn.call("ping", 5) == 5
                    # The subscription was made again on the new session.
                    await conn.call("publish", "t.b", 2)
                    with trio.fail_after(5):
                        assert await sub.__anext__() == ("t.b", 2)
                finally:
                    second.kill()
                    second.wait()
    finally:
        first.kill()
        first.wait()


async def test_server_gone_for_good_gives_session_lost(store: Path) -> None:
    proc = _start_server(store)
    short = SessionConfig(keepalive_interval=0.05, keepalive_timeout=0.5, resume_timeout=0.5,
                          backoff_min=0.01, backoff_max=0.05)
    try:
        async with connect(NAME, host_store=store, session=short) as conn:
            assert await conn.call("ping", 1) == 1
            proc.kill()
            await trio.to_thread.run_sync(proc.wait)
            with trio.fail_after(5), pytest.raises(SessionLost, match="could not resume"):
                await conn.call("block")
            with pytest.raises(SessionLost):
                await conn.notify("ping", 2)
            assert conn.closed and isinstance(conn.error, SessionLost)
    finally:
        proc.kill()
        proc.wait()


async def test_clean_close_by_either_end_ends_the_session(
        tcp_server: tuple[Server, Ledger, Proxy], store: Path) -> None:
    srv, ledger, proxy = tcp_server
    async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{proxy.port}",
                       allow_plaintext=True, session=FAST) as conn:
        await conn.call("call", 1)
        assert srv.sessions is not None and len(srv.sessions) == 1
    with trio.fail_after(5):
        while len(srv.sessions):
            await trio.testing.wait_all_tasks_blocked()


async def test_resume_false_runs_the_bus_on_the_transport(
        tcp_server: tuple[Server, Ledger, Proxy], store: Path) -> None:
    srv, ledger, proxy = tcp_server
    async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{proxy.port}",
                       allow_plaintext=True, resume=False) as conn:
        assert conn.session is None and conn.session_id == ""
        assert await conn.call("call", 1) == 2
        assert srv.sessions is not None and len(srv.sessions) == 0
        proxy.cut()
        with pytest.raises(Exception) as info:
            await conn.call("call", 2)
        assert not isinstance(info.value, SessionLost)


async def test_an_error_in_the_block_comes_out_as_itself(
        tcp_server: tuple[Server, Ledger, Proxy], store: Path) -> None:
    srv, ledger, proxy = tcp_server
    with pytest.raises(KeyError, match="mine"):
        async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{proxy.port}",
                           allow_plaintext=True, session=FAST) as conn:
            assert await conn.call("call", 1) == 2
            raise KeyError("mine")
