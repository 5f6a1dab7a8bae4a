"""The segmentation example's site trainer: a 3D UNet on this site's NIfTI volumes, with MONAI's loaders and Dice.

On first use it writes the site's synthetic volumes and datalist into the site's workspace (`data/`, beside the run
folders, reused by later runs). Under `fedadmin start-mgpu N` each rank trains with DistributedDataParallel on its
own shard of the training volumes (nccl on GPUs, gloo on CPUs); rank 0 validates on all the held-out volumes.
On CUDA it trains with AMP (autocast + GradScaler), channels-last weights and cuDNN's autotuner.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from network import SegmentationUNet
from torch.nn.parallel import DistributedDataParallel
from volumes import DataError, SiteVolumes, check_volumes, find_unreadable, load_datalist, synthetic_datalist

try:
    import monai  # noqa: F401
except ImportError as e:  # a plain `pip install fedlearn[site]` has no MONAI
    raise ImportError("the segmentation example needs MONAI and nibabel: pip install 'fedlearn[examples]'") from e

from monai.data import CacheDataset, ThreadDataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    ScaleIntensityd,
    Spacingd,
)

log = logging.getLogger(__name__)

KEYS = ("image", "label")
TARGET_SPACING = (1.0, 1.0, 1.0)


class GpuMemoryError(RuntimeError):
    """Out of GPU memory; the message says which knob of config_train.json to lower."""


def out_of_memory_hint(site: str, phase: str, knobs: dict) -> str:
    """What to tell the operator when `phase` ("training", "validating", "caching") ran out of GPU memory."""
    shown = ", ".join(f"{k}={v}" for k, v in knobs.items())
    lower = {
        "training": "lower batch_size first, then num_samples (crops per volume) or roi_size, or channels",
        "validating": "lower sw_batch_size first, then roi_size (the sliding window)",
        "caching": "set cache_on_device to false (volumes then stay in host memory), or lower num_train or volume_size",
    }[phase]
    amp = "" if knobs.get("amp", True) else "; or turn amp on (half the activation memory)"
    return f"{site}: out of GPU memory while {phase} ({shown}): in config_train.json's trainer args, {lower}{amp}"


def _out_of_memory(e: BaseException | None) -> bool:
    """Whether `e` or an exception it was raised from is torch's CUDA out-of-memory error."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
        e = e.__cause__ or e.__context__
    return False


