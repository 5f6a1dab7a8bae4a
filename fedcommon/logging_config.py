"""What an operator sets about a participant's logs: FEDLEARN_LOG_* variables and local/logging.json (a
logging.config.dictConfig file), read and checked here; fedcommon.logs applies them."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOGGING_FILE = "logging.json"  # in the participant's local/
MAX_CONFIG_BYTES = 64 * 1024
ENV_LEVEL = "FEDLEARN_LOG_LEVEL"
ENV_FORMAT = "FEDLEARN_LOG_FORMAT"
ENV_MAX_BYTES = "FEDLEARN_LOG_MAX_BYTES"
ENV_BACKUPS = "FEDLEARN_LOG_BACKUPS"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
# Rotation bounds: a file smaller than this rotates on every few records; more backups than this is a typo.
MIN_MAX_BYTES = 4096
MAX_MAX_BYTES = 1 << 40
MAX_BACKUPS = 1000


class LoggingConfigError(ValueError):
    """A log setting that cannot be used; the message names the variable or the file and what is wrong."""


@dataclass(frozen=True)
class LogSettings:
    """The operator's choices: None/False where the default (info, text, 10 MiB x 5) applies."""

    level: int | None = None
    json: bool = False
    max_bytes: int | None = None
    backups: int | None = None
    file_config: dict[str, Any] | None = None  # local/logging.json, checked
    file: Path | None = None


def read_settings(local: Path | None = None, environ: Mapping[str, str] | None = None) -> LogSettings:
    """The settings from the environment and, when `local` holds one, its logging.json; LoggingConfigError names
    what is wrong."""
    env = os.environ if environ is None else environ
    level = _level(env.get(ENV_LEVEL))
    fmt = (env.get(ENV_FORMAT) or "text").strip().lower()
    if fmt not in FORMATS:
        raise LoggingConfigError(f"{ENV_FORMAT} must be one of {', '.join(FORMATS)}, got {env[ENV_FORMAT]!r}")
    max_bytes = _whole(env, ENV_MAX_BYTES, MIN_MAX_BYTES, MAX_MAX_BYTES)
    backups = _whole(env, ENV_BACKUPS, 1, MAX_BACKUPS)
    path = local / LOGGING_FILE if local is not None else None
    file_config = read_file_config(path) if path is not None and path.is_file() else None
    return LogSettings(level, fmt == "json", max_bytes, backups, file_config, path if file_config else None)


def _level(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    name = value.strip().lower()
    if name not in LEVELS:
        raise LoggingConfigError(f"{ENV_LEVEL} must be one of {', '.join(LEVELS)}, got {value!r}")
    return logging.getLevelName(name.upper())


def _whole(env: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    try:
        number = int(value.strip())
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise LoggingConfigError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return number


def read_file_config(path: Path) -> dict[str, Any]:
    """local/logging.json as a dictConfig dictionary, its size and shape checked (dictConfig checks the rest)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise LoggingConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise LoggingConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is it a logging configuration?")
    from fedcommon.bounded_json import JsonBoundsError, loads_object  # only a participant with the file pays

    try:
        config = loads_object(data, str(path), MAX_CONFIG_BYTES)
    except JsonBoundsError as e:
        raise LoggingConfigError(str(e)) from None
    if config.get("version") != 1:
        raise LoggingConfigError(
            f'{path}: not a logging.config.dictConfig configuration: it needs "version": 1, '
            f"got {config.get('version')!r}"
        )
    for key in ("formatters", "filters", "handlers", "loggers", "root"):
        if key in config and not isinstance(config[key], dict):
            raise LoggingConfigError(f"{path}: {key!r} must be an object, got {type(config[key]).__name__}")
    return config


def root_level(config: dict[str, Any]) -> int | None:
    """The root logger's level a dictConfig sets, or None."""
    level = (config.get("root") or {}).get("level")
    if isinstance(level, str) and isinstance(logging.getLevelName(level.upper()), int):
        return logging.getLevelName(level.upper())
    return None
