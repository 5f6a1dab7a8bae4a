"""The segmentation example's data path and error messages: synthetic NIfTI volumes, datalists, bad files, GPU OOM."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcommon.components import ComponentError, build_component
from fedcommon.metrics import metric_score, primary_metric
from fedcommon.mmar import Component, load_mmar

pytest.importorskip("monai", reason="the segmentation example needs MONAI: pip install 'fedlearn[examples]'")
nib = pytest.importorskip("nibabel", reason="the segmentation example needs nibabel: pip install 'fedlearn[examples]'")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "segmentation-3d"
TINY = {
    "volume_size": 16,
    "num_train": 2,
    "num_val": 1,
    "channels": [4, 8],
    "epochs_per_round": 1,
    "sw_batch_size": 1,
    "sites": {
        "site-1": {"num_objs": 3, "rad_min": 2, "rad_max": 5, "seed": 1},
        "site-2": {
            "num_objs": 2,
            "rad_min": 3,
            "rad_max": 6,
            "noise_max": 0.5,
            "intensity_scale": 500.0,
            "spacing": 1.25,
            "seed": 2,
        },
    },
}


def _volumes():
    """The example's custom/volumes.py, under a name of its own."""
    spec = importlib.util.spec_from_file_location("segmentation_volumes", EXAMPLE / "custom" / "volumes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


volumes = _volumes()


def make_trainer(site: str, workspace: Path, **args: object):
    mmar = load_mmar(EXAMPLE)
    component = Component(mmar.train.trainer.path, {**mmar.train.trainer.args, **TINY, **args})
    return build_component(component, [mmar.custom_dir], site_name=site, run_dir=str(workspace / "run_1"))


def _datalist(tmp_path: Path, training: list[dict], validation: list[dict] | None = None) -> Path:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": training, "validation": validation or training}))
    return path


def _pair(folder: Path, name: str, image_shape=(16, 16, 16), label_shape=(16, 16, 16)) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.rand(*image_shape).astype(np.float32), np.eye(4)), folder / f"{name}_img.nii.gz")
    label = (np.random.rand(*label_shape) > 0.5).astype(np.uint8)
    nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"{name}_seg.nii.gz")
    return {"image": f"{folder.name}/{name}_img.nii.gz", "label": f"{folder.name}/{name}_seg.nii.gz"}


def test_a_sites_volumes_are_written_once_as_nifti_with_a_datalist_and_reused(tmp_path):
    knobs = volumes.SiteVolumes(num_objs=3, rad_min=2, rad_max=5, seed=1)
    first = volumes.synthetic_datalist(tmp_path, "site-1", knobs, 16, 2, 1)
    written = {p: p.stat().st_mtime_ns for p in first.parent.rglob("*.nii.gz")}
    assert len(written) == 6  # 3 images and their labels

    again = volumes.synthetic_datalist(tmp_path, "site-1", knobs, 16, 2, 1)
    assert again == first and {p: p.stat().st_mtime_ns for p in first.parent.rglob("*.nii.gz")} == written
    entries = volumes.load_datalist(first, "site-1", "training")
    image = nib.load(entries[0]["image"])
    assert image.shape == (16, 16, 16) and set(np.unique(nib.load(entries[0]["label"]).get_fdata())) <= {0, 1}

    other = volumes.synthetic_datalist(
        tmp_path, "site-1", volumes.SiteVolumes(num_objs=3, rad_min=2, rad_max=5, seed=2), 16, 2, 1
    )
    assert other.parent != first.parent, "changed knobs get volumes of their own"


def test_sites_differ_in_intensity_and_voxel_spacing(tmp_path):
    one, two = (make_trainer(site, tmp_path / site) for site in ("site-1", "site-2"))
    lists = sorted((tmp_path).glob("*/data/segmentation-3d/*/datalist.json"))
    images = [nib.load(volumes.load_datalist(p, "s", "training")[0]["image"]) for p in lists]
    assert images[0].get_fdata().max() <= 1.0 < 100 < images[1].get_fdata().max()
    assert images[1].header.get_zooms() == (1.25, 1.25, 1.25)
    # Spacingd resamples site-2's 1.25 mm volumes to 1 mm: 16 voxels become 20.
    assert one._val_set[0]["image"].shape == (1, 16, 16, 16) and two._val_set[0]["image"].shape == (1, 20, 20, 20)
    metrics = one.validate()
    assert set(metrics) == {"dice"} and 0.0 <= metrics["dice"] <= 1.0
    assert primary_metric(metrics) == "dice" and metric_score(metrics) == metrics["dice"], "higher is better"


