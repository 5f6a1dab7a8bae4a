"""A site's cross-site validation gives up at its configured timeout, naming the participant it waited for."""

from __future__ import annotations

import datetime

import pytest
from conftest import copy_mmar, prepare_workspace, server_process, start_site

pytestmark = pytest.mark.e2e


def test_a_participant_that_never_shares_ends_the_wait_at_the_timeout_naming_it(tmp_path, processes):
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    # site-1 validates and waits at most 7 s; site-2 trains but never shares its best model nor declines.
    # The server gives up on a missing participant only 30 s after it left, so only the site's own timeout
    # can end site-1's wait this soon, with that message.
    waiting = copy_mmar(
        tmp_path / "waiting",
        server={"num_rounds": 1},
        client={"cross_site_validate": True, "cross_site_validation_timeout": 7},
    )
    silent = copy_mmar(tmp_path / "silent", server={"num_rounds": 1}, client={"cross_site_validate": False})
    with server_process(ws / "server", "--mmar", str(waiting)):
        site1, site2 = start_site(ws / "site-1", waiting), start_site(ws / "site-2", silent)
        processes.extend([site1, site2])
        out2 = site2.communicate(timeout=240)[0]
        assert site2.returncode == 0, out2[-3000:]
        out1 = site1.communicate(timeout=240)[0]
        assert site1.returncode == 0, out1[-3000:]
    gave_up = [line for line in out1.splitlines() if "gave up after" in line]
    assert gave_up, out1[-3000:]
    assert "cross-site validation of run 1: gave up after 7s" in gave_up[0], gave_up
    assert "site-2" in gave_up[0].split("gave up after", 1)[1], gave_up
    # It gave up no sooner than the timeout after it began to wait (once it had shared its own best model).
    began = next(line for line in out1.splitlines() if "best model for digits" in line)
    waited = _when(gave_up[0]) - _when(began)
    assert waited >= datetime.timedelta(seconds=6.9), waited


def _when(line: str) -> datetime.datetime:
    """The time at the head of a log line ("2026-12-06 01:08:28,030 INFO ...")."""
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
