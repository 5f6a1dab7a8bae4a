"""A guard against restart loops: a participant restarts at most LIMIT times within WINDOW_S seconds.

The restarts are recorded in a small JSON file in the workspace, so the count survives the restart itself
(the process re-executes). Past the limit a restart is refused with a message; the process stays up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedcommon.atomic import atomic_write_json

RESTARTS_FILE = "restarts.json"
LIMIT = 5
WINDOW_S = 300.0


class RestartRefused(Exception):
    """Too many restarts in a short time; the message says how many and when one is allowed again."""


def check_restart(workspace: Path, now: float | None = None, limit: int = LIMIT, window: float = WINDOW_S) -> None:
    """Record one more restart of the participant in `workspace`, or refuse it past `limit` within `window`."""
    now = time.time() if now is None else now
    path = Path(workspace) / RESTARTS_FILE
    try:
        recorded = json.loads(path.read_text())
        recent = [t for t in recorded if isinstance(t, (int, float)) and now - window < t <= now]
    except (OSError, ValueError, TypeError):
        recent = []
    if len(recent) >= limit:
        again = time.strftime("%H:%M:%S", time.localtime(min(recent) + window))
        raise RestartRefused(
            f"restart refused: {len(recent)} restarts in the last {window / 60:g} min, a restart loop? "
            f"Look at log.txt (fedadmin logs); a restart is allowed again after {again}"
        )
    try:
        atomic_write_json(path, [*recent, now])
    except OSError:  # a workspace that cannot be written: the restart goes ahead, uncounted
        pass
