"""The digits example's site trainer: local training and validation on this site's shard of sklearn digits.

Under `fedadmin start-mgpu N` it runs as N ranks: each trains with DistributedDataParallel on its own slice of
the site's training split (on its GPU, or on CPU with gloo), and rank 0 validates on the whole held-out split.
"""

import importlib.util
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from model import DigitsNet
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# A plain `pip install fedlearn[site]` has no scikit-learn.
NO_SKLEARN = "the digits example reads scikit-learn's bundled digits: pip install 'fedlearn[examples]'"
if importlib.util.find_spec("sklearn") is None:
    raise ImportError(NO_SKLEARN)

# The split must be the same at every site, whatever each site's training seed, or shards would overlap.
SPLIT_SEED = 20240601
TRAIN_FRACTION = 0.8
PIXEL_MAX = 16.0


def _bundled_digits() -> Path | None:
    """scikit-learn's own file of the digits (what load_digits reads), found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels scaled to [0, 1], labels) of the 1797 digits, as sklearn.datasets.load_digits gives them."""
    path = _bundled_digits()
    if path is not None:
        # Importing sklearn.datasets costs a site about a second of CPU at every start; its file takes milliseconds.
        table = np.loadtxt(path, delimiter=",")
        pixels, labels = table[:, :-1], table[:, -1]
    else:  # a scikit-learn that keeps the file elsewhere: its own loader finds it
        from sklearn.datasets import load_digits

        data = load_digits()
        pixels, labels = data.data, data.target
    return (pixels / PIXEL_MAX).astype(np.float32), labels.astype(np.int64)


def site_index(site_name: str, num_sites: int, shards: dict[str, int] | None = None) -> int:
    """The 0-based shard of a site: shards[site_name] (k = 1..num_sites) if given, else k of "site-<k>"."""
    if shards and site_name in shards:
        k = shards[site_name]
    else:
        match = re.fullmatch(r"site-(\d+)", site_name)
        k = int(match.group(1)) if match else None
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_sites:
        named = f" or one of {', '.join(sorted(shards))} (the trainer's 'shards')" if shards else ""
        raise ValueError(
            f"site name {site_name!r} does not name a shard: expected 'site-<k>' with k in 1..{num_sites}{named} "
            f"(num_sites={num_sites})"
        )
    return k - 1


def split(labels: np.ndarray, index: int, num_sites: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out) of shard `index`: disjoint stratified shards, each split 80/20 per class."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, held_out = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        # Rotating the first shard per class spreads the remainders evenly over the sites.
        shard = members[(index - label) % num_sites :: num_sites]
        cut = int(round(TRAIN_FRACTION * len(shard)))
        train.append(shard[:cut])
        held_out.append(shard[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))


class DigitsTrainer:
    """Trains and validates DigitsNet on one site's shard of the digits data."""

    def __init__(
        self,
        site_name: str,
        run_dir: str,
        num_sites: int = 2,
        epochs_per_round: int = 3,
        learning_rate: float = 0.05,
        batch_size: int = 32,
        seed: int = 0,
        hidden: int = 64,
        shards: dict[str, int] | None = None,
    ) -> None:
        if not isinstance(num_sites, int) or num_sites < 1:
            raise ValueError(f"num_sites must be an integer >= 1, got {num_sites!r}")
        if epochs_per_round < 1 or batch_size < 1 or learning_rate <= 0:
            raise ValueError("epochs_per_round and batch_size must be >= 1 and learning_rate > 0")
        self.site_name = site_name
        self.run_dir = Path(run_dir)
        self.epochs_per_round = epochs_per_round
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        index = site_index(site_name, num_sites, shards)
        features, labels = _digits()
        self.train_index, self.held_out_index = split(labels, index, num_sites)
        if len(self.train_index) == 0 or len(self.held_out_index) == 0:
            raise ValueError(f"{site_name}: num_sites={num_sites} leaves this site without data")
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        gpu = dist.is_initialized() and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        self._x_train = torch.from_numpy(features[self.train_index]).to(self.device)
        self._y_train = torch.from_numpy(labels[self.train_index]).to(self.device)
        self._x_valid = torch.from_numpy(features[self.held_out_index]).to(self.device)
        self._y_valid = torch.from_numpy(labels[self.held_out_index]).to(self.device)
        torch.manual_seed(seed)
        self.model = DigitsNet(hidden=hidden).to(self.device)
        # Ranks train through the DDP wrapper (gradients averaged across ranks each step); `model` stays the
        # plain module, whose weights the framework reads and writes.
        self._net = self.model
        if self.world_size > 1:
            self._net = DistributedDataParallel(self.model, device_ids=[self.device.index] if gpu else None)
        # Every rank draws the same permutation and takes its own slice of it.
        self._batches = torch.Generator().manual_seed(seed * 1000 + index)
        self._loss = nn.CrossEntropyLoss()
        self._steps = 0

    def train(self, progress: Callable[[int, float], None] | None = None) -> dict:
        """One local phase of epochs_per_round epochs; progress(epoch from 1, mean loss) after each."""
        self.model.train()
        # A fresh optimizer each phase: the model's weights were just replaced by the global ones.
        optimizer = torch.optim.SGD(self.model.parameters(), lr=self.learning_rate, momentum=0.9)
        steps, loss_sum, count = 0, 0.0, 0
        for epoch in range(1, self.epochs_per_round + 1):
            order = self._rank_slice(torch.randperm(len(self._y_train), generator=self._batches))
            loss_sum, count = 0.0, 0
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size].to(self.device)
                optimizer.zero_grad()
                loss = self._loss(self._net(self._x_train[batch]), self._y_train[batch])
                loss.backward()
                optimizer.step()
                steps += 1
                loss_sum += loss.item() * len(batch)
                count += len(batch)
            if progress is not None:
                progress(epoch, loss_sum / count)
        self._steps = steps
        return {"loss": loss_sum / count, "steps": steps}

    def _rank_slice(self, order: torch.Tensor) -> torch.Tensor:
        # Equal slices (the remainder is dropped), so every rank takes the same number of DDP steps.
        per_rank = len(order) // self.world_size
        return order[self.rank :: self.world_size][:per_rank]

    def validate(self) -> dict[str, float]:
        """Accuracy and mean cross-entropy of the current model on this site's held-out split."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            logits = self.model(self._x_valid)
            loss = self._loss(logits, self._y_valid).item()
            accuracy = (logits.argmax(dim=1) == self._y_valid).float().mean().item()
        self.model.train(was_training)
        return {"accuracy": accuracy, "loss": loss}

    def num_local_iterations(self) -> int:
        """Optimizer steps taken by the last train() (0 before any)."""
        return self._steps

    def num_samples(self) -> int:
        """Number of samples in this site's training split."""
        return len(self._y_train)
