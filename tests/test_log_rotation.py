"""Log files rotate at the size the README states, 10 MiB with 5 older files kept, with nothing overridden."""

from __future__ import annotations

import logging
from pathlib import Path

from fedcommon.logs import RotatingWriter, configure_logging

MIB = 1024 * 1024
CAP, BACKUPS = 10 * MIB, 5  # README: "rotated at 10 MiB with 5 older files kept"
RECORD = "x" * (64 * 1024 - 100)  # about 64 KiB a record: 160 fill a file


def _assert_rotated_as_stated(log: Path) -> None:
    files = [log, *(log.with_name(f"{log.name}.{i}") for i in range(1, BACKUPS + 1))]
    assert all(f.exists() for f in files), [f.name for f in files if not f.exists()]
    assert not log.with_name(f"{log.name}.{BACKUPS + 1}").exists(), "more older files than stated"
    sizes = [f.stat().st_size for f in files]
    assert max(sizes) <= CAP, sizes
    assert min(sizes[1:]) > CAP - 128 * 1024, f"rotated well before 10 MiB: {sizes}"


def test_the_process_log_rotates_at_10_mib_keeping_5_older_files(tmp_path):
    log = tmp_path / "log.txt"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging(log)
    # The file handler as configured; the copy to stderr is left out (70 MiB on the test's output).
    root.handlers[:] = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    try:
        for i in range((BACKUPS + 2) * CAP // len(RECORD)):
            logging.getLogger("fed.rotation").info("record %d %s", i, RECORD)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    _assert_rotated_as_stated(log)


def test_a_workers_log_rotates_at_10_mib_keeping_5_older_files(tmp_path):
    log = tmp_path / "run_1" / "logs" / "worker.log"
    writer = RotatingWriter(log)
    try:
        line = (RECORD + "\n").encode()
        for _ in range((BACKUPS + 2) * CAP // len(line)):
            writer.write(line)
    finally:
        writer.close()
    _assert_rotated_as_stated(log)
