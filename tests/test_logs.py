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
    _write(
        log,
        _record("INFO", "starting"),
        _record("ERROR", "training failed"),
        "Traceback (most recent call last):\n",
        '  File "train.py", line 3\n',
        "ValueError: bad data\n",
        _record("WARNING", "slow"),
        _record("INFO", "done"),
        "Traceback (most recent call last):\n",
        "RuntimeError: raw crash\n",
    )
    assert read_log(log, LogQuery(lines=50, level="error"))["lines"] == [
        _record("ERROR", "training failed").rstrip("\n"),
        "Traceback (most recent call last):",
        '  File "train.py", line 3',
        "ValueError: bad data",
        "Traceback (most recent call last):",
        "RuntimeError: raw crash",
    ]
    warnings = read_log(log, LogQuery(lines=50, level="warning"))["lines"]
    assert _record("WARNING", "slow").rstrip("\n") in warnings and not any("starting" in x for x in warnings)
    assert len(read_log(log, LogQuery(lines=50))["lines"]) == 9


def test_a_follow_cursor_carries_whether_the_record_it_stopped_in_was_kept(tmp_path):
    log = tmp_path / "log.txt"
    _write(log, _record("ERROR", "boom"))
    first = read_log(log, LogQuery(level="error"))
    _write(log, "  a continuation of the error\n", _record("INFO", "chatter"), "  and of the info\n")
    assert read_log(log, LogQuery(level="error", cursor=first["cursor"]))["lines"] == ["  a continuation of the error"]


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


@pytest.mark.parametrize(
    "args, match",
    [
        ({"path": "/etc/passwd"}, "logs takes no 'path'"),
        ({"file": "../startup/key.pem"}, "logs takes no 'file'"),
        ({"lines": 0}, "lines must be"),
        ({"lines": "10"}, "lines must be"),
        ({"lines": 10_001}, "lines must be"),
        ({"level": "loud"}, "level must be one of"),
        ({"cursor": {"inode": -1, "offset": 0}}, "cursor must be"),
        ({"cursor": {"inode": 1, "offset": 0, "path": "x"}}, "cursor must be"),
        ({"cursor": "start"}, "cursor must be"),
        ({"cursor": {"inode": 1, "offset": 2**63}}, "cursor must be"),
    ],
)
def test_bad_arguments_are_refused_naming_them(args, match):
    with pytest.raises(LogRequestError, match=match):
        LogQuery.from_args(args)


def _follow_all(log: Path, cursor: dict, steps: int = 200) -> list[str]:
    seen: list[str] = []
    for _ in range(steps):
        reply = read_log(log, LogQuery(cursor=cursor))
        if not reply["lines"] and reply["cursor"] == cursor:
            break
        seen += reply["lines"]
        cursor = reply["cursor"]
    return seen


def test_following_through_two_rotations_with_more_than_a_step_left_in_the_backup(tmp_path):
    log = tmp_path / "worker.log"
    writer = RotatingWriter(log, max_bytes=3 * 1024 * 1024, backups=3)
    writer.write(_record("INFO", "before").encode())
    cursor = read_log(log, LogQuery(lines=1))["cursor"]
    n = 0
    while not Path(f"{log}.2").exists():  # two rotations, each file ~3 MiB: more than one follow step
        writer.write(_record("INFO", f"step {n} " + "x" * 60).encode())
        n += 1
    writer.write(_record("INFO", f"step {n} " + "x" * 60).encode())
    writer.close()
    seen = _follow_all(log, cursor)
    assert [int(line.split("step ")[1].split()[0]) for line in seen] == list(range(n + 1))


def test_a_line_longer_than_a_follow_step_does_not_stall_the_follower(tmp_path):
    log = tmp_path / "log.txt"
    _write(log, _record("INFO", "start"))
    cursor = read_log(log, LogQuery())["cursor"]
    _write(log, "\r" + "progress 50%" * 200_000, "\n", _record("INFO", "after"))  # ~2.4 MB without a newline
    seen = _follow_all(log, cursor)
    assert seen[-1].endswith("fed.test: after") and any("more characters]" in line for line in seen)


