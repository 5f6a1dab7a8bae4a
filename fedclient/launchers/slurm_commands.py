"""The Slurm commands a site's agent runs: sbatch, scontrol, scancel, sinfo; argv lists, timeouts, checked output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcommon.escape import for_log

COMMAND_TIMEOUT_S = 30.0
MAX_OUTPUT_CHARS = 256 * 1024
MAX_MESSAGE_CHARS = 600
MAX_NODES_LISTED = 10_000
_JOB_ID = re.compile(r"\d{1,20}")
_STATE = re.compile(r"[A-Z_]{1,32}")
_UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Zero Bytes were transmitted")
# Jobs in these states will not run again; the rest (PENDING, RUNNING, COMPLETING, SUSPENDED ...) still may.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)


class SlurmError(Exception):
    """A Slurm command refused or failed; the message says which command and what Slurm said."""


class SlurmUnavailable(SlurmError):
    """Slurm cannot be asked at all: its commands are not installed, or its controller does not answer."""


@dataclass(frozen=True)
class JobState:
    """What Slurm says of one job."""

    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, ...
    reason: str  # why it waits or ended ("Resources", "NonZeroExitCode"); "None" when there is none
    exit_code: int | None  # the batch script's exit code; minus the signal's number when a signal ended it
    nodes: str

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class SlurmCommands:
    """Runs Slurm's client commands from `bin_dir` (else PATH) against `slurm_conf` (else Slurm's default)."""

    def __init__(self, bin_dir: Path | None = None, slurm_conf: Path | None = None, timeout: float = COMMAND_TIMEOUT_S):
        self.bin_dir = bin_dir
        self.slurm_conf = slurm_conf
        self.timeout = timeout

    def submit(self, options: list[str], script: Path) -> str:
        """sbatch the script with options; returns the job id; SlurmError with sbatch's own words if it refuses."""
        out = self._run("sbatch", ["--parsable", *options, str(script)])
        first = out.strip().splitlines()[0] if out.strip() else ""
        job_id = first.split(";", 1)[0]  # "ID;CLUSTER" on a federation of clusters
        if not _JOB_ID.fullmatch(job_id):
            raise SlurmError(f"sbatch answered no job id: {_shown(out)!r}")
        return job_id

    def job(self, job_id: str) -> JobState | None:
        """The job's state from slurmctld (`scontrol show job`), else from accounting (`sacct`) once slurmctld has
        forgotten it; None when neither knows the job."""
        try:
            out = self._run("scontrol", ["show", "job", "--oneliner", _checked_id(job_id)])
        except SlurmError as e:
            if "Invalid job id" in str(e):
                return self._accounted(job_id)
            raise
        for line in out.splitlines():
            fields = parse_fields(line)
            if fields.get("JobId") == job_id:
                return job_state(job_id, fields)
        return self._accounted(job_id)

    def _accounted(self, job_id: str) -> JobState | None:
        """The job's end as Slurm's accounting kept it; None without accounting (sacct refuses) or record."""
        try:
            out = self._run(
                "sacct",
                ["--noheader", "--parsable2", "--allocations", "--jobs", job_id, "--format=JobID,State,ExitCode"],
            )
        except SlurmError:
            return None
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] == job_id:
                state = parts[1].split(" ", 1)[0]  # "CANCELLED by 0"
                fields = {"JobState": state, "ExitCode": parts[2], "Reason": "from Slurm's accounting"}
                return job_state(job_id, fields)
        return None

    def cancel(self, job_id: str) -> None:
        """scancel the job (SIGTERM to its steps, SIGKILL after Slurm's KillWait)."""
        self._run("scancel", [_checked_id(job_id)])

    def partition(self, partition: str | None) -> dict[str, Any]:
        """The partition's nodes (total, free), CPUs and GPUs, from `sinfo`, per node."""
        args = ["--noheader", "--Node", "--format=%N|%T|%C|%G|%P"]
        out = self._run("sinfo", [*args, *(["--partition", partition] if partition else [])])
        nodes: dict[str, dict[str, Any]] = {}
        for line in out.splitlines()[:MAX_NODES_LISTED]:
            parts = line.strip().split("|")
            if len(parts) != 5:
                continue
            name, state, cpus, gres, part = parts
            if not partition and not part.endswith("*"):  # sinfo lists a node once per partition
                continue
            _, idle, _, total = (_count(c) for c in (cpus.split("/") + ["", "", "", ""])[:4])
            nodes[name[:128]] = {"state": state[:32], "cpus": total, "cpus_idle": idle, "gpus": gpu_count(gres)}
        return {
            "partition": partition or "(default)",
            "nodes": len(nodes),
            "free_nodes": sum(1 for n in nodes.values() if n["state"].rstrip("*~#$@+-") == "idle"),
            "cpus": sum(n["cpus"] for n in nodes.values()),
            "cpus_idle": sum(n["cpus_idle"] for n in nodes.values()),
            "gpus": sum(n["gpus"] for n in nodes.values()),
        }

    def env(self) -> dict[str, str]:
        """The environment the commands run in (and a job is submitted from)."""
        env = dict(os.environ)
        if self.slurm_conf is not None:
            env["SLURM_CONF"] = str(self.slurm_conf)
        return env

    def _exe(self, name: str) -> str:
        if self.bin_dir is not None:
            path = self.bin_dir / name
            if os.access(path, os.X_OK):
                return str(path)
            raise SlurmUnavailable(f"Slurm is not installed here: {path} does not exist or cannot be run")
        found = shutil.which(name)
        if found is None:
            raise SlurmUnavailable(
                f"Slurm is not installed here: {name} is not on PATH (local/launcher.json chooses the slurm "
                f"launcher; install Slurm's client commands or set slurm.bin_dir)"
            )
        return found

    def _run(self, name: str, args: list[str]) -> str:
        if self.slurm_conf is not None and not self.slurm_conf.is_file():
            # Slurm's commands would retry a missing slurm.conf for a minute before saying so.
            raise SlurmUnavailable(f"{self.slurm_conf} (local/launcher.json slurm.slurm_conf) is not a file")
        argv = [self._exe(name), *args]
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout,
                env=self.env(),
            )
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{name} did not answer within {self.timeout:g}s: is slurmctld running?") from None
        except OSError as e:
            raise SlurmUnavailable(f"cannot run {name}: {e}") from None
        if proc.returncode != 0:
            said = _shown(proc.stderr or proc.stdout) or f"exit code {proc.returncode}"
            if any(marker in said for marker in _UNREACHABLE):
                raise SlurmUnavailable(f"the Slurm controller does not answer ({name}: {said})")
            raise SlurmError(f"{name} refused: {said}")
        return proc.stdout[:MAX_OUTPUT_CHARS]


