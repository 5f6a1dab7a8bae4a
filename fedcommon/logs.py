"""Logging set-up shared by the server, the site agent and the worker: a file per process plus stderr."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(log_file: Path | None = None, debug: bool = False, tag: str = "") -> None:
    """Send records to stderr and, when given, append them to `log_file`; `tag` marks each line (e.g. "rank 1")."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(logging.Formatter(FORMAT.replace("%(name)s", f"[{tag}] %(name)s") if tag else FORMAT))
        root.addHandler(h)
