"""The native blk ring layout equals Xen's blkif.h / ring.h (x86_64), byte for byte."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from meshlink._native import lib

HERE = Path(__file__).parent
NAMES = ["req_prod", "req_event", "rsp_prod", "rsp_event", "ring", "operation", "nr_segments",
         "handle", "id", "sector_number", "seg", "first_sect", "last_sect", "rsp_operation",
         "rsp_status", "discard_flag", "discard_nr_sectors", "ind_indirect_op",
         "ind_nr_segments", "ind_handle", "ind_indirect_grefs", "sizeof_indirect"]


@pytest.fixture(scope="module")
def xen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if not Path("/usr/include/xen/io/blkif.h").exists() or shutil.which("gcc") is None:
        pytest.skip("needs gcc and libxen-dev (installed by .ci/run)")
    exe_path = tmp_path_factory.mktemp("blkif") / "xen_blkif_layout"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-o", str(exe_path),
                    str(HERE / "xen_blkif_layout.c")], check=True)
    out = subprocess.run([str(exe_path)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_offsets_match_xen(xen: dict[str, object]) -> None:
    ours = {name: lib.ml_blk_field_offset(i) for i, name in enumerate(NAMES)}
    assert ours == {name: xen[name] for name in NAMES}


def test_sizes_match_xen(xen: dict[str, object]) -> None:
    assert lib.ml_blk_request_size() == xen["sizeof_request"] == xen["sizeof_slot"] == 112
    assert lib.ml_blk_response_size() == xen["sizeof_response"] == 16
    assert lib.ml_blk_sring_header_size() == xen["ring"] == 64
    assert lib.ML_BLK_MAX_SEGMENTS == xen["max_segments"] == 11


def test_ring_entries_for_orders_0_to_4(xen: dict[str, object]) -> None:
    ours = [lib.ml_blk_ring_entries(order) for order in range(5)]
    assert ours == xen["entries"] == [32, 64, 128, 256, 512]
    assert lib.ml_blk_ring_entries(5) == 0 and lib.ml_blk_ring_entries(-1) == 0


def test_constants_match_xen(xen: dict[str, object]) -> None:
    assert [lib.ML_BLK_OP_READ, lib.ML_BLK_OP_WRITE, lib.ML_BLK_OP_WRITE_BARRIER,
            lib.ML_BLK_OP_FLUSH_DISKCACHE, lib.ML_BLK_OP_DISCARD,
            lib.ML_BLK_OP_INDIRECT] == xen["ops"]
    assert [lib.ML_BLK_RSP_OKAY, lib.ML_BLK_RSP_ERROR, lib.ML_BLK_RSP_EOPNOTSUPP] == xen["status"]
