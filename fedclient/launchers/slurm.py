"""A site's training as a Slurm job: sbatch (srun + torchrun for several ranks), followed, cancelled, taken up again.

The run folder is the channel: the job's worker appends its events to run_N/slurm/events-RANK.jsonl and Slurm
writes its output to run_N/slurm/job-ID.out; the agent copies both in, so the job outlives a restart of the agent.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedclient.client_executor import WORKER_MODULE, ClientExecutor, EventHandler, TrainArgs, TrainingError
from fedclient.executor_channel import MAX_EVENT_BYTES
from fedclient.launchers.config import SlurmConfig
from fedclient.launchers.slurm_commands import JobState, SlurmCommands, SlurmError, SlurmUnavailable
from fedcommon import run_folder
from fedcommon.atomic import atomic_write_bytes, atomic_write_json
from fedcommon.commands import ClientStatus, get_status_message
from fedcommon.logs import WORKER_LOG, RotatingWriter

log = logging.getLogger(__name__)

SLURM_DIR = "slurm"  # in run_N: the job's script, record, output and events
RECORD_FILE = "job.json"
SCRIPT_FILE = "job.sh"
CANCEL_TRIES = 3
CANCEL_RETRY_S = 1.0
ABORT_WAIT_S = 60.0
COPY_STOP_WAIT_S = 10.0
COPY_CHUNK = 1 << 20  # the most of the job's output copied per poll
MAX_RECORD_BYTES = 64 * 1024
MAX_RECORDS_SCANNED = 1000
RDZV_PORT_BASE = 20000  # torchrun's rendezvous port on the first node: this plus the job id modulo RDZV_PORT_SPAN
RDZV_PORT_SPAN = 20000
_RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class _Job:
    """One submitted job as the agent follows it; `copied` is how far its output and events were taken in."""

    job_id: str
    run_number: int
    ranks: int
    folder: Path  # run_N/slurm, as the agent sees it
    submitted: float
    copied: dict[str, int] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    aborting: bool = False
    expired: str = ""  # why the agent cancelled it itself (pending too long)
    cancel_error: str = ""  # why the last cancel failed, until one succeeds
    detached: bool = False  # the agent restarts: stop following, leave the job running
    stopped: threading.Event = field(default_factory=threading.Event)  # the follower has returned
    state: str = "PENDING"

    @property
    def record(self) -> Path:
        return self.folder / RECORD_FILE

    @property
    def output(self) -> Path:
        return self.folder / f"job-{self.job_id}.out"

    def save(self, ended: str | None = None) -> None:
        data = {
            "job_id": self.job_id,
            "run_number": self.run_number,
            "ranks": self.ranks,
            "submitted": self.submitted,
            "copied": self.copied,
            "ended": ended,
        }
        atomic_write_json(self.record, data)


class SlurmExecutor(ClientExecutor):
    """Runs the site's training as a Slurm job on its cluster; status, abort and logs as ProcessExecutor's."""

    runs_here = False

    def __init__(
        self,
        config: SlurmConfig,
        workspace: Path,
        on_event: EventHandler | None = None,
        commands: SlurmCommands | None = None,
        python: str | None = None,
        worker_module: str = WORKER_MODULE,
    ):
        super().__init__(on_event)
        self.config = config
        self.workspace = Path(workspace).resolve()
        self.slurm = commands or SlurmCommands(config.bin_dir, config.slurm_conf)
        self.python = python or config.python or sys.executable
        self.worker_module = worker_module
        self.detail = ""
        self._job: _Job | None = None

    @property
    def backend(self) -> str:
        """The ranks' collective backend: nccl on a GPU cluster, gloo on a CPU-only one."""
        return "nccl" if self.config.gpus_per_node else "gloo"

    # ---- start ----------------------------------------------------------------------------------

    def start_train(self, client, args: TrainArgs, mmar_root: Path) -> int:
        """Submit one task running the worker for run args.run_number; returns the Slurm job id."""
        gpus = 1 if self.config.gpus_per_node else 0
        return self._submit(args, mmar_root, ranks=1, nodes=1, per_node=1, gpus_per_node=gpus)

    def start_mgpu_train(self, client, args: TrainArgs, mmar_root: Path, gpu_number: int) -> int:
        """Submit gpu_number ranks (GPUs, or CPU ranks on a CPU-only cluster): srun starts torchrun on each node."""
        if isinstance(gpu_number, bool) or not isinstance(gpu_number, int) or gpu_number < 1:
            raise TrainingError(f"the number of GPUs must be a whole number >= 1, got {gpu_number!r}")
        per_node = min(gpu_number, self.config.gpus_per_node) if self.config.gpus_per_node else gpu_number
        nodes = math.ceil(gpu_number / per_node)
        if gpu_number % per_node:
            raise TrainingError(
                f"start-mgpu {gpu_number}: nodes here have {per_node} GPUs each; ask for a multiple of {per_node}"
            )
        if nodes > self.config.nodes:
            raise TrainingError(
                f"start-mgpu {gpu_number} needs {nodes} nodes of {per_node} GPUs; local/launcher.json allows "
                f"{self.config.nodes} (slurm.nodes)"
            )
        gpus = per_node if self.config.gpus_per_node else 0
        return self._submit(args, mmar_root, gpu_number, nodes, per_node, gpus)

    def _submit(self, args: TrainArgs, mmar_root: Path, ranks: int, nodes: int, per_node: int, gpus_per_node: int):
        with self._lock:
            if self.is_training():
                raise TrainingError(f"run {self.run_number} is already training")
            number = args.run_number
            run_dir = run_folder.run_dir(self.workspace, number)
            folder = run_dir / SLURM_DIR
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            for rank in range(max(ranks, 64)):  # a previous launch's events are not this one's
                (folder / f"events-{rank}.jsonl").unlink(missing_ok=True)
            script = folder / SCRIPT_FILE
            atomic_write_bytes(script, self._script(args, Path(mmar_root), ranks, per_node).encode(), 0o700)
            options = self._options(args, run_dir, nodes, per_node, gpus_per_node)
            self._reset(number)
            self.ranks = ranks
            try:
                job_id = self.slurm.submit(options, self._seen_by_job(script))
            except SlurmError as e:
                what = "cannot submit to Slurm" if isinstance(e, SlurmUnavailable) else "Slurm refused the job"
                self.status, self.error, self.detail = ClientStatus.TRAINING_EXCEPTION, f"{what}: {e}", ""
                log.error("run %d: %s", number, self.error)
                raise TrainingError(self.error) from None
            job = _Job(job_id, number, ranks, folder, time.time())
            job.save()
            self._job = job
            self.detail = f"submitted to Slurm as job {job_id}"
        log.info("run %d: submitted to Slurm as job %s (%d rank%s)", number, job_id, ranks, "" if ranks == 1 else "s")
        self._follow_in_thread(job)
        return int(job_id)

    def _seen_by_job(self, path: Path) -> Path:
        """Where the job finds `path` (in the workspace): under the shared folder when the nodes mount it there."""
        shared = self.config.shared_folder
        if shared is None:
            return path
        try:
            return shared / Path(path).resolve().relative_to(self.workspace)
        except ValueError:
            return path

    def _options(self, args: TrainArgs, run_dir: Path, nodes: int, per_node: int, gpus_per_node: int) -> list[str]:
        config = self.config
        name = _NAME_UNSAFE.sub("_", self.workspace.name)[:64]
        slurm_dir = self._seen_by_job(run_dir / SLURM_DIR)
        options = [
            f"--job-name=fedlearn-{name}-run{args.run_number}",
            f"--output={slurm_dir}/job-%j.out",
            "--open-mode=append",
            f"--chdir={self._seen_by_job(run_dir)}",
            f"--nodes={nodes}",
            "--ntasks-per-node=1",
            f"--cpus-per-task={config.cpus_per_task * (1 if gpus_per_node else per_node)}",
            "--export=ALL",
        ]
        if gpus_per_node:
            options.append(f"--gpus-per-node={gpus_per_node}")
        for key in ("partition", "account", "qos"):
            value = getattr(config, key)
            if value is not None:
                options.append(f"--{key}={value}")
        if config.time_limit is not None:
            options.append(f"--time={config.time_limit}")
        return [*options, *config.sbatch_options]

    def _script(self, args: TrainArgs, mmar_root: Path, ranks: int, per_node: int) -> str:
        """The batch script: one srun task per node; with several ranks, torchrun's rendezvous on the first node."""
        run_dir = run_folder.run_dir(self.workspace, args.run_number)
        worker = [
            "-m",
            self.worker_module,
            "--workspace",
            str(self._seen_by_job(self.workspace)),
            "--mmar",
            str(self._seen_by_job(mmar_root)),
            "--run-number",
            str(args.run_number),
            "--events",
            str(self._seen_by_job(run_dir / SLURM_DIR)),
            *(["--debug"] if args.debug else []),
            *(["--validate"] if args.validate else []),
        ]
        custom = shlex.quote(str(self._seen_by_job(mmar_root / "custom")))
        lines = [
            "#!/bin/sh",
            f"# fedlearn: run {args.run_number} of {self.workspace.name}, written by the site's agent",
            f"export PYTHONPATH={custom}${{PYTHONPATH:+:$PYTHONPATH}}",
            "export PYTHONUNBUFFERED=1",
        ]
        srun = 'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1'
        if ranks == 1:
            lines.append(f"exec {srun} {shlex.join([self.python, *worker])}")
        else:
            torchrun = [
                self.python,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(per_node),
                "--rdzv-backend",
                "c10d",
                "--max-restarts",
                "0",
            ]
            lines += [
                'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                f"port=$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN}))",
                f'exec {srun} {shlex.join(torchrun)} --nnodes "$SLURM_JOB_NUM_NODES" --rdzv-id "$SLURM_JOB_ID" '
                f'--rdzv-endpoint "$head:$port" {shlex.join(worker)}',
            ]
        return "\n".join(lines) + "\n"

    # ---- follow ---------------------------------------------------------------------------------

    def resume(self) -> None:
        """Take up the newest job a previous agent submitted and did not see end (from run_N/slurm/job.json)."""
        found = []
        for record in sorted(self.workspace.glob(f"{run_folder.RUN_PREFIX}*/{SLURM_DIR}/{RECORD_FILE}"))[
            :MAX_RECORDS_SCANNED
        ]:
            job = _load_record(record)
            if job is not None:
                found.append(job)
        if not found:
            return
        job = max(found, key=lambda j: j.submitted)
        with self._lock:
            if self.is_training():
                return
            self._reset(job.run_number)
            self.ranks = job.ranks
            self._job = job
            self.detail = f"following Slurm job {job.job_id} again"
        log.info("run %d: following Slurm job %s, submitted before this agent started", job.run_number, job.job_id)
        self._follow_in_thread(job)

    def _follow_in_thread(self, job: _Job) -> None:
        threading.Thread(target=self._follow, args=(job,), name=f"slurm-job-{job.job_id}", daemon=True).start()

    def _follow(self, job: _Job) -> None:
        writer = RotatingWriter(run_folder.RunFolder.of(self.workspace, job.run_number).worker_log)
        try:
            while not job.detached:
                self._copy(job, writer)
                try:
                    state = self.slurm.job(job.job_id)
                except SlurmError as e:
                    with self._lock:
                        self.detail = f"cannot ask Slurm about job {job.job_id}: {e}"
                    job.wake.wait(self.config.poll_s)
                    job.wake.clear()
                    continue
                if state is None:
                    state = JobState(job.job_id, "UNKNOWN", "no longer known to Slurm", None, "")
                if state.final or state.state == "UNKNOWN":
                    self._copy(job, writer)
                    self._finish(job, state)
                    return
                self._update(job, state)
                job.wake.wait(self.config.poll_s)
                job.wake.clear()
        except Exception:
            log.exception("following Slurm job %s failed", job.job_id)
            self._finish(job, JobState(job.job_id, "UNKNOWN", "the agent stopped following it", None, ""))
        finally:
            writer.close()
            job.stopped.set()

    def _update(self, job: _Job, state: JobState) -> None:
        job.state = state.state
        with self._lock:
            if state.state == "PENDING":
                self.detail = f"queued in Slurm: {state.reason}"
            elif state.state in _RUNNING:
                if self.status == ClientStatus.TRAINING_STARTING and not job.aborting:
                    self.status = ClientStatus.TRAINING_STARTED
                self.detail = f"running in Slurm as job {job.job_id} on {state.nodes}"
            else:
                self.detail = f"Slurm job {job.job_id}: {state.state} ({state.reason})"
        limit = self.config.pending_limit_s
        if state.state == "PENDING" and limit and time.time() - job.submitted > limit and not job.expired:
            job.expired = (
                f"Slurm job {job.job_id} waited in the queue for more than {limit:g}s ({state.reason}); "
                f"the agent cancelled it"
            )
            log.error("run %d: %s", job.run_number, job.expired)
            try:
                self._cancel(job)
            except TrainingError as e:
                log.error("run %d: %s", job.run_number, e)

    def _finish(self, job: _Job, state: JobState) -> None:
        job.state = state.state
        with self._lock:
            code = state.exit_code if state.exit_code is not None else -1
            if state.state == "COMPLETED" or (state.state == "CANCELLED" and job.aborting and not job.expired):
                self.status = ClientStatus.TRAINING_STOPPED
            else:
                self.status = ClientStatus.TRAINING_EXCEPTION
                ended = f"Slurm job {job.job_id} {state.state} ({state.reason}), exit code {code}"
                if job.expired:
                    self.error = job.expired
                elif self.error:
                    self.error = f"{self.error} [{ended}]"
                else:
                    self.error = f"{ended}; its output is in run_{job.run_number}/logs/{WORKER_LOG}"
            self.exit_code = code
            self.detail = f"Slurm job {job.job_id} ended: {state.state}"
            final = {
                "kind": "exit",
                "run_number": job.run_number,
                "status": self.status,
                "exit_code": code,
                "error": self.error if self.status == ClientStatus.TRAINING_EXCEPTION else "",
            }
        try:
            job.save(ended=state.state)
        except OSError as e:
            log.error("cannot record that Slurm job %s ended: %s", job.job_id, e)
        code_now = final["status"]
        job.done.set()
        log.info(
            "run %d: Slurm job %s ended %s: %s", job.run_number, job.job_id, state.state, get_status_message(code_now)
        )
        self._emit(final)

    def _copy(self, job: _Job, writer: RotatingWriter) -> None:
        """Take in what the job wrote since the last poll: its output into worker.log, its events into the status."""
        before = dict(job.copied)
        data = _read_from(job.output, job.copied.get("output", 0), COPY_CHUNK)
        if data:
            writer.write(data)
            job.copied["output"] = job.copied.get("output", 0) + len(data)
        for rank in range(job.ranks):
            name = f"events-{rank}.jsonl"
            offset = job.copied.get(name, 0)
            data = _read_from(job.folder / name, offset, MAX_EVENT_BYTES * 4)
            lines = data.split(b"\n")
            if len(lines) == 1 and len(data) >= MAX_EVENT_BYTES:  # one line longer than any event: skipped whole
                log.warning("Slurm job %s: skipping an over-long event line in %s", job.job_id, name)
                job.copied[name] = offset + len(data)
                continue
            for line in lines[:-1]:  # the last piece is a line still being written
                offset += len(line) + 1
                self._take_event(job, line)
            job.copied[name] = offset
        if job.copied != before:
            try:
                job.save()
            except OSError as e:
                log.warning("cannot record how far Slurm job %s was copied: %s", job.job_id, e)

    def _take_event(self, job: _Job, line: bytes) -> None:
        try:
            event = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            log.warning("Slurm job %s: ignoring a malformed event line", job.job_id)
            return
        if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
            log.warning("Slurm job %s: ignoring an event that is not an object with a kind", job.job_id)
            return
        if event["kind"] == "status" and event.get("status") == ClientStatus.TRAINING_STARTING:
            return  # the worker has started: Slurm's RUNNING said so already
        self._handle(event)

    # ---- status, abort --------------------------------------------------------------------------

    def status_detail(self) -> dict[str, Any]:
        """The Slurm job and what Slurm says of it ("queued in Slurm: Resources")."""
        job = self._job
        if job is None:
            return {"launcher": "slurm"}
        detail = {"launcher": "slurm", "slurm_job": job.job_id, "slurm_state": job.state, "detail": self.detail}
        if job.cancel_error:
            detail["cancel_error"] = job.cancel_error
        return detail

    def cluster_info(self) -> dict[str, Any]:
        """The partition's nodes, free nodes, CPUs and GPUs, as sinfo reports them."""
        try:
            return {"launcher": "slurm", **self.slurm.partition(self.config.partition)}
        except SlurmError as e:
            return {"launcher": "slurm", "partition": self.config.partition or "(default)", "error": str(e)}

    def _cancel(self, job: _Job) -> None:
        """scancel, tried CANCEL_TRIES times; TrainingError (and the status detail) says when it kept failing."""
        error: SlurmError | None = None
        for attempt in range(1, CANCEL_TRIES + 1):
            try:
                self.slurm.cancel(job.job_id)
            except SlurmError as e:
                error = e
                log.warning("scancel %s failed (try %d of %d): %s", job.job_id, attempt, CANCEL_TRIES, e)
                if attempt < CANCEL_TRIES:
                    time.sleep(CANCEL_RETRY_S)
                continue
            job.cancel_error = ""
            job.wake.set()
            return
        job.cancel_error = f"scancel of Slurm job {job.job_id} failed {CANCEL_TRIES} times: {error}; it may still run"
        raise TrainingError(job.cancel_error)

    def abort_train(self, client) -> None:
        """scancel the job, then follow it until Slurm says it ended; TrainingError when scancel keeps failing."""
        with self._lock:
            job = self._job
            if job is None or job.done.is_set():
                return
            job.aborting = True
        log.info("run %d: cancelling Slurm job %s", job.run_number, job.job_id)
        try:
            self._cancel(job)
        except TrainingError:
            job.aborting = False
            raise
        if not job.done.wait(ABORT_WAIT_S):
            raise TrainingError(f"Slurm job {job.job_id} was cancelled but had not ended after {ABORT_WAIT_S:g}s")

    def wait_training_process_finish(self, client, timeout: float | None = None) -> bool:
        """Wait until Slurm says the job ended and its output was copied; False on timeout."""
        job = self._job
        return True if job is None else job.done.wait(timeout)

    def detach(self) -> None:
        """Stop following the job and leave it running: the restarted agent resumes it from its record."""
        job = self._job
        if job is not None and not job.done.is_set():
            job.detached = True
            job.wake.set()
            job.stopped.wait(COPY_STOP_WAIT_S)  # the last copy is recorded before the agent goes
            log.info("run %d: Slurm job %s left running for the restarted agent", job.run_number, job.job_id)

    def close(self) -> None:
        """Cancel any job (as ProcessExecutor leaves no process); a failed cancel is logged."""
        try:
            self.abort_train(None)
        except TrainingError as e:
            log.error("%s", e)


