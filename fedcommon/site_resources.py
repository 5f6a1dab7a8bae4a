"""PLACEHOLDER until the site branch lands: what a site declares it has, read back from its sysinfo."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SiteResources:
    gpu_ids: tuple[str, ...] = ()
    cpu_slots: int = 1
    gpus_in_use: frozenset[str] = frozenset()
    cpu_slots_in_use: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_sysinfo(cls, data: dict[str, Any]) -> SiteResources:
        res = data.get("resources")
        if not isinstance(res, dict):
            raise ValueError("no resources in the sysinfo reply")
        gpus = res.get("gpus") or []
        ids = tuple(str(g["id"]) for g in gpus)
        used = frozenset(str(g["id"]) for g in gpus if g.get("in_use_by") is not None)
        slots_used = sum((res.get("cpu_slots_in_use") or {}).values())
        return cls(ids, int(res.get("cpu_slots", 1)), used, slots_used)

    def free_gpus(self) -> list[str]:
        return [g for g in self.gpu_ids if g not in self.gpus_in_use]

    def free_cpu_slots(self) -> int:
        return self.cpu_slots - self.cpu_slots_in_use
