"""The seed's client API (seeds/000_c17036b54cfa50ae.txt): every class and method takes a seed-style call, and what
the seed's parameters ask for is either done or refused with a message that says why."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys

import numpy as np
import pytest
from conftest import prepare_workspace

from fedclient.admin_interface import ClientAdminInterface
from fedclient.direct_client import DirectFederatedClient
from fedclient.fed_client import FederatedClient
from fedclient.fed_privacy import LaplacianProtocol, PercentileProtocol, SVTProtocol
from fedclient.test_client import TestFederatedClient
from fedclient.worker import kit_ssl_args
from fedcommon.kit import load_kit

# (where, the seed's parameter list as the seed prints it); methods list `self` first.
SEED = [
    ("fedclient.admin:FedAdminAgent", "client_name, sender, app_ctx, req_poll_interval=0.5, process_poll_interval=0.1"),
    ("fedclient.admin:FedAdminAgent.register_processor", "self, processor"),
    ("fedclient.admin:FedAdminAgent.shutdown", "self"),
    ("fedclient.admin:FedAdminAgent.start", "self"),
    ("fedclient.admin:RequestProcessor.get_topics", "self"),
    ("fedclient.admin:RequestProcessor.process", "self, req, app_ctx"),
    ("fedclient.admin:Sender.retrieve_requests", "self"),
    ("fedclient.admin:Sender.send_reply", "self, reply"),
    ("fedclient.admin:Sender.send_result", "self, message"),
    (
        "fedclient.admin:AdminMessageSender",
        "client_name, root_cert=None, ssl_cert=None, private_key=None, "
        "server_args=None, secure=False, is_multi_gpu=False, rank=0",
    ),
    ("fedclient.admin:AdminMessageSender.retrieve_client_requests", "self, taskname"),
    ("fedclient.admin:AdminMessageSender.retrieve_requests", "self"),
    ("fedclient.admin:AdminMessageSender.send_client_reply", "self, message, taskname"),
    ("fedclient.admin:AdminMessageSender.send_reply", "self, message"),
    ("fedclient.admin:AdminMessageSender.send_result", "self, message"),
    ("fedclient.admin_interface:ClientAdminInterface", "client, client_name, sender, args, rank, workers=5"),
    *(
        (f"fedclient.admin_interface:ClientAdminInterface.{name}", "self")
        for name in (
            "abort_client",
            "client_status",
            "remove_custom_path",
            "restart_client",
            "shutdown_client",
            "wait_process_complete",
            "wait_training_process_finish",
        )
    ),
    ("fedclient.admin_interface:ClientAdminInterface.delete_run_number", "self, num"),
    ("fedclient.admin_interface:ClientAdminInterface.deploy_mmar", "self, data"),
    ("fedclient.admin_interface:ClientAdminInterface.do_validate", "self, req"),
    ("fedclient.admin_interface:ClientAdminInterface.set_agent", "self, admin_agent"),
    ("fedclient.admin_interface:ClientAdminInterface.start_client", "self, run_number"),
    ("fedclient.admin_interface:ClientAdminInterface.start_mgpu_client", "self, run_number, gpu_number"),
    *(
        entry
        for executor in ("ClientExecutor", "ProcessExecutor", "ThreadExecutor")
        for entry in (
            (f"fedclient.client_executor:{executor}.abort_train", "self, client"),
            (f"fedclient.client_executor:{executor}.check_status", "self, client"),
            (f"fedclient.client_executor:{executor}.start_mgpu_train", "self, client, args, mmar_root, gpu_number"),
            (f"fedclient.client_executor:{executor}.start_train", "self, client, args, mmar_root"),
        )
    ),
    ("fedclient.client_executor:ProcessExecutor.close", "self"),
    ("fedclient.client_executor:ProcessExecutor.wait_process_complete", "self, client"),
    ("fedclient.client_executor:ProcessExecutor.wait_training_process_finish", "self, client"),
    ("fedclient.client_executor:ThreadExecutor", "client, executor"),
    ("fedclient.client_executor:listen_command", "client, conn"),
    ("fedclient.client_executor:update_client_properties", "client, trainer, cross_site_val_conf=None"),
    (
        "fedclient.model_manager:ClientModelManager",
        "task_names=None, exclude_vars=None, privacy=None, "
        "model_reader_writer=None, model_validator=None, visualizer=None",
    ),
    *(
        (f"fedclient.model_manager:ClientModelManager.{name}", "self")
        for name in ("close", "get_best_model", "get_fitter", "num_local_iterations", "train")
    ),
    ("fedclient.model_manager:ClientModelManager.assign_current_model", "self, remote_models"),
    ("fedclient.model_manager:ClientModelManager.get_current_model_data", "self, local_model_params=None"),
    ("fedclient.model_manager:ClientModelManager.model_meta", "self, task_name"),
    ("fedclient.model_manager:ClientModelManager.model_vars", "self, task_name"),
    ("fedclient.model_manager:ClientModelManager.read_current_model", "self, task_name, type_str='delta_w'"),
    ("fedclient.model_manager:ClientModelManager.set_fitter", "self, fitter"),
    ("fedclient.model_manager:ClientModelManager.update_current_model", "self, local_model_params"),
    ("fedclient.model_manager:ClientModelManager.validate_model", "self, cross_site_val_configer, checkpoint"),
    ("fedclient.client_status:get_status_message", "status"),
    (
        "fedclient.communicator:Communicator",
        "model_manager, ssl_args=None, secure_train=False, retry_timeout=30, "
        "pre_processors=None, post_processors=None, "
        "client_state_processors=None, compression=None",
    ),
    ("fedclient.communicator:Communicator.client_registration", "self, uid, servers, task_name"),
    ("fedclient.communicator:Communicator.getModel", "self, servers, task_name, token, app_ctx"),
    ("fedclient.communicator:Communicator.get_client_state", "self, task_name, token, app_ctx=None"),
    ("fedclient.communicator:Communicator.get_validation_models", "self, uid, servers, task_name, token"),
    (
        "fedclient.communicator:Communicator.grpc_error_handler",
        "self, service, grpc_error, action, start_time, retry, verbose=False",
    ),
    ("fedclient.communicator:Communicator.quit_remote", "self, servers, task_name, token"),
    ("fedclient.communicator:Communicator.send_heartbeat", "self, servers, task_name, token"),
    ("fedclient.communicator:Communicator.set_up_channel", "self, channel_dict, token=None"),
    ("fedclient.communicator:Communicator.submitUpdate", "self, servers, task_name, token, fl_ctx, app_ctx, uid"),
    (
        "fedclient.communicator:Communicator.submit_best_local_model",
        "self, uid, servers, task_name, token, disable=False",
    ),
    (
        "fedclient.communicator:Communicator.submit_cross_site_validation_results",
        "self, uid, servers, task_name, token, client_names, client_metrics",
    ),
    (
        "fedclient.data_assembler:DataAssembler.get_best_local_model",
        "model_manager, task_name, client_state, disable=False",
    ),
    (
        "fedclient.data_assembler:DataAssembler.get_contribution_data",
        "model_manager, task_name, client_state, pre_processors, fl_ctx, app_ctx",
    ),
    *(
        (
            f"fedclient.{module}:{cls}",
            "client_id, client_args, secure_train, server_args=None, exclude_vars=None, "
            "privacy=None, retry_timeout=30, cross_site_validate=False, "
            "model_reader_writer=None, model_validator=None, pre_processors=None, "
            "post_processors=None, client_state_processors=None, req_processors=None, "
            "handlers=None, compression=None",
        )
        for module, cls in (("fed_client", "FederatedClient"), ("fed_client_base", "FederatedClientBase"))
    ),
    ("fedclient.fed_client:FederatedClient.admin_run", "self, fitter"),
    ("fedclient.fed_client:FederatedClient.cross_validation", "self, client_local_rank"),
    ("fedclient.fed_client:FederatedClient.federated_step", "self, fitter"),
    ("fedclient.fed_client:FederatedClient.run", "self, fitter"),
    ("fedclient.fed_client:FederatedClient.run_federated_steps", "self, fitter"),
    *(
        (f"fedclient.fed_client_base:FederatedClientBase.{name}", "self")
        for name in (
            "close",
            "heartbeat",
            "pull_models",
            "push_best_models",
            "push_models",
            "register",
            "run_cross_site_validation",
            "run_heartbeat",
            "start_heartbeat",
        )
    ),
    ("fedclient.fed_client_base:FederatedClientBase.check_progress", "self, remote_models"),
    *(
        (f"fedclient.fed_client_base:FederatedClientBase.{name}", "self, task_name")
        for name in (
            "client_register",
            "fetch_remote_model",
            "get_validation_models",
            "push_best_model",
            "push_remote_model",
            "quit_remote",
            "send_heartbeat",
        )
    ),
    ("fedclient.fed_client_base:FederatedClientBase.submit_cross_site_validation_results", "self, params"),
    (
        "fedclient.direct_client:DirectFederatedClient",
        "client_id, client_args, secure_train, server_args=None, exclude_vars=None, privacy=None, retry_timeout=30, "
        "train_context=None, model_reader_writer=None, pre_processors=None, post_processors=None, "
        "client_state_processors=None, req_processors=None, handlers=None, train_options=None",
    ),
    ("fedclient.direct_client:DirectFederatedClient.close_connect", "self"),
    ("fedclient.direct_client:DirectFederatedClient.connect_to_server", "self, options={'heart_beat': True}"),
    ("fedclient.direct_client:DirectFederatedClient.in_training_progress", "self"),
    ("fedclient.direct_client:DirectFederatedClient.pull_models_from_server", "self, options=None"),
    ("fedclient.direct_client:DirectFederatedClient.push_models_to_server", "self, model_data, options=None"),
    ("fedclient.fed_privacy:LaplacianProtocol", "fraction=0.1, epsilon=1000, gamma=0.001, tau=0.0001"),
    ("fedclient.fed_privacy:PercentileProtocol", "percentile=10, gamma=0.01"),
    ("fedclient.fed_privacy:SVTProtocol", "fraction=0.1, epsilon=0.1, noise_var=0.1, gamma=1e-05, tau=1e-06"),
    *(
        (f"fedclient.fed_privacy:{cls}.apply", "self, model_diff, train_ctx=None")
        for cls in ("LaplacianProtocol", "PercentileProtocol", "SVTProtocol")
    ),
    ("fedclient.fed_privacy:PrivacyProtocol.apply", "self, model_diff, train_ctx"),
    (
        "fedclient.test_client:TestFederatedClient",
        "client_id, client_args, secure_train, server_args=None, "
        "exclude_vars=None, privacy_params=None, req_processors=None",
    ),
    ("fedclient.test_client:TestFederatedClient.client_login", "self, task_name"),
    *(
        entry
        for processor in (
            "ShellCommandProcessor",
            "SysInfoProcessor",
            "AbortClientProcessor",
            "ClientStatusProcessor",
            "DeleteRunNumberProcessor",
            "DeployProcessor",
            "RestartClientProcessor",
            "ShutdownClientProcessor",
            "StartClientMGpuProcessor",
            "StartClientProcessor",
            "ValidateRequestProcessor",
        )
        for entry in (
            (f"fedclient.admin_commands:{processor}.get_topics", "self"),
            (f"fedclient.admin_commands:{processor}.process", "self, req, app_ctx"),
        )
    ),
]

# Where a seed default is a mutable literal, None here stands for it (the method documents the same behaviour).
SAME_AS_SEED_DEFAULT = {("fedclient.direct_client:DirectFederatedClient.connect_to_server", "options"): None}

_NO_DEFAULT = object()


def _resolve(where: str):
    module, _, path = where.partition(":")
    target = importlib.import_module(module)
    for part in path.split("."):
        target = getattr(target, part)
    return target


def _seed_params(spec: str) -> list[tuple[str, object]]:
    """[(name, default or _NO_DEFAULT)] of a parameter list as the seed prints it."""
    params = []
    for node in ast.parse(f"def f({spec}): pass").body[0].args.args:
        params.append((node.arg, _NO_DEFAULT))
    defaults = ast.parse(f"def f({spec}): pass").body[0].args.defaults
    for i, default in enumerate(defaults, len(params) - len(defaults)):
        params[i] = (params[i][0], ast.literal_eval(default))
    return params


@pytest.mark.parametrize(("where", "spec"), SEED, ids=[where.partition(":")[2] for where, _ in SEED])
def test_every_seed_signature_takes_a_seed_style_call(where, spec):
    signature = inspect.signature(_resolve(where))
    params = _seed_params(spec)
    # All of the seed's parameters by position, in the seed's order...
    signature.bind(*(f"<{name}>" for name, _ in params))
    # ...the required ones by position and the rest by keyword...
    required = [name for name, default in params if default is _NO_DEFAULT]
    signature.bind(
        *(f"<{name}>" for name in required),
        **{name: f"<{name}>" for name, default in params if default is not _NO_DEFAULT},
    )
    # ...or only the required ones, with the seed's defaults.
    signature.bind(*(f"<{name}>" for name in required))
    for name, default in params:
        if default is _NO_DEFAULT:
            continue
        ours = signature.parameters[name].default
        expected = SAME_AS_SEED_DEFAULT.get((where, name), default)
        assert ours == expected and type(ours) is type(expected), f"{where}({name}=...): {ours!r}, seed {default!r}"


# ---- real calls, seed style ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssl_args(tmp_path_factory) -> dict[str, str]:
    return kit_ssl_args(load_kit(prepare_workspace(tmp_path_factory.mktemp("ws"), clients=1) / "site-1"))


SERVERS = [{"name": "t", "target": "127.0.0.1:1"}]


def test_the_privacy_protocols_filter_in_seed_style_with_a_training_context():
    class TrainContext:
        local_steps = 2

    delta = {"w": np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)}
    for protocol in (
        LaplacianProtocol(0.1, 1000, 0.001, 0.0001),
        PercentileProtocol(10, 0.01),
        SVTProtocol(0.1, 0.1, 0.1, 1e-05, 1e-06),
    ):
        out = protocol.apply(delta, TrainContext())
        assert out["w"].shape == (4, 5) and out["w"].dtype == np.float32


@pytest.mark.parametrize("client_class", [FederatedClient, DirectFederatedClient, TestFederatedClient])
def test_a_seed_style_client_is_built_and_plaintext_is_refused_saying_why_and_what_to_pass(client_class, ssl_args):
    client = client_class("site-1", ssl_args, True, SERVERS)
    assert client.servers == {"t": SERVERS[0]} and client.token is None
    with pytest.raises(ValueError) as err:
        client_class("site-1", ssl_args, False, SERVERS)
    message = str(err.value)
    assert message.startswith(
        f"{client_class.__name__}: secure_train=False (plaintext) is not supported: the server "
        f"accepts only mutual TLS, because"
    )
    assert "Pass secure_train=True and client_args=" in message and "<workspace>/startup/rootCA.pem" in message


@pytest.mark.parametrize("client_class", [FederatedClient, DirectFederatedClient, TestFederatedClient])
def test_req_processors_are_refused_saying_where_request_processors_go(client_class, ssl_args):
    with pytest.raises(
        ValueError,
        match=f"{client_class.__name__}: req_processors is not supported: admin requests "
        "reach the site's agent.*FedAdminAgent.register_processor",
    ):
        client_class("site-1", ssl_args, True, SERVERS, req_processors=[object()])


@pytest.mark.parametrize("client_class", [FederatedClient, DirectFederatedClient])
def test_handlers_are_refused_saying_why(client_class, ssl_args):
    with pytest.raises(
        ValueError,
        match=f"{client_class.__name__}: handlers is not supported: the seed documents "
        "no handler interface; FederatedClient's on_progress",
    ):
        client_class("site-1", ssl_args, True, SERVERS, handlers=[object()])


def test_remove_custom_path_takes_the_runs_custom_folders_off_sys_path(tmp_path, monkeypatch):
    workspace = tmp_path / "site-1"
    custom = workspace / "run_2" / "mmar" / "custom"
    custom.mkdir(parents=True)
    other = tmp_path / "elsewhere" / "custom"
    other.mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(custom), str(other), *sys.path])
    interface = ClientAdminInterface(None, "site-1", None, argparse.Namespace(workspace=workspace), 0)
    assert interface.remove_custom_path() == [str(custom)]
    assert str(custom) not in sys.path and str(other) in sys.path
