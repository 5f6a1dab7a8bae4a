"""The federation server: fl_port (training plane + site agents) and admin_port (operators), its live runs."""

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
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from fedcommon import run_folder
from fedcommon.archive_signature import ArchiveSignature, SignatureError
from fedcommon.atomic import atomic_write_json
from fedcommon.chunk_wire import add_training_servicer
from fedcommon.commands import DEFAULT_TIMEOUT_S, ArgumentError, ResultTopic, seconds
from fedcommon.commands import run_number as checked_run_number
from fedcommon.identity import PeerIdentity
from fedcommon.kit import Kit, server_credentials, server_ssl_context
from fedcommon.mmar import MMARError, load_mmar
from fedcommon.model_file import ModelFileError, read_index
from fedcommon.revocation import CRL_FILE, RevocationError, RevocationList
from fedcommon.tensor_codec import MAX_MESSAGE_BYTES
from fedcommon.wire import admin_pb2_grpc as admin_grpc
from fedserver import crypto_child, identity_gate
from fedserver.admin_hub import AdminHub
from fedserver.admin_service import AdminService
from fedserver.agent_service import SiteAgentService
from fedserver.audit import AUDIT_FILE, AuditLog
from fedserver.authorization import PolicyError, load_policy
from fedserver.blob_store import BlobStore
from fedserver.bulk_channel import BulkChannel
from fedserver.bulk_tickets import TicketBook
from fedserver.cross_site import CrossSiteError, CrossSiteValidation
from fedserver.downloads import DOWNLOADS_DIR, Downloads
from fedserver.errors import ServerError
from fedserver.identity_gate import CallLimits, IdentityGate, RefusalRecorder
from fedserver.initial_models import InitialModels
from fedserver.jobs import JobStore, load_max_jobs
from fedserver.mailbox import SiteMailbox
from fedserver.registry import UNBOUND, ClientRegistry
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
from fedserver.tracking import ExperimentTracker, TrackingConfigError
from fedserver.training_service import DOWNLOAD_SLOTS, MAX_CONCURRENT_UPLOADS, TrainingService
from fedserver.transfer_slots import TransferSlots
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
STOP_WAIT_S = 10.0
# What the job queue is told when a live run ends: (run number, "completed" or "aborted", a line on how).
RunEndHook = Callable[[int, str, str], None]


