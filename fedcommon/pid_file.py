"""A participant process's own pid file, <workspace>/pid.json: which process serves a workspace, however it was started.

The file names the process by pid, start time and command line; a reader trusts it only while all three match a live
process, so a stale file (the process died, its pid went to another program) never leads to signalling a stranger.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedcommon.atomic import atomic_write_json

PID_FILE = "pid.json"
_SAME_START = 0.05  # seconds: a pid with another start time is another process


@dataclass(frozen=True)
class PidRecord:
    """What a participant process wrote about itself."""

    pid: int
    create_time: float
    cmdline: tuple[str, ...]


def write_pid_file(workspace: Path) -> PidRecord:
    """Record this process as the one serving `workspace` (atomically; it replaces an earlier one's)."""
    me = psutil.Process()
    record = PidRecord(me.pid, me.create_time(), tuple(me.cmdline()))
    atomic_write_json(
        Path(workspace) / PID_FILE,
        {"pid": record.pid, "create_time": record.create_time, "cmdline": list(record.cmdline)},
    )
    return record


def remove_pid_file(workspace: Path) -> None:
    """Remove the pid file if this process wrote it (one started since may have written its own)."""
    record = read_pid_file(workspace)
    if record is not None and record.pid == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            (Path(workspace) / PID_FILE).unlink()


def read_pid_file(workspace: Path) -> PidRecord | None:
    """The record in <workspace>/pid.json; None when there is none or it is not one."""
    try:
        data = json.loads((Path(workspace) / PID_FILE).read_text())
        pid, create_time, cmdline = data["pid"], data["create_time"], data["cmdline"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if (
        not isinstance(pid, int)
        or isinstance(pid, bool)
        or pid <= 0
        or not isinstance(create_time, (int, float))
        or not isinstance(cmdline, list)
        or not all(isinstance(a, str) for a in cmdline)
    ):
        return None
    return PidRecord(pid, float(create_time), tuple(cmdline))


def live_process(record: PidRecord) -> psutil.Process | None:
    """The running process the record names: same pid, start time and command line; else None."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > _SAME_START or tuple(proc.cmdline()) != record.cmdline:
            return None
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.Error:
        return None
