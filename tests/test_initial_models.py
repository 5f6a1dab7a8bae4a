"""Initial models built ahead: begun at deploy, taken by start; dropped when the MMAR changes, and stopped with the
server, their sandboxed child included."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import copy_mmar, prepare_workspace

from fedcommon.kit import load_kit
from fedcommon.model_file import load_model
from fedserver import server as server_module
from fedserver import untrusted_code
from fedserver.errors import ServerError
from fedserver.initial_models import InitialModels
from fedserver.server import FederationServer


class Builds:
    """A stand-in for the server's sandboxed build: writes the MMAR's marker file as the model, counts its calls."""

    def __init__(self, hold: float = 0.0, fail: bool = False) -> None:
        self.calls: list[Path] = []
        self.cancelled: list[Path] = []
        self.hold = hold
        self.fail = fail

    def __call__(self, mmar_dir: Path, out: Path, what: str, cancel: threading.Event) -> None:
        self.calls.append(mmar_dir)
        if cancel.wait(self.hold):
            self.cancelled.append(mmar_dir)
            raise ServerError(f"building the initial model of {what} was stopped")
        if self.fail:
            raise ServerError("building the initial model failed: ValueError: bad args")
        out.write_text((mmar_dir / "marker").read_text())


def mmar(folder: Path, marker: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "marker").write_text(marker)
    return folder


def leftovers(workspace: Path) -> list[Path]:
    return list(workspace.glob(".initial-model-*"))


def test_start_takes_the_model_built_at_deploy_once_it_is_ready(tmp_path):
    builds = Builds(hold=0.3)
    models = InitialModels(tmp_path, builds)
    models.begin(1, mmar(tmp_path / "run_1", "one"))
    dest = tmp_path / "global.fl"
    started = time.monotonic()

    assert models.take(1, dest)  # waits for the build in flight
    assert time.monotonic() - started >= 0.2
    assert dest.read_text() == "one" and len(builds.calls) == 1
    assert not models.take(1, dest)  # taken once
    assert leftovers(tmp_path) == []
    models.close()


def test_nothing_is_taken_for_a_run_not_deployed_here_or_whose_build_failed(tmp_path):
    models = InitialModels(tmp_path, Builds(fail=True))
    assert not models.take(7, tmp_path / "global.fl")
    models.begin(1, mmar(tmp_path / "run_1", "one"))
    assert not models.take(1, tmp_path / "global.fl")  # the caller builds it and reports its own error
    assert not (tmp_path / "global.fl").exists()
    assert leftovers(tmp_path) == []
    models.close()


def building(tmp_path: Path, folder: str) -> tuple[Builds, InitialModels]:
    """Builds that hold until cancelled, with run 1's begun from `folder`."""
    builds = Builds(hold=30.0)
    models = InitialModels(tmp_path, builds)
    models.begin(1, mmar(tmp_path / folder, "one"))
    return builds, models


def test_a_run_deployed_again_gets_the_model_of_its_new_mmar_and_the_old_build_is_stopped(tmp_path):
    builds, models = building(tmp_path, "first")
    deadline = time.monotonic() + 5
    while not builds.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    builds.hold = 0.0
    models.begin(1, mmar(tmp_path / "second", "new"))
    dest = tmp_path / "global.fl"

    assert models.take(1, dest)
    assert dest.read_text() == "new"
    assert builds.cancelled == [tmp_path / "first"]
    models.close()
    assert leftovers(tmp_path) == []


def test_a_model_built_from_an_mmar_changed_since_is_not_taken(tmp_path):
    models = InitialModels(tmp_path, Builds())
    folder = mmar(tmp_path / "run_1", "one")
    models.begin(1, folder)
    time.sleep(0.2)
    (folder / "marker").write_text("edited after deploy")

    assert not models.take(1, tmp_path / "global.fl")
    assert leftovers(tmp_path) == []
    models.close()


def test_a_build_queued_behind_another_runs_is_left_to_start_itself(tmp_path):
    builds, models = building(tmp_path, "run_1")
    models.begin(2, mmar(tmp_path / "run_2", "two"))
    started = time.monotonic()

    assert not models.take(2, tmp_path / "global.fl")  # not waited for behind run 1's
    assert time.monotonic() - started < 1.0
    models.forget(1)
    models.close()
    assert builds.calls == [tmp_path / "run_1"] and builds.cancelled == [tmp_path / "run_1"]
    assert leftovers(tmp_path) == []


def test_closed_builds_stop_and_begin_nothing_more(tmp_path):
    builds, models = building(tmp_path, "run_1")
    time.sleep(0.1)
    started = time.monotonic()
    models.close()
    assert time.monotonic() - started < 5.0
    models.begin(2, mmar(tmp_path / "run_2", "two"))
    assert not models.take(2, tmp_path / "global.fl")
    assert builds.calls == [tmp_path / "run_1"] and leftovers(tmp_path) == []


def test_folders_a_stopped_server_left_behind_are_removed(tmp_path):
    (tmp_path / ".initial-model-run_3.abc").mkdir()
    InitialModels(tmp_path, Builds()).close()
    assert leftovers(tmp_path) == []


# ---- in the server, with the real sandboxed child ----------------------------------------------------


@pytest.fixture
def server_ws(tmp_path) -> Path:
    return prepare_workspace(tmp_path / "ws", clients=2) / "server"


def counting_children(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = server_module.run_child

    def run_child(box, module, args, timeout, cancel=None):
        calls.append(args)
        return real(box, module, args, timeout, cancel)

    monkeypatch.setattr(server_module, "run_child", run_child)
    return calls


def test_the_server_builds_the_initial_model_once_from_deploy_to_start(server_ws, tmp_path, monkeypatch):
    calls = counting_children(monkeypatch)
    server = FederationServer(server_ws, load_kit(server_ws), fl_port=0, admin_port=0)
    try:
        server.set_run_number(1)
        server.deploy(copy_mmar(tmp_path / "mmar"), 1)
        run = server.start_training(1)
        model, _ = load_model(run.model_path)
        assert set(model) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
        assert len(calls) == 1
    finally:
        server.stop()
    assert leftovers(server_ws) == []


def test_a_server_stopped_while_it_builds_ahead_leaves_no_child(server_ws, tmp_path):
    server = FederationServer(server_ws, load_kit(server_ws), fl_port=0, admin_port=0)
    server.set_run_number(1)
    server.deploy(copy_mmar(tmp_path / "mmar"), 1)
    deadline = time.monotonic() + 10
    while not _builders() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _builders(), "no initial-model child was started at deploy"
    server.stop()
    assert _builders() == []
    assert leftovers(server_ws) == []


def _builders() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "fedserver.init_model" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_a_cancelled_child_is_stopped_at_once(tmp_path):
    box = untrusted_code.Sandbox(tmp_path, tmp_path / "out", [], untrusted_code.scrubbed_env(tmp_path), tmp_path, None)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        untrusted_code.run_child(box, "timeit", ["-n", "1", "-r", "1", "import time; time.sleep(60)"], 120, cancel)
    assert time.monotonic() - started < 5
