"""End to end: the 3D segmentation MMAR (MONAI, real NIfTI files) trains federated on CPU, and as two gloo ranks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import ROOT, copy_mmar, prepare_workspace
from test_e2e_admin import fedadmin, ok_json, replies

pytest.importorskip("monai", reason="the segmentation example needs MONAI: pip install 'fedlearn[examples]'")
pytest.importorskip("nibabel", reason="the segmentation example needs nibabel: pip install 'fedlearn[examples]'")

pytestmark = pytest.mark.e2e

SEGMENTATION = ROOT / "examples" / "segmentation-3d"
SITES = ["site-1", "site-2"]


def _summary(ws: Path, run: int) -> dict:
    return json.loads((ws / "server" / f"run_{run}" / "summary.json").read_text())


def _mean_dice(metrics: dict[str, dict[str, float]]) -> float:
    return sum(m["dice"] for m in metrics.values()) / len(metrics)


def _run(ws: Path, number: int, mmar: Path, *start: str) -> float:
    """Deploy and start run `number`, wait until it completed; the seconds from start to completion."""
    ok_json(ws, "set-run", str(number))
    ok_json(ws, "deploy", str(mmar), "all")
    started = time.monotonic()
    ok_json(ws, *start)
    ok_json(ws, "wait", "--timeout", "300", timeout=330)
    return time.monotonic() - started


def _wait_matrix(ws: Path, cells: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        out = ok_json(ws, "validate")
        if sum(len(row) for row in out["results"].values()) >= cells or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def test_two_sites_train_on_their_nifti_volumes_to_dice_0_7_and_cross_validate(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    started = fedadmin(ws, "poc", "start", "--workspace", str(ws), timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        seconds = _run(ws, 1, copy_mmar(tmp_path / "seg", src=SEGMENTATION), "start", "all")
        summary = _summary(ws, 1)
        assert summary["status"] == "completed"
        # Each round's row scores the global model the sites received at its start; "final" the last one.
        curve = [_mean_dice(r["metrics"]) for r in summary["rounds"]] + [_mean_dice(summary["final_metrics"])]
        print(
            f"\nsegmentation-3d, 2 sites, {len(summary['rounds'])} rounds in {seconds:.1f} s; mean Dice per "
            f"round: {', '.join(f'{d:.3f}' for d in curve)}"
        )
        assert all(curve[i + 1] > curve[i] for i in range(len(curve) - 1)), curve
        assert curve[-1] >= 0.7, curve

        for site in SITES:  # the volumes went through the real loading path: NIfTI files named by a datalist
            (datalist,) = (ws / site / "data" / "segmentation-3d").glob("*/datalist.json")
            entries = json.loads(datalist.read_text())
            assert entries["training"] and entries["validation"]
            assert all(
                (datalist.parent / e["image"]).is_file() and e["image"].endswith(".nii.gz")
                for e in entries["training"] + entries["validation"]
            )

        metrics = ok_json(ws, "metrics")
        assert metrics["metric"] == "dice"
        png = tmp_path / "dice.png"
        ok_json(ws, "metrics", "--png", str(png))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        matrix = _wait_matrix(ws, 6)
        assert {site: set(row) for site, row in matrix["results"].items()} == {s: {*SITES, "server"} for s in SITES}
        dice = [cell["dice"] for row in matrix["results"].values() for cell in row.values()]
        print(
            "cross-site Dice (row: the validating site): "
            + "; ".join(
                f"{site}: " + ", ".join(f"{owner} {cell['dice']:.3f}" for owner, cell in sorted(row.items()))
                for site, row in sorted(matrix["results"].items())
            )
        )
        assert all(0.6 <= d <= 1.0 for d in dice), matrix["results"]
    finally:
        fedadmin(ws, "poc", "stop", "--workspace", str(ws), timeout=120)


def test_a_site_trains_the_segmentation_as_two_gloo_ranks_under_start_mgpu(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    started = fedadmin(ws, "poc", "start", "--workspace", str(ws), timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        mmar = copy_mmar(
            tmp_path / "seg",
            src=SEGMENTATION,
            server={"num_rounds": 2, "min_num_clients": 1},
            client={"cross_site_validate": False},
        )
        seconds = _run(ws, 1, mmar, "start-mgpu", "2", "all")
        summary = _summary(ws, 1)
        assert summary["status"] == "completed"
        log = (ws / "site-1" / "run_1" / "logs" / "worker.log").read_text()
        assert "rank 1 of 2 joined the site's process group (gloo)" in log
        # Each rank trained its own shard: 4 of the site's 8 volumes, one crop each, per epoch.
        for rank in (0, 1):
            assert f"site-1 rank {rank}: trained 16 crops" in log, log[-3000:]
        curve = [r["metrics"]["site-1"]["dice"] for r in [*summary["rounds"], {"metrics": summary["final_metrics"]}]]
        print(
            f"\nsegmentation-3d, 2 gloo ranks, 2 rounds in {seconds:.1f} s; Dice per round: "
            f"{', '.join(f'{d:.3f}' for d in curve)}"
        )
        first, final = curve[0], curve[-1]
        assert final > first + 0.3, (first, final)

        # A datalist naming a missing volume stops the site before it trains; the operator reads which file.
        (datalist,) = (ws / "site-1" / "data" / "segmentation-3d").glob("*/datalist.json")
        entries = json.loads(datalist.read_text())
        entries["training"][1]["image"] = "images/gone.nii.gz"
        (datalist.parent / "broken.json").write_text(json.dumps(entries))
        broken = copy_mmar(
            tmp_path / "broken",
            src=SEGMENTATION,
            server={"min_num_clients": 1},
            train_args={"datalist": str((datalist.parent / "broken.json").relative_to(ws / "site-1"))},
        )
        ok_json(ws, "set-run", "2")
        ok_json(ws, "deploy", str(broken), "all")
        ok_json(ws, "start", "all")
        deadline = time.monotonic() + 60
        while (status := replies(ok_json(ws, "status", "site-1"))["site-1"])["status"] != "training exception":
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert (
            "site-1: image file " in status["error"]
            and "images/gone.nii.gz does not exist; nothing was started" in status["error"]
        ), status["error"]
    finally:
        fedadmin(ws, "poc", "stop", "--workspace", str(ws), timeout=120)
