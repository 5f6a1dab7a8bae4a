"""The federation server: fl_port (training plane + site agents) and admin_port (operators), the current run."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time
import zipfile
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from fedcommon import run_folder
from fedcommon.atomic import atomic_write_json
from fedcommon.chunk_wire import add_training_servicer
from fedcommon.commands import DEFAULT_TIMEOUT_S, ArgumentError, seconds
from fedcommon.commands import run_number as checked_run_number
from fedcommon.identity import PeerIdentity
from fedcommon.kit import Kit, server_credentials
from fedcommon.mmar import MMARError, load_mmar
from fedcommon.model_file import ModelFileError, load_model
from fedcommon.revocation import CRL_FILE, RevocationError, RevocationList
from fedcommon.tensor_codec import MAX_MESSAGE_BYTES
from fedcommon.wire import admin_pb2_grpc as admin_grpc
from fedserver import identity_gate
from fedserver.admin_hub import AdminHub
from fedserver.admin_service import AdminService
from fedserver.agent_service import SiteAgentService
from fedserver.audit import AUDIT_FILE, AuditLog
from fedserver.authorization import PolicyError, load_policy
from fedserver.blob_store import BlobStore
from fedserver.cross_site import CrossSiteError, CrossSiteValidation
from fedserver.downloads import DOWNLOADS_DIR, Downloads
from fedserver.errors import ServerError
from fedserver.identity_gate import CallLimits, IdentityGate
from fedserver.jobs import JobStore, load_max_jobs
from fedserver.mailbox import SiteMailbox
from fedserver.registry import ClientRegistry
from fedserver.run import GLOBAL_MODEL, FederatedRun, Phase, RunStateError
from fedserver.run_record import (
    UNREAD,
    RecordMissing,
    RunRecord,
    RunRecordError,
    last_recorded_metrics,
    metrics_answer,
    recorded_algorithms,
)
from fedserver.scheduler import JobScheduler
from fedserver.stream_watch import StreamDeadlines, StreamWatchdog
from fedserver.telemetry import Telemetry, start_exporter
from fedserver.training_service import TrainingService
from fedserver.untrusted_code import (
    CodePolicyError,
    CodeRefused,
    code_sandbox,
    load_code_policy,
    run_child,
    take_output,
)

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    # gRPC sets SO_REUSEPORT by default: a second server on the same port would listen too, and calls would go to
    # either at random. One port, one server: a port in use is refused at start.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Sites hold long-polls of up to 60 s: a ping every 30 s (answered in 10 s, or the connection and its calls
    # are dropped) finds a site whose machine or network died, so it stops counting as connected.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.bdp_probe", 0),
    # A TCP connection that has not finished its TLS handshake in 10 s is dropped (gRPC's default is 120 s).
    ("grpc.server_handshake_timeout_ms", 10_000),
    # Calls past this many on one connection wait at the caller, not in a server thread; the identity gate's
    # per-site limit (far lower) refuses the rest with a reason.
    ("grpc.max_concurrent_streams", 256),
    # A connection with no call for 5 minutes is closed (a site always holds a long-poll while it is up).
    ("grpc.max_connection_idle_ms", 300_000),
]
# Operators send commands and 1 MiB upload chunks: anything far larger on the admin port is hostile.
ADMIN_MAX_MESSAGE_BYTES = 8 << 20
ADMIN_GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", ADMIN_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.server_handshake_timeout_ms", 10_000),
    # A console whose machine or network died has its calls cancelled within 40 s (a handler that watches
    # context.is_active() then frees its thread; a request stream's wait raises at once).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),  # a command waiting on sites sends no data for minutes
    ("grpc.max_connection_idle_ms", 120_000),
]
# grpcio has no per-peer connection cap (its listener accepts every connection; a per-source cap needs the host's
# firewall, e.g. iptables connlimit, or a proxy in front). What it has is a cap per port, set from the descriptor
# limit so that a flood of connections to one port cannot take the descriptors the other port and the run's files
# need: the admin port gets at most ADMIN_CONNECTIONS, and RESERVED_DESCRIPTORS stay outside both.
ADMIN_CONNECTIONS = 256
RESERVED_DESCRIPTORS = 256
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
INIT_MODEL_TIMEOUT_S = 600
STATE_FILE = "state.json"
UPLOADS_DIR = "uploads"
ADMIN_WORKERS = 16
# Admin threads that only project admins may take: no group of leads or members can lock them out.
ADMIN_RESERVED_WORKERS = 4
# Each site holds up to two long-polls on fl_port (its agent's Retrieve, its worker's GetModel), and the sync
# gRPC server gives every call in flight a thread; threads are created only when needed, so a high cap costs
# nothing until sites connect (an idle thread blocked on a condition uses no CPU and ~100 KiB of memory).
FL_WORKERS = 4096
REVOCATION_CHECK_S = 1.0


def _refuse_unsupported_algorithms(number: int, mmar) -> None:
    """Combinations of issue 20's algorithms that the rounds cannot run (see README, "Algorithms")."""
    if mmar.client.scaffold and mmar.server.aggregator.name is None:
        raise ServerError(
            f"run {number}: SCAFFOLD with a custom aggregator ({mmar.server.aggregator.label}) is "
            "not supported: use a built-in aggregator, or turn scaffold off in config_fed_client.json"
        )
    if mmar.client.scaffold and mmar.client.privacy is not None:
        raise ServerError(
            f"run {number}: SCAFFOLD with a privacy filter is refused: a site's delta c_i carries its "
            "unfiltered local update; turn one of them off in config_fed_client.json"
        )


