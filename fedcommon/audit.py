"""Append-only JSON-lines audit logs (DESIGN §10), shared by the server and the site agent.

An entry is bounded whatever the caller sent (depth, string lengths, list sizes), so writing it cannot fail on
caller input; the file rotates at max_bytes and keeps `backups` older files; refusals are rate-limited per
caller so a caller cannot fill the disk (or rotate older entries away) with refused commands.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from fedcommon.logs import rotate_files

log = logging.getLogger(__name__)

AUDIT_MAX_BYTES = 10 << 20
AUDIT_BACKUPS = 20
MAX_DEPTH = 6
MAX_STRING = 4096
MAX_ITEMS = 64
MAX_ENTRY_BYTES = 64 << 10


def bounded(value: Any, depth: int = 0) -> Any:
    """`value` as JSON-ready data no deeper than MAX_DEPTH, with strings and collections cut, saying so."""
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else f"{value[:MAX_STRING]}… ({len(value)} characters)"
    if value is None or isinstance(value, (bool, int, float)):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 63:
            return f"<integer of {len(str(value))} digits>"
        return value
    if depth >= MAX_DEPTH:
        return f"<{type(value).__name__} nested deeper than {MAX_DEPTH}>"
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(k)[:200]: bounded(v, depth + 1) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["…"] = f"{len(items) - MAX_ITEMS} more keys"
        return out
    if isinstance(value, (list, tuple)):
        out_list = [bounded(v, depth + 1) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            out_list.append(f"… {len(value) - MAX_ITEMS} more items")
        return out_list
    return bounded(repr(value), depth)


class JsonLinesLog:
    """Appends one timestamped JSON object per line to a 0600 file that rotates; a failed write is logged."""

    def __init__(self, path: Path, max_bytes: int = AUDIT_MAX_BYTES, backups: int = AUDIT_BACKUPS):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()

    def append(self, entry: dict[str, Any]) -> None:
        """Write `entry` (bounded) with a leading UTC "time" field as one line; never raises."""
        stamped = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            **bounded(entry),
        }
        line = (json.dumps(stamped) + "\n").encode("utf-8")
        if len(line) > MAX_ENTRY_BYTES:
            line = (
                json.dumps(
                    {
                        "time": stamped["time"],
                        "entry_cut": line[: MAX_ENTRY_BYTES // 2].decode("utf-8", errors="replace"),
                        "length": len(line),
                    }
                )
                + "\n"
            ).encode("utf-8")
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    if os.fstat(fd).st_size and os.fstat(fd).st_size + len(line) > self.max_bytes:
                        os.close(fd)
                        rotate_files(self.path, self.backups)
                        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except OSError as e:
            log.error("cannot append to the audit log %s: %s", self.path, e)


class RefusalLimiter:
    """At most `burst` audited refusals per caller, refilled at `per_second`; the rest are counted, and the count
    is reported with the caller's next audited refusal (so a flood of refusals costs a line now and then)."""

    def __init__(self, burst: int = 20, per_second: float = 1.0, clock=time.monotonic):
        self.burst = burst
        self.per_second = per_second
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float, int]] = {}  # caller -> (tokens, at, suppressed)

    def admit(self, caller: str) -> tuple[bool, int]:
        """(whether to audit this refusal, how many of the caller's refusals were suppressed before it)."""
        now = self._clock()
        with self._lock:
            tokens, at, suppressed = self._buckets.get(caller, (float(self.burst), now, 0))
            tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
            if tokens < 1:
                self._buckets[caller] = (tokens, now, suppressed + 1)
                return False, 0
            self._buckets[caller] = (tokens - 1, now, 0)
            if len(self._buckets) > 10_000:  # callers are certificate names, but bound it all the same
                self._buckets = {k: v for k, v in self._buckets.items() if v[2] or v[0] < self.burst}
            return True, suppressed
