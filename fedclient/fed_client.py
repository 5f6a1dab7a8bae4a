"""FederatedClient: runs a site's federated rounds around a trainer ("fitter")."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from fedclient.client_status import ClientStatus
from fedclient.communicator import CommunicationError
from fedclient.fed_client_base import CrossSiteValidationTimeout, FederatedClientBase
from fedclient.site_algorithms import SiteAlgorithms
from fedcommon.model_meta import FLContext, FLContextKey
from fedcommon.run_folder import RunFolder

log = logging.getLogger(__name__)

WEIGHT_BY = ("iterations", "samples", "uniform")
BEST_LOCAL_MODEL = "best_local_model.fl"


class FederatedClient(FederatedClientBase):
    """Federated client-side implementation: pull, validate, train, push, until the server ends the run."""

    def __init__(
        self,
        client_id,
        client_args,
        secure_train,
        server_args=None,
        exclude_vars=None,
        privacy=None,
        retry_timeout=30,
        cross_site_validate=False,
        model_reader_writer=None,
        model_validator=None,
        pre_processors=None,
        post_processors=None,
        client_state_processors=None,
        req_processors=None,
        handlers=None,
        compression=None,
        *,
        weight_by: str = "iterations",
        run_dir: Path | None = None,
        on_progress: Callable[[dict], None] | None = None,
    ):
        super().__init__(
            client_id,
            client_args,
            secure_train,
            server_args,
            exclude_vars,
            privacy,
            retry_timeout,
            cross_site_validate,
            model_reader_writer,
            model_validator,
            pre_processors,
            post_processors,
            client_state_processors,
            req_processors,
            handlers,
            compression,
        )
        if weight_by not in WEIGHT_BY:
            raise ValueError(f"weight_by must be one of {', '.join(WEIGHT_BY)}, got {weight_by!r}")
        self.weight_by = weight_by
        self.run_dir = run_dir
        self.on_progress = on_progress
        self.final_metrics: dict[str, float] | None = None
        self.on_validation = lambda event: self._emit(**event)
        # Multi-GPU: rank 0's link to the site's other ranks (fedclient.distributed.RankSync); None on one process.
        self.ranks = None
        self._ranks_training = False
        # FedProx / SCAFFOLD as config_fed_client.json turns them on (fedclient.site_algorithms); None: neither.
        self.site_algorithms: SiteAlgorithms | None = None

    def abort(self) -> None:
        """Stop after the current step."""
        self._stop.set()

    def _emit(self, **event) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(event)
            except Exception:
                log.exception("progress callback failed")

    @property
    def best_model_path(self) -> Path | None:
        """Where the best local model of this run is saved (run_N/models/best_local_model.fl)."""
        return RunFolder(self.run_dir).models / BEST_LOCAL_MODEL if self.run_dir else None

    def _weight(self, fitter) -> float:
        if self.weight_by == "samples":
            return float(fitter.num_samples())
        if self.weight_by == "uniform":
            return 1.0
        return float(self.model_manager.num_local_iterations())

    def federated_step(self, fitter) -> bool:
        """Run a federated step; False once the server has ended the run."""
        remotes = self.pull_models()
        task, remote = next(iter(remotes.items()))
        if remote.status == "wait":
            return True
        self.current_round = remote.round
        self.run_number = remote.run_number or self.run_number
        metrics = self.model_manager.validate()
        if not self.cross_site_validate:
            # Without cross-site validation no extra validation runs: the best model is the best global one.
            self.model_manager.update_best_model(metrics, self.best_model_path)
        if remote.status == "end":
            self.final_metrics = metrics
            log.info("%s: run %d ended; final global model: %s", self.client_name, remote.run_number, _fmt(metrics))
            self._with_session(
                task, lambda: self.communicator.report_metrics(self.servers, task, self.token, remote.round, metrics)
            )
            self._emit(kind="end", round=remote.round, metrics=metrics)
            if self.cross_site_validate:
                self._validate_after_training()
            return False
        log.info("%s: round %d: global model %s; training", self.client_name, remote.round, _fmt(metrics))
        self._emit(kind="round", round=remote.round, metrics=metrics)
        algorithms = self.site_algorithms
        if algorithms is not None:
            algorithms.begin_round(fitter.model, self.control.get(task, {}))
        if self.ranks is not None:
            self._ranks_training = True
            self.ranks.begin_local_training(fitter, algorithms)
        result = self.model_manager.train(
            lambda epoch, loss: self._emit(kind="epoch", round=remote.round, epoch=epoch, loss=loss)
        )
        if self.ranks is not None:
            self.ranks.end_local_training()  # rank 0 submits what every rank agrees on
            self._ranks_training = False
        extra = algorithms.end_round(fitter.model) if algorithms is not None else {}
        if self.cross_site_validate:
            # The best model this site shares is the locally trained one that scored best on its own data.
            self._keep_if_best_local()
        fl_ctx = FLContext(
            {
                FLContextKey.RUN_NUMBER: remote.run_number,
                FLContextKey.ROUND: remote.round,
                FLContextKey.WEIGHT: self._weight(fitter),
                FLContextKey.METRICS: metrics,
                FLContextKey.TASK_NAME: task,
                FLContextKey.EXTRA_TENSORS: extra,
            }
        )
        reply = self.push_remote_model(task, fl_ctx)
        if reply.accepted:
            if algorithms is not None:
                algorithms.commit()  # a refused update leaves SCAFFOLD's c_i as it was
            log.info(
                "%s: round %d: update accepted (local loss %.4f)",
                self.client_name,
                remote.round,
                float(result.get("loss", float("nan"))) if isinstance(result, dict) else float("nan"),
            )
        else:
            log.warning("%s: round %d: update refused: %s", self.client_name, remote.round, reply.reason)
        return True

    def _keep_if_best_local(self) -> None:
        try:
            self.model_manager.update_best_model(self.model_manager.validate(), self.best_model_path)
        except ValueError as e:  # unusable metrics of the local model: it is not a candidate, training goes on
            log.warning("%s: the locally trained model was not scored: %s", self.client_name, e)

    def _validate_after_training(self) -> None:
        # The training itself succeeded: a validation that cannot finish is reported, not a training failure.
        try:
            self.run_cross_site_validation()
        except (CrossSiteValidationTimeout, CommunicationError, RuntimeError) as e:  # RuntimeError: no best model
            log.error("%s: %s", self.client_name, e)
            self._report_validation(error=str(e))

    def cross_validation(self, client_local_rank: int = 0) -> dict[str, dict[str, float]]:
        """Cross-site validation of this client's run; only local rank 0 talks to the server."""
        return self.run_cross_site_validation() if client_local_rank == 0 else {}

    def run_federated_steps(self, fitter) -> None:
        """Keep running federated steps until the run ends or abort() is called."""
        self.model_manager.set_fitter(fitter)
        if self.run_dir is not None:  # the workspace's disk, not a temp folder that may live in memory
            self.model_manager.global_model_dir = RunFolder(self.run_dir).models
        if self.token is None:
            self.register()
        self.start_heartbeat()
        self.status = ClientStatus.TRAINING_STARTED
        while not self._stop.is_set():
            if not self.federated_step(fitter):
                break
        self.status = ClientStatus.TRAINING_STOPPED

    def admin_run(self, fitter) -> None:
        """Run in the calling thread until the run ends; always closes the session."""
        self.status = ClientStatus.TRAINING_STARTING
        try:
            self.run_federated_steps(fitter)
            self._release_ranks()
        except Exception:
            self.status = ClientStatus.TRAINING_EXCEPTION
            self._release_ranks()
            raise
        except BaseException:  # a signal: every rank is being stopped the same way
            self.status = ClientStatus.TRAINING_EXCEPTION
            raise
        finally:
            self.close()

    def _release_ranks(self) -> None:
        # Outside a training phase the other ranks wait for rank 0's word; inside one, they fail with it.
        if self.ranks is not None and not self._ranks_training:
            try:
                self.ranks.stop()
            except Exception as e:
                log.warning("%s: could not tell the other ranks to stop: %s", self.client_name, e)

    def run(self, fitter) -> threading.Thread:
        """Run the client-side as a thread; returns the started thread."""
        thread = threading.Thread(target=self.admin_run, args=(fitter,), name=f"fl-{self.client_name}", daemon=True)
        thread.start()
        return thread


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
