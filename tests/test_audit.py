"""The audit log cannot fail on caller input, rotates with retention, and refusals are rate-limited per caller."""

from __future__ import annotations

import json

from fedcommon.audit import MAX_ENTRY_BYTES, JsonLinesLog, RefusalLimiter


def _entries(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_entry_nested_as_deep_as_a_caller_likes_is_written_bounded(tmp_path):
    """Hardening item 2: args nested ~982 deep made the audit write raise RecursionError: no entry at all."""
    deep: object = "leaf"
    for _ in range(5000):
        deep = [deep]
    log = JsonLinesLog(tmp_path / "audit.log")
    log.append({"admin": "mallory", "command": "set-run", "args": {"run_number": deep}, "ok": False})
    (entry,) = _entries(tmp_path / "audit.log")
    assert entry["admin"] == "mallory" and entry["command"] == "set-run"
    assert "nested deeper than" in json.dumps(entry["args"])


def test_huge_strings_and_collections_are_cut_and_an_entry_stays_bounded(tmp_path):
    log = JsonLinesLog(tmp_path / "audit.log")
    log.append(
        {
            "admin": "x" * 100_000,
            "targets": [f"site-{i}" for i in range(300_000)],
            "args": {str(i): "y" * 4000 for i in range(1000)},
        }
    )
    line = (tmp_path / "audit.log").read_bytes()
    assert len(line) <= MAX_ENTRY_BYTES + 200
    (entry,) = _entries(tmp_path / "audit.log")
    assert "time" in entry


def test_the_audit_log_rotates_and_keeps_its_backups(tmp_path):
    """Hardening item 10: audit.log never rotated; a flood filled the disk."""
    path = tmp_path / "audit.log"
    log = JsonLinesLog(path, max_bytes=2000, backups=3)
    for i in range(200):
        log.append({"n": i, "pad": "z" * 100})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    assert _entries(path)[-1]["n"] == 199
    newest_backup = _entries(tmp_path / "audit.log.1")
    assert newest_backup[-1]["n"] == _entries(path)[0]["n"] - 1  # nothing lost between the files


def test_refusals_are_limited_per_caller_and_the_suppressed_count_is_reported():
    """Hardening item 10: a member's refused commands grew audit.log 13 MB/s."""
    now = [0.0]
    limiter = RefusalLimiter(burst=3, per_second=0.5, clock=lambda: now[0])
    assert [limiter.admit("carol")[0] for _ in range(5)] == [True, True, True, False, False]
    assert limiter.admit("bob") == (True, 0)  # another caller has its own share
    now[0] += 2.0  # one token back
    assert limiter.admit("carol") == (True, 2)
    assert limiter.admit("carol") == (False, 0)
