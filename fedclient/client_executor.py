"""How a site runs its training: a worker process in its own process group (or a thread), watched and aborted.

The worker's side of the channel is fedclient.executor_channel; the process-group helpers, fedclient.process_group.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from fedclient.executor_channel import KeyHandoff, listen_command, send_event, serve_events
from fedclient.process_group import descendant_groups, signal_group, wait_group_empty
from fedclient.worker import SiteTraining, WorkerSetupError, update_client_properties
from fedcommon import run_folder
from fedcommon.commands import ClientStatus, get_status_message
from fedcommon.logs import WORKER_LOG, RotatingWriter, pump_lines

log = logging.getLogger(__name__)

# The seed's names: listen_command (the worker's side) and update_client_properties (what the worker does to its
# client) live beside the worker; they are importable from here as in fed_learn.client.client_executor.
__all__ = [
    "ClientExecutor",
    "ProcessExecutor",
    "ThreadExecutor",
    "TrainArgs",
    "TrainingError",
    "listen_command",
    "update_client_properties",
]

ABORT_GRACE_S = 3.0
ABORT_MESSAGE_WAIT_S = 1.0
GROUP_EXIT_WAIT_S = 5.0
GROUP_SCAN_S = 0.5
WORKER_MODULE = "fedclient.worker"
PROGRESS_KINDS = ("progress", "round", "epoch", "end")
PROGRESS_KEYS = ("round", "epoch", "loss", "metrics")
VALIDATION_KEYS = ("owner", "metrics", "validated", "error")

EventHandler = Callable[[dict[str, Any]], None]


class TrainingError(Exception):
    """Training cannot be started; the message says why in words an operator can act on."""


@dataclass(frozen=True)
class TrainArgs:
    """What one training launch needs: the site's workspace, the run number and whether to log verbosely."""

    workspace: Path
    run_number: int
    debug: bool = False
    validate: bool = False  # cross-site validation of the run, already trained, instead of training
    # Set in the worker's environment for this launch: the GPUs the site gave the run (CUDA_VISIBLE_DEVICES).
    # A ThreadExecutor trains in the agent's process, whose environment is not the run's to change.
    env: Mapping[str, str] = field(default_factory=dict)


