"""DirectFederatedClient and TestFederatedClient against a real in-process server over mutual TLS on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import copy_mmar, prepare_workspace

from fedclient.direct_client import DirectFederatedClient
from fedclient.test_client import TestFederatedClient
from fedclient.worker import kit_ssl_args
from fedcommon.cert_fields import pem_to_der
from fedcommon.identity import identity_of
from fedcommon.kit import load_kit
from fedcommon.model_file import load_model, save_model
from fedserver.server import FederationServer

pytestmark = pytest.mark.timeout(60)

TASK = "digits"
A1 = 3.0  # site-1's aggregation weight a_i on the server; site-2 keeps the default 1
W0 = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 8, "b": np.array([1.0, -1.0], np.float32)}
D1 = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 4, "b": np.array([0.5, 0.25], np.float32)}
D2 = {"w": np.full((2, 3), 3.0, np.float32), "b": np.array([-1.0, 2.0], np.float32)}
N1, N2 = 1.0, 3.0


def _expected() -> dict[str, np.ndarray]:
    """w + sum(a n d) / sum(a n), DESIGN section 7."""
    total = A1 * N1 + 1.0 * N2
    return {k: W0[k] + (A1 * N1 * D1[k] + 1.0 * N2 * D2[k]) / total for k in W0}


@pytest.fixture
def federation(tmp_path, request):
    """start(num_rounds) -> (server, workspace, target); the server and every client made are stopped after."""
    servers, clients = [], []

    def start(num_rounds: int):
        ws = prepare_workspace(tmp_path / "ws", clients=2)
        mmar = copy_mmar(
            tmp_path / "mmar",
            server={
                "initial_model": {"file": "models/initial.fl"},
                "min_num_clients": 2,
                "num_rounds": num_rounds,
                "wait_after_min_clients": 30,
                "heart_beat_timeout": 30,
                "aggregation_weights": {"site-1": A1},
            },
        )
        save_model(mmar / "models" / "initial.fl", W0)
        server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0)
        servers.append(server)
        server.start_run(mmar)
        port = server.start()
        return server, ws, f"127.0.0.1:{port}"

    start.clients = clients
    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.stop(0)


def _direct(federation, ws, target, site: str, **kwargs) -> DirectFederatedClient:
    client = DirectFederatedClient(
        site,
        kit_ssl_args(load_kit(ws / site)),
        True,
        server_args=[{"name": TASK, "target": target}],
        retry_timeout=5,
        **kwargs,
    )
    federation.clients.append(client)
    return client


def _train_and_push(client: DirectFederatedClient, delta: dict[str, np.ndarray], weight: float):
    pulled = client.pull_models_from_server()
    assert pulled["status"] == "train" and pulled["round"] == 0 and pulled["run_number"] == 1
    for k, v in W0.items():
        np.testing.assert_array_equal(pulled["model"][k], v, err_msg=k)
    local = {k: pulled["model"][k] + delta[k] for k in W0}
    reply = client.push_models_to_server(local, {"weight": weight, "metrics": {"accuracy": 0.5}})
    assert reply.accepted, reply.reason
    return reply


def _assert_model(model: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(model) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(model[k], v, rtol=1e-6, atol=0, err_msg=k)


def test_two_sites_pull_push_and_pull_the_weighted_average(federation):
    server, ws, target = federation(num_rounds=2)
    c1, c2 = _direct(federation, ws, target, "site-1"), _direct(federation, ws, target, "site-2")
    c1.connect_to_server()
    c2.connect_to_server()
    assert server.registry.names() == {"site-1", "site-2"}
    _train_and_push(c1, D1, N1)
    _train_and_push(c2, D2, N2)

    nxt = c1.pull_models_from_server()
    assert nxt["status"] == "train" and nxt["round"] == 1
    _assert_model(nxt["model"], _expected())
    _assert_model(load_model(server.run.model_path)[0], _expected())
    assert c1.in_training_progress() is True
    record = server.run.status()
    assert record["current_round"] == 1 and record["status"] == "training"


def test_after_the_last_round_the_pull_says_end_and_training_stops(federation):
    server, ws, target = federation(num_rounds=1)
    c1, c2 = _direct(federation, ws, target, "site-1"), _direct(federation, ws, target, "site-2")
    for c in (c1, c2):
        c.connect_to_server({"heart_beat": False})
    assert c1.in_training_progress() is True
    _train_and_push(c1, D1, N1)
    _train_and_push(c2, D2, N2)
    for c in (c1, c2):
        final = c.pull_models_from_server()
        assert final["status"] == "end"
        _assert_model(final["model"], _expected())
        assert c.in_training_progress() is False
    assert server.run.status()["status"] == "completed"


def test_push_before_pull_raises(federation):
    server, ws, target = federation(num_rounds=1)
    c1 = _direct(federation, ws, target, "site-1")
    c1.connect_to_server({"heart_beat": False})
    with pytest.raises(RuntimeError, match="before a round's model was pulled"):
        c1.push_models_to_server({k: v.copy() for k, v in W0.items()})


def test_second_push_in_a_round_is_refused_as_duplicate(federation):
    server, ws, target = federation(num_rounds=1)
    c1 = _direct(federation, ws, target, "site-1")
    _direct(federation, ws, target, "site-2").connect_to_server({"heart_beat": False})
    c1.connect_to_server({"heart_beat": False})
    _train_and_push(c1, D1, N1)
    again = c1.push_models_to_server({k: W0[k] + D1[k] for k in W0})
    assert not again.accepted and "duplicate contribution" in again.reason


def test_close_connect_removes_the_site_from_the_registry(federation):
    server, ws, target = federation(num_rounds=1)
    c1, c2 = _direct(federation, ws, target, "site-1"), _direct(federation, ws, target, "site-2")
    c1.connect_to_server()
    c2.connect_to_server({"heart_beat": False})
    assert server.registry.names() == {"site-1", "site-2"}
    c1.close_connect()
    assert server.registry.names() == {"site-2"}
    assert c1.token is None


def test_test_client_login_returns_a_token_the_server_accepts(federation):
    server, ws, target = federation(num_rounds=1)
    client = TestFederatedClient(
        "site-2", kit_ssl_args(load_kit(ws / "site-2")), True, server_args=[{"name": TASK, "target": target}]
    )
    federation.clients.append(client)
    token = client.client_login(TASK)
    assert isinstance(token, str) and len(token) >= 32
    assert client.token == token
    kit = load_kit(ws / "site-2")
    fingerprint = identity_of(pem_to_der(kit.cert_pem)).fingerprint
    assert server.registry.authenticate(token, "site-2", fingerprint).name == "site-2"


def test_train_options_are_the_defaults_of_every_calls_options(federation):
    server, ws, target = federation(num_rounds=2)
    c1 = _direct(federation, ws, target, "site-1", train_options={"heart_beat": False, "weight": N1})
    c2 = _direct(federation, ws, target, "site-2", train_options={"heart_beat": False, "weight": N2})
    for client, delta in ((c1, D1), (c2, D2)):
        client.connect_to_server()
        assert client._heartbeat_thread is None
        pulled = client.pull_models_from_server()
        reply = client.push_models_to_server({k: pulled["model"][k] + delta[k] for k in W0})
        assert reply.accepted, reply.reason
    _assert_model(c1.pull_models_from_server()["model"], _expected())


def test_an_unknown_train_option_is_refused_naming_it(federation):
    server, ws, target = federation(num_rounds=1)
    with pytest.raises(ValueError, match="train_options: unknown option\\(s\\) 'heartbeat'; known: heart_beat"):
        _direct(federation, ws, target, "site-1", train_options={"heartbeat": False})


class _TrainingContext:
    """The site's own training context: an object with attributes, as a training loop keeps one."""

    local_steps = 4


