"""A site's choice of where its training runs: local/launcher.json, read and checked."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAUNCHER_FILE = Path("local") / "launcher.json"
LAUNCHERS = ("process", "slurm")
MAX_CONFIG_BYTES = 64 * 1024
MAX_SBATCH_OPTIONS = 32
_TOP_KEYS = ("launcher", "slurm")
_NAME = re.compile(r"[A-Za-z0-9_.,:+-]{1,128}")
# Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"\d{1,6}|\d{1,6}:\d{2}(:\d{2})?|\d{1,4}-\d{1,2}(:\d{2}){0,2}|UNLIMITED|INFINITE")
_OPTION = re.compile(r"--[a-z][a-z0-9-]{0,40}(=[^\x00-\x1f\x7f]{0,256})?")


class LauncherConfigError(ValueError):
    """A local/launcher.json that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class SlurmConfig:
    """Where and how a site's jobs run on its Slurm cluster (the keys of local/launcher.json's "slurm")."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str | None = None
    gpus_per_node: int = 0  # 0: a CPU-only cluster, start-mgpu N runs N CPU ranks on one node
    nodes: int = 1  # the most nodes one training may span
    cpus_per_task: int = 1
    sbatch_options: tuple[str, ...] = ()
    shared_folder: Path | None = None  # the workspace as the compute nodes see it; None: the same path
    python: str | None = None  # the interpreter on the compute nodes; None: the agent's own
    pending_limit_s: float = 0.0  # cancel a job that waited longer than this in the queue; 0: no limit
    poll_s: float = 2.0
    slurm_conf: Path | None = None  # SLURM_CONF for the Slurm commands; None: theirs
    bin_dir: Path | None = None  # where sbatch, squeue ... are; None: PATH


@dataclass(frozen=True)
class LauncherConfig:
    """The launcher a site chose: "process" (the default) or "slurm" with its settings."""

    launcher: str = "process"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def load_launcher_config(workspace: Path) -> LauncherConfig:
    """The site's local/launcher.json; the process launcher when there is none."""
    path = Path(workspace) / LAUNCHER_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return LauncherConfig()
    except OSError as e:
        raise LauncherConfigError(f"{path}: cannot be read: {e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise LauncherConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise LauncherConfigError(f"{path}: not valid JSON: {e}") from None
    return parse_launcher_config(data, str(path))


def parse_launcher_config(data: Any, where: str = str(LAUNCHER_FILE)) -> LauncherConfig:
    """A LauncherConfig from launcher.json's object; LauncherConfigError names the key that is wrong."""
    if not isinstance(data, dict):
        raise LauncherConfigError(f"{where}: must be a JSON object")
    _no_unknown(data, _TOP_KEYS, where)
    launcher = data.get("launcher", "process")
    if launcher not in LAUNCHERS:
        raise LauncherConfigError(f"{where}: launcher: must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    slurm = data.get("slurm", {})
    if not isinstance(slurm, dict):
        raise LauncherConfigError(f"{where}: slurm: must be an object")
    if launcher == "process" and slurm:
        raise LauncherConfigError(f'{where}: slurm: given, but launcher is "process"')
    return LauncherConfig(launcher, _slurm(slurm, f"{where}: slurm"))


def _slurm(data: dict[str, Any], where: str) -> SlurmConfig:
    fields = SlurmConfig.__dataclass_fields__
    _no_unknown(data, tuple(fields), where)
    values: dict[str, Any] = {}
    for key in ("partition", "account", "qos"):
        if key in data:
            values[key] = _matching(data[key], _NAME, f"{where}.{key}", "a Slurm name")
    if "time_limit" in data:
        values["time_limit"] = _matching(data["time_limit"], _TIME, f"{where}.time_limit", "a Slurm time limit")
    for key, low in (("gpus_per_node", 0), ("nodes", 1), ("cpus_per_task", 1)):
        if key in data:
            values[key] = _whole(data[key], low, 4096, f"{where}.{key}")
    for key, low in (("pending_limit_s", 0.0), ("poll_s", 0.1)):
        if key in data:
            values[key] = _seconds(data[key], low, f"{where}.{key}")
    if "sbatch_options" in data:
        values["sbatch_options"] = _options(data["sbatch_options"], f"{where}.sbatch_options")
    for key in ("shared_folder", "slurm_conf", "bin_dir"):
        if key in data:
            values[key] = Path(_absolute(data[key], f"{where}.{key}"))
    if "python" in data:
        values["python"] = _absolute(data["python"], f"{where}.python")
    return SlurmConfig(**values)


def _no_unknown(data: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(k)[:64] for k in data if k not in known)
    if unknown:
        raise LauncherConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")


def _matching(value: Any, pattern: re.Pattern[str], where: str, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise LauncherConfigError(f"{where}: must be {what}, got {str(value)[:80]!r}")
    return value


def _whole(value: Any, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LauncherConfigError(f"{where}: must be a whole number from {low} to {high}, got {str(value)[:80]!r}")
    return value


def _seconds(value: Any, low: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= 30 * 86400:
        raise LauncherConfigError(f"{where}: must be a number of seconds from {low} to 30 days, got {value!r}")
    return float(value)


def _options(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_SBATCH_OPTIONS:
        raise LauncherConfigError(f"{where}: must be a list of at most {MAX_SBATCH_OPTIONS} options")
    for item in value:
        # --opt or --opt=value, one argv entry each: nothing positional, which sbatch would take for the script.
        _matching(item, _OPTION, where, 'an option "--name" or "--name=value"')
    return tuple(value)


def _absolute(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 1024 or "\x00" in value:
        raise LauncherConfigError(f"{where}: must be an absolute path, got {str(value)[:80]!r}")
    return value