class ClientExecutor:
    """Starts, watches and aborts a site's training; `on_event` gets each worker event and a final "exit"."""

    runs_here = True  # False where the training runs elsewhere (a cluster's nodes): this host's GPUs do not count

    def __init__(self, on_event: EventHandler | None = None):
        self.on_event = on_event
        self._lock = threading.RLock()
        self.status = ClientStatus.TRAINING_NOT_STARTED
        self.run_number: int | None = None
        self.progress: dict[str, Any] = {}
        self.error = ""
        self.exit_code: int | None = None
        self.ranks = 1  # processes of the current training (GPUs with start-mgpu)

    def start_train(self, client, args: TrainArgs, mmar_root: Path) -> int:
        """Start training run args.run_number from the MMAR at mmar_root; returns the process id."""
        raise NotImplementedError

    def start_mgpu_train(self, client, args: TrainArgs, mmar_root: Path, gpu_number: int) -> int:
        """Start training on gpu_number GPUs (one rank each); only a process executor can."""
        raise TrainingError(f"{type(self).__name__} trains in one process; multi-GPU needs the process executor")

    def check_status(self, client) -> str:
        """The training's status message, as the seed documents ("training started", ...); its code is `status`."""
        return get_status_message(self.status)

    def is_training(self) -> bool:
        """Whether a training is starting or running."""
        return self.status in (ClientStatus.TRAINING_STARTING, ClientStatus.TRAINING_STARTED)

    def abort_train(self, client) -> None:
        """Stop the training; returns once nothing of it runs any more."""
        raise NotImplementedError

    def wait_training_process_finish(self, client, timeout: float | None = None) -> bool:
        """Wait until the training has ended; False on timeout."""
        raise NotImplementedError

    def wait_process_complete(self, client, timeout: float | None = None) -> int:
        """Wait until the training has ended and been cleaned up; returns the final status code."""
        self.wait_training_process_finish(client, timeout)
        return self.status

    def close(self) -> None:
        """Abort any training and release what the executor holds."""
        if self.is_training():
            self.abort_train(None)

    def resume(self) -> None:
        """Take up a training a previous agent left running elsewhere (a cluster's job); nothing for a local one."""

    def detach(self) -> None:
        """Let go of the training as the agent restarts: a cluster's job runs on, to be resumed; a local one ends."""
        self.close()

    def status_detail(self) -> dict[str, Any]:
        """Fields the launcher adds to the site's status (a Slurm job, its state and reason); none here."""
        return {}

    def cluster_info(self) -> dict[str, Any] | None:
        """What sysinfo reports of where training runs when that is not this host (a Slurm partition)."""
        return None

    def _reset(self, run_number: int) -> None:
        self.ranks = 1
        self.status = ClientStatus.TRAINING_STARTING
        self.run_number = run_number
        self.progress = {}
        self.error = ""
        self.exit_code = None

    def _handle(self, event: dict[str, Any]) -> None:
        """Fold one worker event into the status and progress, then pass it on."""
        kind = event.get("kind")
        with self._lock:
            if kind == "status":
                code = event.get("status")
                if code in (ClientStatus.TRAINING_STARTING, ClientStatus.TRAINING_STARTED) and self.is_training():
                    self.status = code
                if isinstance(event.get("error"), str) and event["error"] and not self.error:
                    # The first failure is the cause; other ranks fail after it, of it.
                    rank = event.get("rank")
                    self.error = f"rank {rank}: {event['error']}" if isinstance(rank, int) else event["error"]
            elif kind in PROGRESS_KINDS:
                self.progress.update({k: event[k] for k in PROGRESS_KEYS if k in event})
            elif kind == "validation":
                shown = {k: event[k] for k in VALIDATION_KEYS if k in event}
                self.progress["validation"] = {**self.progress.get("validation", {}), **shown}
            else:
                log.debug("unknown worker event %r", kind)
                return
            event = {**event, "run_number": self.run_number}
        self._emit(event)

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("training event handler failed on %s", event.get("kind"))


@dataclass
class _Launch:
    proc: subprocess.Popen
    listener: Listener
    authkey: bytes
    handoff: KeyHandoff
    exited: threading.Event
    done: threading.Event
    ranks: int = 1  # worker processes that connect back (torchrun's ranks)
    conns: list[Connection] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)
    # Process groups of the launch: the leader's, and the ranks' (torchrun starts each in a session of its own).
    groups: set[int] = field(default_factory=set)
    aborting: bool = False
    pump: threading.Thread | None = None  # copies the worker's output into run_N/logs/worker.log


