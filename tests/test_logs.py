"""Log files and the reader behind `fedadmin logs`: tails, level filters, following across rotation, refusals."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedcommon.logs import LogQuery, LogRequestError, RotatingWriter, configure_logging, read_log


def _record(level: str, text: str, second: int = 0) -> str:
    return f"2026-11-29 10:00:{second:02d},123 {level} fed.test: {text}\n"


def _write(path: Path, *lines: str) -> None:
    with open(path, "a") as f:
        f.write("".join(lines))


def test_the_last_lines_are_returned_and_an_unfinished_line_waits(tmp_path):
    log = tmp_path / "log.txt"
    _write(log, *(_record("INFO", f"line {i}") for i in range(10)), "half a li")
    reply = read_log(log, LogQuery(lines=3))
    assert [line.split(": ", 1)[1] for line in reply["lines"]] == ["line 7", "line 8", "line 9"]
    assert reply["truncated"] is True
    assert reply["cursor"]["offset"] == log.stat().st_size - len("half a li")
    _write(log, "ne\n")
    follow = read_log(log, LogQuery(cursor=reply["cursor"]))
    assert follow["lines"] == ["half a line"]


def test_level_keeps_whole_records_with_their_traceback_and_a_bare_traceback_counts_as_an_error(tmp_path):
    log = tmp_path / "log.txt"
    _write(log, _record("INFO", "starting"), _record("ERROR", "training failed"),
           "Traceback (most recent call last):\n", '  File "train.py", line 3\n', "ValueError: bad data\n",
           _record("WARNING", "slow"), _record("INFO", "done"),
           "Traceback (most recent call last):\n", "RuntimeError: raw crash\n")
    assert read_log(log, LogQuery(lines=50, level="error"))["lines"] == [
        _record("ERROR", "training failed").rstrip("\n"), "Traceback (most recent call last):",
        '  File "train.py", line 3', "ValueError: bad data", "Traceback (most recent call last):",
        "RuntimeError: raw crash"]
    warnings = read_log(log, LogQuery(lines=50, level="warning"))["lines"]
    assert _record("WARNING", "slow").rstrip("\n") in warnings and not any("starting" in x for x in warnings)
    assert len(read_log(log, LogQuery(lines=50))["lines"]) == 9


def test_a_follow_cursor_carries_whether_the_record_it_stopped_in_was_kept(tmp_path):
    log = tmp_path / "log.txt"
    _write(log, _record("ERROR", "boom"))
    first = read_log(log, LogQuery(level="error"))
    _write(log, "  a continuation of the error\n", _record("INFO", "chatter"), "  and of the info\n")
    assert read_log(log, LogQuery(level="error", cursor=first["cursor"]))["lines"] == [
        "  a continuation of the error"]


def test_following_goes_on_across_a_rotation_without_losing_or_repeating_lines(tmp_path):
    log = tmp_path / "worker.log"
    writer = RotatingWriter(log, max_bytes=400, backups=2)
    seen: list[str] = []
    cursor = None
    for i in range(40):
        writer.write(_record("INFO", f"step {i}").encode())
        if i % 7 == 6:
            reply = read_log(log, LogQuery(cursor=cursor) if cursor else LogQuery(lines=10_000))
            seen += reply["lines"]
            cursor = reply["cursor"]
    seen += read_log(log, LogQuery(cursor=cursor))["lines"]
    writer.close()
    assert [line.rsplit(" ", 1)[1] for line in seen] == [str(i) for i in range(40)]
    assert Path(f"{log}.1").exists() and Path(f"{log}.2").exists() and not Path(f"{log}.3").exists()
    assert log.stat().st_size <= 400


def test_a_tail_reaches_into_the_rotated_files_when_the_current_one_is_short(tmp_path):
    log = tmp_path / "log.txt"
    writer = RotatingWriter(log, max_bytes=300, backups=3)
    for i in range(12):
        writer.write(_record("INFO", f"n {i}").encode())
    writer.close()
    lines = read_log(log, LogQuery(lines=8))["lines"]
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(i) for i in range(4, 12)]


def test_the_process_log_rotates(tmp_path):
    log = tmp_path / "log.txt"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging(log)
    handler = next(h for h in root.handlers if hasattr(h, "maxBytes"))
    try:
        handler.maxBytes = 2000
        for i in range(100):
            logging.getLogger("fed.test").info("message number %d with some padding to fill the file", i)
    finally:
        handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert Path(f"{log}.1").exists() and log.stat().st_size <= 2000
    assert read_log(log, LogQuery(lines=1))["lines"][0].endswith("message number 99 with some padding to fill the file")


def test_a_missing_log_is_reported_not_raised(tmp_path):
    assert read_log(tmp_path / "nothing.log", LogQuery())["missing"] is True


@pytest.mark.parametrize("args, match", [
    ({"path": "/etc/passwd"}, "logs takes no 'path'"),
    ({"file": "../startup/key.pem"}, "logs takes no 'file'"),
    ({"lines": 0}, "lines must be"),
    ({"lines": "10"}, "lines must be"),
    ({"lines": 10_001}, "lines must be"),
    ({"level": "loud"}, "level must be one of"),
    ({"cursor": {"inode": -1, "offset": 0}}, "cursor must be"),
    ({"cursor": {"inode": 1, "offset": 0, "path": "x"}}, "cursor must be"),
    ({"cursor": "start"}, "cursor must be"),
])
def test_bad_arguments_are_refused_naming_them(args, match):
    with pytest.raises(LogRequestError, match=match):
        LogQuery.from_args(args)
