"""Logs: set-up shared by the server, the site agent and the worker (rotated files plus stderr), and the reader
behind `fedadmin logs` (the last lines of a log, filtered by level, and what was appended since a cursor)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from fedcommon import run_folder
from fedcommon.escape import for_log

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A log file is moved aside (log.txt -> log.txt.1 -> ... .N) once it would pass this size.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
# Each participant's own log files, relative to its workspace: the process's, and a run's training worker's.
PROCESS_LOG = "log.txt"
WORKER_LOG = run_folder.WORKER_LOG  # in a run's logs/ folder

LEVELS = ("debug", "info", "warning", "error", "critical")
_LEVEL_RANK = {name.upper(): i for i, name in enumerate(LEVELS)}
# The head of a record as FORMAT writes it ("2026-11-29 09:01:02,345 ERROR ...") or JsonLinesFormatter does
# ('{"ts": "...", "level": "ERROR", ...'); other lines continue a record.
_RECORD_HEAD = re.compile(
    rb"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} |\{\"ts\": \"[^\"]*\", \"level\": \")"
    rb"(DEBUG|INFO|WARNING|ERROR|CRITICAL)[ \"]"
)
# What the interpreter prints for an uncaught exception, outside logging: it starts an error record.
_TRACEBACK_HEAD = b"Traceback (most recent call last):"
_INFO = _LEVEL_RANK["INFO"]

MAX_LINES = 10_000
MAX_REPLY_BYTES = 512 * 1024  # the newest lines that fit are kept
MAX_FOLLOW_READ = 1024 * 1024  # read per follow step; the rest comes with the next one
MAX_LINE_BYTES = 64 * 1024  # a worker's output line longer than this is written in pieces
MAX_LINE_CHARS = 16 * 1024  # a longer line is shown cut, with how much was left out
MAX_LOG_BYTES = 2 * LOG_MAX_BYTES  # read at most this much of one file (rotation keeps them far smaller)


def configure_logging(
    log_file: Path | None = None,
    debug: bool = False,
    tag: str = "",
    *,
    role: str = "",
    name: str = "",
    local: Path | None = None,
    own_file_config: bool = True,
) -> None:
    """Send records to stderr and, when given, to `log_file` (rotated); `tag` marks each line (e.g. "rank 1").

    The operator's settings apply (fedcommon.logging_config): FEDLEARN_LOG_LEVEL, FEDLEARN_LOG_FORMAT=json (JSON
    lines naming `role` and the participant `name`), FEDLEARN_LOG_MAX_BYTES / _BACKUPS, or `local`/logging.json
    in place of all of it (with own_file_config; otherwise only its root level counts). `debug` wins over levels.
    LoggingConfigError names a bad setting.
    """
    import logging.config  # here: the console imports this module for its constants only
    import logging.handlers

    from fedcommon.logging_config import LoggingConfigError, read_settings, root_level

    settings = read_settings(local)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    if settings.file_config is not None and own_file_config:
        config = _with_paths_under(settings.file_config, local.parent if local is not None else Path.cwd())
        try:
            logging.config.dictConfig(config)
        except (ValueError, TypeError, AttributeError, ImportError, OSError) as e:
            raise LoggingConfigError(f"{settings.file}: {e}") from None
        for handler in _all_handlers():
            handler.addFilter(_ESCAPE)  # whatever formatter the file names, remote text stays on its record
    else:
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    log_file, maxBytes=settings.max_bytes or LOG_MAX_BYTES, backupCount=settings.backups or LOG_BACKUPS
                )
            )
        if settings.json:
            formatter: logging.Formatter = JsonLinesFormatter(role=role, name=name, tag=tag)
        else:
            formatter = OneLineFormatter(FORMAT.replace("%(name)s", f"[{tag}] %(name)s") if tag else FORMAT)
        for h in handlers:
            h.setFormatter(formatter)
            root.addHandler(h)
        root.setLevel(logging.INFO)
        file_level = root_level(settings.file_config) if settings.file_config is not None else None
        if file_level is not None:
            root.setLevel(file_level)
    if settings.level is not None:
        root.setLevel(settings.level)
    if debug:
        root.setLevel(logging.DEBUG)
    logging.getLogger(__name__).debug(
        "logging at %s for %s, as %s",
        logging.getLevelName(root.level).lower(),
        role or "this process",
        settings.file
        if settings.file_config is not None and own_file_config
        else "json lines"
        if settings.json
        else "text",
    )


def _with_paths_under(config: dict[str, Any], workspace: Path) -> dict[str, Any]:
    """The config with each handler's relative `filename` taken from the participant's workspace, not the working
    directory the process happened to start in; their folders are made."""
    handlers = {}
    for key, handler in (config.get("handlers") or {}).items():
        if isinstance(handler, dict) and isinstance(handler.get("filename"), str):
            path = workspace / handler["filename"]
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = {**handler, "filename": str(path)}
        handlers[key] = handler
    # Loggers made at import (each module's) keep working unless the file says otherwise.
    return {"disable_existing_loggers": False, **config, "handlers": handlers}


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]
    return list({id(h): h for lg in loggers for h in getattr(lg, "handlers", [])}.values())


class _EscapeFilter(logging.Filter):
    """Folds a record's arguments into its message, escaped as OneLineFormatter would."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = for_log(record.getMessage()), None
        return True


