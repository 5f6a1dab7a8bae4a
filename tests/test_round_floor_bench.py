"""The round's floor benchmark does the round's work: every byte over mutual TLS, summed, the new model on disk."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import round_floor_bench as floor  # noqa: E402


@pytest.mark.slow
def test_the_floor_round_moves_every_byte_and_writes_the_averaged_model(tmp_path):
    result = floor.one_round(tmp_path, 8)
    # The model is all ones and each site sends back what it pulled: the new model is 1 + (1 + 1) / 2.
    model = np.fromfile(tmp_path / "model.bin", np.float32)
    assert model.size == 8 * 2**20 // 4
    assert np.all(model == 2.0)
    assert 0 < result["pulls_done_s"] <= result["round_wall_s"]
    assert result["disk_write_s"] > 0 and result["disk_read_s"] > 0
    assert not (tmp_path / "disk.bin").exists()


@pytest.mark.slow
def test_a_site_that_fails_fails_the_round_and_leaves_no_process(tmp_path, monkeypatch):
    prepare = floor.prepare_poc

    def without_site_2s_key(kits, *args):
        names = prepare(kits, *args)
        (kits / "site-2" / "startup" / floor.KEY_FILE).unlink()
        return names

    monkeypatch.setattr(floor, "prepare_poc", without_site_2s_key)
    with pytest.raises(RuntimeError, match="ended early"):
        floor.one_round(tmp_path, 1)
    left = [p for p in psutil.Process().children(recursive=True) if "round_floor_bench" in " ".join(p.cmdline())]
    assert left == []