def _numbers(runs: list[FederatedRun]) -> str:
    """ "3, 4": the runs' numbers, for messages."""
    return ", ".join(str(r.run_number) for r in sorted(runs, key=lambda r: r.run_number))


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
    """Owns the gRPC servers, the registry of sites, the admin hub, the current run number and the live runs."""

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
        max_runs: int | None = None,
        bulk_port: int | None = None,
    ):
        """bulk_port: the bulk channel's port (0: a free one, -1: none; None: the kit's). stream_deadlines, fl_limits,
        admin_limits: how long a request stream may stall and how many calls one
        caller may hold on each port (defaults: the modules' constants, read now). max_runs: how many runs (jobs
        or runs by hand) may train at once; None: max_jobs in local/jobs.json, else 1."""
        if max_runs is not None and max_runs < 1:
            raise ServerError(f"max_runs must be at least 1, got {max_runs}")
        self.workspace = Path(workspace)
        self.kit = kit
        self.bind_host = bind_host or kit.server_host
        self.fl_port = kit.fl_port if fl_port is None else fl_port
        self.admin_port = kit.admin_port if admin_port is None else admin_port
        self.bulk_port = kit.bulk_port if bulk_port is None else bulk_port
        self.registry = ClientRegistry()
        self.telemetry = Telemetry(gauges=self._gauges)
        self._exporter = None
        # The live runs by number, in the order they started: a run stays after it ends until replaced or deleted.
        self.runs: dict[int, FederatedRun] = {}
        self._run_cond = threading.Condition()
        self._starting: set[int] = set()  # runs start_training is making live (see there)
        self._run_end_hooks: list[RunEndHook] = []
        self._ended_told: set[int] = set()  # live runs whose end the hooks have been told of
        self._hooks_lock = threading.Lock()
        self._cross_site: dict[int, CrossSiteValidation] = {}
        self._cross_site_lock = threading.Lock()
        # Serialises changes of the run state (set-run, deploy, start, abort, delete-run) between operators.
        self._admin_lock = threading.RLock()
        self._run_number, self.admin_timeout = self._load_state()
        try:
            self.revocations = RevocationList(kit.folder / "startup" / CRL_FILE, kit.ca_pem, crypto_child.load_crl)
            policy = load_policy(self.workspace)
            self.code_policy = load_code_policy(self.workspace)
            self.tracking = ExperimentTracker.for_server(self.workspace)
            self.max_runs = load_max_jobs(self.workspace) if max_runs is None else max_runs
        except (RevocationError, PolicyError, CodePolicyError, TrackingConfigError, ValueError) as e:
            raise ServerError(str(e)) from None
        # Every upload and every deploy of one is checked for an admin's signature against the project CA and CRL.
        verifier = crypto_child.ChildArchiveVerifier(kit.ca_pem, self.revocations.revoked)
        self.blobs = BlobStore(self.workspace / UPLOADS_DIR, verifier)
        self.mailbox = SiteMailbox()
        self.audit = AuditLog(self.workspace / AUDIT_FILE)
        self.hub = AdminHub(self, policy, self.audit)
        self.downloads = Downloads(self.workspace / DOWNLOADS_DIR)
        self._initial_models = InitialModels(self.workspace, self._build_initial_model)
        self._resume()
        # After the runs are resumed: a running job finds its run.
        self.jobs = JobScheduler(self, JobStore(self.workspace), self.max_runs)
        self.mailbox.on_result = self._site_result
        self.exit_requested = threading.Event()
        self.restart_requested = False
        # Each site holds up to two long-polls (agent Retrieve, worker GetModel): size the pool for that.
        self._max_workers = max_workers
        self._tick_seconds = tick_seconds
        self._watchdog = StreamWatchdog(stream_deadlines or StreamDeadlines())
        # Model downloads that send bytes at once, whichever path sends them (gRPC stream or a side channel).
        self.download_slots = TransferSlots(DOWNLOAD_SLOTS, 2, "download")
        # Uploads receiving bytes at once, one per site (a bulk upload's ticket keeps its slot: TrainingService).
        self.upload_slots = TransferSlots(MAX_CONCURRENT_UPLOADS, 1, "upload")
        self._fl_limits = fl_limits or CallLimits(identity_gate.CALLS_PER_SITE)
        self._admin_limits = admin_limits or CallLimits(
            identity_gate.CALLS_PER_ADMIN, total=ADMIN_WORKERS - ADMIN_RESERVED_WORKERS, privileged_role="project_admin"
        )
        self._stop = threading.Event()
        self._grpc: grpc.Server | None = None
        self._admin_grpc: grpc.Server | None = None
        self._ticker: threading.Thread | None = None
        self.bulk: BulkChannel | None = None  # the bulk channel for tensor bytes, while it serves

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
        training = TrainingService(
            self, download_slots=self.download_slots, upload_slots=self.upload_slots, watchdog=self._watchdog
        )
        add_training_servicer(training, fl)
        admin_grpc.add_SiteAgentServicer_to_server(SiteAgentService(self.mailbox, self.blobs), fl)
        port = self._bind(fl, self.fl_port, creds, "fl_port")
        admin = grpc.server(
            futures.ThreadPoolExecutor(max_workers=ADMIN_WORKERS, thread_name_prefix="admin"),
            options=[*ADMIN_GRPC_OPTIONS, ("grpc.max_allowed_incoming_connections", admin_connections)],
            interceptors=[self._gate("admin_port", ("admin",), self._admin_limits)],
        )
        admin_grpc.add_AdminServiceServicer_to_server(AdminService(self.hub, self.blobs, self.downloads), admin)
        admin_port = self._bind(admin, self.admin_port, creds, "admin_port")
        self._start_bulk(training)
        fl.start()
        admin.start()
        self._grpc, self.fl_port = fl, port
        self._admin_grpc, self.admin_port = admin, admin_port
        self._ticker = threading.Thread(target=self._tick_loop, name="round-ticker", daemon=True)
        self._ticker.start()
        self.jobs.start()
        log.info(
            "training plane and site agents on %s:%d, admin on %s:%d, %s (mutual TLS)",
            self.bind_host,
            port,
            self.bind_host,
            admin_port,
            f"bulk channel on {self.bind_host}:{self.bulk_port}" if self.bulk is not None else "no bulk channel",
        )
        return port

    def _start_bulk(self, training: TrainingService) -> None:
        """Serve the bulk channel for tensor bytes (docs/bulk-channel.md) unless bulk_port is -1."""
        if self.bulk_port < 0:
            return
        record = self._refusal_recorder("bulk_port")
        gate = IdentityGate("bulk_port", ("client",), self.revocations, record)

        def refusal(peer: PeerIdentity) -> str | None:
            refused = gate.refusal(peer)
            return refused[1] if refused is not None else None

        tickets = TicketBook()
        channel = BulkChannel(
            self.bind_host, self.bulk_port, server_ssl_context(self.kit), tickets, training, refusal, record
        )
        try:
            self.bulk_port = channel.start()
        except OSError as e:
            raise ServerError(
                f"cannot listen on {self.bind_host}:{self.bulk_port} for bulk_port: {e.strerror}; "
                f"{_port_holder(self.bulk_port)}"
            ) from None
        self.bulk = channel
        training.offer_bulk(self.bulk_port, tickets)

    def serve_metrics(self, host: str, port: int) -> int:
        """Expose the telemetry for Prometheus on http://host:port/metrics; returns the bound port."""
        self._exporter, bound = start_exporter(self.telemetry, host, port)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def _gauges(self) -> dict[str, float]:
        run = self.training_run()
        gauges = {
            "registered_sites": len(self.registry.names()),
            "connected_sites": len(self.mailbox.connected_sites()),
            "run_number": self._run_number or 0,
            "training": len(self.training_runs()),  # 0 or 1 unless max_runs > 1
        }
        if run is not None:
            gauges["round"] = run.current_round
        return gauges

    def _gate(self, port_name: str, kinds: tuple[str, ...], limits: CallLimits) -> IdentityGate:
        record = self._refusal_recorder(port_name)
        return IdentityGate(port_name, kinds, self.revocations, record, limits, self._watchdog)

    def _refusal_recorder(self, port_name: str) -> RefusalRecorder:
        """Audits a refused caller of `port_name`; a revoked site's sessions and long-polls end at once."""

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

        return record

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
        self._initial_models.close()
        self.mailbox.close()
        if self.bulk is not None:
            self.bulk.stop()  # transfers in flight fail: their GetModel calls end before the gRPC servers stop
        events = [s.stop(grace) for s in (self._admin_grpc, self._grpc) if s is not None]
        for event in events:
            # Set once every handler has returned: one stuck in a wait that ignores cancellation must not keep a
            # shutdown or a restart from happening.
            if not event.wait(grace + STOP_WAIT_S):
                log.warning(
                    "stopping: RPC handlers still running after %.0fs; going on without them", grace + STOP_WAIT_S
                )
        self._watchdog.close()
        self.tracking.close()
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
        """Make `run_number` current; refused while a run is training, unless several runs may train at once."""
        try:
            checked_run_number(run_number, "run number")
        except ArgumentError as e:
            raise ServerError(str(e)) from None
        with self._admin_lock:
            active = self.training_run()
            if active is not None and self.max_runs == 1:
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

    @property
    def run(self) -> FederatedRun | None:
        """The current run: the set-run number's live run, else the live run started last; None when none is."""
        current = self._set_run_live()
        return current if current is not None else next(reversed(list(self.runs.values())), None)

    def _set_run_live(self) -> FederatedRun | None:
        """The set-run number's live run, if it is live."""
        return self.runs.get(self._run_number) if self._run_number is not None else None

    def training_runs(self) -> list[FederatedRun]:
        """The runs training now, in the order they started."""
        return [r for r in list(self.runs.values()) if r.phase is Phase.TRAINING]

    def training_run(self) -> FederatedRun | None:
        """A run training now: the current run when it trains, else the one started last; None when none trains."""
        run = self.run
        if run is not None and run.phase is Phase.TRAINING:
            return run
        training = self.training_runs()
        return training[-1] if training else None

    def _site_result(self, site: str, topic: str, data: dict[str, Any]) -> None:
        """A site's report as the mailbox took it: progress goes to tracking; a worker's end may end a job."""
        self.tracking.site_result(site, topic, data)
        if topic == ResultTopic.TRAINING_ENDED:
            self.site_finished()

    def site_finished(self) -> None:
        """A site reported its final metrics or its worker's end: a job whose run completed may end now."""
        self.jobs.notice_sites_finished()

    def final_metrics_sites(self, run_number: int) -> set[str]:
        """The sites that have reported their metrics of live run `run_number`'s final model."""
        run = self.runs.get(run_number)
        return run.final_metrics_sites() if run is not None else set()

    def run_sites(self, run_number: int) -> set[str]:
        """The sites registered in run `run_number` now."""
        return self.registry.run_names(run_number)

    def on_run_end(self, callback: RunEndHook) -> None:
        """Call `callback(run_number, phase, detail)` once when a live run completes or is aborted (outside the
        server's locks; what it raises is logged)."""
        with self._hooks_lock:
            self._run_end_hooks.append(callback)

    def notice_run_ends(self) -> None:
        """Tell the run-end hooks of every live run that has ended since they were last told."""
        ended = []
        with self._hooks_lock:
            for run in list(self.runs.values()):
                if run.phase in (Phase.COMPLETED, Phase.ABORTED) and run.run_number not in self._ended_told:
                    self._ended_told.add(run.run_number)
                    ended.append(run)
            hooks = list(self._run_end_hooks)
        for run in ended:
            snapshot = run.status()
            if run.phase is Phase.COMPLETED:
                detail = f"completed after round {snapshot['current_round']}"
            else:
                detail = f"aborted in round {snapshot['current_round']}"
            for hook in hooks:
                try:
                    hook(run.run_number, run.phase.value, detail)
                except Exception:
                    log.exception("run %d: a run-end hook failed", run.run_number)

    def run_status(self, run_number: int, summary: Any = UNREAD) -> str:
        """ "none", "deployed", "training", "completed" or "aborted".

        summary: the run's summary.json when the caller has read it already (None: there is none).
        """
        run = self.runs.get(run_number)
        if run is not None:
            return run.phase.value
        if run_number in self._starting:
            return "deployed"
        return self.run_record(run_number).status(summary)

    def runs_report(self) -> list[dict[str, Any]]:
        """One line per live run for `status`: its number, status, rounds and the sites registered in it."""
        out = []
        for number, run in sorted(self.runs.items()):
            snapshot = run.status()
            out.append(
                {
                    "run_number": number,
                    "run_status": snapshot["status"],
                    "current_round": snapshot["current_round"],
                    "num_rounds": snapshot["num_rounds"],
                    "registered_sites": sorted(self.run_sites(number)),
                }
            )
        return out

    def run_report(self) -> dict[str, Any]:
        """The current run for `status`: number, status, rounds, and how many sites it needs (while it is live);
        `runs`: every live run."""
        number = self._run_number
        live = self.runs.get(number) if number is not None else None
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
            "runs": self.runs_report(),
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
                if self.run_status(number) == Phase.TRAINING.value:
                    raise ServerError(f"run {number} is training; abort it before deploying again")
                self.refuse_finished(number)
                target = run_folder.RunFolder.of(self.workspace, number).mmar
                target.parent.mkdir(exist_ok=True)
                if target.exists():
                    self._initial_models.forget(number)  # built from the MMAR being replaced
                    target.rename(staging / "replaced")
                mmar_dir.rename(target)
                self._initial_models.begin(number, target)
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

    def deploy_job_archive(self, archive: Path, run_number: int, signature: ArchiveSignature | None) -> Path:
        """Deploy a job's kept archive as run N here, its submitter's signature checked again over the file first
        (a signer revoked while the job was queued counts)."""
        try:
            self.blobs.verifier.verify_file(archive, signature)
        except SignatureError as e:
            raise ServerError(f"deploy refused: {e}") from None
        return self.deploy(archive, run_number)

    def _resume(self) -> None:
        """Carry on every run that trained when the server stopped (each at the round that was open); the current
        run (set-run) last, so that it stays the current one."""
        numbers = [n for n in run_folder.run_numbers(self.workspace) if n != self._run_number]
        for number in [*numbers, *([self._run_number] if self._run_number is not None else [])]:
            record = self.run_record(number)
            if record.was_training():
                self._resume_run(number, record)

    def _resume_run(self, number: int, record: RunRecord) -> None:
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
        self.runs[number] = run
        self.tracking.attach(run)
        log.info(
            "run %d resumed at round %d of %d..%d (%d round(s) were complete)",
            number,
            run.current_round,
            run.config.start_round,
            run.end_round - 1,
            run.current_round - run.config.start_round,
        )

    def start_training(self, run_number: int | None = None) -> FederatedRun:
        """Build run N's initial model and open its first round; refused when not deployed, already training, or
        when `max_runs` runs train already."""
        number = self._require_run_number(run_number)
        with self._admin_lock:
            training = self.training_runs()
            if any(r.run_number == number for r in training):
                raise ServerError(f"run {number} is already training")
            if len(training) >= self.max_runs:
                if self.max_runs == 1:
                    raise ServerError(f"run {training[0].run_number} is training; abort it first")
                raise ServerError(
                    f"runs {_numbers(training)} are training and this server trains at most {self.max_runs} "
                    "at once; abort one first or wait for one to end"
                )
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
                if not self._initial_models.take(number, building):
                    self._build_initial_model(mmar.root, building, f"run {number}")
                os.replace(building, models / GLOBAL_MODEL)
            finally:
                building.unlink(missing_ok=True)
            # FederatedRun writes summary.json ("training") before the run is live: until then the run counts as
            # deployed, not as a training run without a live one (which reads as aborted and refuses sites).
            self._starting.add(number)
            try:
                run = FederatedRun(number, folder.root, mmar.server, client=mmar.client, code_policy=self.code_policy)
                self.tracking.attach(run)
                with self._run_cond:
                    self.runs.pop(number, None)  # the restarted run is the newest
                    self.runs[number] = run
                    self._run_cond.notify_all()
            finally:
                self._starting.discard(number)
            with self._hooks_lock:
                self._ended_told.discard(number)
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

    def _build_initial_model(self, mmar_dir: Path, out: Path, what: str, cancel: threading.Event | None = None) -> None:
        """Write the run's initial model to `out`, built in a child: the MMAR's custom code and torch stay out of
        the long-lived server, and that code never runs as the server's user unless local/custom_code.json says.
        Setting `cancel` stops the child (a build begun at deploy that is no longer wanted)."""
        try:
            with code_sandbox(mmar_dir, self.code_policy, what) as box:
                try:
                    proc = run_child(
                        box,
                        "fedserver.init_model",
                        ["--mmar", str(box.mmar), "--out", str(box.out)],
                        INIT_MODEL_TIMEOUT_S,
                        cancel,
                    )
                except subprocess.TimeoutExpired:
                    if cancel is not None and cancel.is_set():
                        raise ServerError(f"building the initial model of {what} was stopped") from None
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
            # Refuses what is not a readable model file, whatever the child wrote: its index, and every tensor within
            # the file (read_index checks that), without reading the model into memory.
            with open(out, "rb") as f:
                read_index(f, out)
        except CodeRefused as e:
            raise ServerError(f"start refused: {e}") from None
        except ModelFileError as e:
            raise ServerError(f"building the initial model failed: its output is not a model file: {e}") from None

    def abort_training(self, run_number: int | None = None) -> int:
        """Abort run `run_number` (None: the current run if it trains, else the only training run); returns its
        number."""
        with self._admin_lock:
            run = self.run_to_abort(run_number)
            run.abort()
        log.info("run %d aborted by an operator", run.run_number)
        self.notice_run_ends()
        return run.run_number

    def run_to_abort(self, run_number: int | None) -> FederatedRun:
        """The run `abort` acts on: run `run_number`, else the current run if it trains, else the only training run;
        ServerError when that run is not training, or several train and none is named."""
        if run_number is not None:
            run = self.runs.get(run_number)
            if run is None or run.phase is not Phase.TRAINING:
                raise ServerError(f"run {run_number} is not training ({self.run_status(run_number)})")
            return run
        training = self.training_runs()
        current = self._set_run_live()
        if current is not None and current.phase is Phase.TRAINING:
            return current
        if not training:
            raise ServerError("no run is training")
        if len(training) > 1:
            raise ServerError(f"runs {_numbers(training)} are training: name one (--run N)")
        return training[0]

    def delete_run(self, run_number: int) -> Path:
        """Delete run_N from disk; refused while it is training."""
        self.notice_run_ends()  # a run that ended is told of before it goes
        with self._admin_lock:
            training = self.run_status(run_number) == Phase.TRAINING.value
            if not training and not self.tracking.forget(run_number):
                log.warning("run %d: experiment tracking is behind; its event files may be cut short", run_number)
            try:
                trash = run_folder.set_aside(self.workspace, run_number, run_number if training else None)
            except run_folder.RunFolderError as e:
                raise ServerError(str(e)) from None
            with self._cross_site_lock:
                store = self._cross_site.pop(run_number, None)
            if store is not None:
                store.close()  # a call still in flight must not write the deleted run back
            with self._run_cond:
                self.runs.pop(run_number, None)
        self._initial_models.forget(run_number)
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

    def wait_for_run(self, timeout: float, run_number: int = UNBOUND) -> FederatedRun | None:
        """Live run `run_number` (UNBOUND: the run a worker that names none joins), waiting up to `timeout` seconds
        for it to start. ServerError when a worker that names no run cannot be told which one."""
        find = (lambda: self.runs.get(run_number)) if run_number != UNBOUND else self.run_for_unnamed
        with self._run_cond:
            self._run_cond.wait_for(lambda: find() is not None, timeout)
            return find()

    def run_for_unnamed(self) -> FederatedRun | None:
        """The run a worker that names none (run number 0) joins: the current run if it trains, else the only
        training run, else the current run (it may have ended); ServerError when several train."""
        current = self._set_run_live()
        if current is not None and current.phase is Phase.TRAINING:
            return current
        training = self.training_runs()
        if len(training) > 1:
            raise ServerError(
                f"runs {_numbers(training)} are training and none is the current run: "
                "the worker must name its run (--run-number N)"
            )
        return training[0] if training else self.run

    def run_for_register(self, run_number: int) -> tuple[int, FederatedRun | None]:
        """(the run number a new session joins, its live run if any) for a Register naming `run_number`.

        0 (a worker that names none): see run_for_unnamed; (0, None) while no run is live. A named run may be live,
        deployed and about to start (the server may still build its initial model), or completed (cross-site
        validation); ServerError for one not deployed here or aborted.
        """
        if run_number == UNBOUND:
            run = self.run_for_unnamed()
            return (run.run_number, run) if run is not None else (UNBOUND, None)
        status = self.run_status(run_number)
        if status == "none":
            raise ServerError(f"run {run_number} is not deployed on the server")
        if status == Phase.ABORTED.value:
            raise ServerError(f"run {run_number} was aborted; it takes no more sites")
        return run_number, self.runs.get(run_number)

    # ---- liveness -------------------------------------------------------------------------------

    def heartbeat_timeout(self, run_number: int = UNBOUND) -> float:
        """Seconds of silence after which a site registered in run `run_number` is dropped (UNBOUND: in no run,
        the current run's)."""
        run = self.runs.get(run_number) if run_number != UNBOUND else self.run
        return run.config.heart_beat_timeout if run is not None else DEFAULT_HEARTBEAT_TIMEOUT

    def heartbeat_interval(self, run_number: int = UNBOUND) -> float:
        """How often sites in run `run_number` should send heartbeats: a few per timeout."""
        return max(0.5, min(30.0, self.heartbeat_timeout(run_number) / 4))

    def active_sites(self) -> set[str]:
        """Sites registered in the training plane, in any run."""
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
                dropped = self.registry.drop_silent_by_run(self.heartbeat_timeout)
                for number, run in list(self.runs.items()):
                    run.tick(self.run_sites(number), dropped.get(number, []))
                self.notice_run_ends()
            except Exception:
                log.exception("round ticker failed; continuing")
