"""STARTTLS: required mode refuses plaintext with NBD_REP_ERR_TLS_REQD; TLS clients work."""

from __future__ import annotations

import json
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from meshlink.disk.nbd import open_nbd
from meshlink.disk.nbd import wire as c
from tests.helpers.nbd import Server, nbd_server, need, run

trustme = pytest.importorskip("trustme")


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1, and a client certificate,
    laid out the way libnbd's tls-certificates directory expects."""
    d = tmp_path / "pki"
    d.mkdir()
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client.example")
    ca.cert_pem.write_to_path(d / "ca-cert.pem")
    server.private_key_pem.write_to_path(d / "server-key.pem")
    server.cert_chain_pems[0].write_to_path(d / "server-cert.pem")
    client.private_key_pem.write_to_path(d / "client-key.pem")
    client.cert_chain_pems[0].write_to_path(d / "client-cert.pem")
    return d


def _tls_args(certs: Path, mode: str) -> list[str]:
    return ["--tls", mode, "--tls-cert", str(certs / "server-cert.pem"),
            "--tls-key", str(certs / "server-key.pem"), "--tls-ca", str(certs / "ca-cert.pem")]


@pytest.fixture
def tls_server(tmp_path: Path, certs: Path) -> Iterator[Server]:
    with nbd_server(tmp_path, "secure", size="4M", tcp=True,
                    extra=_tls_args(certs, "required")) as srv:
        yield srv


def _plain_option(port: int, option: int, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert len(sock.recv(18, socket.MSG_WAITALL)) == 18
        sock.sendall(struct.pack(">I", 3))
        sock.sendall(struct.pack(">QII", c.IHAVEOPT, option, len(data)) + data)
        _, _, rtype, length = struct.unpack(">QIII", sock.recv(20, socket.MSG_WAITALL))
        return int(rtype)


def test_plaintext_client_refused_with_tls_reqd(tls_server: Server) -> None:
    assert tls_server.port is not None
    go = struct.pack(">I", 6) + b"secure" + struct.pack(">H", 0)
    assert _plain_option(tls_server.port, c.OPT_GO, go) == c.REP_ERR_TLS_REQD
    assert _plain_option(tls_server.port, c.OPT_LIST, b"") == c.REP_ERR_TLS_REQD


def test_nbdinfo_plaintext_fails(tls_server: Server) -> None:
    need("nbdinfo")
    result = run(["nbdinfo", tls_server.uri], check=False)
    assert result.returncode != 0


def test_nbdinfo_over_tls_with_certificates(tls_server: Server, certs: Path) -> None:
    need("nbdinfo")
    uri = tls_server.uri.replace("nbd://", "nbds://") + f"?tls-certificates={certs}"
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 4 << 20


def test_nbdinfo_without_client_certificate_is_refused(tls_server: Server, certs: Path,
                                                       tmp_path: Path) -> None:
    need("nbdinfo")
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    (only_ca / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
    uri = tls_server.uri.replace("nbd://", "nbds://") + f"?tls-certificates={only_ca}"
    assert run(["nbdinfo", uri], check=False).returncode != 0
    assert tls_server.proc.poll() is None


async def test_our_client_over_tls(tls_server: Server, certs: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    ctx.load_cert_chain(certs / "client-cert.pem", certs / "client-key.pem")
    uri = tls_server.uri.replace("nbd://", "nbds://")
    async with open_nbd(uri, ssl_context=ctx) as disk:
        await disk.write(512, b"secret" * 1000)
        assert await disk.read(512, 6000) == b"secret" * 1000
        assert disk.info.contexts  # negotiated again after STARTTLS
    await trio.lowlevel.checkpoint()


def test_optional_tls_serves_both(tmp_path: Path, certs: Path) -> None:
    need("nbdinfo")
    with nbd_server(tmp_path, "opt", size="1M", tcp=True,
                    extra=_tls_args(certs, "optional")) as srv:
        plain = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
        uri = srv.uri.replace("nbd://", "nbds://") + f"?tls-certificates={certs}"
        secure = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert plain["TLS"] is False and secure["TLS"] is True
