"""Several runs training at once on one server: each session routes by its run over real gRPC with mutual TLS, the
max_runs limit, the current run for workers that name none, abort, resume and the run-end hook."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest
from conftest import copy_mmar, prepare_workspace

from fedcommon.chunk_wire import TrainingStub
from fedcommon.kit import channel_credentials, load_kit
from fedcommon.model_file import load_model, save_model
from fedcommon.tensor_codec import encode_tensors
from fedcommon.wire import training_pb2 as pb
from fedserver.catalogue import CATALOGUE
from fedserver.errors import ServerError
from fedserver.run import Phase
from fedserver.server import FederationServer

W0 = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
ONES = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}


def _mmar(tmp_path, name, num_rounds=2):
    mmar = copy_mmar(
        tmp_path / name,
        server={
            "initial_model": {"file": "models/initial.fl"},
            "min_num_clients": 2,
            "num_rounds": num_rounds,
            "wait_after_min_clients": 30,
            "heart_beat_timeout": 30,
        },
    )
    save_model(mmar / "models" / "initial.fl", W0)
    return mmar


@pytest.fixture
def two_runs(tmp_path):
    """A running in-process server with max_runs 2 training runs 1 and 2 (2 rounds, 2 sites each); run 1 is
    current (set-run)."""
    ws = prepare_workspace(tmp_path / "ws", clients=3)
    server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0, max_runs=2)
    ended: list[tuple[int, str, str]] = []
    server.on_run_end(lambda number, phase, detail: ended.append((number, phase, detail)))
    server.start_run(_mmar(tmp_path, "mmar-1"), run_number=1)
    server.deploy(_mmar(tmp_path, "mmar-2"), 2)
    server.start_training(2)
    port = server.start()
    yield server, ws, f"127.0.0.1:{port}", ended
    server.stop(0)


def _register(ws, site, target, run_number):
    channel = grpc.secure_channel(target, channel_credentials(load_kit(ws / site)))
    stub = TrainingStub(channel)
    reply = stub.Register(pb.RegisterRequest(client_name=site, run_number=run_number), timeout=10)
    return stub, (("fl-token", reply.token),), reply


def _fetch(stub, md):
    return list(stub.GetModel(pb.GetModelRequest(wait_seconds=0.5), metadata=md, timeout=10))


def _submit(stub, md, tensors, run_number, round_number=0):
    header = pb.ModelHeader(
        run_number=run_number, round=round_number, kind="delta_w", weight=1.0, num_tensors=len(tensors)
    )
    return stub.SubmitUpdate(iter([pb.ModelChunk(header=header), *encode_tensors(tensors)]), metadata=md, timeout=10)


def _summary(server, number):
    return json.loads((server.run_dir(number) / "summary.json").read_text())


def _wait_for(what, condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


def test_a_site_registers_in_each_run_and_each_session_gets_its_runs_model(two_runs):
    server, ws, target, _ = two_runs
    stub1, md1, reply1 = _register(ws, "site-1", target, 1)
    stub2, md2, reply2 = _register(ws, "site-1", target, 2)
    assert (reply1.run_number, reply2.run_number) == (1, 2)
    assert reply1.token != reply2.token
    assert server.run_sites(1) == {"site-1"} and server.run_sites(2) == {"site-1"}
    assert _fetch(stub1, md1)[0].header.run_number == 1
    assert _fetch(stub2, md2)[0].header.run_number == 2
    beat = stub2.Heartbeat(pb.HeartbeatRequest(), metadata=md2, timeout=10)
    assert beat.known and beat.run_number == 2


def test_contributions_go_to_their_sessions_run_and_the_rounds_never_mix(two_runs):
    server, ws, target, _ = two_runs
    sessions = {}
    for run in (1, 2):
        for site in ("site-1", "site-2"):
            stub, md, _ = _register(ws, site, target, run)
            _fetch(stub, md)
            sessions[run, site] = (stub, md)
    stub, md = sessions[1, "site-1"]
    wrong = _submit(stub, md, ONES, run_number=2)
    assert not wrong.accepted and "contribution is for run 2, the active run is 1" in wrong.reason
    assert _submit(stub, md, ONES, run_number=1).accepted
    assert _submit(*sessions[1, "site-2"], {k: 3 * v for k, v in ONES.items()}, run_number=1).accepted
    _wait_for("run 1's round 0 closed", lambda: _summary(server, 1)["rounds"])
    assert _summary(server, 1)["rounds"][0]["contributors"] == ["site-1", "site-2"]
    assert _summary(server, 2)["rounds"] == [] and server.runs[2].current_round == 0
    np.testing.assert_allclose(load_model(server.runs[1].model_path)[0]["w"], np.full((2, 3), 2.0))
    np.testing.assert_allclose(load_model(server.runs[2].model_path)[0]["w"], np.zeros((2, 3)))
    assert _submit(*sessions[2, "site-1"], ONES, run_number=2).accepted
    assert _submit(*sessions[2, "site-2"], ONES, run_number=2).accepted
    _wait_for("run 2's round 0 closed", lambda: _summary(server, 2)["rounds"])
    np.testing.assert_allclose(load_model(server.runs[2].model_path)[0]["w"], np.ones((2, 3)))


def test_quit_ends_only_the_session_of_its_run(two_runs):
    server, ws, target, _ = two_runs
    stub1, md1, _ = _register(ws, "site-1", target, 1)
    _register(ws, "site-1", target, 2)
    stub1.Quit(pb.QuitRequest(), metadata=md1, timeout=10)
    assert server.run_sites(1) == set() and server.run_sites(2) == {"site-1"}


def test_register_without_a_run_joins_the_current_run(two_runs):
    server, ws, target, _ = two_runs
    _, _, reply = _register(ws, "site-1", target, 0)
    assert reply.run_number == 1 and server.run_sites(1) == {"site-1"}


def test_register_without_a_run_is_refused_when_several_train_and_none_is_current(two_runs):
    server, ws, target, _ = two_runs
    server.set_run_number(7)  # max_runs 2: set-run is allowed while runs train
    with pytest.raises(grpc.RpcError) as err:
        _register(ws, "site-1", target, 0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "runs 1, 2 are training and none is the current run" in err.value.details()
    assert server.registry.names() == set()


def test_register_for_a_run_not_deployed_or_aborted_is_refused_naming_it(two_runs):
    server, ws, target, _ = two_runs
    with pytest.raises(grpc.RpcError) as err:
        _register(ws, "site-1", target, 9)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "run 9 is not deployed on the server" in err.value.details()
    server.abort_training(2)
    with pytest.raises(grpc.RpcError) as err:
        _register(ws, "site-1", target, 2)
    assert "run 2 was aborted" in err.value.details()


def test_a_session_for_a_deployed_run_waits_until_it_starts(two_runs, tmp_path):
    server, ws, target, _ = two_runs
    server.abort_training(2)
    server.deploy(_mmar(tmp_path, "mmar-3"), 3)
    stub, md, reply = _register(ws, "site-1", target, 3)
    assert reply.run_number == 3
    waiting = _fetch(stub, md)
    assert waiting[0].header.status == pb.WAIT and "run 3 has not started yet" in waiting[0].header.message
    server.start_training(3)
    assert _fetch(stub, md)[0].header.run_number == 3


def test_start_is_refused_past_max_runs_naming_the_runs_and_the_limit(two_runs, tmp_path):
    server, ws, target, _ = two_runs
    server.deploy(_mmar(tmp_path, "mmar-3"), 3)
    with pytest.raises(ServerError, match=r"runs 1, 2 are training and this server trains at most 2 at once"):
        server.start_training(3)
    server.abort_training(1)
    assert server.start_training(3).run_number == 3
    assert sorted(r.run_number for r in server.training_runs()) == [2, 3]


def test_with_max_runs_1_a_second_start_keeps_todays_message(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0)
    assert server.max_runs == 1
    server.start_run(_mmar(tmp_path, "mmar-1"), run_number=1)
    server.deploy(_mmar(tmp_path, "mmar-2"), 2)
    with pytest.raises(ServerError) as err:
        server.start_training(2)
    assert str(err.value) == "run 1 is training; abort it first"


def test_abort_without_a_run_takes_the_current_one_and_names_the_runs_when_none_is(two_runs):
    server, ws, target, ended = two_runs
    site_args = CATALOGUE["abort"].site_args
    assert site_args(server, {}) == {"run_number": 1}, "the sites are told the run the server aborts"
    assert site_args(server, {"run_number": 2}) == {"run_number": 2}
    server.set_run_number(7)
    with pytest.raises(ServerError, match=r"runs 1, 2 are training: name one \(--run N\)"):
        site_args(server, {})
    with pytest.raises(ServerError, match=r"runs 1, 2 are training: name one \(--run N\)"):
        server.abort_training()
    with pytest.raises(ServerError, match="run 5 is not training"):
        server.abort_training(5)
    server.set_run_number(2)
    assert server.abort_training() == 2
    assert server.runs[2].phase is Phase.ABORTED and server.runs[1].phase is Phase.TRAINING
    assert server.abort_training() == 1  # the only one left training
    assert sorted(ended) == [(1, "aborted", "aborted in round 0"), (2, "aborted", "aborted in round 0")]


def test_the_run_end_hook_is_told_once_when_a_run_completes(two_runs):
    server, ws, target, ended = two_runs
    sessions = [_register(ws, site, target, 2)[:2] for site in ("site-1", "site-2")]
    for round_number in (0, 1):
        for stub, md in sessions:
            _fetch(stub, md)
            assert _submit(stub, md, ONES, run_number=2, round_number=round_number).accepted
        _wait_for(f"run 2's round {round_number} closed", lambda n=round_number: len(_summary(server, 2)["rounds"]) > n)
    _wait_for("the hook was told", lambda: ended)
    time.sleep(0.6)  # a few ticks more: told once only
    assert ended == [(2, "completed", "completed after round 1")]
    assert server.runs[1].phase is Phase.TRAINING


def test_a_failing_run_end_hook_is_logged_and_the_others_are_still_told(two_runs, caplog):
    server, ws, target, ended = two_runs

    def broken(number, phase, detail):
        raise RuntimeError("hook broke")

    server.on_run_end(broken)
    also: list[int] = []
    server.on_run_end(lambda number, phase, detail: also.append(number))
    server.abort_training(1)
    assert [e[0] for e in ended] == [1] and also == [1]
    assert "run-end hook failed" in caplog.text


def test_status_reports_every_live_run_with_its_sites(two_runs):
    server, ws, target, _ = two_runs
    _register(ws, "site-1", target, 1)
    _register(ws, "site-2", target, 2)
    _register(ws, "site-3", target, 2)
    report = server.run_report()
    assert report["run_number"] == 1 and report["run_status"] == "training"
    assert report["runs"] == [
        {
            "run_number": 1,
            "run_status": "training",
            "current_round": 0,
            "num_rounds": 2,
            "registered_sites": ["site-1"],
        },
        {
            "run_number": 2,
            "run_status": "training",
            "current_round": 0,
            "num_rounds": 2,
            "registered_sites": ["site-2", "site-3"],
        },
    ]


def test_a_restarted_server_resumes_every_run_that_was_training(two_runs):
    server, ws, target, _ = two_runs
    server.stop(0)
    again = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0, max_runs=2)
    assert sorted(again.runs) == [1, 2]
    assert all(r.phase is Phase.TRAINING for r in again.runs.values())
    assert again.run.run_number == 1  # the current run (set-run) stays current


def test_deleting_a_run_that_ended_takes_it_out_of_the_live_runs(two_runs):
    server, ws, target, ended = two_runs
    with pytest.raises(ServerError, match="run 2 is active"):
        server.delete_run(2)
    server.abort_training(2)
    server.delete_run(2)
    assert sorted(server.runs) == [1] and ended == [(2, "aborted", "aborted in round 0")]


# ---- the console's view of several live runs ---------------------------------------------------------


def _status_outcome(runs):
    from fedcommon.outcome import CommandOutcome, TargetReply

    server = {"run_number": 1, "run_status": "training", "current_round": 0, "num_rounds": 2, "runs": runs}
    return CommandOutcome("status", True, [TargetReply("server", True, server)])


def _rendered(outcome) -> str:
    import io

    from fedadmin import render

    out = io.StringIO()
    render.terminal(file=out, width=200).print(render.status_view(outcome))
    return out.getvalue()


def test_status_shows_a_table_of_the_live_runs_only_when_several_are():
    from fedadmin import render

    one = [{"run_number": 1, "run_status": "training", "current_round": 0, "num_rounds": 2, "registered_sites": []}]
    several = [
        *one,
        {"run_number": 2, "run_status": "completed", "current_round": 2, "num_rounds": 2, "registered_sites": ["a"]},
    ]
    assert "live runs" not in _rendered(_status_outcome(one))
    shown = _rendered(_status_outcome(several))
    assert "live runs" in shown and "completed" in shown and "2 of 2" in shown
    lines = render.progress_lines(_status_outcome(several))
    assert "run 2: completed, round 2 of 2, sites a" in lines
    assert not any(line.startswith("run 1:") for line in render.progress_lines(_status_outcome(one)))


def test_a_site_registering_while_its_run_is_made_live_is_taken_not_refused_as_aborted(two_runs, tmp_path, monkeypatch):
    from fedserver import server as server_mod

    server, ws, target, _ = two_runs
    server.abort_training(2)
    server.deploy(_mmar(tmp_path, "mmar-3"), 3)
    seen = []
    real = server_mod.FederatedRun

    def built_then_registered(*args, **kwargs):
        run = real(*args, **kwargs)  # summary.json says "training" now; the run is not live yet
        seen.append((_summary(server, 3)["status"], server.run_for_register(3)[0]))
        return run

    monkeypatch.setattr(server_mod, "FederatedRun", built_then_registered)
    server.start_training(3)
    assert seen == [("training", 3)]
    assert server.run_status(3) == "training"
