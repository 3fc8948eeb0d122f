"""meshlink.serve / meshlink.connect on one machine: vchan, fallback, TLS policy, crashes."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from meshlink import AuthError, Server, connect, serve
from meshlink.bus import Handlers
from resolver import HostStore, ResolveError, Resolver
from resolver.hoststore import HostStoreSource, ServiceRecord, default_host_id, write_record

from .helpers.connect_certs import Certs, make_certs

NAME = "storage-node"


def echo_handlers() -> Handlers:
    h = Handlers()

    async def echo(text: str) -> str:
        return text.upper()

    h.add_method("echo", echo)
    return h


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), NAME)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MESHLINK_TLS_CERT", "MESHLINK_TLS_KEY", "MESHLINK_TLS_CA", "MESHLINK_RULES",
                "MESHLINK_ZEROCONF", "MESHLINK_HOST_ID", "MESHLINK_HOST_STORE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
async def server(store: Path, certs: Certs) -> AsyncIterator[Server]:
    """An in-process echo server: vchan + mutual TLS + TCP (plain TCP asked for)."""
    async with trio.open_nursery() as nursery:
        srv: Server = await nursery.start(partial(
            serve, NAME, echo_handlers(), host_store=store, tls=certs.server_tls(),
            allow_plaintext=True, handle_sigterm=False))
        yield srv
        srv.stop()


# --- transports -----------------------------------------------------------------------


async def test_colocated_client_gets_vchan(server: Server, store: Path, certs: Certs) -> None:
    async with connect(NAME, host_store=store, tls=certs.client_tls()) as conn:
        assert conn.transport == "vchan"
        assert await conn.call("echo", "hello from dom0") == "HELLO FROM DOM0"
    assert server.accepted == {"vchan": 1, "tls": 0, "tcp": 0}


async def test_forbid_vchan_uses_tls_then_pin_uses_tcp(
    server: Server, store: Path, certs: Certs
) -> None:
    async with connect(NAME, host_store=store, tls=certs.client_tls(), forbid_vchan=True) as c:
        assert c.transport == "tls"
        assert await c.call("echo", "over tls") == "OVER TLS"
    async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{server.tcp_port}") as c:
        assert c.transport == "tcp"
        assert await c.call("echo", "over tcp") == "OVER TCP"
    # without a TLS configuration the TLS endpoint is skipped, not half-tried
    async with connect(NAME, host_store=store, forbid_vchan=True) as c:
        assert c.transport == "tcp"
    assert server.accepted == {"vchan": 0, "tls": 1, "tcp": 2}


async def test_dead_vchan_socket_falls_back_to_tcp_with_a_log_line(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hs = HostStore(store)
    async with trio.open_nursery() as nursery:
        # the real service: plain TCP only, not in the host store
        srv: Server = await nursery.start(partial(
            serve, NAME, echo_handlers(), host_store=store, vchan=False, tls_port=None,
            allow_plaintext=True, handle_sigterm=False))
        # a live claim whose socket nobody listens on: the vchan handshake must fail
        pub = hs.claim(NAME)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(pub.socket_path))
        write_record(hs, ServiceRecord(NAME, default_host_id(hs), ("vchan", "tcp"),
                                       (f"tcp://127.0.0.1:{srv.tcp_port}",)))
        try:
            with caplog.at_level(logging.INFO, logger="meshlink.connect"):
                async with connect(NAME, host_store=store) as conn:
                    assert conn.transport == "tcp"
                    assert await conn.call("echo", "fallback") == "FALLBACK"
        finally:
            dead.close()
            pub.withdraw()
        srv.stop()
    warn = [r for r in caplog.records if r.name == "meshlink.connect"
            and r.levelno == logging.WARNING]
    assert len(warn) == 1
    assert "vchan://host-store/storage-node failed" in warn[0].getMessage()
    assert "falling back" in warn[0].getMessage()
    assert srv.accepted["tcp"] == 1


# --- TLS policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["no_cert", "rogue_client"])
async def test_mutual_tls_refuses_a_client_without_a_valid_certificate(
    server: Server, store: Path, certs: Certs, which: str
) -> None:
    from meshlink.transport.tls import TLSConfig

    tls = TLSConfig(None, None, certs.ca) if which == "no_cert" else certs.client_tls(which)
    with pytest.raises(AuthError):
        async with connect(NAME, host_store=store, tls=tls, require_tls=True,
                           forbid_vchan=True):
            pytest.fail("connected without a valid certificate")
    assert server.refused["tls"] == 1 and server.accepted["tls"] == 0
    assert server.accepted["tcp"] == 0


async def test_server_restricts_client_certificate_names(store: Path, certs: Certs) -> None:
    async with trio.open_nursery() as nursery:
        srv: Server = await nursery.start(partial(
            serve, NAME, echo_handlers(), host_store=store,
            tls=certs.server_tls(allow=["client-1"]), require_tls=True, vchan=False,
            handle_sigterm=False))
        assert srv.tcp_port == 0  # require_tls: no plain TCP listener at all
        with pytest.raises(AuthError):
            async with connect(NAME, host_store=store, tls=certs.client_tls("other_client"),
                               pin=f"tls://127.0.0.1:{srv.tls_port}"):
                pass
        async with connect(NAME, host_store=store, tls=certs.client_tls(),
                           pin=f"tls://127.0.0.1:{srv.tls_port}") as conn:
            assert await conn.call("echo", "named") == "NAMED"
        assert srv.refused["tls"] == 1 and srv.accepted["tls"] == 1
        srv.stop()


@pytest.fixture
async def tcp_trap() -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP listener that counts every connection made to it."""
    hits: list[int] = []
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def count(stream: trio.SocketStream) -> None:
        hits.append(1)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, count, listeners)
        yield listeners[0].socket.getsockname()[1], hits
        nursery.cancel_scope.cancel()