class SegmentationTrainer:
    """Trains and validates a 3D UNet (Dice + cross-entropy) on one site's volumes; reports mean Dice."""

    def __init__(
        self,
        site_name: str,
        run_dir: str,
        sites: dict[str, dict],
        volume_size: int = 32,
        num_train: int = 8,
        num_val: int = 4,
        channels: Sequence[int] = (8, 16, 32, 64),
        num_res_units: int = 1,
        epochs_per_round: int = 4,
        batch_size: int = 2,
        learning_rate: float = 5e-3,
        roi_size: int | None = None,
        num_samples: int = 1,
        sw_batch_size: int = 4,
        amp: bool = True,
        channels_last: bool = True,
        cache_on_device: bool = True,
        cpu_threads: int = 0,
        datalist: str | None = None,
        data_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        if epochs_per_round < 1 or batch_size < 1 or num_samples < 1 or sw_batch_size < 1 or learning_rate <= 0:
            raise ValueError(
                "epochs_per_round, batch_size, num_samples and sw_batch_size must be >= 1 and learning_rate > 0"
            )
        self.site_name = site_name
        self.epochs_per_round = epochs_per_round
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.roi_size = (roi_size or volume_size,) * 3
        self.sw_batch_size = sw_batch_size
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # One process on a GPU machine uses the GPU; ranks use theirs when the site's group is nccl.
        gpu = dist.get_backend() == "nccl" if dist.is_initialized() else torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        self.amp = bool(amp) and gpu
        self._knobs = {
            "batch_size": batch_size,
            "num_samples": num_samples,
            "roi_size": self.roi_size[0],
            "sw_batch_size": sw_batch_size,
            "channels": list(channels),
            "volume_size": volume_size,
            "num_train": num_train,
            "amp": self.amp,
        }
        if gpu:
            torch.backends.cudnn.benchmark = True
        elif cpu_threads > 0:
            # Sites sharing a few cores run many times faster with one thread each than with oversubscribed pools.
            torch.set_num_threads(cpu_threads)

        workspace = Path(run_dir).resolve().parent
        if datalist is None:
            if site_name not in sites:
                raise DataError(
                    f"site {site_name!r} has no entry in the trainer's 'sites' (known: {', '.join(sorted(sites))})"
                )
            knobs = SiteVolumes.from_args(site_name, sites[site_name])
            root = workspace / (data_dir or "data/segmentation-3d")
            datalist_path = synthetic_datalist(root, site_name, knobs, volume_size, num_train, num_val)
        else:
            datalist_path = workspace / datalist
        train_entries = load_datalist(datalist_path, site_name, "training")
        val_entries = load_datalist(datalist_path, site_name, "validation")
        check_volumes(train_entries + val_entries, site_name)
        self._num_train = len(train_entries)
        per_rank = len(train_entries) // self.world_size
        if per_rank < 1:
            raise DataError(
                f"{site_name}: {len(train_entries)} training volumes cannot be shared by "
                f"{self.world_size} ranks; raise num_train"
            )
        shard = train_entries[self.rank :: self.world_size][:per_rank]

        cache_device = self.device if cache_on_device else torch.device("cpu")
        deterministic = [
            LoadImaged(keys=KEYS, image_only=True),
            EnsureChannelFirstd(keys=KEYS),
            Orientationd(keys=KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=KEYS, pixdim=TARGET_SPACING, mode=("bilinear", "nearest")),
            ScaleIntensityd(keys="image"),
            EnsureTyped(keys=KEYS, device=cache_device, track_meta=False),
        ]
        augment = [
            RandCropByPosNegLabeld(
                keys=KEYS,
                label_key="label",
                spatial_size=self.roi_size,
                pos=1,
                neg=1,
                num_samples=num_samples,
                image_key="image",
                image_threshold=0,
            ),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
            RandRotate90d(keys=KEYS, prob=0.5, spatial_axes=(0, 1)),
        ]
        train_transform = Compose(deterministic + augment).set_random_state(seed=seed * 1000 + self.rank)
        self._train_set = self._cache(shard, train_transform)
        self._loader = ThreadDataLoader(
            self._train_set,
            batch_size=batch_size,
            shuffle=True,
            num_workers=0,
            generator=torch.Generator().manual_seed(seed * 1000 + self.rank),
        )
        # Only rank 0 validates: the other ranks keep no held-out volumes.
        self._val_set = self._cache(val_entries, Compose(deterministic)) if self.rank == 0 else None

        torch.manual_seed(seed)
        self.model = SegmentationUNet(channels=channels, num_res_units=num_res_units).to(self.device)
        self._memory_format = torch.channels_last_3d if channels_last and gpu else torch.contiguous_format
        self.model = self.model.to(memory_format=self._memory_format)
        # Ranks train through the DDP wrapper; `model` stays the plain module whose weights the framework reads.
        self._net = self.model
        if self.world_size > 1:
            self._net = DistributedDataParallel(self.model, device_ids=[self.device.index] if gpu else None)
        self._loss = DiceCELoss(sigmoid=True)
        self._scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self._steps = 0

    def _cache(self, entries: list[dict[str, str]], transform: Compose) -> CacheDataset:
        """The volumes after the deterministic transforms, loaded once by a few threads (ranks share the cores)."""
        threads = max(1, min(8, (os.cpu_count() or 1) // self.world_size))
        try:
            return CacheDataset(entries, transform=transform, cache_rate=1.0, num_workers=threads, progress=False)
        except Exception as e:
            if _out_of_memory(e):  # MONAI wraps a transform's error in its own RuntimeError
                raise GpuMemoryError(out_of_memory_hint(self.site_name, "caching", self._knobs)) from e
            # The headers were fine: find the file whose data is not, and name it.
            raise find_unreadable(entries, self.site_name) or DataError(
                f"{self.site_name}: loading the volumes failed: {e}"
            ) from e

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp)

    def train(self, progress: Callable[[int, float], None] | None = None) -> dict:
        """One local phase of epochs_per_round epochs; progress(epoch from 1, mean loss) after each."""
        try:
            return self._train(progress)
        except Exception as e:
            if _out_of_memory(e):  # also when a GPU transform's error comes wrapped by MONAI
                raise GpuMemoryError(out_of_memory_hint(self.site_name, "training", self._knobs)) from e
            raise

    def _train(self, progress: Callable[[int, float], None] | None) -> dict:
        self.model.train()
        # A fresh optimizer each phase: the model's weights were just replaced by the global ones.
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        steps, images, mean_loss = 0, 0, 0.0
        for epoch in range(1, self.epochs_per_round + 1):
            # Summed on the device: reading each step's loss would wait for the GPU every step.
            loss_sum, count = torch.zeros((), device=self.device), 0
            for batch in self._loader:
                image = batch["image"].to(self.device, non_blocking=True).to(memory_format=self._memory_format)
                label = batch["label"].to(self.device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    logits = self._net(image)
                # The loss in float32: Dice sums over a whole crop, beyond what float16 holds.
                loss = self._loss(logits.float(), label)
                self._scaler.scale(loss).backward()
                self._scaler.step(optimizer)
                self._scaler.update()
                steps += 1
                images += len(image)
                loss_sum += loss.detach().float() * len(image)
                count += len(image)
            mean_loss = loss_sum.item() / count
            if progress is not None:
                progress(epoch, mean_loss)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        log.info(
            "%s rank %d: trained %d crops of %s in %.2f s: %.1f images/s, peak GPU memory %.0f MiB",
            self.site_name,
            self.rank,
            images,
            "x".join(map(str, self.roi_size)),
            seconds,
            images / seconds,
            peak,
        )
        self._steps = steps
        return {"loss": mean_loss, "steps": steps}

    def validate(self) -> dict[str, float]:
        """{"dice": mean Dice of the foreground (thresholded at 0.5) over this site's held-out volumes}.

        Dice alone: with no "accuracy" a reported "...loss" would rank models instead (fedcommon.metrics).
        """
        if self._val_set is None:
            raise RuntimeError(f"{self.site_name}: rank {self.rank} keeps no held-out volumes; rank 0 validates")
        try:
            return self._validate()
        except Exception as e:
            if _out_of_memory(e):  # also when a GPU transform's error comes wrapped by MONAI
                raise GpuMemoryError(out_of_memory_hint(self.site_name, "validating", self._knobs)) from e
            raise

    def _validate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        # compute_dice per volume, not DiceMetric: its aggregate() all-gathers across ranks, and only rank 0
        # validates (the others would never join the collective).
        dice_sum = 0.0
        with torch.no_grad(), self._autocast():
            for item in self._val_set:
                image = item["image"][None].to(self.device).to(memory_format=self._memory_format)
                label = item["label"][None].to(self.device)
                logits = sliding_window_inference(
                    image, self.roi_size, self.sw_batch_size, self.model, overlap=0.25
                ).float()
                pred = (torch.sigmoid(logits) > 0.5).float()
                # ignore_empty=False: a volume without foreground scores 1 if the model leaves it empty, else 0.
                dice_sum += float(compute_dice(pred, label, include_background=True, ignore_empty=False).mean())
        self.model.train(was_training)
        return {"dice": dice_sum / len(self._val_set)}

    def num_local_iterations(self) -> int:
        """Optimizer steps taken by the last train() (0 before any)."""
        return self._steps

    def num_samples(self) -> int:
        """Number of training volumes at this site (all ranks together)."""
        return self._num_train
