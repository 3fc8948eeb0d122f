"""meshlink.transport.tls: our mutual-TLS contexts pass trio's two-way stream conformance suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio.testing import check_two_way_stream

from meshlink import AuthError
from meshlink.transport.tls import TLSConfig, peer_names, tls_client_stream, tls_server_handshake

from .helpers.connect_certs import Certs, make_certs

NAME = "storage-node"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), NAME)


async def _tls_pair(certs: Certs, client: TLSConfig, server: TLSConfig,
                    service: str = NAME) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    out: dict[str, trio.abc.Stream] = {}

    async def accept() -> None:
        raw = await listeners[0].accept()
        tls = trio.SSLStream(raw, server.server_context(), server_side=True)
        try:
            await tls_server_handshake(tls, server)
        except AuthError:
            await trio.aclose_forcefully(tls)  # the client's error is what we test
            return
        out["server"] = tls

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        out["client"] = await tls_client_stream(raw, client.client_context(), service)
    await listeners[0].aclose()
    return out["client"], out["server"]


async def test_mutual_tls_streams_are_conforming(certs: Certs) -> None:
    async def maker() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        return await _tls_pair(certs, certs.client_tls(), certs.server_tls(["client-1"]))

    await check_two_way_stream(maker, None)  # type: ignore[arg-type]


async def test_server_sees_the_client_name(certs: Certs) -> None:
    client, server = await _tls_pair(certs, certs.client_tls(), certs.server_tls())
    assert isinstance(server, trio.SSLStream)
    assert peer_names(server.getpeercert()) == ["client-1"]
    await client.aclose()
    await server.aclose()


async def test_client_refuses_a_server_certificate_for_another_name(certs: Certs) -> None:
    with pytest.raises(BaseExceptionGroup) as info:
        # the server's certificate names storage-node, we asked for other-node
        await _tls_pair(certs, certs.client_tls(), certs.server_tls(), service="other-node")
    refused = info.value.subgroup(
        lambda e: isinstance(e, AuthError) and "server certificate refused" in str(e))
    assert refused is not None, info.value


def test_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("MESHLINK_TLS_CERT", "MESHLINK_TLS_KEY", "MESHLINK_TLS_CA", "MESHLINK_TLS_ALLOW"):
        monkeypatch.delenv(var, raising=False)
    assert TLSConfig.from_env() is None
    monkeypatch.setenv("MESHLINK_TLS_CA", "/ca.pem")
    monkeypatch.setenv("MESHLINK_TLS_ALLOW", "a, b")
    cfg = TLSConfig.from_env(cert="/c.pem")
    assert cfg == TLSConfig("/c.pem", None, "/ca.pem", frozenset({"a", "b"}))
    assert cfg.can_connect and cfg.can_serve
