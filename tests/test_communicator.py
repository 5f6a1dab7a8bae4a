"""Communicator: mutual TLS only, which gRPC failures are retried, and errors that name the call and server."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from conftest import free_port, start_training_run

from fedclient.communicator import (
    ClientState,
    CommunicationError,
    Communicator,
    RegistrationRequired,
    server_target,
)
from fedclient.model_manager import ClientModelManager
from fedclient.worker import kit_ssl_args
from fedcommon.chunk_wire import TrainingStub
from fedcommon.kit import load_kit
from fedcommon.model_meta import FLContext, FLContextKey
from fedcommon.provision import prepare_poc
from fedcommon.wire import training_pb2 as pb

SERVICE = "fl.example.org:8002"


class FakeRpcError(grpc.RpcError):
    """What a failed gRPC call raises: a status code and its details."""

    def __init__(self, code: grpc.StatusCode, details: str = "detail text"):
        super().__init__()
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.fixture(scope="module")
def ssl_args(tmp_path_factory) -> dict[str, str]:
    ws = tmp_path_factory.mktemp("poc")
    prepare_poc(ws, 1, "127.0.0.1", free_port(), free_port(), "t", False)
    return kit_ssl_args(load_kit(ws / "site-1"))


@pytest.fixture
def comm(ssl_args) -> Communicator:
    c = Communicator(ClientModelManager(), ssl_args=ssl_args, secure_train=True, retry_timeout=30)
    yield c
    c.close()


def test_kit_ssl_args_name_the_three_files_of_the_kit(ssl_args):
    assert set(ssl_args) == {"ssl_root_cert", "ssl_cert", "ssl_private_key"}
    assert ssl_args["ssl_private_key"].endswith("key.pem")


@pytest.mark.parametrize("args", [None, {}], ids=["no-ssl-args", "empty-ssl-args"])
def test_communicator_refuses_anything_but_mutual_tls(ssl_args, args):
    with pytest.raises(ValueError, match="only mutual TLS: ssl_args must name ssl_root_cert, ssl_cert and"):
        Communicator(None, ssl_args=args, secure_train=True)


def test_the_seeds_default_secure_train_false_is_refused_saying_why_and_what_to_pass(ssl_args):
    with pytest.raises(ValueError) as err:
        Communicator(None, ssl_args=ssl_args)
    message = str(err.value)
    assert "secure_train=False (plaintext) is not supported: the server accepts only mutual TLS, because" in message
    assert "Pass secure_train=True and ssl_args=" in message and "<workspace>/startup/rootCA.pem" in message


@pytest.mark.parametrize("missing", ["ssl_root_cert", "ssl_cert", "ssl_private_key"])
def test_communicator_refuses_ssl_args_missing_a_file(ssl_args, missing):
    args = {k: v for k, v in ssl_args.items() if k != missing}
    with pytest.raises(ValueError, match=f"ssl_args is missing '{missing}'"):
        Communicator(None, ssl_args=args, secure_train=True)


def test_communicator_refuses_an_unreadable_certificate_naming_it(ssl_args, tmp_path):
    args = dict(ssl_args, ssl_cert=str(tmp_path / "nope.pem"))
    with pytest.raises(ValueError, match="cannot read ssl_cert .*nope.pem"):
        Communicator(None, ssl_args=args, secure_train=True)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_transient_failure_within_retry_timeout_is_retried(comm, code):
    assert comm.grpc_error_handler(SERVICE, FakeRpcError(code), "get model", time.monotonic(), True) is None


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_transient_failure_past_retry_timeout_names_the_action_and_server(comm, code):
    start = time.monotonic() - 31
    with pytest.raises(CommunicationError) as err:
        comm.grpc_error_handler(SERVICE, FakeRpcError(code, "connection refused"), "get model", start, True)
    assert not isinstance(err.value, RegistrationRequired)
    message = str(err.value)
    assert message.startswith("get model: server fl.example.org:8002 not reachable for 31s")
    assert code.name in message and "connection refused" in message


def test_transient_failure_without_retry_raises_at_once(comm):
    with pytest.raises(CommunicationError, match="quit: server fl.example.org:8002 not reachable"):
        comm.grpc_error_handler(SERVICE, FakeRpcError(grpc.StatusCode.UNAVAILABLE), "quit", time.monotonic(), False)


def test_unauthenticated_asks_to_register_again(comm):
    err = FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "unknown or expired session token: register again")
    with pytest.raises(RegistrationRequired, match="submit update refused by fl.example.org:8002: unknown or expired"):
        comm.grpc_error_handler(SERVICE, err, "submit update", time.monotonic(), True)


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED]
)
def test_refusals_raise_at_once_within_retry_timeout(comm, code):
    with pytest.raises(CommunicationError) as err:
        comm.grpc_error_handler(SERVICE, FakeRpcError(code, "not yours"), "register", time.monotonic(), True)
    assert not isinstance(err.value, RegistrationRequired)
    assert str(err.value) == f"register refused by fl.example.org:8002: {code.name}: not yours"


def _failing_then(result, failures: list[grpc.StatusCode]):
    calls = []

    def fn():
        calls.append(time.monotonic())
        if len(calls) <= len(failures):
            raise FakeRpcError(failures[len(calls) - 1])
        return result

    return fn, calls


def test_call_retries_transient_failures_until_the_call_succeeds(comm):
    fn, calls = _failing_then("ok", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE])
    servers = {"t": {"target": SERVICE}}
    assert comm._call(servers, "t", "heartbeat", fn) == "ok"
    assert len(calls) == 3


def test_call_does_not_retry_a_refusal(comm):
    fn, calls = _failing_then("ok", [grpc.StatusCode.PERMISSION_DENIED])
    with pytest.raises(CommunicationError, match="heartbeat refused by fl.example.org:8002: PERMISSION_DENIED"):
        comm._call({"t": {"target": SERVICE}}, "t", "heartbeat", fn)
    assert len(calls) == 1


def test_server_target_accepts_a_target():
    assert server_target({"name": "t", "target": "h:1"}) == "h:1"


def test_server_target_accepts_claras_service_target():
    assert server_target({"name": "t", "service": {"target": "h:2", "options": []}}) == "h:2"


@pytest.mark.parametrize("entry", [{"name": "t"}, {"service": {}}, {"target": ""}])
def test_server_target_refuses_an_entry_without_one(entry):
    with pytest.raises(ValueError, match="has no target"):
        server_target(entry)


def test_call_for_an_unconfigured_task_names_the_task(comm):
    with pytest.raises(CommunicationError, match="no server configured for task 'other'"):
        comm.send_heartbeat({"t": {"target": SERVICE}}, "other", "token")


def test_channel_is_reused_per_target(comm):
    entry = {"target": "127.0.0.1:1"}
    assert comm.set_up_channel(entry) is comm.set_up_channel({"service": {"target": "127.0.0.1:1"}})
    assert comm.set_up_channel(entry) is not comm.set_up_channel({"target": "127.0.0.1:2"})


def test_unreachable_server_raises_communication_error_within_seconds(ssl_args):
    port = free_port()  # bound, then released: nothing listens there
    c = Communicator(ClientModelManager(), ssl_args=ssl_args, secure_train=True, retry_timeout=1)
    started = time.monotonic()
    try:
        with pytest.raises(CommunicationError) as err:
            c.client_registration("site-1", {"t": {"target": f"127.0.0.1:{port}"}}, "t")
    finally:
        c.close()
    elapsed = time.monotonic() - started
    assert not isinstance(err.value, RegistrationRequired)
    assert f"register: server 127.0.0.1:{port} not reachable" in str(err.value)
    assert 1.0 <= elapsed < 8.0, f"gave up after {elapsed:.1f}s"


# ---- the client state (seed: get_client_state, client_state_processors) ---------------------------------------


def test_client_state_names_the_task_token_site_and_run_from_the_app_context(ssl_args):
    c = Communicator(None, ssl_args=ssl_args, secure_train=True)
    state = c.get_client_state("t", "tok", {"client_name": "site-1", "run_number": 3, "round": 2})
    assert state == ClientState("t", "tok", client_name="site-1", run_number=3, round=2)
    assert c.get_client_state("t", "tok") == ClientState("t", "tok")


def test_client_state_processors_each_get_the_state_and_the_app_context_in_order(ssl_args):
    seen = []

    def tag(name):
        def processor(state, app_ctx):
            seen.append((name, dict(state.meta), app_ctx))
            state.meta[name] = True
            return state

        return processor

    c = Communicator(None, ssl_args=ssl_args, secure_train=True, client_state_processors=[tag("a"), tag("b")])
    ctx = {"client_name": "site-1"}
    assert c.get_client_state("t", "tok", ctx).meta == {"a": True, "b": True}
    assert seen == [("a", {}, ctx), ("b", {"a": True}, ctx)]


def test_a_client_state_processor_that_returns_no_state_is_named(ssl_args):
    def forgetful(state, app_ctx):
        state.meta["x"] = 1

    c = Communicator(None, ssl_args=ssl_args, secure_train=True, client_state_processors=[forgetful])
    with pytest.raises(TypeError, match="client_state_processor 'forgetful' returned NoneType"):
        c.get_client_state("t", "tok")


# ---- against a real server --------------------------------------------------------------------------------

TASK = "digits"
W0 = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}


@pytest.fixture
def federation(tmp_path):
    """A running in-process server (run 1, 2 rounds) and site-1's ssl_args and server entries."""
    server, ws = start_training_run(
        tmp_path, W0, min_num_clients=2, num_rounds=2, wait_after_min_clients=30, heart_beat_timeout=30
    )
    yield kit_ssl_args(load_kit(ws / "site-1")), {TASK: {"name": TASK, "target": f"127.0.0.1:{server.fl_port}"}}
    server.stop(0)


