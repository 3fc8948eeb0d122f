"""Issue 12: what a service admits by default, and refusals that never fall back.

* ``serve`` listens on plain TCP only when asked; ports are checked.
* TLS refusals, either way, are :class:`AuthError` naming the certificate problem.
* A vchan refused for our uid (the server's allow list, or the socket's
  permissions) is an :class:`AuthError` -- never a fallback to TCP.
* A client refuses a vchan server whose uid is not the owner of its record.

The other local user is the real ``nobody``: these tests need root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from meshlink import AuthError, LocalProtocolError, Server, connect, serve
from resolver import HostStore, ResolveError
from resolver.hoststore import ServiceRecord, default_host_id, write_record

from .helpers.connect_certs import Certs, make_certs
from .test_connect import NAME, echo_handlers

ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as 'nobody'")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), NAME)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MESHLINK_TLS_CERT", "MESHLINK_TLS_KEY", "MESHLINK_TLS_CA", "MESHLINK_RULES",
                "MESHLINK_ZEROCONF", "MESHLINK_HOST_ID", "MESHLINK_HOST_STORE",
                "MESHLINK_ALLOW_PLAINTEXT"):
        monkeypatch.delenv(var, raising=False)


#: Run as root until everything is imported (the interpreter lives under /root,
#: out of nobody's reach), then become nobody for good, then run the payload.
AS_NOBODY = """
import os, sys, json, logging, socket, ssl, encodings.idna
import trio, meshlink.cli._app, meshlink.cli.service, meshlink.service, meshlink.bus, resolver
import meshlink.client, meshlink.client_session, meshlink.session  # connect's modules
import resolver._resolver  # resolver loads its sources on first use: load them as root
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
"""
CALL = AS_NOBODY + "sys.exit(meshlink.cli._app.main(sys.argv[1:]))\n"


#: nobody's primary group: the group a shared store is opened to in these tests.
NOGROUP = 65534


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLINK_")}
    env["PYTHONPATH"] = str(ROOT)
    env["MESHLINK_HOST_STORE_GROUP"] = str(NOGROUP)
    return env


@pytest.fixture
def shared_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A host store shared, on purpose, with nobody's group (pytest's tmp_path is
    private to root): root:nogroup, mode 2770, as ``HostStore(group=...)`` wants."""
    top = Path(tempfile.mkdtemp(prefix="meshlink-sec-"))
    top.chmod(0o755)
    store = top / "store"
    store.mkdir()
    os.chown(store, 0, NOGROUP)
    store.chmod(0o2770)
    monkeypatch.setenv("MESHLINK_HOST_STORE_GROUP", str(NOGROUP))
    yield store
    shutil.rmtree(top)


async def _serve(nursery: trio.Nursery, store: Path, **kw: object) -> Server:
    srv: Server = await nursery.start(partial(
        serve, NAME, echo_handlers(), host_store=store, handle_sigterm=False, **kw))
    return srv


# --- 1. nothing listens that was not asked for -------------------------------------------


async def test_default_serve_opens_no_plain_tcp(store: Path, certs: Certs) -> None:
    async with trio.open_nursery() as nursery:
        srv = await _serve(nursery, store, tls=certs.server_tls())
        assert srv.tcp_port == 0 and srv.transports == ("vchan", "tls")
        record = (store / f"{NAME}.meshlink.json").read_text()
        assert "tcp://" not in record
        # a client that may use neither vchan nor TLS has nothing left, and is told why
        with pytest.raises(ResolveError) as info:
            async with connect(NAME, host_store=store, forbid_vchan=True):
                pytest.fail("connected over plain TCP to a server that never offered it")
        assert "vchan" in str(info.value) and "TLS" in str(info.value)
        srv.stop()
    assert srv.accepted["tcp"] == 0
    async with trio.open_nursery() as nursery:  # no certificate: vchan alone
        srv = await _serve(nursery, store)
        assert srv.transports == ("vchan",) and srv.tls_port == 0 and srv.tcp_port == 0
        srv.stop()


