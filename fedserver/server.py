"""The federation server: gRPC on fl_port with mutual TLS, the site registry, and the current run."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc

from fedcommon.kit import Kit, server_credentials
from fedcommon.mmar import load_mmar
from fedcommon.tensor_codec import MAX_MESSAGE_BYTES
from fedcommon.wire import training_pb2_grpc as pb_grpc
from fedserver.registry import ClientRegistry
from fedserver.run import GLOBAL_MODEL, FederatedRun
from fedserver.training_service import TrainingService

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
INIT_MODEL_TIMEOUT_S = 600


class ServerError(Exception):
    """An operator-facing failure of the server (bad MMAR, run already present, ...)."""


class FederationServer:
    """Owns the gRPC server, the registry of sites and the active run."""

    def __init__(self, workspace: Path, kit: Kit, bind_host: str | None = None, fl_port: int | None = None,
                 max_workers: int = 64, tick_seconds: float = 0.25):
        self.workspace = Path(workspace)
        self.kit = kit
        self.bind_host = bind_host or kit.server_host
        self.fl_port = kit.fl_port if fl_port is None else fl_port
        self.registry = ClientRegistry()
        self.run: FederatedRun | None = None
        self._run_cond = threading.Condition()
        self._max_workers = max_workers
        self._tick_seconds = tick_seconds
        self._stop = threading.Event()
        self._grpc: grpc.Server | None = None
        self._ticker: threading.Thread | None = None

    def start(self) -> int:
        """Start serving; returns the bound port."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers), options=GRPC_OPTIONS)
        pb_grpc.add_FederatedTrainingServicer_to_server(TrainingService(self), server)
        port = server.add_secure_port(f"{self.bind_host}:{self.fl_port}", server_credentials(self.kit))
        if port == 0:
            raise ServerError(f"cannot listen on {self.bind_host}:{self.fl_port} (in use, or not a local address)")
        server.start()
        self._grpc, self.fl_port = server, port
        self._ticker = threading.Thread(target=self._tick_loop, name="round-ticker", daemon=True)
        self._ticker.start()
        log.info("training plane listening on %s:%d (mutual TLS)", self.bind_host, port)
        return port

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self._ticker is not None:
            self._ticker.join(timeout=5)

    def wait(self) -> None:
        if self._grpc is not None:
            self._grpc.wait_for_termination()

    # ---- runs -----------------------------------------------------------------------------------

    def start_run(self, mmar_source: Path, run_number: int = 1) -> FederatedRun:
        """Deploy an MMAR as run `run_number` and open its first round; refuses a bad MMAR before writing."""
        mmar = load_mmar(mmar_source)  # validates everything before anything is written
        run_dir = self.workspace / f"run_{run_number}"
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ServerError(f"run {run_number} already exists at {run_dir}; delete it or use another run number")
        staging = Path(tempfile.mkdtemp(prefix=f".run_{run_number}.", dir=self.workspace))
        try:
            shutil.copytree(mmar.root, staging / "mmar", symlinks=False)
            (staging / "models").mkdir()
            self._build_initial_model(staging / "mmar", staging / "models" / GLOBAL_MODEL)
            if run_dir.exists():
                run_dir.rmdir()
            staging.rename(run_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        run = FederatedRun(run_number, run_dir, load_mmar(run_dir / "mmar").server)
        with self._run_cond:
            if self.run is not None:
                self.run.abort()
            self.run = run
            self._run_cond.notify_all()
        log.info("run %d started: task %s, rounds %d..%d, min %d site(s)", run_number, run.config.task_name,
                 run.config.start_round, run.end_round - 1, run.config.min_num_clients)
        return run

    @staticmethod
    def _build_initial_model(mmar_dir: Path, out: Path) -> None:
        # In a child process: the MMAR's custom code and torch stay out of the long-lived server.
        proc = subprocess.run(
            [sys.executable, "-m", "fedserver.init_model", "--mmar", str(mmar_dir), "--out", str(out)],
            capture_output=True, text=True, timeout=INIT_MODEL_TIMEOUT_S,
        )
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ServerError(f"building the initial model failed: {detail}")

    def wait_for_run(self, timeout: float) -> FederatedRun | None:
        with self._run_cond:
            if self.run is None:
                self._run_cond.wait(timeout)
            return self.run

    # ---- liveness -------------------------------------------------------------------------------

    def heartbeat_timeout(self) -> float:
        return self.run.config.heart_beat_timeout if self.run else DEFAULT_HEARTBEAT_TIMEOUT

    def heartbeat_interval(self) -> float:
        """How often sites should send heartbeats: a few per timeout."""
        return max(0.5, min(30.0, self.heartbeat_timeout() / 4))

    def active_sites(self) -> set[str]:
        return self.registry.names()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self._tick_seconds):
            try:
                self.registry.drop_silent(self.heartbeat_timeout())
                if self.run is not None:
                    self.run.tick(self.registry.names())
            except Exception:
                log.exception("round ticker failed; continuing")
