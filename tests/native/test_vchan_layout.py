"""The native vchan layout equals Xen's libxenvchan.h, byte for byte."""

from __future__ import annotations

import json
import mmap
import shutil
import subprocess
from pathlib import Path

import pytest

from meshlink._native import ffi, lib
from meshlink.transport.vchan.ring import choose_orders

HERE = Path(__file__).parent
XEN_HEADER = Path("/usr/include/xen/io/libxenvchan.h")
FIELDS = ["left.cons", "left.prod", "right.cons", "right.prod", "left_order", "right_order",
          "cli_live", "srv_live", "cli_notify", "srv_notify", "grants"]


@pytest.fixture(scope="module")
def xen_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not XEN_HEADER.exists() or shutil.which("gcc") is None:
        pytest.skip("needs gcc and libxen-dev (installed by .ci/run)")
    exe = tmp_path_factory.mktemp("layout") / "xen_vchan_layout"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-o", str(exe),
                    str(HERE / "xen_vchan_layout.c")], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_field_offsets_match_xen(xen_layout: dict[str, int]) -> None:
    ours = {name: lib.ml_vchan_field_offset(i) for i, name in enumerate(FIELDS)}
    assert ours == {name: xen_layout[name] for name in FIELDS}
    assert lib.ml_vchan_header_size() == xen_layout["sizeof"] == 24
    assert xen_layout["NOTIFY_WRITE"] == 1 and xen_layout["NOTIFY_READ"] == 2


def test_inpage_ring_offsets() -> None:
    # libxenvchan: order 10 at 1024, order 11 at 2048, pages from order 12.
    assert lib.ml_vchan_inpage_offset(10) == 1024
    assert lib.ml_vchan_inpage_offset(11) == 2048
    assert [lib.ml_vchan_ring_pages(o) for o in (10, 11, 12, 13, 16, 20)] == [0, 0, 1, 2, 16, 256]
    for o in range(12, 21):
        assert lib.ml_vchan_inpage_offset(o) == 0


def test_seed_control_page_orders_13_13() -> None:
    # docs/vchan.md section 1: what a MirageOS server printed for orders 13/13, grants 9..12.
    expected = bytes.fromhex(
        "00" * 16 + "0d000d00" + "02010100" + "09000000" "0a000000" "0b000000" "0c000000"
    )
    page = mmap.mmap(-1, 4096)
    page.write(b"\xff" * 4096)
    grants = ffi.new("uint32_t[]", [9, 10, 11, 12])
    assert lib.ml_vchan_ctrl_init(ffi.from_buffer(page), 13, 13, grants, 4) == 0
    assert page[:40] == expected
    page.close()


@pytest.mark.parametrize(
    ("lo", "ro", "ngrants"),
    [(10, 10, 0), (11, 11, 0), (9, 12, 1), (12, 21, 1), (20, 10, 256), (13, 13, 3)],
)
def test_ctrl_init_rejects_bad_layouts(lo: int, ro: int, ngrants: int) -> None:
    page = mmap.mmap(-1, 4096)
    grants = ffi.new("uint32_t[]", max(ngrants, 1))
    assert lib.ml_vchan_ctrl_init(ffi.from_buffer(page), lo, ro, grants, ngrants) == lib.ML_EINVAL
    page.close()


@pytest.mark.parametrize(
    ("read_min", "write_min", "orders"),
    [
        (0, 0, (10, 11)),
        (1024, 2048, (10, 11)),
        (2048, 1024, (11, 10)),
        (2048, 2048, (11, 12)),
        (1025, 4096, (11, 12)),
        (4096, 2048, (12, 11)),
        (4097, 4097, (13, 13)),
        (1 << 16, 1 << 16, (16, 16)),
        (1 << 20, 1, (20, 11)),
        (1 << 20, 1 << 20, (20, 20)),
    ],
)
def test_server_order_choice(read_min: int, write_min: int, orders: tuple[int, int]) -> None:
    assert choose_orders(read_min, write_min) == orders


def test_server_order_choice_rejects_too_big() -> None:
    from meshlink import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        choose_orders((1 << 20) + 1, 0)
