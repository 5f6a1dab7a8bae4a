"""A machine's vital signs for `sysinfo`: host, Python, torch, CPU, memory, disk, GPUs (and a site's resources)."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Mapping
from typing import Any

import psutil

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 5.0
_GPU_QUERY = "index,name,memory.total,memory.used,utilization.gpu"


def collect_sysinfo(
    training_status: str, disk_path: str | os.PathLike = ".", resources: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The contract's sysinfo object; sizes in bytes; the disk is the one holding `disk_path`.

    A site passes its `resources` (fedcommon.site_resources.SiteResources.to_dict(), or {"error"}): the server's
    scheduler reads its capacity and what is free from there.
    """
    memory = psutil.virtual_memory()
    disk = shutil.disk_usage(disk_path)
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _torch_version(),
        "cpu_count": os.cpu_count(),
        "cpu_percent": psutil.cpu_percent(interval=0.1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "memory_total": memory.total,
        "memory_available": memory.available,
        "disk_total": disk.total,
        "disk_free": disk.free,
        "gpus": gpu_info(),
        "training_status": training_status,
    }
    if resources is not None:
        info["resources"] = dict(resources)
    return info


def _torch_version() -> str | None:
    # The installed distribution's version: importing torch would cost seconds and memory.
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_info() -> list[dict[str, Any]]:
    """GPUs as nvidia-smi reports them; [] when it is absent, fails or hangs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        proc = subprocess.run(
            [exe, f"--query-gpu={_GPU_QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except (subprocess.TimeoutExpired, OSError) as e:
        log.warning("nvidia-smi failed: %s", e)
        return []
    if proc.returncode != 0:
        log.warning("nvidia-smi exited %d: %s", proc.returncode, proc.stderr.strip()[:200])
        return []
    return parse_gpu_csv(proc.stdout)


def parse_gpu_csv(text: str) -> list[dict[str, Any]]:
    """Rows of `nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu` (csv, no units)."""
    gpus = []
    for line in text.splitlines():
        raw = line.split(",")
        if len(raw) < 5:
            continue
        # A GPU name may itself contain commas: the four numbers are the first and the last three fields.
        index, total, used, util = (f.strip() for f in (raw[0], *raw[-3:]))
        name = ",".join(raw[1:-3]).strip()
        gpus.append(
            {
                "index": _number(index),
                "name": name,
                "memory_total_mib": _number(total),
                "memory_used_mib": _number(used),
                "utilization_percent": _number(util),
            }
        )
    return gpus


def _number(text: str) -> int | float | None:
    # nvidia-smi prints "[N/A]" or "[Not Supported]" for what a GPU does not report.
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else value
