"""A site's resources for training (local/resources.json, else what the host shows) and which run holds which.

The file is {"gpus": [{"id": "0", "memory_mib": 81920}, ...], "cpu_slots": 2}, both keys optional. Without
"gpus" the site has the GPUs this host lets it use (CUDA_VISIBLE_DEVICES, else nvidia-smi); without
"cpu_slots" it has one, and a site without GPUs trains one run at a time (its start-mgpu ranks bounded by its
CPUs, as before slots). A run takes one GPU per rank on a site with GPUs, else one CPU slot per rank where
cpu_slots is declared; its worker sees only its GPUs (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcommon.bounded_json import JsonBoundsError, loads_bounded
from fedcommon.site_resources import (
    GPU_ID,
    MAX_CPU_SLOTS,
    MAX_MEMORY_MIB,
    MAX_SITE_GPUS,
    Gpu,
    SiteResources,
    SiteResourcesError,
    gpu_id,
    positive_int,
    unique_ids,
)

RESOURCES_FILE = Path("local") / "resources.json"
MAX_FILE_BYTES = 64 * 1024
_TOP_KEYS = ("gpus", "cpu_slots")
_GPU_KEYS = ("id", "memory_mib")
_FILE = RESOURCES_FILE.as_posix()


class ResourcesError(SiteResourcesError):
    """A local/resources.json that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Capacity:
    """What a site may train on: its GPUs and CPU slots, and where each figure comes from (for messages)."""

    gpus: tuple[Gpu, ...]
    cpu_slots: int
    gpus_from: str
    cpu_slots_declared: bool

    @property
    def gpus_declared(self) -> bool:
        """Whether local/resources.json names the GPUs."""
        return self.gpus_from == f"{_FILE} gpus"


def visible_gpu_ids(visible: str) -> list[str]:
    """The GPU ids in a CUDA_VISIBLE_DEVICES value; CUDA stops at the first invalid entry ("-1" hides every GPU)."""
    ids = []
    for item in visible.split(","):
        item = item.strip()
        if not GPU_ID.fullmatch(item):  # "-1" too: an id starts with a letter or digit
            break
        ids.append(item)
    return ids


def host_gpus(environ: Mapping[str, str] | None = None) -> tuple[tuple[Gpu, ...], str]:
    """The GPUs this host lets training use (CUDA_VISIBLE_DEVICES respected), and where that comes from."""
    from fedcommon.sysinfo import gpu_info

    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = visible_gpu_ids(visible)
        memory = {str(row["index"]): row["memory_total_mib"] for row in gpu_info()} if ids else {}
        return tuple(Gpu(i, _memory(memory.get(i))) for i in ids), f"CUDA_VISIBLE_DEVICES={visible!r}"
    rows = [row for row in gpu_info() if isinstance(row["index"], int)]
    return tuple(Gpu(str(row["index"]), _memory(row["memory_total_mib"])) for row in rows), "nvidia-smi"


def available_gpus(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """How many GPUs training here may use, and where that count comes from (CUDA_VISIBLE_DEVICES respected)."""
    gpus, where = host_gpus(environ)
    return len(gpus), where


def _memory(value: Any) -> int | None:
    return value if isinstance(value, int) and 0 < value <= MAX_MEMORY_MIB else None


def parse_resources(data: Any, path: Path, environ: Mapping[str, str] | None = None) -> Capacity:
    """The capacity a parsed resources file declares, the host's GPUs standing in for "gpus"; ResourcesError
    names the file and key of the first fault."""
    if not isinstance(data, dict):
        raise ResourcesError(f'{path}: expected {{"gpus": [...], "cpu_slots": N}} (both optional)')
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        raise ResourcesError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(_TOP_KEYS)})")
    try:
        slots = positive_int(data["cpu_slots"], f"{path}: cpu_slots", MAX_CPU_SLOTS) if "cpu_slots" in data else 1
        gpus, where = (_declared_gpus(data["gpus"], path), f"{_FILE} gpus") if "gpus" in data else host_gpus(environ)
    except SiteResourcesError as e:
        raise ResourcesError(str(e)) from None
    return Capacity(gpus, slots, where, "cpu_slots" in data)


def _declared_gpus(raw: Any, path: Path) -> tuple[Gpu, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_SITE_GPUS:
        raise ResourcesError(f"{path}: gpus: must be a list of at most {MAX_SITE_GPUS} GPUs")
    gpus = []
    for i, item in enumerate(raw):
        where = f"{path}: gpus[{i}]"
        if not isinstance(item, dict):
            raise ResourcesError(f'{where}: must be an object {{"id": "0", "memory_mib": 81920}}')
        unknown = sorted(str(k) for k in item if k not in _GPU_KEYS)
        if unknown:
            raise ResourcesError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(_GPU_KEYS)})")
        # A GPU the host does not show is allowed: the site knows its hardware better than nvidia-smi here may.
        memory = positive_int(item.get("memory_mib"), f"{where}.memory_mib", MAX_MEMORY_MIB)
        gpus.append(Gpu(gpu_id(item.get("id"), f"{where}.id"), memory))
    unique_ids([g.id for g in gpus], f"{path}: gpus")
    return tuple(gpus)


def load_resources(workspace: Path, environ: Mapping[str, str] | None = None) -> Capacity:
    """The capacity of the site in `workspace`: its local/resources.json over what the host shows."""
    path = Path(workspace) / RESOURCES_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return parse_resources({}, path, environ)
    except OSError as e:
        raise ResourcesError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        data = loads_bounded(raw, str(path), MAX_FILE_BYTES, max_depth=4)
    except JsonBoundsError as e:
        raise ResourcesError(str(e)) from None
    return parse_resources(data, path, environ)


