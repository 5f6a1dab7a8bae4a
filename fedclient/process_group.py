"""A training's process groups: signal them, find those its launcher's descendants made, wait until they empty."""

from __future__ import annotations

import os
import signal
import time

import psutil


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send `sig` to process group pgid; a group that is gone (or not ours) is left alone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def descendant_groups(pid: int) -> set[int]:
    """Process groups of pid's descendants (empty once pid is gone)."""
    groups = set()
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return groups
    for child in children:
        try:
            groups.add(os.getpgid(child.pid))
        except OSError:
            continue
    return groups


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group pgid."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return members


def wait_group_empty(pgid: int, timeout: float) -> list[int]:
    """Wait until process group pgid has no live member; returns those left at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = group_members(pgid)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)