def _read_from(path: Path, offset: int, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""
    except OSError as e:
        log.warning("cannot read %s: %s", path, e)
        return b""


def _load_record(path: Path) -> _Job | None:
    """A job record not marked ended, checked; None (logged) for one that is ended or unusable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
        data = json.loads(raw) if len(raw) <= MAX_RECORD_BYTES else None
    except (OSError, ValueError, RecursionError) as e:
        log.warning("ignoring the Slurm job record %s: %s", path, e)
        return None
    if not isinstance(data, dict) or data.get("ended") is not None:
        return None
    job_id, number, ranks = data.get("job_id"), data.get("run_number"), data.get("ranks")
    submitted, copied = data.get("submitted"), data.get("copied")
    valid = (
        isinstance(job_id, str)
        and re.fullmatch(r"\d{1,20}", job_id)
        and isinstance(number, int)
        and path.parent.parent.name == f"{run_folder.RUN_PREFIX}{number}"
        and isinstance(ranks, int)
        and 1 <= ranks <= 4096
        and isinstance(submitted, (int, float))
        and isinstance(copied, dict)
        and all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in copied.items())
    )
    if not valid:
        log.warning("ignoring the Slurm job record %s: not a record this agent wrote", path)
        return None
    return _Job(job_id, number, ranks, path.parent, float(submitted), dict(copied))
