"""Standard NBD clients (libnbd tools, qemu, fio) against our server, unmodified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.nbd import nbd_server, need, random_image, run, sha256

MIB = 1 << 20


def test_nbdinfo_list_shows_export(tmp_path: Path) -> None:
    need("nbdinfo")
    with nbd_server(tmp_path, "alpha", extra=["--description", "test disk"]) as srv:
        out = run(["nbdinfo", "--list", "--json", srv.uri]).stdout
    exports = json.loads(out)["exports"]
    assert [e["export-name"] for e in exports] == ["alpha"]
    assert exports[0]["export-size"] == 64 * MIB
    assert exports[0]["description"] == "test disk"


def test_nbdinfo_reports_truthful_flags(tmp_path: Path) -> None:
    need("nbdinfo")
    with nbd_server(tmp_path, "ro", extra=["--read-only"]) as srv:
        info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
    export = info["exports"][0]
    assert export["is_read_only"] is True
    assert export["can_trim"] is False and export["can_zero"] is False
    assert export["can_flush"] is True and export["can_multi_conn"] is True
    assert "base:allocation" in export["contexts"]
    assert export["block_size_maximum"] == 32 * MIB


def test_nbdinfo_map_shows_holes_and_data(tmp_path: Path) -> None:
    need("nbdinfo")
    image = random_image(tmp_path / "src.img", 8 * MIB)
    with nbd_server(tmp_path, "f", "file", size=None, path=image) as srv:
        extents = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
    # Every odd MiB is a hole (hole|zero = 3), every even one is data (0).
    by_offset = {e["offset"]: e for e in extents}
    assert by_offset[0]["type"] == 0
    assert by_offset[MIB]["type"] == 3 and by_offset[MIB]["length"] == MIB
    assert sum(e["length"] for e in extents) == 8 * MIB


@pytest.mark.slow
def test_nbdcopy_both_directions(tmp_path: Path) -> None:
    need("nbdcopy")
    src = random_image(tmp_path / "src.img", 32 * MIB)
    back = tmp_path / "back.img"
    with nbd_server(tmp_path, "m", size="32M") as srv:
        run(["nbdcopy", "--flush", str(src), srv.uri])
        run(["nbdcopy", srv.uri, str(back)])
    assert sha256(back) == sha256(src)


def test_qemu_img_convert_and_compare(tmp_path: Path) -> None:
    need("qemu-img")
    src = random_image(tmp_path / "src.img", 16 * MIB, seed=b"qemu")
    with nbd_server(tmp_path, "q", size="16M") as srv:
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri])
        out = tmp_path / "out.qcow2"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, str(out)])
        run(["qemu-img", "compare", "-F", "raw", str(out), str(src)])
        # A difference must be noticed: change one byte on the export and compare again.
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 512", srv.uri])
        differs = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri],
                      check=False)
    assert differs.returncode == 1, differs.stdout + differs.stderr


def test_qemu_io_write_read_discard_zero_flush(tmp_path: Path) -> None:
    need("qemu-io", "nbdinfo")
    with nbd_server(tmp_path, "io") as srv:
        result = run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M",
                      "-c", "read -P 0xab 0 1M", "-c", "discard 0 64k",
                      "-c", "write -z 1M 1M", "-c", "flush", srv.uri])
        assert "Pattern verification failed" not in result.stdout
        check = run(["qemu-io", "-f", "raw", "-c", "read -P 0 0 64k",
                     "-c", "read -P 0xab 64k 960k", "-c", "read -P 0 1M 1M", srv.uri])
        assert "Pattern verification failed" not in check.stdout
        extents = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
    assert extents[0] == {"offset": 0, "length": 64 * 1024, "type": 3,
                          "description": "hole,zero"}
    assert extents[1]["offset"] == 64 * 1024 and extents[1]["type"] == 0


@pytest.mark.slow
def test_fio_random_read_write_verify(tmp_path: Path) -> None:
    need("fio")
    with nbd_server(tmp_path, "fio", size="32M") as srv:
        result = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}",
                      "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=32M",
                      "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                      # fio would otherwise leave a verify-state file in the cwd
                      "--verify_state_save=0",
                      "--output-format=json"], timeout=240)
    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


def test_socket_activation_with_nbdinfo(tmp_path: Path) -> None:
    need("nbdinfo")
    import sys

    out = run(["nbdinfo", "--size", "--", "[", sys.executable, "-m", "meshlink.disk", "serve",
               "sa", "--backend", "memory", "--size", "3M", "--nbd", "]"]).stdout
    assert out.strip() == str(3 * MIB)


def test_cow_over_nbd_keeps_gold_image(tmp_path: Path) -> None:
    need("qemu-io")
    gold = random_image(tmp_path / "gold.img", 4 * MIB, seed=b"gold")
    before = sha256(gold)
    with nbd_server(tmp_path, "cow", "cow", size=None, path=gold) as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "flush", srv.uri])
        check = run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 0 1M", srv.uri])
        assert "Pattern verification failed" not in check.stdout
    assert sha256(gold) == before


def test_tcp_listener(tmp_path: Path) -> None:
    need("nbdinfo")
    with nbd_server(tmp_path, "t", tcp=True) as srv:
        assert srv.uri.startswith("nbd://127.0.0.1:")
        assert run(["nbdinfo", "--size", srv.uri]).stdout.strip() == str(64 * MIB)
