"""Logging an operator configures: FEDLEARN_LOG_* variables and local/logging.json, JSON lines, rotation sizes, and
clear refusals of bad values by each role (the e2e test runs a federation under them)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from conftest import ROOT, prepare_workspace, python_env, run_fedadmin

from fedcommon.logging_config import LoggingConfigError, read_settings
from fedcommon.logs import LogQuery, configure_logging, read_log


@pytest.fixture
def root_logger(monkeypatch):
    """The root logger as it was, restored after the test reconfigures it; no FEDLEARN_LOG_* from outside."""
    for name in ("LEVEL", "FORMAT", "MAX_BYTES", "BACKUPS"):
        monkeypatch.delenv(f"FEDLEARN_LOG_{name}", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"FEDLEARN_LOG_LEVEL": "loud"}, "FEDLEARN_LOG_LEVEL must be one of debug, info, warning, error, got 'loud'"),
        ({"FEDLEARN_LOG_FORMAT": "xml"}, "FEDLEARN_LOG_FORMAT must be one of text, json"),
        ({"FEDLEARN_LOG_MAX_BYTES": "10M"}, "FEDLEARN_LOG_MAX_BYTES must be a whole number"),
        ({"FEDLEARN_LOG_BACKUPS": "0"}, "FEDLEARN_LOG_BACKUPS must be a whole number from 1"),
    ],
)
def test_a_bad_variable_is_refused_naming_it_and_the_value(env, match):
    with pytest.raises(LoggingConfigError, match=match):
        read_settings(None, env)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "logging.json"),
        ('{"handlers": {}}', 'needs "version": 1'),
        ('{"version": 1, "root": []}', "'root' must be an object"),
        ('{"version": 1, "x": "' + "a" * 70_000 + '"}', "larger than 65536 bytes"),
    ],
)
def test_a_bad_logging_json_is_refused_naming_the_file(tmp_path, content, match):
    (tmp_path / "logging.json").write_text(content)
    with pytest.raises(LoggingConfigError, match=match) as info:
        read_settings(tmp_path, {})
    assert str(tmp_path / "logging.json") in str(info.value)


def test_a_logging_json_that_dictconfig_refuses_names_the_file(tmp_path, root_logger):
    config = {"version": 1, "handlers": {"h": {"class": "logging.NoSuchHandler"}}, "root": {"handlers": ["h"]}}
    (tmp_path / "logging.json").write_text(json.dumps(config))
    with pytest.raises(LoggingConfigError, match="logging.json: .*handler 'h'"):
        configure_logging(None, local=tmp_path)


def test_json_lines_carry_time_level_logger_role_and_the_exception_one_record_a_line(
    tmp_path, root_logger, monkeypatch
):
    monkeypatch.setenv("FEDLEARN_LOG_FORMAT", "json")
    log_file = tmp_path / "log.txt"
    configure_logging(log_file, role="server", name="server-a")
    logger = logging.getLogger("fed.test")
    logger.info("site said %s", "hi\nERROR forged record")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    logger.debug("not at info")
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert list(first)[:5] == ["ts", "level", "logger", "message", "role"]
    assert (first["level"], first["logger"], first["role"], first["name"]) == ("INFO", "fed.test", "server", "server-a")
    assert first["message"] == "site said hi\\nERROR forged record"
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]
    # What `fedadmin logs --level` reads of those records.
    assert [json.loads(x)["level"] for x in read_log(log_file, LogQuery(level="error"))["lines"]] == ["ERROR"]


def test_the_level_variable_and_rotation_sizes_apply_to_the_default_files(tmp_path, root_logger, monkeypatch):
    monkeypatch.setenv("FEDLEARN_LOG_LEVEL", "warning")
    monkeypatch.setenv("FEDLEARN_LOG_MAX_BYTES", "4096")
    monkeypatch.setenv("FEDLEARN_LOG_BACKUPS", "2")
    log_file = tmp_path / "log.txt"
    configure_logging(log_file)
    logger = logging.getLogger("fed.test")
    logger.info("left out")
    for i in range(200):
        logger.warning("line %d %s", i, "x" * 60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "log.txt.1", "log.txt.2"]
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    assert "left out" not in "".join(p.read_text() for p in tmp_path.iterdir())
    configure_logging(log_file, debug=True)  # --debug wins over the variable
    assert root_logger.level == logging.DEBUG


def test_logging_json_replaces_the_defaults_with_files_under_the_workspace_and_remote_text_stays_escaped(
    tmp_path, root_logger
):
    local = tmp_path / "local"
    local.mkdir()
    config = {
        "version": 1,
        "formatters": {"plain": {"format": "%(levelname)s %(message)s"}},
        "handlers": {"f": {"class": "logging.FileHandler", "filename": "logs/site.log", "formatter": "plain"}},
        "root": {"level": "WARNING", "handlers": ["f"]},
    }
    (local / "logging.json").write_text(json.dumps(config))
    early = logging.getLogger("fed.made_before")  # a module's logger, made at import
    configure_logging(tmp_path / "log.txt", local=local)
    early.warning("from a site: %s", "a\nCRITICAL forged")
    early.info("below the file's level")
    assert (tmp_path / "logs" / "site.log").read_text() == "WARNING from a site: a\\nCRITICAL forged\n"
    assert not (tmp_path / "log.txt").exists()


def test_a_worker_under_an_agent_takes_only_the_level_of_logging_json(tmp_path, root_logger):
    local = tmp_path / "local"
    local.mkdir()
    config = {"version": 1, "handlers": {"f": {"class": "logging.FileHandler", "filename": "x.log"}}}
    (local / "logging.json").write_text(json.dumps({**config, "root": {"level": "ERROR", "handlers": ["f"]}}))
    configure_logging(None, local=local, own_file_config=False)
    assert root_logger.level == logging.ERROR
    assert [type(h) for h in root_logger.handlers] == [logging.StreamHandler]
    assert not (tmp_path / "x.log").exists()


@pytest.mark.parametrize("role", ["server", "site-1"])
def test_each_role_refuses_to_start_on_a_bad_setting_naming_it(tmp_path, role):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    module = "fedserver.cli" if role == "server" else "fedclient.cli"
    (ws / role / "local").mkdir(exist_ok=True)
    (ws / role / "local" / "logging.json").write_text('{"version": 2}')
    argv = [sys.executable, "-m", module, "start", "--workspace", str(ws / role)]
    bad_file = subprocess.run(argv, env=python_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad_file.returncode == 3
    assert f"{ws / role / 'local' / 'logging.json'}: not a logging.config.dictConfig" in bad_file.stderr
    (ws / role / "local" / "logging.json").unlink()
    env = {**python_env(), "FEDLEARN_LOG_FORMAT": "yaml"}
    bad_env = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad_env.returncode == 3 and "FEDLEARN_LOG_FORMAT must be one of text, json" in bad_env.stderr


def test_the_console_logs_only_when_asked_and_refuses_a_bad_level_as_a_usage_error(tmp_path):
    quiet = run_fedadmin("--kit", str(tmp_path), "status", "server")
    assert quiet.returncode == 3 and "{" not in quiet.stderr
    bad = run_fedadmin("--kit", str(tmp_path), "status", "server", env={"FEDLEARN_LOG_LEVEL": "chatty"})
    assert bad.returncode == 2 and "FEDLEARN_LOG_LEVEL must be one of" in bad.stderr