def test_a_huge_newest_line_is_cut_not_hiding_the_lines_before_it(tmp_path):
    log = tmp_path / "log.txt"
    _write(log, _record("ERROR", "the cause"), _record("INFO", "y" * 600_000))
    lines = read_log(log, LogQuery(lines=5))["lines"]
    assert lines[0].endswith("the cause") and len(lines[1]) < 20_000 and lines[1].endswith("more characters]")


def test_lines_without_a_record_head_count_as_info(tmp_path):
    log = tmp_path / "worker.log"
    _write(log, "fedclient.worker: bad rank environment\n", "a print from the trainer\n")
    assert read_log(log, LogQuery())["lines"] == ["fedclient.worker: bad rank environment", "a print from the trainer"]
    assert read_log(log, LogQuery(level="warning"))["lines"] == []


def test_a_traceback_split_by_a_rotation_keeps_its_end_under_an_error_filter(tmp_path):
    log = tmp_path / "log.txt"
    Path(f"{log}.1").write_text(_record("ERROR", "failed") + "Traceback (most recent call last):\n")
    _write(log, '  File "x.py", line 1\n', "ValueError: the end\n", _record("INFO", "later"))
    assert read_log(log, LogQuery(level="error"))["lines"][-1] == "ValueError: the end"


def test_a_log_that_is_a_link_or_not_a_file_is_refused(tmp_path):
    secret = tmp_path / "key.pem"
    secret.write_text("PRIVATE\n")
    (tmp_path / "log.txt").symlink_to(secret)
    with pytest.raises(LogRequestError, match="cannot be read"):
        read_log(tmp_path / "log.txt", LogQuery())
    (tmp_path / "dir.log").mkdir()
    with pytest.raises(LogRequestError, match="not a regular file|cannot be read"):
        read_log(tmp_path / "dir.log", LogQuery())


def test_the_output_pump_drains_the_pipe_when_the_file_cannot_be_written(tmp_path):
    import subprocess
    import sys
    import threading

    from fedcommon.logs import pump_lines

    class FullDisk(RotatingWriter):
        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

    proc = subprocess.Popen(
        [sys.executable, "-c", "for i in range(2000): print('line', i, flush=True)"], stdout=subprocess.PIPE
    )
    pump = threading.Thread(target=pump_lines, args=(proc.stdout, FullDisk(tmp_path / "w.log")))
    pump.start()
    assert proc.wait(30) == 0  # no broken pipe for the worker
    pump.join(10)
    assert not pump.is_alive()


def test_a_long_line_from_a_worker_is_written_in_pieces(tmp_path):
    import io

    from fedcommon.logs import MAX_LINE_BYTES, pump_lines

    writer = RotatingWriter(tmp_path / "w.log")
    pump_lines(io.BytesIO(b"z" * (3 * MAX_LINE_BYTES) + b"\nend\n"), writer)
    assert (tmp_path / "w.log").read_bytes() == b"z" * (3 * MAX_LINE_BYTES) + b"\nend\n"


def test_a_logged_remote_string_stays_on_its_own_record(tmp_path):
    """Hardening item 12: one escaping formatter for every role's log; tracebacks keep their lines."""
    import logging

    from fedcommon.logs import configure_logging

    log_file = tmp_path / "log.txt"
    configure_logging(log_file)
    try:
        logger = logging.getLogger("test.remote")
        logger.warning("site said: %s", "bad\n2026-01-01 00:00:00,000 ERROR x: forged\x1b[2J\u202e")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    finally:
        for h in list(logging.getLogger().handlers):
            h.close()
            logging.getLogger().removeHandler(h)
    lines = log_file.read_text().splitlines()
    said = next(line for line in lines if "site said" in line)
    assert said.endswith("bad\\n2026-01-01 00:00:00,000 ERROR x: forged\\x1b[2J\\u202e")
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert "Traceback (most recent call last):" in lines
    assert any(line.startswith("RuntimeError: boom") for line in lines)
