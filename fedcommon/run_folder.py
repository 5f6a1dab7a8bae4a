"""A run's folder in a participant's workspace (server or site): its name, what lies in it, and its deletion."""

from __future__ import annotations

import errno
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

RUN_PREFIX = "run_"
MMAR_DIR = "mmar"  # the deployed MMAR
MODELS_DIR = "models"  # global, best and local models
LOGS_DIR = "logs"
WORKER_LOG = "worker.log"  # in logs/: what the site's training worker printed
SUMMARY_FILE = "summary.json"  # server: per round who contributed and what they measured; the run's status
STATE_FILE = "state.json"  # server: where the run stands (status, next round)
CROSS_SITE_DIR = "cross_site"  # server: shared models and the validation matrix
COMPLETED_FILE = "completed.json"  # site: the worker saw the server end the run; finished results stay
_DELETED_PREFIX = ".deleted-"
_RUN_NAME = re.compile(r"run_[0-9]{1,18}")


class RunFolderError(Exception):
    """A run folder cannot be deleted; the message says why in an operator's words."""


def run_dir(workspace: Path, run_number: int) -> Path:
    """Where run `run_number` lives in `workspace`."""
    if isinstance(run_number, bool) or not isinstance(run_number, int):  # a str could name any path
        raise TypeError(f"a run number is a whole number, got {run_number!r}")
    return Path(workspace) / f"{RUN_PREFIX}{run_number}"


def run_numbers(workspace: Path) -> list[int]:
    """The numbers of the runs that have a folder in `workspace`, ascending."""
    numbers = []
    for path in Path(workspace).glob(f"{RUN_PREFIX}*"):
        suffix = path.name[len(RUN_PREFIX) :]
        if suffix.isascii() and suffix.isdigit() and str(int(suffix)) == suffix and path.is_dir():
            numbers.append(int(suffix))
    return sorted(numbers)


def make_folders(folder: Path, mode: int = 0o777) -> None:
    """Make `folder` and its missing parents, but never a run folder: only deploying (or a site starting to train)
    makes one. A late writer of a deleted run gets FileNotFoundError instead of bringing the run back."""
    missing: list[Path] = []
    path = Path(folder)
    while not path.is_dir():
        if _RUN_NAME.fullmatch(path.name):
            raise FileNotFoundError(errno.ENOENT, f"run folder {path} does not exist (deleted?)", str(path))
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    # One level at a time, never with parents: a run folder renamed away meanwhile makes the next mkdir fail.
    for path in reversed(missing):
        path.mkdir(mode=mode, exist_ok=True)


@dataclass(frozen=True)
class RunFolder:
    """The paths inside one run's folder; nothing is read or created by naming them."""

    root: Path

    @classmethod
    def of(cls, workspace: Path, run_number: int) -> RunFolder:
        return cls(run_dir(workspace, run_number))

    @property
    def mmar(self) -> Path:
        return self.root / MMAR_DIR

    @property
    def models(self) -> Path:
        return self.root / MODELS_DIR

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def worker_log(self) -> Path:
        return self.logs / WORKER_LOG

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def cross_site(self) -> Path:
        return self.root / CROSS_SITE_DIR

    @property
    def completed(self) -> Path:
        return self.root / COMPLETED_FILE

    def is_deployed(self) -> bool:
        """True when an MMAR is deployed in it."""
        return self.mmar.is_dir()


def set_aside(workspace: Path, run_number: int, active: int | None = None) -> Path:
    """Take run N out of `workspace` at once by renaming it; returns where it went, for `remove`.

    Refused (RunFolderError) for the `active` run and for a run that does not exist. The rename is what
    everyone sees (a later deploy of N starts afresh); the slow removal can follow outside any lock.
    """
    folder = run_dir(workspace, run_number)
    if active == run_number:
        raise RunFolderError(f"run {run_number} is active; abort it first")
    if not folder.exists() and not folder.is_symlink():
        raise RunFolderError(f"run {run_number} does not exist ({folder})")
    trash = folder.with_name(f"{_DELETED_PREFIX}{folder.name}.{secrets.token_hex(4)}")
    folder.rename(trash)
    return trash


def remove(trash: Path) -> None:
    """Remove what `set_aside` renamed (a link is removed, never followed); what cannot be removed stays hidden."""
    if trash.is_symlink():
        trash.unlink(missing_ok=True)
    else:
        shutil.rmtree(trash, ignore_errors=True)


def already_ran(run_number: int, how: str) -> str:
    """Why run N may not start again: the one rule, in the same words at the server and at its sites.

    A finished run's results are never overwritten; `how` says how it ended (completed, aborted).
    """
    return f"run {run_number} has already run ({how}); delete-run {run_number} or set another run number"
