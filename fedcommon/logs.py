"""Logs: set-up shared by the server, the site agent and the worker (rotated files plus stderr), and the reader
behind `fedadmin logs` (the last lines of a log, filtered by level, and what was appended since a cursor)."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A log file is moved aside (log.txt -> log.txt.1 -> ... .N) once it would pass this size.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
# Each participant's own log files, relative to its workspace: the process's, and a run's training worker's.
PROCESS_LOG = "log.txt"
WORKER_LOG = "worker.log"  # in run_<N>/logs/

LEVELS = ("debug", "info", "warning", "error", "critical")
_LEVEL_RANK = {name.upper(): i for i, name in enumerate(LEVELS)}
# The head of a record as FORMAT writes it: "2026-11-29 09:01:02,345 ERROR ..."; other lines continue a record.
_RECORD_HEAD = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
# What the interpreter prints for an uncaught exception, outside logging: it starts an error record.
_TRACEBACK_HEAD = b"Traceback (most recent call last):"

MAX_LINES = 10_000
MAX_REPLY_BYTES = 512 * 1024  # the newest lines that fit are kept
MAX_FOLLOW_READ = 1024 * 1024  # read per follow step; the rest comes with the next one


def configure_logging(log_file: Path | None = None, debug: bool = False, tag: str = "") -> None:
    """Send records to stderr and, when given, to `log_file` (rotated); `tag` marks each line (e.g. "rank 1")."""
    import logging.handlers  # here: the console imports this module for its constants only

    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_MAX_BYTES,
                                                             backupCount=LOG_BACKUPS))
    for h in handlers:
        h.setFormatter(logging.Formatter(FORMAT.replace("%(name)s", f"[{tag}] %(name)s") if tag else FORMAT))
        root.addHandler(h)


class RotatingWriter:
    """Appends bytes to a file, moving it aside (.1 … .N) before it would pass max_bytes; thread-safe."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[bytes] = open(self.path, "ab")

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._f.tell() and self._f.tell() + len(data) > self.max_bytes:
                self._rotate()
            self._f.write(data)
            self._f.flush()

    def _rotate(self) -> None:
        self._f.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._f = open(self.path, "ab")

    def close(self) -> None:
        with self._lock:
            self._f.close()


def pump_lines(stream: IO[bytes], writer: RotatingWriter) -> None:
    """Copy a process's output into writer until it ends, a line at a time; closes both."""
    try:
        for line in stream:
            writer.write(line)
    except (OSError, ValueError):
        pass
    finally:
        stream.close()
        writer.close()


# ---- reading ------------------------------------------------------------------------------------


class LogRequestError(ValueError):
    """A logs request that cannot be served; the message names the bad argument."""


@dataclass(frozen=True)
class LogQuery:
    """What `fedadmin logs` asks of one log: the last `lines`, or what follows `cursor`, at `level` or above."""

    lines: int = 50
    level: str | None = None
    cursor: dict[str, int] | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> LogQuery:
        """Check a request's arguments; anything naming a file or path is refused, the reader picks the file."""
        unknown = sorted(set(args) - {"lines", "level", "cursor", "run_number"})
        if unknown:
            raise LogRequestError(f"logs takes no {', '.join(map(repr, unknown))}: the participant chooses its "
                                  "own log files (arguments: run_number, lines, level, cursor)")
        lines = args.get("lines", 50)
        if isinstance(lines, bool) or not isinstance(lines, int) or not 1 <= lines <= MAX_LINES:
            raise LogRequestError(f"lines must be a whole number from 1 to {MAX_LINES}, got {lines!r}")
        level = args.get("level")
        if level is not None and (not isinstance(level, str) or level.lower() not in LEVELS):
            raise LogRequestError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        cursor = args.get("cursor")
        if cursor is not None:
            ok = isinstance(cursor, dict) and set(cursor) <= {"inode", "offset", "keep"} and all(
                isinstance(cursor.get(k), int) and not isinstance(cursor.get(k), bool) and cursor[k] >= 0
                for k in ("inode", "offset"))
            if not ok:
                raise LogRequestError(f"cursor must be what an earlier logs reply returned, got {cursor!r}")
            cursor = {"inode": cursor["inode"], "offset": cursor["offset"], "keep": int(bool(cursor.get("keep")))}
        return cls(lines, level.lower() if level else None, cursor)