class _RecordingFilter:
    def __init__(self):
        self.contexts = []

    def apply(self, model_diff, train_ctx=None):
        self.contexts.append(train_ctx)
        return dict(model_diff)


def test_the_train_context_is_the_privacy_filters_train_ctx(federation):
    server, ws, target = federation(num_rounds=1)
    train_context, privacy = _TrainingContext(), _RecordingFilter()
    c1 = _direct(federation, ws, target, "site-1", train_context=train_context, privacy=privacy)
    c1.connect_to_server({"heart_beat": False})
    _train_and_push(c1, D1, N1)
    assert privacy.contexts == [train_context]


class _ParamFitter:
    """A fitter whose torch model holds W0's variables by name."""

    def __init__(self):
        import torch

        self.model = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(v.shape)) for k, v in W0.items()})

    def num_local_iterations(self) -> int:
        return 1


def test_test_client_builds_its_privacy_filter_from_privacy_params_and_submits_filtered(federation):
    import torch

    from fedclient.fed_privacy import PercentileProtocol
    from fedcommon.model_meta import FLContext, FLContextKey

    server, ws, target = federation(num_rounds=1)
    params = {"name": "PercentileProtocol", "args": {"percentile": 50, "gamma": 0.4}}
    client = TestFederatedClient(
        "site-1",
        kit_ssl_args(load_kit(ws / "site-1")),
        True,
        server_args=[{"name": TASK, "target": target}],
        privacy_params=params,
    )
    federation.clients.append(client)
    assert isinstance(client.model_manager.privacy, PercentileProtocol)
    assert client.model_manager.privacy.percentile == 50 and client.model_manager.privacy.gamma == 0.4
    fitter = _ParamFitter()
    client.model_manager.set_fitter(fitter)
    client.client_login(TASK)
    assert client.pull_models()[TASK].status == "train"
    with torch.no_grad():
        for k, p in fitter.model.items():
            p.add_(torch.from_numpy(D1[k]))
    ctx = FLContext({FLContextKey.RUN_NUMBER: 1, FLContextKey.ROUND: 0})
    reply = client.push_remote_model(TASK, ctx)
    assert reply.accepted, reply.reason
    assert ctx.get_prop(FLContextKey.PRIVACY_PROTOCOL) == "PercentileProtocol"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"name": "GaussianProtocol"}, "'name' must be one of LaplacianProtocol, PercentileProtocol, SVTProtocol"),
        ({"name": "SVTProtocol", "args": {"eps": 1}}, "SVTProtocol: .*unexpected keyword argument 'eps'"),
        ({"dp_type": "svt"}, "unknown key\\(s\\) 'dp_type'"),
        ("svt", "must be None, a PrivacyProtocol or"),
    ],
)
def test_test_client_refuses_privacy_params_it_cannot_build_saying_why(federation, params, message):
    server, ws, target = federation(num_rounds=1)
    with pytest.raises(ValueError, match=message):
        TestFederatedClient(
            "site-1",
            kit_ssl_args(load_kit(ws / "site-1")),
            True,
            server_args=[{"name": TASK, "target": target}],
            privacy_params=params,
        )


def test_the_next_global_model_is_decoded_into_the_working_weights(federation):
    server, ws, target = federation(num_rounds=2)
    c1, c2 = _direct(federation, ws, target, "site-1"), _direct(federation, ws, target, "site-2")
    for c in (c1, c2):
        c.connect_to_server({"heart_beat": False})
    weights = c1.pull_models_from_server()["model"]
    for k in W0:
        weights[k] += D1[k]  # trained in place, as a loop over its own arrays does
    assert c1.push_models_to_server(weights, {"weight": N1}).accepted
    _train_and_push(c2, D2, N2)
    nxt = c1.pull_models_from_server()["model"]
    assert all(nxt[k] is weights[k] for k in W0)  # no receive buffer, no copy: the same arrays
    _assert_model(nxt, _expected())
    assert not c1.model_manager.local_model_partial
