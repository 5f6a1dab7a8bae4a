"""sysinfo: exactly the contract's keys, torch's version without importing it, GPUs from nvidia-smi or none."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time

import pytest

from fedcommon import sysinfo
from fedcommon.sysinfo import collect_sysinfo, parse_gpu_csv

KEYS = {
    "hostname",
    "platform",
    "python",
    "torch",
    "cpu_count",
    "cpu_percent",
    "load_avg",
    "memory_total",
    "memory_available",
    "disk_total",
    "disk_free",
    "gpus",
    "training_status",
}


def _fake_nvidia_smi(folder, script: str, monkeypatch) -> None:
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(folder))


def test_sysinfo_has_exactly_the_contract_keys_with_sizes_in_bytes(tmp_path):
    info = collect_sysinfo("training started", tmp_path)
    assert set(info) == KEYS
    assert info["training_status"] == "training started"
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["torch"] == importlib.metadata.version("torch")
    assert len(info["load_avg"]) == 3
    assert info["memory_total"] >= info["memory_available"] > 1 << 20
    assert info["disk_total"] >= info["disk_free"] > 0
    assert isinstance(info["gpus"], list)


def test_torch_is_not_imported_to_learn_its_version():
    code = (
        "import sys; from fedcommon.sysinfo import collect_sysinfo; collect_sysinfo('x'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_nvidia_smi_means_no_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert collect_sysinfo("none", tmp_path)["gpus"] == []


def test_gpus_come_from_nvidia_smi(tmp_path, monkeypatch):
    _fake_nvidia_smi(
        tmp_path, "echo '0, NVIDIA H200, 143771, 512, 7'\necho '1, NVIDIA H200, 143771, [N/A], 0'", monkeypatch
    )
    assert sysinfo.gpu_info() == [
        {
            "index": 0,
            "name": "NVIDIA H200",
            "memory_total_mib": 143771,
            "memory_used_mib": 512,
            "utilization_percent": 7,
        },
        {
            "index": 1,
            "name": "NVIDIA H200",
            "memory_total_mib": 143771,
            "memory_used_mib": None,
            "utilization_percent": 0,
        },
    ]


def test_a_failing_nvidia_smi_means_no_gpus(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "echo 'NVIDIA-SMI has failed' >&2; exit 9", monkeypatch)
    assert sysinfo.gpu_info() == []


def test_a_hanging_nvidia_smi_is_given_up_on(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "exec sleep 30", monkeypatch)
    monkeypatch.setattr(sysinfo, "NVIDIA_SMI_TIMEOUT_S", 0.3)
    started = time.monotonic()
    assert sysinfo.gpu_info() == []
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "line, name",
    [("2, Tesla V100-SXM2-16GB, 16160, 0, 0", "Tesla V100-SXM2-16GB"), ("3, Odd, Name, 100, 1, 2", "Odd, Name")],
)
def test_gpu_names_are_kept_whole(line, name):
    assert parse_gpu_csv(line)[0]["name"] == name


def test_a_sites_resources_ride_in_sysinfo_beside_the_contract_keys(tmp_path):
    resources = {"gpus": [{"id": "0", "memory_mib": 81920, "in_use_by": 3}], "cpu_slots": 1, "cpu_slots_in_use": {}}
    info = collect_sysinfo("training started", tmp_path, resources)
    assert set(info) == KEYS | {"resources"}
    assert info["resources"] == resources
