"""Initial models built ahead: a run's initial model is built in the background as soon as the run is deployed.

The build is the same sandboxed child that `start` would run (fedserver.untrusted_code); begun at deploy, its
interpreter start and torch import overlap what the operator does next, and `start` takes the finished model instead
of waiting for it. `start` builds the model itself when there is no such build, or when it failed (the error the
operator sees is then that of a build of its own).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

# build(mmar_dir, out, what, cancel): writes the checked initial model to out, or raises; returns early once cancel
# is set (its child stopped).
Build = Callable[[Path, Path, str, threading.Event], None]
MODEL_FILE = "initial_model.fl"
_PREFIX = ".initial-model-"


def _fingerprint(mmar_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """Each file of the MMAR with its size and modification time: a model built ahead is taken only while these hold."""
    found = []
    for path in sorted(Path(mmar_dir).rglob("*")):
        with contextlib.suppress(OSError):
            info = path.lstat()
            found.append((path.relative_to(mmar_dir).as_posix(), info.st_size, info.st_mtime_ns))
    return tuple(found)


class _Ahead:
    """One build begun ahead: its folder (in the server's private workspace), its future, and whether it is wanted."""

    def __init__(self, folder: Path, mmar_dir: Path) -> None:
        self.folder = folder
        self.mmar_dir = mmar_dir
        self.fingerprint = _fingerprint(mmar_dir)
        self.cancel = threading.Event()
        self.future: Future[None] | None = None
        self._lock = threading.Lock()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    @property
    def model(self) -> Path:
        return self.folder / MODEL_FILE

    def run(self, build: Build, mmar_dir: Path, what: str) -> None:
        with self._lock:
            if self.cancel.is_set():
                return
            self._running = True
        try:
            build(mmar_dir, self.model, what, self.cancel)
        finally:
            with self._lock:
                self._running = False
                if self.cancel.is_set():
                    shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self) -> None:
        """Stop the build if it runs and remove what it wrote (now, or when its thread returns)."""
        with self._lock:
            self.cancel.set()
            if not self._running:
                shutil.rmtree(self.folder, ignore_errors=True)


class InitialModels:
    """The builds begun ahead, one per run number; one runs at a time, the others wait their turn."""

    def __init__(self, workspace: Path, build: Build) -> None:
        self._workspace = Path(workspace)
        self._build = build
        self._lock = threading.Lock()
        self._ahead: dict[int, _Ahead] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="initial-model")
        self._closed = False
        for stale in self._workspace.glob(f"{_PREFIX}*"):  # left by a server that did not stop cleanly
            shutil.rmtree(stale, ignore_errors=True)

    def begin(self, run_number: int, mmar_dir: Path) -> None:
        """Start building run `run_number`'s initial model from its deployed MMAR; replaces an earlier build of it."""
        folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}run_{run_number}.", dir=self._workspace))
        ahead = _Ahead(folder, mmar_dir)
        with self._lock:
            if self._closed:
                shutil.rmtree(folder, ignore_errors=True)
                return
            earlier = self._ahead.pop(run_number, None)
            self._ahead[run_number] = ahead
            ahead.future = self._pool.submit(ahead.run, self._build, mmar_dir, f"run {run_number}")
        if earlier is not None:
            earlier.discard()

    def take(self, run_number: int, dest: Path) -> bool:
        """Move run `run_number`'s model built ahead to `dest` (waiting for it if it is being built): True; False when
        there is none to take (none begun, not begun yet, or failed) and the caller builds it."""
        with self._lock:
            ahead = self._ahead.pop(run_number, None)
        if ahead is None or ahead.future is None:
            return False
        try:
            with self._lock:
                behind = not ahead.future.running() and any(a.running for a in self._ahead.values())
            if behind and ahead.future.cancel():  # queued behind another run's build: building it now is quicker
                return False
            try:
                ahead.future.result()
            except Exception as e:  # noqa: BLE001 - the caller's own build reports the error
                log.info("run %d: the initial model built ahead failed (%s); building it again", run_number, e)
                return False
            if ahead.cancel.is_set() or not ahead.model.is_file():
                return False
            if _fingerprint(ahead.mmar_dir) != ahead.fingerprint:
                log.info("run %d: its MMAR changed since it was deployed; building its initial model again", run_number)
                return False
            os.replace(ahead.model, dest)
            return True
        finally:
            ahead.discard()

    def forget(self, run_number: int) -> None:
        """Drop run `run_number`'s build (the run was deleted or deployed again): stopped, its files removed."""
        with self._lock:
            ahead = self._ahead.pop(run_number, None)
        if ahead is not None:
            ahead.discard()

    def close(self) -> None:
        """Stop every build (their children included) and remove their files; nothing is begun after."""
        with self._lock:
            self._closed = True
            left, self._ahead = list(self._ahead.values()), {}
        for ahead in left:
            ahead.discard()
        self._pool.shutdown(wait=True, cancel_futures=True)