class ProcessExecutor(ClientExecutor):
    """Runs `python -m fedclient.worker` in its own process group and talks to it over an authenticated socket."""

    def __init__(
        self,
        on_event: EventHandler | None = None,
        grace: float = ABORT_GRACE_S,
        python: str = sys.executable,
        worker_module: str = WORKER_MODULE,
    ):
        super().__init__(on_event)
        self.grace = grace
        self.python = python
        self.worker_module = worker_module
        self._launch: _Launch | None = None
        self.pid: int | None = None

    def start_train(self, client, args: TrainArgs, mmar_root: Path) -> int:
        """Launch the worker for run args.run_number; output goes to <ws>/run_N/logs/worker.log; returns its pid."""
        return self._start([self.python, "-m", self.worker_module], args, mmar_root, 1, key_by_file=False)

    def start_mgpu_train(self, client, args: TrainArgs, mmar_root: Path, gpu_number: int) -> int:
        """Launch gpu_number ranks of the worker through torchrun on this node; returns torchrun's pid.

        `--standalone` makes torchrun rendezvous on a port it picks free, so sites on one host never collide.
        """
        if isinstance(gpu_number, bool) or not isinstance(gpu_number, int) or gpu_number < 1:
            raise TrainingError(f"the number of GPUs must be a whole number >= 1, got {gpu_number!r}")
        launcher = [
            self.python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(gpu_number),
            "--max-restarts",
            "0",
            "-m",
            self.worker_module,
        ]
        # torchrun starts its ranks with close_fds: they inherit no pipe, so they read the key from a private file.
        return self._start(launcher, args, mmar_root, gpu_number, key_by_file=True)

    def _start(self, launcher: list[str], args: TrainArgs, mmar_root: Path, ranks: int, key_by_file: bool) -> int:
        with self._lock:
            if self.is_training():
                raise TrainingError(f"run {self.run_number} is already training")
            workspace = Path(args.workspace).resolve()
            run_dir = run_folder.run_dir(workspace, args.run_number)
            run_dir.mkdir(parents=True, exist_ok=True)
            authkey = secrets.token_bytes(32)
            listener = Listener(("127.0.0.1", 0), authkey=authkey)
            host, port = listener.address
            argv = [
                *launcher,
                "--workspace",
                str(workspace),
                "--mmar",
                str(Path(mmar_root).resolve()),
                "--run-number",
                str(args.run_number),
                "--parent",
                f"{host}:{port}",
                *(["--debug"] if args.debug else []),
                *(["--validate"] if args.validate else []),
            ]
            log_path = run_folder.RunFolder(run_dir).worker_log
            writer = None
            handoff = None
            try:
                # Every rank's output, and whatever the interpreter prints outside logging, passes through
                # the agent, so one writer rotates the run's log.
                writer = RotatingWriter(log_path)
                handoff = KeyHandoff(authkey, by_file=key_by_file)
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=run_dir,
                    env={**self._child_env(Path(mmar_root)), **args.env, **handoff.env},
                    pass_fds=handoff.pass_fds,
                    start_new_session=True,
                )
            except OSError as e:
                listener.close()
                if writer is not None:
                    writer.close()
                if handoff is not None:
                    handoff.close()
                raise TrainingError(f"cannot start the training worker: {e}") from None
            handoff.launched()
            pump = threading.Thread(
                target=pump_lines, args=(proc.stdout, writer), daemon=True, name=f"worker-{proc.pid}-log"
            )
            pump.start()
            launch = _Launch(
                proc,
                listener,
                authkey,
                handoff,
                threading.Event(),
                threading.Event(),
                ranks,
                groups={proc.pid},
                pump=pump,
            )
            self._launch = launch
            self.pid = proc.pid
            self._reset(args.run_number)
            self.ranks = ranks
        log.info(
            "run %d: training worker started (pid %d, %d rank%s, log %s)",
            args.run_number,
            proc.pid,
            ranks,
            "" if ranks == 1 else "s",
            log_path,
        )
        acceptor = threading.Thread(
            target=self._accept_workers, args=(launch,), name=f"worker-{proc.pid}-accept", daemon=True
        )
        acceptor.start()
        threading.Thread(
            target=self._watch, args=(launch, acceptor), name=f"worker-{proc.pid}-watch", daemon=True
        ).start()
        if ranks > 1:
            threading.Thread(
                target=self._track_groups, args=(launch,), name=f"worker-{proc.pid}-groups", daemon=True
            ).start()
        return proc.pid

    @staticmethod
    def _child_env(mmar_root: Path) -> dict[str, str]:
        env = dict(os.environ)
        custom = str(Path(mmar_root).resolve() / "custom")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (custom, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _accept_workers(self, launch: _Launch) -> None:
        while len(launch.conns) < launch.ranks:
            try:
                conn = launch.listener.accept()
            except OSError:
                return
            except Exception as e:  # AuthenticationError: another local process knocked; keep waiting
                log.warning("refused a connection to the worker's socket: %s", e)
                continue
            if launch.exited.is_set():  # our own knock after the worker died
                conn.close()
                return
            reader = threading.Thread(
                target=self._read_events,
                args=(conn,),
                daemon=True,
                name=f"worker-{launch.proc.pid}-events-{len(launch.conns)}",
            )
            with self._lock:
                launch.conns.append(conn)
                launch.readers.append(reader)
            reader.start()
        launch.handoff.close()  # every rank has read the key
        launch.listener.close()

    def _read_events(self, conn: Connection) -> None:
        serve_events(conn, self._handle, "worker")

    def _track_groups(self, launch: _Launch) -> None:
        # Snapshots while torchrun lives: once it is gone, its ranks can no longer be found through it.
        while not launch.exited.wait(GROUP_SCAN_S):
            launch.groups |= descendant_groups(launch.proc.pid)

    def _signal_launch(self, launch: _Launch, sig: signal.Signals) -> None:
        if not launch.exited.is_set() and launch.ranks > 1:
            launch.groups |= descendant_groups(launch.proc.pid)
        for pgid in sorted(launch.groups):
            signal_group(pgid, sig)

    def _watch(self, launch: _Launch, acceptor: threading.Thread) -> None:
        pid = launch.proc.pid
        try:
            # Wait without reaping: while the leader is a zombie its group id cannot be reused by another process.
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass
        launch.exited.set()
        self._signal_launch(launch, signal.SIGKILL)  # whatever the worker left behind
        code = launch.proc.wait()
        left = [p for pgid in sorted(launch.groups) for p in wait_group_empty(pgid, GROUP_EXIT_WAIT_S)]
        if left:
            log.error("run %s: processes %s of the training survived SIGKILL", self.run_number, left)
        if acceptor.is_alive():
            # Some worker died before connecting: wake the accept() with connections of our own.
            for _ in range(launch.ranks - len(launch.conns)):
                threading.Thread(target=_knock, args=(launch.listener.address, launch.authkey), daemon=True).start()
        acceptor.join(5)
        launch.handoff.close()  # some rank never connected
        for reader in list(launch.readers):
            reader.join(5)
        if launch.pump is not None:
            launch.pump.join(5)  # the log holds the worker's last words before its end is reported
        launch.listener.close()
        for conn in launch.conns:
            conn.close()
        with self._lock:
            self.exit_code = code
            if code == 0 or launch.aborting:
                self.status = ClientStatus.TRAINING_STOPPED
            else:
                self.status = ClientStatus.TRAINING_EXCEPTION
                self.error = self.error or _describe_exit(code)
            final = {
                "kind": "exit",
                "run_number": self.run_number,
                "status": self.status,
                "exit_code": code,
                "error": self.error if self.status == ClientStatus.TRAINING_EXCEPTION else "",
            }
        launch.done.set()
        log.info(
            "run %s: training worker %d ended: %s (exit code %d)",
            self.run_number,
            pid,
            get_status_message(self.status),
            code,
        )
        self._emit(final)

    def abort_train(self, client) -> None:
        """Ask the worker to stop, then SIGTERM its groups, then SIGKILL them; returns once they are empty."""
        with self._lock:
            launch = self._launch
            if launch is None or launch.done.is_set():
                return
            launch.aborting = True
            conns = list(launch.conns)
        log.info("run %s: aborting the training (pid %d)", self.run_number, launch.proc.pid)
        for conn in conns:
            try:
                send_event(conn, "abort")
            except OSError:
                pass
        if not launch.exited.wait(ABORT_MESSAGE_WAIT_S):
            self._signal_launch(launch, signal.SIGTERM)
            if not launch.exited.wait(self.grace):
                log.warning(
                    "run %s: the worker ignored SIGTERM for %gs; killing its process groups",
                    self.run_number,
                    self.grace,
                )
                self._signal_launch(launch, signal.SIGKILL)
        launch.done.wait(GROUP_EXIT_WAIT_S + 10)

    def wait_training_process_finish(self, client, timeout: float | None = None) -> bool:
        """Wait until the worker has exited and its group is empty; False on timeout."""
        launch = self._launch
        return True if launch is None else launch.done.wait(timeout)

    def close(self) -> None:
        """Abort any training; nothing of it is left afterwards."""
        self.abort_train(None)


class ThreadExecutor(ClientExecutor):
    """Runs the training in this process on `executor` (for debugging: no isolation, abort after the current step).

    The client trained is the FederatedClient given to start_train, else the one given here; without one (None,
    or the site's kit), one is built from the site's kit.
    """

    def __init__(self, client, executor: Executor, on_event: EventHandler | None = None):
        super().__init__(on_event)
        self.client = client
        self.executor = executor
        self.training = None
        self._future: Future | None = None

    def start_train(self, client, args: TrainArgs, mmar_root: Path) -> int:
        """Train run args.run_number of the MMAR at mmar_root with the client (see above) on the executor."""
        given = next((c for c in (client, self.client) if hasattr(c, "admin_run")), None)
        with self._lock:
            if self.is_training():
                raise TrainingError(f"run {self.run_number} is already training")
            self._reset(args.run_number)
            try:
                self.training = SiteTraining(
                    Path(args.workspace),
                    Path(mmar_root),
                    args.run_number,
                    on_event=self._handle,
                    validate_only=args.validate,
                    client=given,
                )
            except WorkerSetupError as e:
                self.status, self.error = ClientStatus.TRAINING_EXCEPTION, str(e)
                raise TrainingError(str(e)) from None
            self._future = self.executor.submit(self._train, self.training)
        return os.getpid()

    def start_mgpu_train(self, client, args: TrainArgs, mmar_root: Path, gpu_number: int) -> int:
        """Train on one GPU as start_train; more than one needs one process per rank, which threads cannot give."""
        if isinstance(gpu_number, bool) or not isinstance(gpu_number, int) or gpu_number < 1:
            raise TrainingError(f"the number of GPUs must be a whole number >= 1, got {gpu_number!r}")
        if gpu_number > 1:
            raise TrainingError(
                f"ThreadExecutor trains in this process, on one GPU; {gpu_number} GPUs need one "
                f"process per rank: use the ProcessExecutor (torchrun)"
            )
        return self.start_train(client, args, mmar_root)

    def _train(self, training) -> None:
        code = 0
        try:
            training.run()
        except Exception as e:
            log.exception("run %s: training failed", self.run_number)
            code = 1
            with self._lock:
                self.error = f"training failed: {e}"
        with self._lock:
            self.exit_code = code
            self.status = ClientStatus.TRAINING_EXCEPTION if code else ClientStatus.TRAINING_STOPPED
            final = {
                "kind": "exit",
                "run_number": self.run_number,
                "status": self.status,
                "exit_code": code,
                "error": self.error if code else "",
            }
        self._emit(final)

    def abort_train(self, client) -> None:
        """Ask the client to stop after its current step and wait for that."""
        if self.training is not None and self.is_training():
            self.training.abort()
            self.wait_training_process_finish(client)

    def wait_training_process_finish(self, client, timeout: float | None = None) -> bool:
        """Wait for the training thread; False on timeout."""
        future = self._future
        if future is None:
            return True
        try:
            future.exception(timeout)
        except FutureTimeout:
            return False
        return True


def _knock(address: tuple[str, int], authkey: bytes) -> None:
    try:
        Client(address, authkey=authkey).close()
    except Exception:  # the listener closed first: nothing to wake
        pass


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"the training worker was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the training worker was killed by signal {-code}"
    return f"the training worker exited with code {code}; its output is in run_N/logs/{WORKER_LOG}"