def connection_caps() -> tuple[int, int]:
    """(fl_port, admin_port) caps on open connections, within this process's descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    admin = min(ADMIN_CONNECTIONS, max(16, soft // 8))
    return max(64, soft - admin - RESERVED_DESCRIPTORS), admin


def _port_holder(port: int) -> str:
    """Who holds `port`, as far as this host tells ("in use by pid 812: fedserver start ..."), or why it may fail."""
    import psutil

    try:
        holders = [
            c.pid
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        ]
    except (psutil.Error, OSError):
        holders = []
    if not holders:
        return "the port is in use, or the address is not one of this host's"
    pid = holders[0]
    if pid is None:
        return f"port {port} is in use by a process of another user"
    try:
        shown = " ".join(psutil.Process(pid).cmdline())[:200] or psutil.Process(pid).name()
    except psutil.Error:
        shown = "a process that has exited since"
    return f"port {port} is in use by pid {pid} ({shown})"


class FederationServer:
    """Owns the gRPC servers, the registry of sites, the admin hub, the current run number and the active run."""

    def __init__(
        self,
        workspace: Path,
        kit: Kit,
        bind_host: str | None = None,
        fl_port: int | None = None,
        max_workers: int = FL_WORKERS,
        tick_seconds: float = 0.25,
        admin_port: int | None = None,
        stream_deadlines: StreamDeadlines | None = None,
        fl_limits: CallLimits | None = None,
        admin_limits: CallLimits | None = None,
    ):
        """stream_deadlines, fl_limits, admin_limits: how long a request stream may stall and how many calls one
        caller may hold on each port (defaults: the modules' constants, read now)."""
        self.workspace = Path(workspace)
        self.kit = kit
        self.bind_host = bind_host or kit.server_host
        self.fl_port = kit.fl_port if fl_port is None else fl_port
        self.admin_port = kit.admin_port if admin_port is None else admin_port
        self.registry = ClientRegistry()
        self.telemetry = Telemetry(gauges=self._gauges)
        self._exporter = None
        self.run: FederatedRun | None = None
        self._run_cond = threading.Condition()
        self._cross_site: dict[int, CrossSiteValidation] = {}
        self._cross_site_lock = threading.Lock()
        # Serialises changes of the run state (set-run, deploy, start, abort, delete-run) between operators.
        self._admin_lock = threading.RLock()
        self._run_number, self.admin_timeout = self._load_state()
        self.blobs = BlobStore(self.workspace / UPLOADS_DIR)
        try:
            self.revocations = RevocationList(kit.folder / "startup" / CRL_FILE, kit.ca_pem)
            policy = load_policy(self.workspace)
            self.code_policy = load_code_policy(self.workspace)
            max_jobs = load_max_jobs(self.workspace)
        except (RevocationError, PolicyError, CodePolicyError, ValueError) as e:
            raise ServerError(str(e)) from None
        self.max_runs = max_jobs
        self.mailbox = SiteMailbox()
        self.audit = AuditLog(self.workspace / AUDIT_FILE)
        self.hub = AdminHub(self, policy, self.audit)
        self.downloads = Downloads(self.workspace / DOWNLOADS_DIR)
        self._resume()
        # After the runs are resumed: a running job finds its run.
        self.jobs = JobScheduler(self, JobStore(self.workspace), max_jobs)
        self.exit_requested = threading.Event()
        self.restart_requested = False
        # Each site holds up to two long-polls (agent Retrieve, worker GetModel): size the pool for that.
        self._max_workers = max_workers
        self._tick_seconds = tick_seconds
        self._watchdog = StreamWatchdog(stream_deadlines or StreamDeadlines())
        self._fl_limits = fl_limits or CallLimits(identity_gate.CALLS_PER_SITE)
        self._admin_limits = admin_limits or CallLimits(
            identity_gate.CALLS_PER_ADMIN, total=ADMIN_WORKERS - ADMIN_RESERVED_WORKERS, privileged_role="project_admin"
        )
        self._stop = threading.Event()
        self._grpc: grpc.Server | None = None
        self._admin_grpc: grpc.Server | None = None
        self._ticker: threading.Thread | None = None

    def start(self) -> int:
        """Start serving both ports; returns the bound fl_port (the bound admin port is in `admin_port`)."""
        creds = server_credentials(self.kit)
        fl_connections, admin_connections = connection_caps()
        # Past max_workers a call is refused with RESOURCE_EXHAUSTED (the site retries) instead of queueing
        # behind long-polls that hold every thread for up to 20 s.
        fl = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="fl"),
            options=[*GRPC_OPTIONS, ("grpc.max_allowed_incoming_connections", fl_connections)],
            interceptors=[self._gate("fl_port", ("client",), self._fl_limits)],
            maximum_concurrent_rpcs=self._max_workers,
        )
        add_training_servicer(TrainingService(self), fl)
        admin_grpc.add_SiteAgentServicer_to_server(SiteAgentService(self.mailbox, self.blobs), fl)
        port = self._bind(fl, self.fl_port, creds, "fl_port")
        admin = grpc.server(
            futures.ThreadPoolExecutor(max_workers=ADMIN_WORKERS, thread_name_prefix="admin"),
            options=[*ADMIN_GRPC_OPTIONS, ("grpc.max_allowed_incoming_connections", admin_connections)],
            interceptors=[self._gate("admin_port", ("admin",), self._admin_limits)],
        )
        admin_grpc.add_AdminServiceServicer_to_server(AdminService(self.hub, self.blobs, self.downloads), admin)
        admin_port = self._bind(admin, self.admin_port, creds, "admin_port")
        fl.start()
        admin.start()
        self._grpc, self.fl_port = fl, port
        self._admin_grpc, self.admin_port = admin, admin_port
        self._ticker = threading.Thread(target=self._tick_loop, name="round-ticker", daemon=True)
        self._ticker.start()
        self.jobs.start()
        log.info(
            "training plane and site agents on %s:%d, admin on %s:%d (mutual TLS)",
            self.bind_host,
            port,
            self.bind_host,
            admin_port,
        )
        return port

    def serve_metrics(self, host: str, port: int) -> int:
        """Expose the telemetry for Prometheus on http://host:port/metrics; returns the bound port."""
        self._exporter, bound = start_exporter(self.telemetry, host, port)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def _gauges(self) -> dict[str, float]:
        run = self.run
        training = run is not None and run.phase is Phase.TRAINING
        gauges = {
            "registered_sites": len(self.registry.names()),
            "connected_sites": len(self.mailbox.connected_sites()),
            "run_number": self._run_number or 0,
            "training": int(training),
        }
        if training:
            gauges["round"] = run.current_round
        return gauges

    def _gate(self, port_name: str, kinds: tuple[str, ...], limits: CallLimits) -> IdentityGate:
        def record(peer: PeerIdentity | None, method: str, reason: str) -> None:
            self.audit.record_refused_peer(
                peer.name if peer else "",
                peer.kind if peer else "",
                peer.org if peer else "",
                port_name,
                method,
                reason,
            )
            if peer is not None and self.revocations.is_revoked(peer.serial):
                # A revoked site must not hold a place in the run until heart_beat_timeout, nor count as
                # connected (commands would wait for its reply until their timeout).
                self.registry.remove_certificate(peer.fingerprint)
                if peer.kind == "client":
                    self.mailbox.shut_out(peer.name, reason)

        return IdentityGate(port_name, kinds, self.revocations, record, limits, self._watchdog)

    def _bind(self, server: grpc.Server, port: int, creds: grpc.ServerCredentials, what: str) -> int:
        address = f"{self.bind_host}:{port}"
        try:
            bound = server.add_secure_port(address, creds)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise ServerError(f"cannot listen on {address} for {what}: {_port_holder(port)}")
        return bound

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving: long-polls are released at once, other calls get `grace` seconds."""
        self._stop.set()
        self.jobs.stop()
        self.mailbox.close()
        events = [s.stop(grace) for s in (self._admin_grpc, self._grpc) if s is not None]
        for event in events:
            event.wait()
        self._watchdog.close()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self._exporter is not None:
            self._exporter.shutdown()
            self._exporter.server_close()
            self._exporter = None

    def wait(self) -> None:
        """Block until the training-plane server terminates."""
        if self._grpc is not None:
            self._grpc.wait_for_termination()

    def request_exit(self, restart: bool) -> None:
        """Ask the process that owns this server to stop it (and start it again when `restart`)."""
        self.restart_requested = restart
        self.exit_requested.set()
        log.info("%s requested by an operator", "restart" if restart else "shutdown")

    def check_shutdown(self, leaving: set[str], connected: set[str] = frozenset()) -> None:
        """Refuse to shut down while sites other than `leaving` are registered or have a connected agent."""
        staying = sorted((self.registry.names() | connected) - leaving)
        if staying:
            raise ServerError(
                f"{len(staying)} site{'s are' if len(staying) != 1 else ' is'} registered "
                f"({', '.join(staying)}); shut them down first"
            )

    # ---- the current run number (set-run), persisted in <ws>/state.json ---------------------------

    @property
    def run_number(self) -> int | None:
        """The run that deploy, start and abort act on; None until set-run."""
        return self._run_number

    def set_run_number(self, run_number: int) -> None:
        """Make `run_number` current; refused while a run is training."""
        try:
            checked_run_number(run_number, "run number")
        except ArgumentError as e:
            raise ServerError(str(e)) from None
        with self._admin_lock:
            active = self.training_run()
            if active is not None:
                raise ServerError(f"run {active.run_number} is training; abort it before setting another run number")
            self._run_number = run_number
            self._save_state()
        log.info("current run number set to %d", run_number)

    def set_admin_timeout(self, seconds: float) -> None:
        """Change how long the server waits for sites' replies by default; persisted."""
        with self._admin_lock:
            self.admin_timeout = float(seconds)
            self._save_state()

    def _load_state(self) -> tuple[int | None, float]:
        path = self.workspace / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None, DEFAULT_TIMEOUT_S
        except (OSError, ValueError) as e:
            raise ServerError(f"{path}: unreadable ({e}); fix or remove it") from None
        number = state.get("run_number") if isinstance(state, dict) else None
        timeout = state.get("admin_timeout", DEFAULT_TIMEOUT_S) if isinstance(state, dict) else None
        try:
            return (None if number is None else checked_run_number(number)), seconds(timeout)
        except ArgumentError:
            raise ServerError(
                f'{path}: expected {{"run_number": N or null, "admin_timeout": seconds}}; fix or remove it'
            ) from None

    def _save_state(self) -> None:
        atomic_write_json(
            self.workspace / STATE_FILE, {"run_number": self._run_number, "admin_timeout": self.admin_timeout}
        )

    # ---- runs -----------------------------------------------------------------------------------

    def run_dir(self, run_number: int) -> Path:
        """Where run `run_number` lives on disk."""
        return run_folder.run_dir(self.workspace, run_number)

    def run_record(self, run_number: int) -> RunRecord:
        """Run `run_number`'s record (its folder, summary and state)."""
        return RunRecord.of(self.workspace, run_number)

    def training_run(self) -> FederatedRun | None:
        """The run that is training now, if any."""
        run = self.run
        return run if run is not None and run.phase is Phase.TRAINING else None

    def run_status(self, run_number: int, summary: Any = UNREAD) -> str:
        """ "none", "deployed", "training", "completed" or "aborted".

        summary: the run's summary.json when the caller has read it already (None: there is none).
        """
        run = self.run
        if run is not None and run.run_number == run_number:
            return run.phase.value
        return self.run_record(run_number).status(summary)

    def run_report(self) -> dict[str, Any]:
        """The current run for `status`: number, status, rounds, and how many sites it needs (while it is live)."""
        number = self._run_number
        run = self.run
        live = run if run is not None and run.run_number == number else None
        if live is not None:
            snapshot = live.status()
            status, last = live.phase.value, snapshot.get("last_global_metrics")
            algorithms = {"aggregator": snapshot["aggregator"], "site_algorithms": snapshot["site_algorithms"]}
        elif number is not None:  # a run that is not live: its summary, read once
            snapshot, summary = {}, self.run_record(number).read()
            status = self.run_status(number, summary)
            last = last_recorded_metrics(summary) if summary is not None else None
            algorithms = recorded_algorithms(summary) if summary is not None else {}
        else:
            snapshot, status, last, algorithms = {}, "none", None, {}
        return {
            "run_number": number,
            "run_status": status,
            "current_round": snapshot.get("current_round"),
            "start_round": snapshot.get("start_round"),
            "num_rounds": snapshot.get("num_rounds"),
            "last_global_metrics": last,
            "min_num_clients": live.config.min_num_clients if live is not None else None,
            "aggregator": algorithms.get("aggregator"),
            "site_algorithms": algorithms.get("site_algorithms"),
        }

    def run_metrics(self, run_number: int | None = None) -> dict[str, Any]:
        """Per round, the metrics each site measured of the global model it received, and their mean per metric;
        then the same for the final model (what `fedadmin metrics` shows)."""
        number = self._require_run_number(run_number)
        try:
            summary = self.run_record(number).load()
        except RecordMissing:
            status = self.run_status(number, None)
            raise ServerError(f"run {number} has no metrics: it has not started ({status})") from None
        except RunRecordError as e:
            raise ServerError(str(e)) from None
        return metrics_answer(number, self.run_status(number, summary), summary)

    def _require_run_number(self, run_number: int | None) -> int:
        number = self._run_number if run_number is None else run_number
        if number is None:
            raise ServerError("no run number set: run `fedadmin set-run N` first")
        return number

    def refuse_finished(self, number: int) -> None:
        """ServerError when run N has already run here (completed or aborted): it may not start again, anywhere."""
        status = self.run_status(number)
        if status in (Phase.COMPLETED.value, Phase.ABORTED.value):
            raise ServerError(run_folder.already_ran(number, status))

    def deploy(self, source: Path, run_number: int | None = None) -> Path:
        """Validate an MMAR (folder or zip) and install it as run_N/mmar; refused while run N is training."""
        number = self._require_run_number(run_number)
        source = Path(source)
        staging = Path(tempfile.mkdtemp(prefix=f".deploy-{self.run_dir(number).name}.", dir=self.workspace))
        try:
            mmar_dir = staging / "mmar"
            if source.is_file():
                mmar_dir = self._extract(source, mmar_dir)
            else:
                shutil.copytree(load_mmar(source).root, mmar_dir, symlinks=False)
            load_mmar(mmar_dir)  # validates everything before the run sees it
            with self._admin_lock:
                active = self.training_run()
                if active is not None and active.run_number == number:
                    raise ServerError(f"run {number} is training; abort it before deploying again")
                self.refuse_finished(number)
                target = run_folder.RunFolder.of(self.workspace, number).mmar
                target.parent.mkdir(exist_ok=True)
                if target.exists():
                    target.rename(staging / "replaced")
                mmar_dir.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("run %d deployed from %s", number, source.name)
        return target

    @staticmethod
    def _extract(zip_path: Path, dest: Path) -> Path:
        from fedcommon.safe_zip import UnsafeArchiveError, extract_zip_safely

        try:
            return extract_zip_safely(zip_path, dest)
        except UnsafeArchiveError as e:
            raise ServerError(f"deploy refused: {e}") from None
        except zipfile.BadZipFile as e:
            raise ServerError(f"deploy refused: {zip_path.name} is not a readable zip file ({e})") from None

    def deploy_job_archive(self, archive: Path, run_number: int, job_folder: Path) -> Path:
        """Deploy a job's stored archive as run N here (its signature is checked again before it is extracted)."""
        return self.deploy(archive, run_number)

    def blob_signature_files(self, blob) -> list[Path]:
        """The files that keep an uploaded blob's signature, for a job to keep beside its archive."""
        return []

    def _resume(self) -> None:
        """Carry on the current run if the server stopped while it trained (at the round that was open)."""
        number = self._run_number
        if number is None:
            return
        record = self.run_record(number)
        if not record.was_training():
            return
        run_dir = record.folder.root
        try:
            mmar = load_mmar(record.folder.mmar)
            run = FederatedRun(
                number, run_dir, mmar.server, resume=True, client=mmar.client, code_policy=self.code_policy
            )
        except (OSError, MMARError, ModelFileError, RunStateError) as e:
            raise ServerError(
                f"run {number} was training when the server stopped and cannot be resumed: {e}; "
                f"delete-run {number} (or move {run_dir} away) to start afresh"
            ) from None
        self.run = run
        log.info(
            "run %d resumed at round %d of %d..%d (%d round(s) were complete)",
            number,
            run.current_round,
            run.config.start_round,
            run.end_round - 1,
            run.current_round - run.config.start_round,
        )

    def start_training(self, run_number: int | None = None) -> FederatedRun:
        """Build run N's initial model and open its first round; refused when not deployed or already training."""
        number = self._require_run_number(run_number)
        with self._admin_lock:
            active = self.training_run()
            if active is not None:
                if active.run_number == number:
                    raise ServerError(f"run {number} is already training")
                raise ServerError(f"run {active.run_number} is training; abort it first")
            if self.run_status(number) == "none":
                raise ServerError(f"run {number} is not deployed")
            self.refuse_finished(number)
            folder = run_folder.RunFolder.of(self.workspace, number)
            mmar = load_mmar(folder.mmar)
            _refuse_unsupported_algorithms(number, mmar)
            models = folder.models
            models.mkdir(exist_ok=True)
            building = models / f".{GLOBAL_MODEL}.building"
            try:
                self._build_initial_model(mmar.root, building, f"run {number}")
                os.replace(building, models / GLOBAL_MODEL)
            finally:
                building.unlink(missing_ok=True)
            run = FederatedRun(number, folder.root, mmar.server, client=mmar.client, code_policy=self.code_policy)
            with self._run_cond:
                self.run = run
                self._run_cond.notify_all()
        log.info(
            "run %d started: task %s, rounds %d..%d, min %d site(s)",
            number,
            run.config.task_name,
            run.config.start_round,
            run.end_round - 1,
            run.config.min_num_clients,
        )
        return run

    def start_run(self, mmar_source: Path, run_number: int = 1) -> FederatedRun:
        """Set run `run_number`, deploy the MMAR and start it (`fedserver start --mmar`); leaves nothing on failure."""
        load_mmar(mmar_source)  # refuses a bad MMAR before anything is written
        run_dir = self.run_dir(run_number)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ServerError(f"run {run_number} already exists at {run_dir}; delete it or use another run number")
        with self._admin_lock:
            self.set_run_number(run_number)
            try:
                self.deploy(mmar_source, run_number)
                return self.start_training(run_number)
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise

    def _build_initial_model(self, mmar_dir: Path, out: Path, what: str) -> None:
        """Write the run's initial model to `out`, built in a child: the MMAR's custom code and torch stay out of
        the long-lived server, and that code never runs as the server's user unless local/custom_code.json says."""
        try:
            with code_sandbox(mmar_dir, self.code_policy, what) as box:
                try:
                    proc = run_child(
                        box,
                        "fedserver.init_model",
                        ["--mmar", str(box.mmar), "--out", str(box.out)],
                        INIT_MODEL_TIMEOUT_S,
                    )
                except subprocess.TimeoutExpired:
                    raise ServerError(
                        f"building the initial model of {what} took over {INIT_MODEL_TIMEOUT_S}s and was stopped"
                    ) from None
                if proc.returncode != 0:
                    detail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                    if box.user is not None and any(w in detail for w in ("Permission", "ModuleNotFound")):
                        detail += f" (the MMAR's code runs as user {box.user!r}: it reads only what that user may)"
                    raise ServerError(f"building the initial model failed: {detail}")
                try:
                    take_output(box.out, out)
                except CodeRefused as e:
                    raise ServerError(f"building the initial model failed: {e}") from None
                if box.user is not None:
                    log.info("%s: the initial model was built from the MMAR's code as user %r", what, box.user)
            load_model(out)  # refuses what is not a readable model file, whatever the child wrote
        except CodeRefused as e:
            raise ServerError(f"start refused: {e}") from None
        except ModelFileError as e:
            raise ServerError(f"building the initial model failed: its output is not a model file: {e}") from None

    def abort_training(self) -> int:
        """Abort the training run; returns its number."""
        with self._admin_lock:
            run = self.training_run()
            if run is None:
                raise ServerError("no run is training")
            run.abort()
        log.info("run %d aborted by an operator", run.run_number)
        return run.run_number

    def delete_run(self, run_number: int) -> Path:
        """Delete run_N from disk; refused while it is training."""
        with self._admin_lock:
            active = self.training_run()
            try:
                trash = run_folder.set_aside(
                    self.workspace, run_number, active.run_number if active is not None else None
                )
            except run_folder.RunFolderError as e:
                raise ServerError(str(e)) from None
            with self._cross_site_lock:
                store = self._cross_site.pop(run_number, None)
            if store is not None:
                store.close()  # a call still in flight must not write the deleted run back
            if self.run is not None and self.run.run_number == run_number:
                with self._run_cond:
                    self.run = None
        run_folder.remove(trash)
        log.info("run %d deleted by an operator", run_number)
        return self.run_dir(run_number)

    def cross_site(self, run_number: int) -> CrossSiteValidation:
        """Run N's cross-site validation (loaded from disk on first use); CrossSiteError unless N has completed."""
        with self._cross_site_lock:
            store = self._cross_site.get(run_number)
            if store is not None and store.run_dir.is_dir():
                return store
            status = self.run_status(run_number)
            if status == "none":
                raise CrossSiteError(f"run {run_number} does not exist")
            if status != Phase.COMPLETED.value:
                detail = {
                    "deployed": "has not been trained yet",
                    "training": "is still training",
                    "aborted": "was aborted",
                }.get(status, f"is {status}")
                raise CrossSiteError(f"run {run_number} {detail}; cross-site validation needs a completed run")
            try:
                store = CrossSiteValidation(run_number, self.run_dir(run_number), self.registry.names)
            except OSError as e:
                raise CrossSiteError(f"run {run_number}: cannot read its files ({e})") from None
            self._cross_site[run_number] = store
            return store

    def remove_site(self, name: str) -> None:
        """Drop `name` from the training plane's registry."""
        if not self.registry.remove(name):
            raise ServerError(f"{name} is not registered")

    def wait_for_run(self, timeout: float) -> FederatedRun | None:
        """The run, waiting up to `timeout` seconds for one to start."""
        with self._run_cond:
            if self.run is None:
                self._run_cond.wait(timeout)
            return self.run

    # ---- liveness -------------------------------------------------------------------------------

    def heartbeat_timeout(self) -> float:
        """Seconds of silence after which a registered site is dropped."""
        return self.run.config.heart_beat_timeout if self.run else DEFAULT_HEARTBEAT_TIMEOUT

    def heartbeat_interval(self) -> float:
        """How often sites should send heartbeats: a few per timeout."""
        return max(0.5, min(30.0, self.heartbeat_timeout() / 4))

    def active_sites(self) -> set[str]:
        """Sites registered in the training plane."""
        return self.registry.names()

    def _shut_out_revoked(self) -> None:
        """Release the long-polls of sites whose certificate was revoked since they connected.

        A Retrieve is held up to a minute; without this a revoked site would count as connected until it ends.
        """
        revoked = self.revocations.revoked()
        if revoked:
            for site in self.mailbox.revoked_sites(revoked):
                log.warning("%s: its certificate was revoked; its long-poll is released", site)
                self.mailbox.shut_out(site, "its certificate was revoked")

    def _tick_loop(self) -> None:
        last_revocation_check = 0.0
        while not self._stop.wait(self._tick_seconds):
            try:
                if time.monotonic() - last_revocation_check >= REVOCATION_CHECK_S:
                    last_revocation_check = time.monotonic()
                    self._shut_out_revoked()
                    self.blobs.sweep()
                dropped = self.registry.drop_silent(self.heartbeat_timeout())
                if self.run is not None:
                    self.run.tick(self.registry.names(), dropped)
            except Exception:
                log.exception("round ticker failed; continuing")