class _ZeroUpdate:
    """A model manager whose update is W0-shaped zeros, and that records the context it was read with."""

    def __init__(self):
        self.contexts = []

    def read_current_model(self, task_name, type_str="delta_w", train_ctx=None):
        self.contexts.append(train_ctx)
        return {k: np.zeros_like(v) for k, v in W0.items()}


def test_a_channel_set_up_with_the_token_authenticates_calls_that_carry_none(federation):
    ssl, servers = federation
    c = Communicator(None, ssl_args=ssl, secure_train=True)
    try:
        token = c.client_registration("site-1", servers, TASK).token
        bare = TrainingStub(c.set_up_channel(servers[TASK]))
        assert not bare.Heartbeat(pb.HeartbeatRequest(), timeout=10).known
        with_token = TrainingStub(c.set_up_channel(servers[TASK], token=token))
        reply = with_token.Heartbeat(pb.HeartbeatRequest(), timeout=10)
        assert reply.known and reply.run_number == 1
    finally:
        c.close()


def test_the_client_state_goes_with_the_update_and_its_token_authenticates_it(federation):
    ssl, servers = federation
    seen = []

    def pre_processor(tensors, fl_ctx):
        seen.append(fl_ctx.get_prop(FLContextKey.CLIENT_STATE))
        return tensors

    def label(state, app_ctx):
        state.meta["scanner"] = "ct-7"
        return state

    manager = _ZeroUpdate()
    c = Communicator(
        manager, ssl_args=ssl, secure_train=True, pre_processors=[pre_processor], client_state_processors=[label]
    )
    try:
        token = c.client_registration("site-1", servers, TASK).token
        assert c.getModel(servers, TASK, token, None, wait_seconds=1).status == "train"
        ctx = FLContext({FLContextKey.RUN_NUMBER: 1, FLContextKey.ROUND: 0})
        reply = c.submitUpdate(servers, TASK, token, ctx, {"round": 0}, "site-1")
        assert reply.accepted, reply.reason
        [state] = seen
        assert state == ClientState(TASK, token, client_name="site-1", run_number=1, round=0, meta={"scanner": "ct-7"})
    finally:
        c.close()