def test_a_missing_image_is_named_with_the_site_and_nothing_starts(tmp_path):
    entry = _pair(tmp_path / "images", "a")
    datalist = _datalist(tmp_path, [entry, {"image": "images/gone.nii.gz", "label": entry["label"]}])
    with pytest.raises(
        ComponentError,
        match=r"site-1: image file .*images/gone\.nii\.gz does not exist; "
        r"nothing was started",
    ):
        make_trainer("site-1", tmp_path, datalist=str(datalist))


def test_a_corrupt_header_is_named_with_the_site(tmp_path):
    entry = _pair(tmp_path / "images", "a")
    (tmp_path / entry["label"]).write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    with pytest.raises(ComponentError, match=r"site-2: label file .*a_seg\.nii\.gz is not a readable NIfTI file"):
        make_trainer("site-2", tmp_path, datalist=str(_datalist(tmp_path, [entry])))


def test_a_truncated_volume_is_named_when_its_data_cannot_be_read(tmp_path):
    entry = _pair(tmp_path / "images", "a")
    image = tmp_path / entry["image"]
    raw = gzip.decompress(image.read_bytes())
    image.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # the header is whole, half the voxels are missing
    with pytest.raises(ComponentError, match=r"site-1: image file .*a_img\.nii\.gz is corrupt"):
        make_trainer("site-1", tmp_path, datalist=str(_datalist(tmp_path, [entry])))


def test_a_label_whose_shape_differs_from_its_image_is_refused(tmp_path):
    entry = _pair(tmp_path / "images", "a", label_shape=(16, 16, 12))
    with pytest.raises(
        ComponentError,
        match=r"site-1: label .*a_seg\.nii\.gz has shape \(16, 16, 12\) but its image "
        r".*a_img\.nii\.gz has \(16, 16, 16\)",
    ):
        make_trainer("site-1", tmp_path, datalist=str(_datalist(tmp_path, [entry])))


def test_an_empty_datalist_is_refused_naming_the_file_and_the_site(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "validation": []}))
    with pytest.raises(ComponentError, match=r"site-1: datalist .*datalist\.json has no 'training' volumes"):
        make_trainer("site-1", tmp_path, datalist=str(datalist))
    with pytest.raises(volumes.DataError, match=r"site-1: datalist .*nowhere\.json does not exist"):
        volumes.load_datalist(tmp_path / "nowhere.json", "site-1", "training")


def test_a_site_without_volume_settings_is_named_with_the_known_ones(tmp_path):
    with pytest.raises(
        ComponentError,
        match=r"site 'site-9' has no entry in the trainer's 'sites' \(known: site-1, "
        r"site-2\)",
    ):
        make_trainer("site-9", tmp_path)
    assert set(load_mmar(EXAMPLE).train.trainer.args["sites"]) == {"site-1", "site-2", "hospital-a", "hospital-b"}


def test_out_of_gpu_memory_says_which_knob_to_lower(tmp_path, monkeypatch):
    trainer = make_trainer("site-1", tmp_path)
    module = type(trainer).__module__

    def no_memory(*_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_train", no_memory)
    monkeypatch.setattr(trainer, "_validate", no_memory)
    with pytest.raises(
        RuntimeError,
        match=r"site-1: out of GPU memory while training \(batch_size=2, num_samples=1, "
        r"roi_size=16, .*lower batch_size first, then num_samples",
    ) as e:
        trainer.train()
    assert type(e.value).__name__ == "GpuMemoryError" and type(e.value).__module__ == module
    assert isinstance(e.value.__cause__, torch.cuda.OutOfMemoryError)
    with pytest.raises(RuntimeError, match=r"while validating .*lower sw_batch_size first, then roi_size"):
        trainer.validate()

    # While caching on the GPU, MONAI wraps the error in its own RuntimeError.
    def wrapped(*_, **__):
        try:
            no_memory()
        except torch.cuda.OutOfMemoryError as e:
            raise RuntimeError("applying transform <EnsureTyped>") from e

    monkeypatch.setattr(sys.modules[module], "CacheDataset", wrapped)
    with pytest.raises(RuntimeError, match=r"while caching .*set cache_on_device to false"):
        trainer._cache([], None)
    hint = sys.modules[module].out_of_memory_hint
    assert "set cache_on_device to false" in hint("site-1", "caching", {"num_train": 200, "amp": True})
    assert "turn amp on" in hint("site-1", "training", {"batch_size": 4, "amp": False})
    assert "turn amp on" not in hint("site-1", "training", {"batch_size": 4, "amp": True})