@dataclass(frozen=True)
class Allocation:
    """What one run holds: its GPU ids (on a site with GPUs) or its CPU slots."""

    run_number: int
    gpus: tuple[str, ...] = ()
    cpu_slots: int = 0

    def worker_env(self) -> dict[str, str]:
        """What the run's worker environment must say so it uses only its GPUs."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus)} if self.gpus else {}

    def shown(self) -> dict[str, Any]:
        """The allocation in a status entry: "gpus" or "cpu_slots"."""
        return {"gpus": list(self.gpus)} if self.gpus else {"cpu_slots": self.cpu_slots}


class ResourcesShort(Exception):
    """A run needs more than is free; the message names what is in use and by which runs.

    `sole_holder` is the run holding the site's only GPU or slot when the site declared none (the site trains one
    run at a time, as it always did): callers say "run 3 is training" in the words they always used.
    """

    def __init__(self, message: str, sole_holder: int | None = None):
        super().__init__(message)
        self.sole_holder = sole_holder


class Allocator:
    """Which run holds which GPUs and CPU slots of a site: taken at start, given back once the run's processes are
    gone."""

    def __init__(self, site: str):
        self.site = site
        self._lock = threading.Lock()
        self._held: dict[int, Allocation] = {}

    def held(self) -> dict[int, Allocation]:
        """Every run's allocation, by run number."""
        with self._lock:
            return dict(self._held)

    def reserve(self, capacity: Capacity, run_number: int, ranks: int = 1) -> Allocation:
        """Take what run N needs for `ranks` ranks: that many GPUs (the lowest free ids in the site's order) on a
        site with GPUs, else CPU slots (one per rank where cpu_slots is declared, else the site's one slot)."""
        with self._lock:
            if run_number in self._held:
                raise ResourcesShort(
                    f"{self.site}: run {run_number} already holds {_held_words(self._held[run_number])}"
                )
            if capacity.gpus:
                taken = {g for a in self._held.values() for g in a.gpus}
                free = [g.id for g in capacity.gpus if g.id not in taken]
                if len(free) < ranks:
                    raise self._short_of_gpus(capacity, run_number, ranks)
                allocation = Allocation(run_number, gpus=tuple(free[:ranks]))
            else:
                need = ranks if capacity.cpu_slots_declared else 1
                used = sum(a.cpu_slots for a in self._held.values())
                if capacity.cpu_slots - used < need:
                    raise self._short_of_slots(capacity, run_number, need, used)
                allocation = Allocation(run_number, cpu_slots=need)
            self._held[run_number] = allocation
            return allocation

    def release(self, run_number: int) -> Allocation | None:
        """Give back what run N holds; returns it (None when it held nothing)."""
        with self._lock:
            return self._held.pop(run_number, None)

    def report(self, capacity: Capacity) -> SiteResources:
        """The site's resources and what each run holds, as sysinfo reports them."""
        with self._lock:
            holder = {g: a.run_number for a in self._held.values() for g in a.gpus}
            slots = {a.run_number: a.cpu_slots for a in self._held.values() if a.cpu_slots}
        gpus = tuple(Gpu(g.id, g.memory_mib, holder.get(g.id)) for g in capacity.gpus)
        return SiteResources(gpus, capacity.cpu_slots, slots)

    def _short_of_gpus(self, capacity: Capacity, run_number: int, ranks: int) -> ResourcesShort:
        ids = [g.id for g in capacity.gpus]
        holders = [(a.run_number, [g for g in a.gpus if g in ids]) for a in self._held.values()]
        holders = [(run, gpus) for run, gpus in holders if gpus]
        used = sum(len(gpus) for _, gpus in holders)
        by = ", ".join(f"run {run} ({', '.join(gpus)})" for run, gpus in holders)
        message = (
            f"{self.site}: {_count(len(ids), 'GPU')} ({', '.join(ids)}), {_in_use(used, len(ids))} by {by}; "
            f"run {run_number} needs {ranks} ({capacity.gpus_from})"
        )
        return ResourcesShort(message, _sole(holders, len(ids), ranks, capacity.gpus_declared))

    def _short_of_slots(self, capacity: Capacity, run_number: int, need: int, used: int) -> ResourcesShort:
        holders = [(a.run_number, a.cpu_slots) for a in self._held.values() if a.cpu_slots]
        by = ", ".join(f"run {run}" + (f" ({n})" if n > 1 else "") for run, n in holders)
        where = f"{_FILE} cpu_slots" if capacity.cpu_slots_declared else f"no GPU; {_FILE} declares no cpu_slots"
        message = (
            f"{self.site}: {_count(capacity.cpu_slots, 'CPU slot')}, {_in_use(used, capacity.cpu_slots)} by {by}; "
            f"run {run_number} needs {need} ({where})"
        )
        return ResourcesShort(message, _sole(holders, capacity.cpu_slots, need, capacity.cpu_slots_declared))


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _in_use(used: int, total: int) -> str:
    return "in use" if used >= total else f"{used} in use"


def _held_words(allocation: Allocation) -> str:
    if allocation.gpus:
        return f"GPU{'s' if len(allocation.gpus) > 1 else ''} {', '.join(allocation.gpus)}"
    return _count(allocation.cpu_slots, "CPU slot")


def _sole(holders: list[tuple[int, Any]], total: int, need: int, declared: bool) -> int | None:
    return holders[0][0] if not declared and total == 1 and need == 1 and len(holders) == 1 else None