def parse_fields(line: str) -> dict[str, str]:
    """`scontrol --oneliner`'s Key=Value pairs (a value may hold spaces only in keys Slurm puts last, ignored)."""
    fields: dict[str, str] = {}
    for token in line[:MAX_OUTPUT_CHARS].split(" "):
        key, sep, value = token.partition("=")
        if sep and key and key not in fields and len(fields) < 512:
            fields[key[:64]] = value[:1024]
    return fields


def job_state(job_id: str, fields: dict[str, str]) -> JobState:
    """A JobState from `scontrol show job`'s fields; an unexpected state is kept as its words, checked."""
    state = fields.get("JobState", "")
    if not _STATE.fullmatch(state):
        raise SlurmError(f"scontrol: job {job_id}: unexpected JobState {state[:40]!r}")
    code, _, sig = fields.get("ExitCode", "").partition(":")
    exit_code = None
    if code.isdigit() and len(code) < 6:
        exit_code = -int(sig) if sig.isdigit() and len(sig) < 4 and int(sig) else int(code)
    reason = for_log(fields.get("Reason", "None"))[:200]
    return JobState(job_id, state, reason, exit_code, for_log(fields.get("NodeList", ""))[:200])


def gpu_count(gres: str) -> int:
    """GPUs in sinfo's %G ("gpu:4", "gpu:a100:4(S:0-1)", several comma-separated, "(null)")."""
    total = 0
    for item in re.split(r",(?![^()]*\))", gres[:1024]):
        item = item.split("(", 1)[0]
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit() and len(parts[-1]) < 5:
            total += int(parts[-1])
    return total


def _count(text: str) -> int:
    return int(text) if text.isdigit() and len(text) < 9 else 0


def _checked_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise SlurmError(f"not a Slurm job id: {str(job_id)[:40]!r}")
    return job_id


def _shown(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return for_log(" / ".join(lines))[:MAX_MESSAGE_CHARS]
