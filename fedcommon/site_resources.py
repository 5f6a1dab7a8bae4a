"""What a site may train on at once (GPUs, CPU slots) and which run holds each: sites report it, the server reads it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcommon.commands import MAX_RUN_NUMBER  # one bound for every run number, here as on the wire

GPU_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,95}")  # an index ("0") or a UUID ("GPU-3f2a…", "MIG-…")
MAX_SITE_GPUS = 256
MAX_CPU_SLOTS = 1024
MAX_MEMORY_MIB = 1 << 24  # 16 TiB
MAX_ERROR_CHARS = 500
_KEYS = ("gpus", "cpu_slots", "cpu_slots_in_use")
_GPU_KEYS = ("id", "memory_mib", "in_use_by")


class SiteResourcesError(ValueError):
    """Resources that cannot be used; the message names where and which key."""


def positive_int(value: Any, where: str, high: int) -> int:
    """value when it is a whole number from 1 to high; else SiteResourcesError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise SiteResourcesError(f"{where}: must be a whole number from 1 to {high}, got {value!r}")
    return value


def gpu_id(value: Any, where: str) -> str:
    """value when it is a GPU id CUDA_VISIBLE_DEVICES can carry (an index or a UUID); else SiteResourcesError."""
    if not isinstance(value, str) or not GPU_ID.fullmatch(value):
        raise SiteResourcesError(
            f"{where}: must be a GPU index or UUID (letters, digits, '_.:-', at most 96), got {value!r}"
        )
    return value


@dataclass(frozen=True)
class Gpu:
    """One GPU of a site: its id, its memory (None when unknown) and the run that holds it (None when free)."""

    id: str
    memory_mib: int | None = None
    in_use_by: int | None = None


@dataclass(frozen=True)
class SiteResources:
    """A site's GPUs and CPU slots, and what runs hold; the `resources` object of a site's sysinfo."""

    gpus: tuple[Gpu, ...] = ()
    cpu_slots: int = 1
    cpu_slots_in_use: Mapping[int, int] = field(default_factory=dict)

    @property
    def gpu_ids(self) -> list[str]:
        """Every GPU's id, in the site's order."""
        return [g.id for g in self.gpus]

    def free_gpus(self) -> list[str]:
        """The ids of the GPUs no run holds."""
        return [g.id for g in self.gpus if g.in_use_by is None]

    def free_cpu_slots(self) -> int:
        """CPU slots no run holds."""
        return max(0, self.cpu_slots - sum(self.cpu_slots_in_use.values()))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a site sends (run numbers as keys become strings)."""
        return {
            "gpus": [{"id": g.id, "memory_mib": g.memory_mib, "in_use_by": g.in_use_by} for g in self.gpus],
            "cpu_slots": self.cpu_slots,
            "cpu_slots_in_use": {str(run): n for run, n in sorted(self.cpu_slots_in_use.items())},
        }

    @classmethod
    def from_dict(cls, data: Any, what: str = "resources") -> SiteResources:
        """The resources in a parsed `resources` object, every value checked; SiteResourcesError names the key."""
        if not isinstance(data, dict):
            raise SiteResourcesError(f"{what}: must be an object, got {type(data).__name__}")
        if "error" in data:
            raise SiteResourcesError(f"{what}: the site cannot read its own: {_shown_error(data['error'])}")
        unknown = sorted(str(k) for k in data if k not in _KEYS)
        if unknown:
            raise SiteResourcesError(f"{what}.{unknown[0]}: unknown key (known: {', '.join(_KEYS)})")
        raw_gpus = data.get("gpus", [])
        if not isinstance(raw_gpus, list) or len(raw_gpus) > MAX_SITE_GPUS:
            raise SiteResourcesError(f"{what}.gpus: must be a list of at most {MAX_SITE_GPUS} GPUs")
        gpus = tuple(_gpu(raw, f"{what}.gpus[{i}]") for i, raw in enumerate(raw_gpus))
        unique_ids([g.id for g in gpus], f"{what}.gpus")
        slots = positive_int(data.get("cpu_slots", 1), f"{what}.cpu_slots", MAX_CPU_SLOTS)
        raw_use = data.get("cpu_slots_in_use", {})
        if not isinstance(raw_use, dict) or len(raw_use) > MAX_CPU_SLOTS:
            raise SiteResourcesError(f"{what}.cpu_slots_in_use: must be an object {{run: slots}}")
        in_use = {
            _run_key(run, f"{what}.cpu_slots_in_use"): positive_int(n, f"{what}.cpu_slots_in_use.{run}", MAX_CPU_SLOTS)
            for run, n in raw_use.items()
        }
        return cls(gpus, slots, in_use)

    @classmethod
    def from_sysinfo(cls, data: Any) -> SiteResources:
        """The resources in a site's sysinfo reply (parsed JSON); SiteResourcesError when absent or not valid."""
        if not isinstance(data, dict) or "resources" not in data:
            raise SiteResourcesError("sysinfo: the site reports no resources (an agent from before issue 22)")
        return cls.from_dict(data["resources"], "sysinfo.resources")


def _gpu(raw: Any, where: str) -> Gpu:
    if not isinstance(raw, dict):
        raise SiteResourcesError(f"{where}: must be an object {{id, memory_mib, in_use_by}}")
    unknown = sorted(str(k) for k in raw if k not in _GPU_KEYS)
    if unknown:
        raise SiteResourcesError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(_GPU_KEYS)})")
    memory = raw.get("memory_mib")
    holder = raw.get("in_use_by")
    return Gpu(
        gpu_id(raw.get("id"), f"{where}.id"),
        None if memory is None else positive_int(memory, f"{where}.memory_mib", MAX_MEMORY_MIB),
        None if holder is None else positive_int(holder, f"{where}.in_use_by", MAX_RUN_NUMBER),
    )


def _run_key(key: str, where: str) -> int:
    if not isinstance(key, str) or not re.fullmatch(r"[1-9][0-9]{0,8}", key):
        raise SiteResourcesError(f"{where}: keys must be run numbers, got {key!r}")
    return int(key)


def unique_ids(ids: list[str], where: str) -> None:
    """Refuse (SiteResourcesError) a GPU id listed twice, naming its place."""
    seen: set[str] = set()
    for i, value in enumerate(ids):
        if value in seen:
            raise SiteResourcesError(f"{where}[{i}].id: {value!r} is listed twice")
        seen.add(value)


def _shown_error(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"