def _records(lines: Iterable[bytes], keep_first: bool, minimum: int) -> tuple[list[bytes], bool]:
    """The lines of the records at `minimum` rank or above; continuation lines follow their record.

    keep_first: whether lines before the first record head belong to a kept record. Returns the kept
    lines and whether the last record was kept.
    """
    kept: list[bytes] = []
    keep = keep_first
    for line in lines:
        head = _RECORD_HEAD.match(line)
        if head:
            keep = _LEVEL_RANK[head.group(1).decode()] >= minimum
        elif line.startswith(_TRACEBACK_HEAD):
            keep = _LEVEL_RANK["ERROR"] >= minimum
        if keep:
            kept.append(line)
    return kept, keep


def _decode(lines: list[bytes]) -> list[str]:
    return [line.rstrip(b"\r\n").decode("utf-8", errors="replace") for line in lines]


def _fit(lines: list[str], count: int) -> tuple[list[str], bool]:
    """The last `count` lines that fit in MAX_REPLY_BYTES; True when some were left out for size."""
    out: list[str] = []
    size = 0
    for line in reversed(lines[-count:]):
        size += len(line) + 1
        if size > MAX_REPLY_BYTES:
            return out[::-1], True
        out.append(line)
    return out[::-1], False


def _cursor(f: IO[bytes], offset: int, keep: bool) -> dict[str, int]:
    return {"inode": os.fstat(f.fileno()).st_ino, "offset": offset, "keep": int(keep)}


def read_log(path: Path, query: LogQuery) -> dict[str, Any]:
    """The reply to a logs request for the log at `path` (with its rotated backups path.1, path.2, …).

    Without a cursor: the last `lines` lines at the level or above (older backups are read when the current
    file holds too few). With one: the complete lines appended since, across a rotation. The reply's
    `cursor` continues from where this one ended.
    """
    minimum = _LEVEL_RANK[(query.level or "debug").upper()]
    if query.cursor is None:
        return _tail(path, query.lines, minimum)
    return _since(path, query.cursor, minimum)


def _tail(path: Path, count: int, minimum: int) -> dict[str, Any]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return {"lines": [], "cursor": None, "truncated": False, "missing": True}
    with f:
        data = f.read()
        end = data.rfind(b"\n") + 1  # an unfinished last line comes with the next follow step
        kept, keep = _records(data[:end].splitlines(keepends=True), False, minimum)
        older: list[bytes] = []
        for i in range(1, LOG_BACKUPS + 1):
            if len(older) + len(kept) >= count:
                break
            try:
                backup = Path(f"{path}.{i}").read_bytes()
            except FileNotFoundError:
                break
            older = _records(backup.splitlines(keepends=True), False, minimum)[0] + older
        lines, truncated = _fit(_decode(older + kept), count)
        return {"lines": lines, "cursor": _cursor(f, end, keep), "truncated": truncated or len(older + kept) > count}


def _since(path: Path, cursor: dict[str, int], minimum: int) -> dict[str, Any]:
    chunks: list[bytes] = []
    inode, offset = cursor["inode"], cursor["offset"]
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return {"lines": [], "cursor": cursor, "truncated": False, "missing": True}
    with f:
        if os.fstat(f.fileno()).st_ino != inode:
            # Rotated since: the rest of the file the cursor was in (now a backup), then this one from its start.
            for i in range(1, LOG_BACKUPS + 1):
                backup = Path(f"{path}.{i}")
                try:
                    if backup.stat().st_ino == inode:
                        with open(backup, "rb") as b:
                            b.seek(offset)
                            chunks.append(b.read(MAX_FOLLOW_READ))
                        break
                except FileNotFoundError:
                    break
            offset = 0
        elif os.fstat(f.fileno()).st_size < offset:  # truncated or replaced in place
            offset = 0
        f.seek(offset)
        data = f.read(MAX_FOLLOW_READ)
        end = data.rfind(b"\n") + 1
        chunks.append(data[:end])
        kept, keep = _records(b"".join(chunks).splitlines(keepends=True), bool(cursor.get("keep")), minimum)
        lines, truncated = _fit(_decode(kept), MAX_LINES)
        return {"lines": lines, "cursor": _cursor(f, offset + end, keep), "truncated": truncated}