async def test_require_tls_never_attempts_plain_tcp(
    server: Server, store: Path, certs: Certs, tmp_path: Path,
    tcp_trap: tuple[int, list[int]],
) -> None:
    trap_port, hits = tcp_trap
    rules = tmp_path / "rules.toml"
    rules.write_text(
        f'[names]\n"{NAME}" = ["tcp://127.0.0.1:{trap_port}", '
        f'"tls://127.0.0.1:{server.tls_port}"]\n'
        f'"only-tcp" = ["tcp://127.0.0.1:{trap_port}"]\n')
    other_store = tmp_path / "elsewhere"  # not co-located: only the rules apply
    async with connect(NAME, host_store=other_store, rules=rules, tls=certs.client_tls(),
                       require_tls=True) as conn:
        assert conn.transport == "tls"
        assert await conn.call("echo", "secure") == "SECURE"
    with pytest.raises(ResolveError, match="policy requires TLS"):
        async with connect("only-tcp", host_store=other_store, rules=rules,
                           tls=certs.client_tls(), require_tls=True):
            pass
    # the trap does count connections: without require_tls it is tried (and fails)
    with pytest.raises(ResolveError, match="closed the transport"):
        async with connect("only-tcp", host_store=other_store, rules=rules):
            pass
    assert hits == [1], "exactly one plain TCP connection: the one without require_tls"
    assert server.accepted["tcp"] == 0 and server.accepted["tls"] == 1


# --- crashes and shutdown ---------------------------------------------------------------------


def _start_cli_server(store: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlink.cli", "serve-echo", NAME, "--host-store", str(store),
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MESHLINK_")})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(f"serving {NAME}:"):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.communicate()[1]}")
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()


async def test_sigkilled_server_is_stale_and_replaced(
    store: Path, procs: list[subprocess.Popen[str]]
) -> None:
    procs.append(_start_cli_server(store))
    async with connect(NAME, host_store=store) as conn:
        assert conn.transport == "vchan"
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    assert (store / f"{NAME}.sock").exists()  # leftovers of the crash...
    src = HostStoreSource(HostStore(store))
    assert src.lookup(NAME) == []  # ...are stale, and ignored
    assert [(n, live) for n, live, _ in src.services()] == [(NAME, False)]
    with pytest.raises(ResolveError, match="no source knows it"):
        await Resolver(host_store=store, zeroconf=False).resolve(NAME)
    procs.append(_start_cli_server(store))  # the same name starts cleanly
    async with connect(NAME, host_store=store) as conn:
        assert conn.transport == "vchan"
        assert await conn.call("echo", "again") == "AGAIN"


async def test_sigterm_withdraws_everything(
    store: Path, procs: list[subprocess.Popen[str]]
) -> None:
    procs.append(_start_cli_server(store))
    assert sorted(p.name for p in store.iterdir()) == [
        f"{NAME}.lock", f"{NAME}.meshlink.json", f"{NAME}.sock"]
    procs[0].send_signal(signal.SIGTERM)
    assert procs[0].wait(timeout=30) == 0
    assert list(store.iterdir()) == []


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP listener that accepts and then never says anything."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, hold, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_a_silent_endpoint_times_out_and_falls_back(
    server: Server, store: Path, certs: Certs, tmp_path: Path, silent_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(f'[names]\n"{NAME}" = ["tls://127.0.0.1:{silent_port}", '
                     f'"tcp://127.0.0.1:{server.tcp_port}"]\n')
    async with connect(NAME, host_store=tmp_path / "elsewhere", rules=rules,
                       tls=certs.client_tls(), attempt_timeout=0.5) as conn:
        assert conn.transport == "tcp"
        assert conn.endpoint is not None and conn.endpoint.port == server.tcp_port
    assert any(f"tls://127.0.0.1:{silent_port} failed" in r.getMessage()
               for r in caplog.records if r.name == "meshlink.connect")


async def test_cancelling_connect_leaves_nothing_open(
    store: Path, certs: Certs, tmp_path: Path, silent_port: int
) -> None:
    with trio.CancelScope() as scope:
        async def cancel_when_blocked() -> None:
            from trio.testing import wait_all_tasks_blocked

            await wait_all_tasks_blocked(0.05)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_blocked)
            async with connect(NAME, host_store=store, tls=certs.client_tls(),
                               pin=f"tls://127.0.0.1:{silent_port}"):
                pytest.fail("connected to a silent endpoint")
    assert scope.cancelled_caught
