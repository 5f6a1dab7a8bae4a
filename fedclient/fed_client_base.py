"""FederatedClientBase: registration, model pull/push and heartbeats shared by every federated client."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from fedclient.client_status import ClientStatus
from fedclient.communicator import (
    Communicator,
    RegistrationRequired,
    RemoteModel,
    ValidationModel,
    mutual_tls_required,
)
from fedclient.model_manager import ClientModelManager
from fedclient.site_algorithms import split_control
from fedcommon.model_meta import FLContext

log = logging.getLogger(__name__)

T = TypeVar("T")
CROSS_SITE_TIMEOUT_S = 600.0
VALIDATION_POLL_S = 20.0


class CrossSiteValidationTimeout(Exception):
    """Models this site was to validate did not arrive in time; the message names them."""


def servers_by_task(server_args) -> dict[str, dict[str, Any]]:
    """{task_name: server entry} from a list of entries with "name" (or an already keyed dict)."""
    if not server_args:
        raise ValueError("server_args must name at least one server: [{'name': TASK, 'target': 'host:port'}]")
    if isinstance(server_args, dict):
        return dict(server_args)
    servers = {}
    for entry in server_args:
        if "name" not in entry:
            raise ValueError(f"server entry {entry!r} has no 'name' (the task name)")
        servers[entry["name"]] = entry
    return servers


class FederatedClientBase:
    """Federated client-side base: the tools used by FederatedClient and DirectFederatedClient."""

    def __init__(
        self,
        client_id: str,
        client_args: dict,
        secure_train: bool,
        server_args=None,
        exclude_vars=None,
        privacy=None,
        retry_timeout: float = 30,
        cross_site_validate: bool = False,
        model_reader_writer=None,
        model_validator=None,
        pre_processors=None,
        post_processors=None,
        client_state_processors=None,
        req_processors=None,
        handlers=None,
        compression=None,
    ):
        owner = type(self).__name__
        if not secure_train:
            raise ValueError(
                mutual_tls_required(
                    owner,
                    "secure_train",
                    "client_args={'ssl_root_cert': ..., 'ssl_cert': ..., 'ssl_private_key': ...} (kit_ssl_args(kit))",
                )
            )
        if req_processors:
            raise ValueError(
                f"{owner}: req_processors is not supported: admin requests reach the site's agent, not "
                f"the training client (which runs in a worker process); register a RequestProcessor "
                f"with FedAdminAgent.register_processor instead"
            )
        if handlers:
            raise ValueError(
                f"{owner}: handlers is not supported: the seed documents no handler interface; "
                f"FederatedClient's on_progress=callable receives the round, epoch, end and "
                f"validation events"
            )
        self.client_name = client_id
        self.uid = client_id
        self.client_args = client_args
        self.servers = servers_by_task(server_args)
        self.cross_site_validate = cross_site_validate
        self.cross_site_val_conf = None
        # Cross-site validation: share the best local model (or only validate the others), and how long to wait.
        self.is_participating = True
        self.cross_site_validation_timeout = CROSS_SITE_TIMEOUT_S
        self.on_validation: Callable[[dict[str, Any]], None] | None = None
        self._validation_run: int | None = None  # fixed for a validation: heartbeats may report a newer run
        self._stop = threading.Event()
        self.req_processors: list = []
        self.handlers: list = []
        self.model_manager = ClientModelManager(
            task_names=list(self.servers),
            exclude_vars=exclude_vars,
            privacy=privacy,
            model_reader_writer=model_reader_writer,
            model_validator=model_validator,
        )
        self.communicator = Communicator(
            self.model_manager,
            ssl_args=client_args,
            secure_train=secure_train,
            retry_timeout=retry_timeout,
            pre_processors=pre_processors,
            post_processors=post_processors,
            client_state_processors=client_state_processors,
            compression=compression,
        )
        self.token: str | None = None
        self.run_number = 0
        self.register_run = 0  # the run this client registers for; 0: the server's current run
        self.heartbeat_interval = 10.0
        self.status = ClientStatus.TRAINING_NOT_STARTED
        self.current_round: int | None = None
        self.remote_models: dict[str, RemoteModel] = {}
        # SCAFFOLD's server control variate c that came with each task's global model (empty without SCAFFOLD).
        self.control: dict[str, dict[str, np.ndarray]] = {}
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._session_lock = threading.Lock()

    @property
    def app_context(self) -> dict[str, Any]:
        return {
            "client_name": self.client_name,
            "run_number": self.run_number,
            "round": self.current_round,
            "status": self.status,
        }

    # ---- session --------------------------------------------------------------------------------

    def client_register(self, task_name: str) -> str:
        """Register with the task's server; returns (and keeps) the session token."""
        reply = self.communicator.client_registration(self.client_name, self.servers, task_name, self.register_run)
        with self._session_lock:
            self.token = reply.token
            self.run_number = reply.run_number
            if reply.heartbeat_interval > 0:
                self.heartbeat_interval = reply.heartbeat_interval
        log.info("%s registered with %s (run %d)", self.client_name, task_name, reply.run_number)
        return reply.token

    def register(self) -> None:
        """Register with every configured server."""
        for task_name in self.servers:
            self.client_register(task_name)

    def _with_session(self, task_name: str, call: Callable[[], T]) -> T:
        if self.token is None:
            self.client_register(task_name)
        try:
            return call()
        except RegistrationRequired:
            log.warning("%s: the server no longer knows this site; registering again", self.client_name)
            self.client_register(task_name)
            return call()

    # ---- models ---------------------------------------------------------------------------------

    def fetch_remote_model(self, task_name: str) -> RemoteModel:
        """The server's model for the next round (status "wait" when there is none yet)."""
        return self._with_session(
            task_name, lambda: self.communicator.getModel(self.servers, task_name, self.token, self.app_context)
        )

    def pull_models(self) -> dict[str, RemoteModel]:
        """Fetch each task's model and load those that came into the local model."""
        remotes = {task: self.fetch_remote_model(task) for task in self.servers}
        with_model = {t: r for t, r in remotes.items() if r.status != "wait"}
        for task, r in with_model.items():
            r.tensors, self.control[task] = split_control(r.tensors)
        if with_model:
            self.model_manager.assign_current_model(
                {t: r.tensors for t, r in with_model.items()},
                {t: {"run_number": r.run_number, "round": r.round} for t, r in with_model.items()},
            )
            for r in with_model.values():
                r.tensors = {}  # the model manager keeps the global model on disk, the local model has its values
        self.remote_models = remotes
        return remotes

    def check_progress(self, remote_models: dict[str, RemoteModel]) -> bool:
        """True while training goes on; False once every task's run has ended."""
        return not all(r.status == "end" for r in remote_models.values())

    def push_remote_model(self, task_name: str, fl_ctx: FLContext | None = None):
        """Send this round's update to the task's server; returns its SubmitReply."""
        ctx = fl_ctx or FLContext()
        return self._with_session(
            task_name,
            lambda: self.communicator.submitUpdate(
                self.servers, task_name, self.token, ctx, self.app_context, self.uid
            ),
        )

    def push_models(self, fl_ctx: FLContext | None = None) -> dict[str, Any]:
        """Send the update to every server."""
        return {task: self.push_remote_model(task, fl_ctx) for task in self.servers}

    # ---- cross-site validation (DESIGN §9) -------------------------------------------------------

    def push_best_model(self, task_name: str):
        """Share the best local model with the task's server (or, when not participating, say it is not shared)."""
        return self._with_session(
            task_name,
            lambda: self.communicator.submit_best_local_model(
                self.uid,
                self.servers,
                task_name,
                self.token,
                disable=not self.is_participating,
                run_number=self._validation_run or self.run_number,
            ),
        )

    def push_best_models(self) -> dict[str, Any]:
        """push_best_model to every server."""
        return {task: self.push_best_model(task) for task in self.servers}

    def get_validation_models(
        self, task_name: str, validated: set[str] | None = None, wait_seconds: float = VALIDATION_POLL_S
    ) -> ValidationModel:
        """The next model of this run this site has not validated ("wait" while none is ready, "end" when done)."""
        return self._with_session(
            task_name,
            lambda: self.communicator.get_validation_models(
                self.uid,
                self.servers,
                task_name,
                self.token,
                run_number=self._validation_run or self.run_number,
                validated=validated,
                wait_seconds=wait_seconds,
            ),
        )

    def submit_cross_site_validation_results(self, params: dict[str, dict[str, float]], task_name: str | None = None):
        """Report {model owner: metrics} to the task's server (the first server by default)."""
        task = task_name or next(iter(self.servers))
        names = list(params)
        return self._with_session(
            task,
            lambda: self.communicator.submit_cross_site_validation_results(
                self.uid,
                self.servers,
                task,
                self.token,
                names,
                [params[n] for n in names],
                run_number=self._validation_run or self.run_number,
            ),
        )

    def run_cross_site_validation(self, run_number: int | None = None) -> dict[str, dict[str, float]]:
        """Share the best local model, then validate every model offered and report each result.

        For run `run_number` (default: this client's run). Returns {owner: metrics}.
        Raises CrossSiteValidationTimeout naming what never came.
        """
        self._validation_run = run_number or self.run_number
        self.model_manager.release_global_models()  # the run is over: one model copy fewer while validating
        try:
            return self._cross_site_validation()
        finally:
            self._validation_run = None

    def _cross_site_validation(self) -> dict[str, dict[str, float]]:
        for task, reply in self.push_best_models().items():
            (log.info if reply.accepted else log.warning)(
                "%s: best model for %s: %s", self.client_name, task, reply.reason or "shared"
            )
        results: dict[str, dict[str, float]] = {}
        deadline = time.monotonic() + self.cross_site_validation_timeout
        waiting = ""
        for task in self.servers:
            validated: set[str] = set()
            while not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CrossSiteValidationTimeout(
                        f"cross-site validation of run {self._validation_run}: gave up after "
                        f"{self.cross_site_validation_timeout:g}s {waiting or 'waiting for the server'}"
                    )
                offered = self.get_validation_models(task, validated, min(VALIDATION_POLL_S, left))
                if offered.status == "end":
                    break
                waiting = offered.message
                if offered.status == "wait":
                    continue
                validated.add(offered.owner)
                metrics = self._validate_offered(offered)
                if metrics is None:
                    continue
                ack = self.submit_cross_site_validation_results({offered.owner: metrics}, task)
                if not ack.ok:
                    log.warning("%s: result for %s's model refused: %s", self.client_name, offered.owner, ack.message)
                    continue
                results[offered.owner] = metrics
                self._report_validation(owner=offered.owner, metrics=metrics, validated=sorted(results))
        return results

    def _validate_offered(self, offered: ValidationModel) -> dict[str, float] | None:
        try:
            metrics = self.model_manager.validate_model(self.cross_site_val_conf, offered.tensors)
        except Exception as e:  # the owner's model, not this site, is at fault: go on with the others
            log.error("%s: cannot validate %s's model: %s", self.client_name, offered.owner, e)
            self._report_validation(owner=offered.owner, error=f"cannot validate {offered.owner}'s model: {e}")
            return None
        finally:
            offered.tensors = {}
        log.info(
            "%s: validated %s's model: %s",
            self.client_name,
            offered.owner,
            ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
        )
        return metrics

    def _report_validation(self, **event: Any) -> None:
        if self.on_validation is not None:
            try:
                self.on_validation({"kind": "validation", "run_number": self._validation_run, **event})
            except Exception:
                log.exception("validation progress callback failed")

    # ---- heartbeat ------------------------------------------------------------------------------

    def send_heartbeat(self, task_name: str):
        reply = self.communicator.send_heartbeat(self.servers, task_name, self.token)
        if not reply.known:
            log.warning("%s: heartbeat not recognised by the server; registering again", self.client_name)
            self.client_register(task_name)
        elif reply.run_number:
            self.run_number = reply.run_number
        return reply

    def heartbeat(self) -> None:
        """Sends a heartbeat to every server."""
        for task_name in self.servers:
            self.send_heartbeat(task_name)

    def run_heartbeat(self) -> None:
        """Send heartbeats until close(); failures are logged, never fatal."""
        while not self._heartbeat_stop.wait(self.heartbeat_interval):
            try:
                self.heartbeat()
            except Exception as e:
                log.warning("%s: heartbeat failed: %s", self.client_name, e)

    def start_heartbeat(self) -> None:
        if self._heartbeat_thread is None:
            self._heartbeat_thread = threading.Thread(target=self.run_heartbeat, name="heartbeat", daemon=True)
            self._heartbeat_thread.start()

    # ---- leaving --------------------------------------------------------------------------------

    def quit_remote(self, task_name: str):
        """Tell the task's server this site leaves."""
        return self.communicator.quit_remote(self.servers, task_name, self.token)

    def close(self) -> None:
        """Quit the remote servers (best effort) and close the local session."""
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=5)
            self._heartbeat_thread = None
        if self.token is not None:
            for task_name in self.servers:
                try:
                    self.quit_remote(task_name)
                except Exception as e:
                    log.info("%s: quit not acknowledged: %s", self.client_name, e)
            self.token = None
        self.communicator.close()
