"""DirectFederatedClient: for a site that owns its training loop and only pulls and pushes models."""

from __future__ import annotations

import logging

import numpy as np

from fedclient.fed_client_base import FederatedClientBase
from fedcommon.model_meta import FLContext, FLContextKey

log = logging.getLogger(__name__)


class _Weights:
    """A stand-in fitter whose 'model' is a dict of numpy weights, so the model manager can diff them."""

    def __init__(self) -> None:
        self.weights: dict[str, np.ndarray] = {}

    def num_local_iterations(self) -> int:
        return 1  # the site's loop counts its own steps: train_context.local_steps


class _DictReaderWriter:
    """The working weights are handed out and taken back without copies (a model may be GiBs): an array it is given
    becomes a weight, and the next global model is decoded into the weights' arrays."""

    def extract_model(self, fitter: _Weights) -> dict[str, np.ndarray]:
        return dict(fitter.weights)

    def writable_model(self, fitter: _Weights) -> dict[str, np.ndarray]:
        return dict(fitter.weights)

    def apply_model(self, fitter: _Weights, model_params, exclude_vars=()) -> bool:
        for k, v in model_params.items():
            if fitter.weights.get(k) is not v:
                owned = isinstance(v, np.ndarray) and v.flags.writeable and v.flags.c_contiguous
                fitter.weights[k] = v if owned else np.array(v, copy=True)
        return True


# The options connect_to_server, pull_models_from_server and push_models_to_server read; train_options sets defaults.
OPTIONS = ("heart_beat", "wait", "weight", "metrics")


class DirectFederatedClient(FederatedClientBase):
    """Federated client for a training loop of the site's own: connect, pull, push, close.

    train_context: the loop's training context, given to the privacy filter as its train_ctx (its local_steps
    attribute or item is S). train_options: defaults for the options of the calls below (OPTIONS).
    """

    def __init__(
        self,
        client_id,
        client_args,
        secure_train,
        server_args=None,
        exclude_vars=None,
        privacy=None,
        retry_timeout=30,
        train_context=None,
        model_reader_writer=None,
        pre_processors=None,
        post_processors=None,
        client_state_processors=None,
        req_processors=None,
        handlers=None,
        train_options=None,
    ):
        super().__init__(
            client_id,
            client_args,
            secure_train,
            server_args,
            exclude_vars,
            privacy,
            retry_timeout,
            model_reader_writer=model_reader_writer or _DictReaderWriter(),
            pre_processors=pre_processors,
            post_processors=post_processors,
            client_state_processors=client_state_processors,
            req_processors=req_processors,
            handlers=handlers,
        )
        self.train_context = train_context
        self.train_options = self._checked_options(train_options, "train_options")
        self._state = _Weights()
        self.model_manager.set_fitter(self._state)
        self._last = None

    @property
    def task_name(self) -> str:
        return next(iter(self.servers))

    @staticmethod
    def _checked_options(options: dict | None, what: str) -> dict:
        unknown = sorted(set(options or {}) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"DirectFederatedClient: {what}: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(OPTIONS)}"
            )
        return dict(options or {})

    def _options(self, options: dict | None) -> dict:
        """train_options overridden by this call's options."""
        return {**self.train_options, **self._checked_options(options, "options")}

    def connect_to_server(self, options: dict | None = None) -> None:
        """Register (and start heartbeats unless options says heart_beat False). Main thread only."""
        options = self._options(options)
        self.register()
        if options.get("heart_beat", True):
            self.start_heartbeat()

    def in_training_progress(self) -> bool:
        """False once the server has ended the run."""
        return self._last is None or self._last.status != "end"

    def pull_models_from_server(self, options: dict | None = None) -> dict:
        """The next round's global model: {"status", "run_number", "round", "model": {name: ndarray}}.

        Waits (long-polls) while the server has nothing new for this site, unless options["wait"] is False.
        The model's arrays are the client's working weights: the next pull writes the next global model into them
        (copy what you keep). A pull that raises may have written part of it (model_manager.local_model_partial).
        """
        wait = self._options(options).get("wait", True)
        while True:
            remote = self.pull_models()[self.task_name]
            if remote.status != "wait" or not wait:
                break
        self._last = remote
        model = self.model_manager.get_current_model_data() if remote.status != "wait" else {}
        return {"status": remote.status, "run_number": remote.run_number, "round": remote.round, "model": model}

    def push_models_to_server(self, model_data: dict[str, np.ndarray], options: dict | None = None):
        """Send the update from local weights `model_data` (diffed against the last pulled model).

        options: "weight" (aggregation weight, default 1) and "metrics" (of the pulled model).
        """
        if self._last is None or self._last.status != "train":
            raise RuntimeError("push_models_to_server before a round's model was pulled")
        options = self._options(options)
        self.model_manager.update_current_model(model_data)
        fl_ctx = FLContext(
            {
                FLContextKey.RUN_NUMBER: self._last.run_number,
                FLContextKey.ROUND: self._last.round,
                FLContextKey.WEIGHT: float(options.get("weight", 1.0)),
                FLContextKey.METRICS: dict(options.get("metrics", {})),
                FLContextKey.TRAIN_CONTEXT: self.train_context,
            }
        )
        return self.push_remote_model(self.task_name, fl_ctx)

    def close_connect(self) -> None:
        """Leave the federation. Main thread only."""
        self.close()
