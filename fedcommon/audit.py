"""Append-only JSON-lines audit logs (DESIGN §10), shared by the server and the site agent."""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class JsonLinesLog:
    """Appends one timestamped JSON object per line to a 0600 file; a failed write is logged, never raised."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, entry: dict[str, Any]) -> None:
        """Write `entry` with a leading UTC "time" field as one line."""
        stamped = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"), **entry}
        line = (json.dumps(stamped) + "\n").encode("utf-8")
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except OSError as e:
            log.error("cannot append to the audit log %s: %s", self.path, e)
