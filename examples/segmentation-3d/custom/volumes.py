"""A site's volumes: synthetic NIfTI images and labels written once with a datalist, and checks that name bad files.

The datalist is the JSON MONAI bundles read (`{"training": [{"image": ..., "label": ...}], "validation": [...]}`,
paths relative to the datalist's folder). A site with real data points the trainer at its own datalist instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DATALIST = "datalist.json"
SPLITS = ("training", "validation")


class DataError(ValueError):
    """A site's data that cannot be used; the message names the site and the file."""


@dataclass(frozen=True)
class SiteVolumes:
    """How one site's synthetic volumes look: what makes its data differ from another site's."""

    num_objs: int = 8
    rad_min: int = 4
    rad_max: int = 10
    noise_max: float = 0.3
    intensity_scale: float = 1.0
    spacing: float = 1.0
    seed: int = 0

    @classmethod
    def from_args(cls, site: str, args: dict) -> SiteVolumes:
        """The knobs of `site` from the trainer's `sites` entry; DataError naming an unknown key."""
        unknown = sorted(set(args) - set(cls.__dataclass_fields__))
        if unknown:
            raise DataError(f"{site}: unknown volume settings {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**args)


def synthetic_datalist(root: Path, site: str, knobs: SiteVolumes, size: int, num_train: int, num_val: int) -> Path:
    """The datalist of `site`'s synthetic volumes under `root`, generated on first use and reused afterwards.

    The folder is named by a hash of everything that shapes the volumes, so changed knobs get new volumes; it is
    written to a temporary folder and renamed into place under a lock, so ranks or runs starting together write it
    once and never read a half-written one.
    """
    if 2 * knobs.rad_max >= size or not 1 <= knobs.rad_min < knobs.rad_max:
        raise DataError(
            f"{site}: object radius must satisfy 1 <= rad_min < rad_max < volume_size/2, got "
            f"rad_min={knobs.rad_min} rad_max={knobs.rad_max} volume_size={size}"
        )
    if num_train < 1 or num_val < 1:
        raise DataError(f"{site}: num_train and num_val must be >= 1, got {num_train} and {num_val}")
    recipe = {"site": site, "size": size, "num_train": num_train, "num_val": num_val, **asdict(knobs)}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    folder = root / f"{site}-{size}-{digest}"
    datalist = folder / DATALIST
    if datalist.is_file():
        return datalist
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not datalist.is_file():
            _write_volumes(folder, recipe, knobs, size, num_train, num_val)
    return datalist


def _write_volumes(folder: Path, recipe: dict, knobs: SiteVolumes, size: int, num_train: int, num_val: int) -> None:
    scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=folder.parent))
    try:
        names = {
            "training": [f"train_{i:04d}" for i in range(num_train)],
            "validation": [f"val_{i:04d}" for i in range(num_val)],
        }
        jobs = [(name, knobs.seed * 1_000_003 + i) for i, name in enumerate(names["training"] + names["validation"])]
        (scratch / "images").mkdir()
        (scratch / "labels").mkdir()
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(lambda job: _write_pair(scratch, job[0], job[1], knobs, size), jobs))
        entries = {
            split: [{"image": f"images/{n}.nii.gz", "label": f"labels/{n}.nii.gz"} for n in names[split]]
            for split in SPLITS
        }
        (scratch / DATALIST).write_text(
            json.dumps({"name": "synthetic spheres", "recipe": recipe, **entries}, indent=1)
        )
        if folder.exists():  # a half-written folder of a process that died: never read, replaced
            shutil.rmtree(folder)
        os.rename(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_pair(folder: Path, name: str, seed: int, knobs: SiteVolumes, size: int) -> None:
    import nibabel as nib
    from monai.data.synthetic import create_test_image_3d

    image, label = create_test_image_3d(
        size,
        size,
        size,
        num_objs=knobs.num_objs,
        rad_max=knobs.rad_max,
        rad_min=knobs.rad_min,
        noise_max=knobs.noise_max,
        num_seg_classes=1,
        random_state=np.random.RandomState(seed),
    )
    affine = np.diag([knobs.spacing, knobs.spacing, knobs.spacing, 1.0])
    nib.save(
        nib.Nifti1Image((image * knobs.intensity_scale).astype(np.float32), affine),
        folder / "images" / f"{name}.nii.gz",
    )
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / "labels" / f"{name}.nii.gz")


def load_datalist(path: Path, site: str, split: str) -> list[dict[str, str]]:
    """The entries of one split of a datalist, paths made absolute; DataError naming the site and the file."""
    from monai.data import load_decathlon_datalist

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{site}: datalist {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{site}: datalist {path} is not readable JSON: {e}") from None
    entries = raw.get(split) if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(
            f"{site}: datalist {path} has no {split!r} volumes (an empty or missing list); nothing was started"
        )
    bad = next(
        (
            i
            for i, e in enumerate(entries)
            if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("image", "label"))
        ),
        None,
    )
    if bad is not None:
        raise DataError(f"{site}: datalist {path}: {split}[{bad}] must name an 'image' and a 'label' file")
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=split, base_dir=str(path.parent))


def check_volumes(entries: list[dict[str, str]], site: str) -> None:
    """Every image and label exists, reads as NIfTI, and each label's shape is its image's; DataError otherwise.

    Headers only (cheap, even for hundreds of volumes); `find_unreadable` reads the data when loading fails.
    """
    import nibabel as nib

    for entry in entries:
        shapes = {}
        for key in ("image", "label"):
            file = Path(entry[key])
            if not file.is_file():
                raise DataError(f"{site}: {key} file {file} does not exist; nothing was started")
            try:
                shapes[key] = tuple(nib.load(file).shape[:3])
            except Exception as e:  # nibabel raises many kinds for a damaged header
                raise DataError(
                    f"{site}: {key} file {file} is not a readable NIfTI file ({e}); nothing was started"
                ) from None
        if shapes["image"] != shapes["label"]:
            raise DataError(
                f"{site}: label {entry['label']} has shape {shapes['label']} but its image "
                f"{entry['image']} has {shapes['image']}; nothing was started"
            )


def find_unreadable(entries: list[dict[str, str]], site: str) -> DataError | None:
    """The error for the first image or label whose data cannot be read (a truncated or corrupt file), or None."""
    import nibabel as nib

    for entry in entries:
        for key in ("image", "label"):
            try:
                np.asanyarray(nib.load(entry[key]).dataobj)
            except Exception as e:
                return DataError(
                    f"{site}: {key} file {entry[key]} is corrupt ({type(e).__name__}: {e}); nothing was started"
                )
    return None
