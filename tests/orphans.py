"""Find the processes a test left behind: every process it starts inherits a tag in its environment."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

TAG_VAR = "FEDLEARN_TEST_TAG"


def new_tag() -> str:
    return uuid.uuid4().hex


def tagged_processes(tag: str) -> dict[int, str]:
    """PID -> command line of each live process (not this one) whose environment holds TAG_VAR=tag.

    /proc/PID/environ is the environment a process was started with, so a process that was re-parented to
    init after its parent died is still found; a zombie has none and is not counted.
    """
    needle = f"{TAG_VAR}={tag}".encode()
    found: dict[int, str] = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or another user's
            continue
        found[int(entry.name)] = cmdline
    return found


def reap_leftovers(tag: str, grace: float) -> dict[int, str]:
    """Wait up to `grace` seconds for the tagged processes to end; kill (by PID) and return those that did not."""
    deadline = time.monotonic() + grace
    left = tagged_processes(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = tagged_processes(tag)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