def test_a_client_state_processor_that_changes_the_token_changes_what_authenticates(federation):
    ssl, servers = federation

    def wrong_token(state, app_ctx):
        state.token = "not-a-token"
        return state

    c = Communicator(_ZeroUpdate(), ssl_args=ssl, secure_train=True, client_state_processors=[wrong_token])
    try:
        token = c.client_registration("site-1", servers, TASK).token
        with pytest.raises(RegistrationRequired):
            c.getModel(servers, TASK, token, None, wait_seconds=1)
    finally:
        c.close()


@pytest.mark.parametrize(
    "call", ["get_validation_models", "submit_best_local_model", "submit_cross_site_validation_results"]
)
def test_cross_site_calls_in_seed_style_take_the_run_from_the_session(federation, call):
    ssl, servers = federation
    c = Communicator(ClientModelManager(), ssl_args=ssl, secure_train=True)
    try:
        token = c.client_registration("site-1", servers, TASK).token
        args = {
            "get_validation_models": ("site-1", servers, TASK, token),
            "submit_best_local_model": ("site-1", servers, TASK, token, True),
            "submit_cross_site_validation_results": ("site-1", servers, TASK, token, ["site-2"], [{"accuracy": 0.5}]),
        }[call]
        # Run 1 is still training: the server's refusal names the run the session asked about.
        with pytest.raises(CommunicationError, match="FAILED_PRECONDITION: run 1 is still training"):
            getattr(c, call)(*args)
    finally:
        c.close()


