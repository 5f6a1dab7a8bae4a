"""The restart-loop guard: at most LIMIT restarts within WINDOW_S, counted across the restarts themselves."""

from __future__ import annotations

import json

import pytest

from fedcommon.restart_guard import RESTARTS_FILE, RestartRefused, check_restart


def test_restarts_past_the_limit_in_the_window_are_refused_and_allowed_again_later(tmp_path):
    for t in range(5):
        check_restart(tmp_path, now=1000.0 + t, limit=5, window=60)
    with pytest.raises(RestartRefused, match="5 restarts in the last 1 min"):
        check_restart(tmp_path, now=1010.0, limit=5, window=60)
    assert len(json.loads((tmp_path / RESTARTS_FILE).read_text())) == 5  # a refused one is not counted
    check_restart(tmp_path, now=1061.0, limit=5, window=60)  # the first has left the window
    assert json.loads((tmp_path / RESTARTS_FILE).read_text())[0] == 1002.0


def test_an_unreadable_record_does_not_block_a_restart(tmp_path):
    (tmp_path / RESTARTS_FILE).write_text("{not json")
    check_restart(tmp_path, now=5.0)
    (tmp_path / RESTARTS_FILE).write_text('["x", null, 4.0]')
    check_restart(tmp_path, now=5.0)
    assert json.loads((tmp_path / RESTARTS_FILE).read_text()) == [4.0, 5.0]
