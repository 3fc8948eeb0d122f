"""meshlink.connect_blocking: calls without trio, against a real server process
(tests/helpers/blocking_server.py) over vchan, TCP and TLS."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshlink
from meshlink import (
    AuthError,
    BlockingConnection,
    ConnectionLost,
    RemoteError,
    ResolveError,
    connect_blocking,
)
from meshlink.bus import BusConfig

from .conftest import Peer
from .helpers.connect_certs import Certs, make_certs

NAME = "blocking-svc"


class Server:
    def __init__(self, store: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.peer = Peer("blocking_server.py", str(store), NAME, *args, env=env)
        assert self.peer.proc.stdout is not None
        line = self.peer.proc.stdout.readline().split()
        assert line and line[0] == "ready", line
        self.tls_port = line[1]
        self.tcp_port = line[2]

    def expect(self, line: str) -> None:
        self.peer.expect(line)

    def kill(self) -> None:
        self.peer.kill()


@pytest.fixture
def server(store: Path) -> Iterator[Server]:
    srv = Server(store)
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), NAME)


def over(kind: str, store: Path, server: Server) -> BlockingConnection:
    if kind == "vchan":
        return connect_blocking(NAME, host_store=store)
    return connect_blocking(NAME, host_store=store, allow_plaintext=True,
                            pin=f"tcp://127.0.0.1:{server.tcp_port}")


@pytest.mark.parametrize("kind", ["vchan", "tcp"])
def test_calls_notifies_and_errors(kind: str, store: Path, server: Server) -> None:
    with over(kind, store, server) as conn:
        assert conn.transport == kind
        assert conn.call("echo", {"a": [1, b"x"]}) == {"a": [1, b"x"]}
        big = b"z" * (3 << 20)  # more than the 256 KiB ring: written in pieces
        assert conn.call("echo", big) == big
        for i in range(2000):
            conn.notify("note", i)
        # A call after notifications runs after them.
        assert conn.call("take_notes", 2000) == list(range(2000))
        with pytest.raises(RemoteError) as info:
            conn.call("fail", "no")
        assert (info.value.remote_type, info.value.remote_message) == ("ValueError", "no")
        with pytest.raises(RemoteError) as info:
            conn.call("no_such_method")
        assert info.value.remote_type == "MethodNotFound"
        with pytest.raises(meshlink.LocalProtocolError):
            conn.call("echo", object())
        assert conn.call("echo", 1) == 1  # every error above left it usable


@pytest.mark.parametrize("kind", ["vchan", "tcp"])
def test_what_the_server_asks_of_us_is_answered(kind: str, store: Path, server: Server) -> None:
    with over(kind, store, server) as conn:
        assert conn.call("call_back") == "MethodNotFound"
        # Its notifications are ignored, and their credit returned: far more
        # than the notify window (256 KiB) goes through.
        assert conn.call("notify_back", 20_000) == 20_000
        assert conn.call("echo", "still") == "still"


def test_a_timeout_cancels_the_handler_and_drops_its_late_reply(store: Path,
                                                               server: Server) -> None:
    with over("vchan", store, server) as conn:
        with pytest.raises(TimeoutError):
            conn.call("sleep", 30, timeout=0.2)
        assert conn.call("was_cancelled") is True
        assert conn.call("sleep", 0, timeout=10) == 0


def test_a_connection_the_server_dropped_is_opened_again_for_the_next_call(
    store: Path,
) -> None:
    srv = Server(store, "--heartbeat", "0.05")
    try:
        conn = connect_blocking(NAME, host_store=store)
        assert conn.call("echo", 1) == 1
        srv.expect("lost 1")  # idle: nobody answered the server's pings
        assert conn.call("echo", 2) == 2
        assert conn.reconnects == 1
        # A long call is kept alive by the pongs it answers meanwhile.
        assert conn.call("sleep", 0.5) == 0.5
        assert conn.reconnects == 1
        conn.close()
    finally:
        srv.kill()


def test_a_server_that_died_fails_the_call_in_flight_and_is_found_again(store: Path) -> None:
    srv = Server(store)
    conn = connect_blocking(NAME, host_store=store)
    try:
        assert conn.call("echo", 1) == 1
        os.kill(srv.peer.proc.pid, signal.SIGSTOP)  # frozen mid-call, then killed
        with pytest.raises(TimeoutError):
            conn.call("echo", 2, timeout=0.3)
        srv.kill()
        with pytest.raises((ConnectionLost, ResolveError)):
            conn.call("echo", 3)  # nothing serves the name now
        srv = Server(store)
        assert conn.call("echo", 4) == 4  # the restarted server, by name
        assert conn.transport == "vchan"
    finally:
        conn.close()
        srv.kill()


def test_a_server_killed_during_a_call_fails_that_call(store: Path) -> None:
    srv = Server(store)
    conn = connect_blocking(NAME, host_store=store)

    def kill_once_it_sleeps() -> None:
        srv.expect("sleeping")
        os.kill(srv.peer.proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_it_sleeps)
    killer.start()
    try:
        # The caller sleeps in C (poll on the doorbell); the liveness socket
        # wakes it, and the call fails instead of waiting for the heartbeat.
        with pytest.raises(ConnectionLost):
            conn.call("sleep", 60)
    finally:
        killer.join()
        conn.close()
        srv.kill()


def test_a_killed_server_is_seen_before_the_next_call_is_sent(store: Path) -> None:
    srv = Server(store)
    conn = connect_blocking(NAME, host_store=store)
    try:
        assert conn.call("echo", 1) == 1
        srv.kill()
        srv = Server(store)
        # The old ring's liveness socket says its server is gone: the call
        # goes to the new one instead of failing.
        assert conn.call("echo", 2) == 2
        assert conn.reconnects == 1
    finally:
        conn.close()
        srv.kill()


def test_closed_connection_refuses_calls(store: Path, server: Server) -> None:
    import trio

    conn = over("vchan", store, server)
    conn.close()
    conn.close()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        conn.call("echo", 1)


def test_no_server_is_a_resolve_error(store: Path) -> None:
    with pytest.raises(ResolveError):
        connect_blocking(NAME, host_store=store)


def test_tls_with_a_client_certificate(store: Path, certs: Certs) -> None:
    srv = Server(store, "--tls", certs.server, certs.ca)
    try:
        with connect_blocking(NAME, host_store=store, forbid_vchan=True,
                              tls=certs.client_tls()) as conn:
            assert conn.transport == "tls"
            assert conn.call("echo", b"secret") == b"secret"
    finally:
        srv.kill()


def test_a_tls_refusal_never_falls_back_to_tcp(store: Path, certs: Certs) -> None:
    # The server allows one client name, not ours; plain TCP is on offer and
    # allowed, but a refusal must not turn into a downgrade.
    srv = Server(store, "--tls", certs.server, certs.ca, "someone-else")
    try:
        with pytest.raises(AuthError):
            connect_blocking(NAME, host_store=store, forbid_vchan=True,
                             allow_plaintext=True, tls=certs.client_tls(),
                             config=BusConfig(handshake_timeout=5))
    finally:
        srv.kill()


def test_a_server_certificate_from_another_ca_is_refused(store: Path, certs: Certs) -> None:
    srv = Server(store, "--tls", certs.server, certs.ca)
    try:
        with pytest.raises(AuthError):
            connect_blocking(NAME, host_store=store, forbid_vchan=True,
                             tls=meshlink.TLSConfig(certs.client, None, certs.rogue_ca))
    finally:
        srv.kill()


async def test_refused_inside_trio(store: Path) -> None:
    with pytest.raises(meshlink.LocalProtocolError, match="meshlink.connect"):
        connect_blocking(NAME, host_store=store)


def test_a_signal_ends_a_call_that_waits(store: Path) -> None:
    # The caller sleeps in C (poll); a signal must reach its Python handler at
    # once, as Ctrl-C must, not when the reply comes.  No heartbeat here: a
    # ping would wake the caller anyway.
    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    srv = Server(store, "--heartbeat", "1000")
    old = signal.signal(signal.SIGUSR1, handler)
    conn = connect_blocking(NAME, host_store=store)
    main = threading.get_ident()

    def signal_once_it_sleeps() -> None:
        srv.expect("sleeping")
        signal.pthread_kill(main, signal.SIGUSR1)  # the thread that sleeps in C

    sender = threading.Thread(target=signal_once_it_sleeps)
    sender.start()
    try:
        with pytest.raises(Interrupted):
            conn.call("sleep", 10)  # under our heartbeat timeout (15 s), which would wake it
        assert conn.call("sleeps_finished") == 0  # it did not wait for the reply
    finally:
        sender.join()
        signal.signal(signal.SIGUSR1, old)
        conn.close()
        srv.kill()


def test_a_server_that_breaks_the_protocol_is_dropped(store: Path) -> None:
    # A hand-made TCP server: a proper hello, then bytes that are no frame.
    from meshlink.bus.codec import PROTOCOL_VERSION
    from meshlink.bus.events import NEED_DATA, Close, Hello, Request
    from meshlink.bus.proto import BusProtocol

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            sock, _ = listener.accept()
            with sock:
                proto = BusProtocol(Hello(PROTOCOL_VERSION, ["rpc"], "liar", 8, 65536, 65536,
                                          1 << 20))
                sock.sendall(proto.send(proto.our_hello))
                while True:  # until its request (or its goodbye) is in
                    data = sock.recv(65536)
                    proto.receive_data(data)
                    events = []
                    while (ev := proto.next_event()) is not NEED_DATA:
                        events.append(type(ev))
                    if not data or Request in events or Close in events:
                        break
                if Request in events:
                    sock.sendall(b"\xc1\xc1\xc1\xc1")  # 0xc1: never valid msgpack
                    sock.recv(1)  # until the client hangs up

    t = threading.Thread(target=serve)
    t.start()
    try:
        conn = connect_blocking(NAME, host_store=store, allow_plaintext=True,
                                pin=f"tcp://127.0.0.1:{port}")
        conn.close()  # the first connection: hello only
        conn = connect_blocking(NAME, host_store=store, allow_plaintext=True,
                                pin=f"tcp://127.0.0.1:{port}")
        with pytest.raises(meshlink.RemoteProtocolError):
            conn.call("echo", 1)
        conn.close()
    finally:
        t.join()
        listener.close()


def test_a_server_that_corrupts_the_ring_is_dropped(store: Path) -> None:
    # No pings: the server's next write (its first ping can come late on a
    # loaded machine) would publish its true index over the corrupted one
    # (its writer keeps its own copy), undoing it.
    server = Server(store, "--heartbeat", "0")
    conn = connect_blocking(NAME, host_store=store)
    try:
        with pytest.raises(meshlink.RemoteProtocolError, match="corrupt"):
            conn.call("corrupt_my_ring")
        with connect_blocking(NAME, host_store=store) as other:
            other.call("heal_rings")  # the ring looks sound again now
        # That connection is never read again: the next call opens another.
        assert conn.call("echo", 5) == 5
        assert conn.reconnects == 1, conn.reconnects
    finally:
        conn.close()
        server.kill()


def test_a_ring_corrupted_between_calls_is_dropped_before_the_next(store: Path) -> None:
    """The look before a call (ml_vchan_idle) finds the ring corrupted: the
    connection is dropped and the call goes out on a new one."""
    server = Server(store, "--heartbeat", "0")  # no ping to undo it (see above)
    try:
        with connect_blocking(NAME, host_store=store) as conn:
            assert conn.call("echo", 1) == 1
            conn.notify("corrupt_my_ring")  # runs on the server while we make no call
            with connect_blocking(NAME, host_store=store) as other:
                other.call("ring_corrupted")  # returns once it is done
            assert conn.call("echo", 2) == 2
            assert conn.reconnects == 1, conn.reconnects
    finally:
        server.kill()