_ESCAPE = _EscapeFilter()


class OneLineFormatter(logging.Formatter):
    """A record's message on one line, whatever remote text it carries (a newline in a site's error text would
    otherwise start a genuine-looking record); a traceback, written by the formatter itself, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = for_log(record.message)
        return super().formatMessage(record)


class JsonLinesFormatter(logging.Formatter):
    """One JSON object a line, for log shippers: ts (UTC), level, logger, message, role, name, tag, exception."""

    def __init__(self, role: str = "", name: str = "", tag: str = "") -> None:
        super().__init__()
        self.fields = {k: v for k, v in (("role", role), ("name", name), ("tag", tag)) if v}

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc)
        # ts then level first, in this order: fedcommon.logs reads a line's level from its head.
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": for_log(record.getMessage()),
            **self.fields,
        }
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def rotate_files(path: Path, backups: int) -> None:
    """Move `path` aside as path.1, path.1 to path.2, … ; what would become path.<backups + 1> is dropped."""
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    if path.exists():
        os.replace(path, path.with_name(f"{path.name}.1"))


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
        rotate_files(self.path, self.backups)
        self._f = open(self.path, "ab")

    def close(self) -> None:
        with self._lock:
            self._f.close()


def pump_lines(stream: IO[bytes], writer: RotatingWriter) -> None:
    """Copy a process's output into writer until it ends, a line (at most MAX_LINE_BYTES) at a time.

    The stream is read to its end whatever happens to the file: a writer that fails (disk full) costs log
    lines, never the process a broken pipe. Closes both at the end.
    """
    failed = False
    try:
        while line := stream.readline(MAX_LINE_BYTES):
            if failed:
                continue
            try:
                writer.write(line)
            except (OSError, ValueError) as e:
                failed = True
                logging.getLogger(__name__).error(
                    "cannot write %s (%s): the worker's output is dropped from now on", writer.path, e
                )
    except (OSError, ValueError):
        pass
    finally:
        stream.close()
        with contextlib.suppress(OSError, ValueError):
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
            raise LogRequestError(
                f"logs takes no {', '.join(map(repr, unknown))}: the participant chooses its "
                "own log files (arguments: run_number, lines, level, cursor)"
            )
        lines = args.get("lines", 50)
        if isinstance(lines, bool) or not isinstance(lines, int) or not 1 <= lines <= MAX_LINES:
            raise LogRequestError(f"lines must be a whole number from 1 to {MAX_LINES}, got {lines!r}")
        level = args.get("level")
        if level is not None and (not isinstance(level, str) or level.lower() not in LEVELS):
            raise LogRequestError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        cursor = args.get("cursor")
        if cursor is not None:
            ok = (
                isinstance(cursor, dict)
                and set(cursor) <= {"inode", "offset", "keep"}
                and all(
                    isinstance(cursor.get(k), int) and not isinstance(cursor.get(k), bool) and 0 <= cursor[k] < 2**63
                    for k in ("inode", "offset")
                )
                and cursor["offset"] <= MAX_LOG_BYTES
            )
            if not ok:
                raise LogRequestError(f"cursor must be what an earlier logs reply returned, got {cursor!r}")
            cursor = {"inode": cursor["inode"], "offset": cursor["offset"], "keep": int(bool(cursor.get("keep")))}
        return cls(lines, level.lower() if level else None, cursor)

    def to_args(self) -> dict[str, Any]:
        """The checked query as request arguments (what a site is sent)."""
        args: dict[str, Any] = {"lines": self.lines}
        if self.level is not None:
            args["level"] = self.level
        if self.cursor is not None:
            args["cursor"] = self.cursor
        return args


def _records(lines: Iterable[bytes], keep_first: bool, minimum: int) -> tuple[list[bytes], bool]:
    """The lines of the records at `minimum` rank or above; continuation lines follow their record.

    keep_first: whether lines before the first record head belong to a kept record. Returns the kept
    lines and whether the last record was kept.
    """
    kept: list[bytes] = []
    keep = keep_first
    for line in lines:
        keep = _kept(line, keep, minimum)
        if keep:
            kept.append(line)
    return kept, keep


def _kept(line: bytes, keep: bool, minimum: int) -> bool:
    """Whether `line` is shown: a record head (or a bare traceback) decides by its level, others follow `keep`."""
    head = _RECORD_HEAD.match(line)
    if head:
        return _LEVEL_RANK[head.group(1).decode()] >= minimum
    if line.startswith(_TRACEBACK_HEAD):
        return _LEVEL_RANK["ERROR"] >= minimum
    return keep


def _take(raw: list[bytes], keep_first: bool, minimum: int) -> tuple[list[str], bool, int]:
    """The kept lines of `raw` from its start while they fit in one reply (MAX_LINES, MAX_REPLY_BYTES);
    returns them, whether the last record was kept, and how many bytes of `raw` they account for."""
    out: list[str] = []
    keep, used, size = keep_first, 0, 0
    for line in raw:
        record_keep = _kept(line, keep, minimum)
        if record_keep:
            text = _shown(line)
            if len(out) == MAX_LINES or size + len(text) + 1 > MAX_REPLY_BYTES:
                break
            out.append(text)
            size += len(text) + 1
        keep = record_keep
        used += len(line)
    return out, keep, used


def _shown(line: bytes) -> str:
    text = line.rstrip(b"\r\n").decode("utf-8", errors="replace")
    if len(text) > MAX_LINE_CHARS:
        text = f"{text[:MAX_LINE_CHARS]}… [{len(text) - MAX_LINE_CHARS} more characters]"
    return text


def _fit(lines: list[bytes], count: int) -> tuple[list[str], bool]:
    """The last `count` lines (each cut to MAX_LINE_CHARS) that fit in MAX_REPLY_BYTES; True when some were left
    out for size."""
    out: list[str] = []
    size = 0
    for line in reversed(lines[-count:]):
        text = _shown(line)
        size += len(text) + 1
        if size > MAX_REPLY_BYTES:
            return out[::-1], True
        out.append(text)
    return out[::-1], False


def _open(path: Path) -> IO[bytes] | None:
    """A log file opened for reading, or None when it does not exist; a link or anything but a regular file is
    refused (a worker cannot point the reader elsewhere)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LogRequestError(f"{path.name} cannot be read: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogRequestError(f"{path.name} is not a regular file")
    return os.fdopen(fd, "rb")


def _backup(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.{i}")


def _last_bytes(f: IO[bytes], limit: int) -> bytes:
    """About the last `limit` bytes of the file, from a line's start; the file's position is left after them."""
    size = os.fstat(f.fileno()).st_size
    if size <= limit:
        f.seek(0)
        return f.read(limit)
    f.seek(size - limit)
    data = f.read(limit)
    return data[data.find(b"\n") + 1 :]


def read_log(path: Path, query: LogQuery) -> dict[str, Any]:
    """The reply to a logs request for the log at `path` (with its rotated backups path.1, path.2, …).

    Without a cursor: the last `lines` lines at the level or above (older backups are read when the current
    file holds too few). With one: the complete lines appended since, across rotations. The reply's
    `cursor` continues from where this one ended.
    """
    minimum = _LEVEL_RANK[(query.level or "debug").upper()]
    if query.cursor is None:
        return _tail(path, query.lines, minimum)
    return _since(path, query.cursor, minimum)


def _tail(path: Path, count: int, minimum: int) -> dict[str, Any]:
    f = _open(path)
    if f is None:
        return {"lines": [], "cursor": None, "truncated": False, "missing": True}
    with f:
        data = _last_bytes(f, MAX_LOG_BYTES)
        end = data.rfind(b"\n") + 1  # an unfinished last line comes with the next follow step
        cursor_offset = f.tell() - (len(data) - end)
        chunks = [data[:end]]  # newest first
        # Lines without a record head (a print) count as info; older files are read while too few lines match.
        while len(_records(b"".join(reversed(chunks)).splitlines(keepends=True), True, minimum)[0]) < count:
            if len(chunks) > LOG_BACKUPS:
                break
            older = _open(_backup(path, len(chunks)))
            if older is None:
                break
            with older:
                chunks.append(_last_bytes(older, MAX_LOG_BYTES))
        kept, keep = _records(b"".join(reversed(chunks)).splitlines(keepends=True), minimum <= _INFO, minimum)
        lines, truncated = _fit(kept, count)
        return {"lines": lines, "cursor": _cursor(f, cursor_offset, keep), "truncated": truncated or len(kept) > count}


def _cursor(f: IO[bytes], offset: int, keep: bool) -> dict[str, int]:
    return {"inode": os.fstat(f.fileno()).st_ino, "offset": offset, "keep": int(keep)}


def _since(path: Path, cursor: dict[str, int], minimum: int) -> dict[str, Any]:
    """Complete lines after the cursor: from the file the cursor is in (the current one, or a backup it was
    rotated to, oldest first), at most MAX_FOLLOW_READ bytes per call."""
    current = _open(path)
    if current is None:
        return {"lines": [], "cursor": cursor, "truncated": False, "missing": True}
    files = [current]  # current, .1, .2, …: newest first
    try:
        if os.fstat(current.fileno()).st_ino != cursor["inode"]:
            for i in range(1, LOG_BACKUPS + 1):
                backup = _open(_backup(path, i))
                if backup is None:
                    break
                files.append(backup)
                if os.fstat(backup.fileno()).st_ino == cursor["inode"]:
                    break
        found = os.fstat(files[-1].fileno()).st_ino == cursor["inode"]
        # The cursor's file rotated out of reach: carry on from the oldest file there is.
        f, offset = files[-1], cursor["offset"] if found else 0
        size = os.fstat(f.fileno()).st_size
        if offset > size:  # truncated or replaced in place
            offset = 0
        f.seek(offset)
        data = f.read(MAX_FOLLOW_READ)
        finished = f is not current and offset + len(data) >= size  # a backup no longer grows: take it all
        end = len(data) if finished else data.rfind(b"\n") + 1
        if end == 0 and len(data) == MAX_FOLLOW_READ:
            end = len(data)  # one line longer than a whole step: take it as it is rather than stall
        keep_first = bool(cursor.get("keep")) if found else minimum <= _INFO
        lines, keep, used = _take(data[:end].splitlines(keepends=True), keep_first, minimum)
        if used < end:  # the reply is full: the rest comes with the next step
            end, finished = used, False
        if finished:
            # That file is done: the next step starts at the top of the next newer one.
            newer = files[-2]
            return {"lines": lines, "cursor": _cursor(newer, 0, keep), "truncated": False}
        return {"lines": lines, "cursor": _cursor(f, offset + end, keep), "truncated": False}
    finally:
        for f in files:
            f.close()
