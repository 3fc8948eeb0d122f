"""meshlink.disk.open by name: blk ring when co-located, else NBD over TLS via the resolver."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trio

from meshlink import ResolveError
from meshlink.disk import BlkDisk, MemoryBackend, TLSMode, serve
from meshlink.disk import open as open_disk
from resolver import Resolver

from .helpers.connect_certs import Certs, make_certs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), "storage-node")


def _resolver(tmp: Path, store: Path, rules: str) -> Resolver:
    path = tmp / "rules.toml"
    path.write_text(rules)
    return Resolver(host_store=store, rules=path, zeroconf=False)


async def test_remote_disk_is_opened_over_nbd_tls(certs: Certs, store: Path,
                                                  tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    port, dead = free_port(), free_port()
    server_tls = certs.server_tls()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(
            {"disk0": MemoryBackend(1 << 20)}, f"127.0.0.1:{port}", tls=TLSMode.REQUIRED,
            ssl_context=server_tls.server_context(), task_status=task_status))
        # The first endpoint is dead: open falls back to the next and says why.
        res = _resolver(tmp_path, store, '[names]\n"storage-node.nbd" = '
                        f'["tls://127.0.0.1:{dead}", "tls://127.0.0.1:{port}"]\n')
        with caplog.at_level(logging.WARNING, logger="meshlink.disk"):
            async with open_disk("storage-node/disk0", host_store=store, resolver=res,
                                 tls=certs.client_tls()) as disk:
                assert not isinstance(disk, BlkDisk)
                await disk.write(4096, b"\x5c" * 4096)
                assert await disk.read(4096, 4096) == b"\x5c" * 4096
        assert any(f"127.0.0.1:{dead}" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()


async def test_plain_tcp_is_refused_by_default(certs: Certs, store: Path,
                                               tmp_path: Path) -> None:
    """With only a plain-TCP endpoint known, no connection is ever attempted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    res = _resolver(tmp_path, store, f'[names]\n"storage-node.nbd" = ["tcp://127.0.0.1:{port}"]\n')
    with pytest.raises(ResolveError):
        async with open_disk("storage-node/disk0", host_store=store, resolver=res,
                             tls=certs.client_tls()):
            pass
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected
    listener.close()