def test_cross_site_calls_without_a_run_number_or_a_session_say_what_to_pass(ssl_args):
    c = Communicator(ClientModelManager(), ssl_args=ssl_args, secure_train=True)
    with pytest.raises(ValueError, match="get validation models: no run_number given and the session names no run"):
        c.get_validation_models("site-1", {TASK: {"target": SERVICE}}, TASK, "unknown-token")


# ---- the global model goes straight into the local model ---------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((2, 3), 7.0))
        self.b = torch.nn.Parameter(torch.full((2,), 7.0))


class _Fitter:
    def __init__(self):
        self.model = _Net()

    def num_local_iterations(self) -> int:
        return 1


def _torch_site(ssl, **kwargs) -> tuple[Communicator, ClientModelManager, _Fitter]:
    mm = ClientModelManager(task_names=[TASK])
    fitter = _Fitter()
    mm.set_fitter(fitter)
    return Communicator(mm, ssl_args=ssl, secure_train=True, **kwargs), mm, fitter


def _own(fitter: _Fitter) -> dict[str, np.ndarray]:
    return {"w": fitter.model.w.detach().numpy(), "b": fitter.model.b.detach().numpy()}


def test_get_model_decodes_into_the_local_models_parameters(federation):
    ssl, servers = federation
    c, mm, fitter = _torch_site(ssl)
    try:
        token = c.client_registration("site-1", servers, TASK).token
        remote = c.getModel(servers, TASK, token, None, wait_seconds=1)
        own = _own(fitter)
        for name in W0:
            assert np.shares_memory(remote.tensors[name], own[name]), name
            np.testing.assert_array_equal(own[name], W0[name], err_msg=name)
        assert mm.local_model_partial  # until pull_models assigns it
        mm.assign_current_model({TASK: remote.tensors})
        assert not mm.local_model_partial
    finally:
        c.close()


def test_with_post_processors_the_download_goes_to_fresh_buffers_first(federation):
    ssl, servers = federation
    c, mm, fitter = _torch_site(ssl, post_processors=[lambda tensors, app_ctx: tensors])
    try:
        token = c.client_registration("site-1", servers, TASK).token
        remote = c.getModel(servers, TASK, token, None, wait_seconds=1)
        own = _own(fitter)
        for name in W0:
            assert not np.shares_memory(remote.tensors[name], own[name]), name
            assert (own[name] == 7.0).all()  # untouched until assigned
        assert not mm.local_model_partial
    finally:
        c.close()