async def test_plain_tcp_when_asked_binds_loopback(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHLINK_ALLOW_PLAINTEXT", "1")
    async with trio.open_nursery() as nursery:
        srv = await _serve(nursery, store, vchan=False)
        assert srv.tcp_port != 0
        assert [ep.url for ep in srv.endpoints] == [f"tcp://127.0.0.1:{srv.tcp_port}"]
        srv.stop()
    monkeypatch.setenv("MESHLINK_ALLOW_PLAINTEXT", "maybe")
    with pytest.raises(LocalProtocolError, match="MESHLINK_ALLOW_PLAINTEXT"):
        await serve(NAME, echo_handlers(), host_store=store)


@pytest.mark.parametrize("kw, match", [
    (dict(tcp_port=7002), "needs allow_plaintext"),
    (dict(tcp_port=70000, allow_plaintext=True), "1..65535"),
    (dict(tcp_port=-1, allow_plaintext=True), "1..65535"),
    (dict(tls_port=65536), "1..65535"),
    (dict(tls_port=True), "1..65535"),
    (dict(allow_plaintext=True, require_tls=True), "contradict"),
    (dict(vchan=False), "listen nowhere"),
])
async def test_serve_refuses_bad_listener_options(
    store: Path, kw: dict[str, object], match: str
) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        await serve(NAME, echo_handlers(), host_store=store, handle_sigterm=False, **kw)
    assert list(store.iterdir()) == []  # nothing claimed, nothing bound


@pytest.mark.parametrize("args, err", [
    (["--tcp", "--tcp-port", "70000"], "outside 1..65535"),
    (["--tls-port", "-5"], "outside 1..65535"),
    (["--tcp-port", "7002"], "--tcp-port needs --tcp"),
    (["--tcp", "--no-tcp"], "not allowed with argument"),
])
def test_cli_serve_echo_usage_errors_exit_2(store: Path, args: list[str], err: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshlink.cli", "serve-echo", NAME, "--host-store", str(store),
         *args], capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 2, out.stderr
    assert err in out.stderr
    assert list(store.iterdir()) == []


# --- 2. TLS refusals name the certificate problem, both ways ---------------------------------


@pytest.mark.parametrize("case, client_says, server_says", [
    ("rogue_client", "tlsv1 alert unknown ca",
     "certificate verify failed: unable to get local issuer certificate"),
    ("no_cert", "tlsv13 alert certificate required", "peer did not return a certificate"),
    ("other_client", "not in the server's allow list", "['intruder'] are not allowed"),
])
async def test_server_refuses_client_certificate_and_says_why(
    store: Path, certs: Certs, case: str, client_says: str, server_says: str
) -> None:
    from meshlink.transport.tls import TLSConfig

    tls = TLSConfig(None, None, certs.ca) if case == "no_cert" else certs.client_tls(case)
    async with trio.open_nursery() as nursery:
        srv = await _serve(nursery, store, tls=certs.server_tls(allow=["client-1"]),
                           vchan=False)
        with pytest.raises(AuthError, match="refused our certificate") as info:
            async with connect(NAME, host_store=store, tls=tls,
                               pin=f"tls://127.0.0.1:{srv.tls_port}"):
                pytest.fail("connected with a refused certificate")
        assert client_says in str(info.value)
        assert srv.refused["tls"] == 1 and server_says in srv.last_refusal
        srv.stop()


@pytest.mark.parametrize("case, says", [
    ("hostname", "certificate verify failed: Hostname mismatch"),
    ("untrusted", "certificate verify failed: self-signed certificate in certificate chain"),
])
async def test_client_refuses_server_certificate_and_says_why(
    store: Path, certs: Certs, case: str, says: str
) -> None:
    from meshlink.transport.tls import TLSConfig

    name = "other-name" if case == "hostname" else NAME
    tls = certs.client_tls() if case == "hostname" else TLSConfig(certs.client, None,
                                                                   certs.rogue_ca)
    async with trio.open_nursery() as nursery:
        srv = await _serve(nursery, store, tls=certs.server_tls(), vchan=False)
        with pytest.raises(AuthError, match="server certificate refused") as info:
            async with connect(name, host_store=store, tls=tls,
                               pin=f"tls://127.0.0.1:{srv.tls_port}"):
                pytest.fail("accepted a server certificate it should not")
        assert says in str(info.value)
        assert srv.accepted["tls"] == 0
        srv.stop()


# --- 3. a refused vchan is an AuthError, never a fallback --------------------------------------


@needs_root
@pytest.mark.parametrize("socket_mode, says", [
    (None, "uid 65534 is not allowed"),        # the server's allow list refuses
    (0o640, "Permission denied"),              # the kernel refuses (socket not writable)
])
async def test_nobody_refused_on_vchan_does_not_fall_back_to_tcp(
    shared_store: Path, socket_mode: int | None, says: str
) -> None:
    async with trio.open_nursery() as nursery:
        # root's server: vchan (root only, the default) and plain TCP, asked for
        srv = await _serve(nursery, shared_store, allow_plaintext=True)
        # the group store lets nobody resolve the entry and reach the socket
        if socket_mode is not None:
            (shared_store / f"{NAME}.sock").chmod(socket_mode)
        out = await trio.run_process(
            [sys.executable, "-c", CALL, "call", NAME, "echo", "hi",
             "--host-store", str(shared_store)],
            capture_stdout=True, capture_stderr=True, check=False, env=_env())
        srv.stop()
    err = out.stderr.decode()
    assert out.returncode == 1, (out.stdout, err)
    assert says in err and "vchan://host-store/" in err, err
    assert "tcp://" not in err  # not even attempted
    assert srv.accepted == {"vchan": 0, "tls": 0, "tcp": 0}


# --- 4. the client checks who serves the vchan ---------------------------------------------------


IMPOSTOR = AS_NOBODY + """
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(1)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def impostor_slot(shared_store: Path) -> Iterator[Path]:
    """Root's live claim and record for NAME, its socket path left for someone else."""
    hs = HostStore(shared_store, group=NOGROUP)  # a store nobody's group may bind in
    pub = hs.claim(NAME)
    write_record(hs, ServiceRecord(NAME, default_host_id(hs), ("vchan",)))
    yield pub.socket_path
    pub.withdraw()


@needs_root
async def test_client_refuses_a_vchan_server_not_owning_the_record(
    impostor_slot: Path,
) -> None:
    with subprocess.Popen([sys.executable, "-c", IMPOSTOR, str(impostor_slot)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env=_env()) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        try:
            with trio.fail_after(3):  # an accepted hello would wait out the 5 s handshake
                with pytest.raises(AuthError, match="runs as uid 65534, but its host store "
                                                    "record belongs to uid 0"):
                    async with connect(NAME, host_store=impostor_slot.parent):
                        pytest.fail("talked to a server that does not own the record")
        finally:
            proc.communicate("")


@needs_root
async def test_record_owner_must_match_the_real_server(store: Path) -> None:
    async with trio.open_nursery() as nursery:
        srv = await _serve(nursery, store)
        async with connect(NAME, host_store=store) as conn:  # owner matches: fine
            assert conn.transport == "vchan"
        nobody = pwd.getpwnam("nobody").pw_uid
        os.chown(store / f"{NAME}.meshlink.json", nobody, -1)
        with pytest.raises(AuthError, match=f"runs as uid 0, but .* uid {nobody}"):
            async with connect(NAME, host_store=store):
                pass
        srv.stop()
    assert srv.accepted["vchan"] == 1


# --- 6. a service's connections are bounded, whatever their transport ---------------------------


async def test_serve_closes_connections_beyond_its_limit(store: Path) -> None:
    from meshlink import BusConfig
    from meshlink import ResolveError as MeshResolveError

    async with trio.open_nursery() as nursery:
        srv = await _serve(nursery, store, config=BusConfig(max_connections=1))
        with trio.fail_after(10):
            async with connect(NAME, host_store=store) as first:
                assert await first.call("echo", "a") == "A"
                # the service is full: the second connection is closed at once
                with pytest.raises(MeshResolveError):
                    async with connect(NAME, host_store=store):
                        pytest.fail("a connection beyond the limit was served")
                assert await first.call("echo", "b") == "B"  # the first one is unharmed
            async with connect(NAME, host_store=store) as third:  # its slot came back
                assert await third.call("echo", "c") == "C"
        srv.stop()
    assert srv.accepted["vchan"] == 2
