"""Communicator: mutual TLS only, which gRPC failures are retried, and errors that name the call and server."""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import free_port

from fedclient.communicator import CommunicationError, Communicator, RegistrationRequired, server_target
from fedclient.model_manager import ClientModelManager
from fedclient.worker import kit_ssl_args
from fedcommon.kit import load_kit
from fedcommon.provision import prepare_poc

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


@pytest.mark.parametrize("secure_train, args", [(False, "kit"), (True, None), (True, {})],
                         ids=["not-secure", "no-ssl-args", "empty-ssl-args"])
def test_communicator_refuses_anything_but_mutual_tls(ssl_args, secure_train, args):
    with pytest.raises(ValueError, match="only mutual TLS: secure_train must be True"):
        Communicator(None, ssl_args=ssl_args if args == "kit" else args, secure_train=secure_train)


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


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED])
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