def _breaking_stub(monkeypatch, codes: list[grpc.StatusCode]) -> list[int]:
    """GetModel streams that fail with codes[i] at the second tensor's header (the first one is written by then)."""
    from fedclient import communicator as comm_mod

    calls = []

    class Breaking(TrainingStub):
        def __init__(self, channel):
            super().__init__(channel)
            real = self.GetModel

            def get_model(request, **kwargs):
                stream = real(request, **kwargs)
                calls.append(1)
                if len(calls) > len(codes):
                    return stream
                code = codes[len(calls) - 1]

                def broken():
                    for chunk in stream:
                        if chunk.WhichOneof("part") == "tensor" and chunk.tensor.name == "b":
                            stream.cancel()
                            raise FakeRpcError(code)
                        yield chunk

                return broken()

            self.GetModel = get_model

    monkeypatch.setattr(comm_mod, "TrainingStub", Breaking)
    return calls


def _session(ssl, servers, fitter=None):
    from fedclient.fed_client_base import FederatedClientBase

    client = FederatedClientBase("site-1", ssl, True, server_args=servers)
    client.model_manager.set_fitter(fitter or _Fitter())
    return client


def test_a_download_that_breaks_off_is_retried_whole_and_leaves_the_local_model_the_global_one(federation, monkeypatch):
    ssl, servers = federation
    calls = _breaking_stub(monkeypatch, [grpc.StatusCode.UNAVAILABLE])
    fitter = _Fitter()
    client = _session(ssl, servers, fitter)
    try:
        assert client.pull_models()[TASK].status == "train"
        assert len(calls) == 2
        assert not client.model_manager.local_model_partial
        for name, arr in _own(fitter).items():
            np.testing.assert_array_equal(arr, W0[name], err_msg=name)
        with torch.no_grad():
            fitter.model.w.add_(0.5)
        delta = client.model_manager.read_current_model(TASK)
        np.testing.assert_array_equal(delta["w"], np.full((2, 3), 0.5, np.float32))
    finally:
        client.close()


def test_a_download_that_fails_for_good_leaves_a_partial_model_named_as_such(federation, monkeypatch):
    ssl, servers = federation
    _breaking_stub(monkeypatch, [grpc.StatusCode.INTERNAL])
    fitter = _Fitter()
    client = _session(ssl, servers, fitter)
    try:
        with pytest.raises(CommunicationError, match="get model refused by .*INTERNAL"):
            client.pull_models()
        mm = client.model_manager
        assert mm.local_model_partial
        own = _own(fitter)
        assert (own["w"] == 0).all() and (own["b"] == 7.0).all()  # w arrived, b did not: a mix
        with pytest.raises(RuntimeError, match="local model is incomplete.*'w'"):
            mm.read_current_model(TASK)
        assert client.pull_models()[TASK].status == "train"  # pulled again: whole
        assert not mm.local_model_partial and (own["b"] == 0).all()
    finally:
        client.close()


def test_a_pull_writes_the_global_copy_while_it_streams_so_assign_writes_nothing(federation, monkeypatch):
    from fedclient import model_manager

    ssl, servers = federation
    fitter = _Fitter()
    client = _session(ssl, servers, fitter)

    def refuse(*args, **kwargs):
        raise AssertionError("assign_current_model wrote the global copy again")

    monkeypatch.setattr(model_manager, "GlobalModelFile", refuse)
    try:
        assert client.pull_models()[TASK].status == "train"
        assert not client.model_manager.local_model_partial
        assert not any(t.name == "global-model-writer" and t.is_alive() for t in threading.enumerate())
        with torch.no_grad():
            fitter.model.b.add_(0.25)
        delta = client.model_manager.read_current_model(TASK)
        np.testing.assert_array_equal(delta["b"], np.full(2, 0.25, np.float32))
        np.testing.assert_array_equal(delta["w"], np.zeros((2, 3), np.float32))
    finally:
        client.close()
