"""The Python API of the console: `Session`, one method per admin command, typed results and typed errors.

`fedadmin` itself is built on it. A method checks its arguments with the command's declaration
(fedcommon.commands) before anything is sent (UsageError), returns a record of fedadmin.results, and raises
Refused when a policy refused the command, CommandFailed when it failed at a target (fedadmin.errors).
The POC helpers (`poc_prepare`, `poc_start`, `poc_stop`) run a local federation for scripts and CI.

    with Session("poc/admin") as session:
        job = session.submit("examples/digits")
        assert session.wait_job(job.job_id).completed
"""

from __future__ import annotations

import math
import os
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedadmin.errors import (
    CommandFailed,
    CommandTimeout,
    NotConnected,
    Refused,
    RemoteError,
    SessionError,
    UsageError,
    raise_for,
)
from fedcommon.commands import GROUP_TARGETS, TARGET_RE, ArgumentError
from fedcommon.commands import command as declared
from fedcommon.outcome import CommandOutcome

if TYPE_CHECKING:
    from fedadmin.connection import AdminConnection, Uploaded
    from fedadmin.local_federation import Stopped
    from fedadmin.results import (
        Deployed,
        Downloaded,
        Job,
        JobList,
        LogLines,
        Metrics,
        PocKits,
        PocRunning,
        Replies,
        RunEnded,
        ShellOutput,
        Status,
        Validation,
    )

KIT_ENV = "FEDADMIN_KIT"
# What the shell command runs at a participant (the site checks again: argv only, whitelisted flags).
SHELL_COMMANDS = ("ls", "cat", "head", "tail", "grep", "pwd")
POLL_INTERVAL_S = 1.0

Targets = str | Sequence[str]
# Follows a run: (poll, stop, deadline) -> (last outcome, whether stop held); fedadmin.watch.follow with a mode.
Follower = Callable[[Callable[[], CommandOutcome], Callable[[CommandOutcome], bool], float | None], Any]

__all__ = [
    "CommandFailed",
    "CommandTimeout",
    "NotConnected",
    "Refused",
    "Session",
    "SessionError",
    "UsageError",
    "poc_prepare",
    "poc_start",
    "poc_stop",
]


class Session:
    """A connection to the federation server with an admin kit; a context manager that closes its channel.

    kit: the admin's participant folder (holding startup/), else $FEDADMIN_KIT. reply_timeout: seconds the server
    waits for the sites' replies (default: its own setting, see set_timeout).
    """

    def __init__(self, kit: str | os.PathLike[str] | None = None, reply_timeout: float | None = None) -> None:
        folder = kit if kit is not None else os.environ.get(KIT_ENV) or None
        if folder is None:
            raise UsageError(f"no admin kit: pass kit= (the admin's participant folder) or set {KIT_ENV}")
        self.kit = Path(folder)
        if not self.kit.is_dir():
            raise UsageError(f"admin kit {self.kit}: no such folder (the admin's participant folder, holding startup/)")
        if reply_timeout is not None and not (isinstance(reply_timeout, (int, float)) and 0 < reply_timeout < math.inf):
            raise UsageError(f"reply_timeout must be a number of seconds > 0, got {reply_timeout!r}")
        self.reply_timeout = reply_timeout
        self._channel: AdminConnection | None = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel to the server."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def _conn(self) -> AdminConnection:
        """The channel, opened on the first command (the kit is loaded then: NotConnected if it is unusable)."""
        if self._channel is None:
            from fedadmin.connection import AdminConnection

            self._channel = AdminConnection(self.kit, self.reply_timeout)
        return self._channel

    @property
    def admin(self) -> str:
        """The admin's name, from the kit's certificate."""
        return self._conn.kit.name

    # ---- every command goes through here ------------------------------------------------------------

    def execute(self, command: str, targets: Targets, args: dict[str, Any] | None = None) -> CommandOutcome:
        """Run any declared command; every target's reply, failed ones included (no CommandFailed).

        UsageError (nothing sent) when the declaration refuses the arguments or a target is not a name.
        """
        names = _targets(targets)
        try:
            declared(command).check_args(args or {})
        except ArgumentError as e:
            raise UsageError(str(e)) from None
        return self._conn.execute(command, names, args or {})

    def _checked(self, command: str, targets: Targets, args: dict[str, Any] | None = None) -> CommandOutcome:
        outcome = self.execute(command, targets, args)
        raise_for(outcome)
        return outcome

    # ---- runs -----------------------------------------------------------------------------------------

    def status(self, targets: Targets = "all") -> Status:
        """The server's current run and each site's training status and progress."""
        from fedadmin.results import Status

        outcome = self.execute("status", targets)
        status = Status.from_outcome(outcome)
        raise_for(outcome, status)
        return status

    def set_run(self, run_number: int) -> Replies:
        """Choose the run number that deploy, start and abort act on."""
        return self._checked("set-run", "server", {"run_number": run_number})

    def upload(self, mmar: str | os.PathLike[str], show_progress: bool = False) -> Uploaded:
        """Check an MMAR (a folder is zipped) and stream it to the server, signed with the kit's key."""
        from fedadmin.upload import mmar_problem, upload_mmar

        problem = mmar_problem(Path(mmar))
        if problem:
            raise UsageError(problem.message)
        return upload_mmar(self._conn, Path(mmar), show_progress)

    def deploy(
        self, mmar: str | os.PathLike[str], targets: Targets, run_number: int | None = None, show_progress: bool = False
    ) -> Deployed:
        """Upload MMAR and deploy it to targets as the current run (or run_number)."""
        from fedadmin.results import Deployed

        _targets(targets)
        uploaded = self.upload(mmar, show_progress)
        outcome = self.execute("deploy", targets, _with_run({"blob_id": uploaded.blob_id}, run_number))
        deployed = Deployed(uploaded.blob_id, uploaded.size, outcome)
        raise_for(outcome, deployed)
        return deployed

    def start(self, targets: Targets, run_number: int | None = None) -> Replies:
        """Start training the current run (or run_number) at targets."""
        return self._checked("start", targets, _with_run({}, run_number))

    def start_mgpu(self, gpus: int, targets: Targets = "all", run_number: int | None = None) -> Replies:
        """Start the run with gpus training ranks (torchrun, DDP) at each site of targets."""
        return self._checked("start-mgpu", targets, _with_run({"gpu_number": gpus}, run_number))

    def abort(self, targets: Targets, run_number: int | None = None) -> Replies:
        """Abort training at targets (`server` aborts the sites first); no confirmation is asked."""
        return self._checked("abort", targets, _with_run({}, run_number))

    def wait(
        self, timeout: float | None = None, *, interval: float = POLL_INTERVAL_S, follow: Follower | None = None
    ) -> RunEnded:
        """Follow the current run until it completes and its sites are done, is aborted, or a site fails.

        Returns how it ended (ok only when completed); CommandTimeout (with the last Status) after timeout seconds.
        follow: how to poll, e.g. the console's live view (fedadmin.watch.follow); default quiet.
        """
        from fedadmin.results import RunEnded, Status
        from fedadmin.watch import follow as watch_follow
        from fedadmin.watch import run_end

        if timeout is not None and not timeout > 0:
            raise UsageError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout

        def poll() -> CommandOutcome:
            return self.execute("status", "all")

        def stop(outcome: CommandOutcome) -> bool:
            return run_end(outcome) is not None

        if follow is None:
            outcome, ended = watch_follow(poll, stop, mode="quiet", deadline=deadline, interval=interval)
        else:
            outcome, ended = follow(poll, stop, deadline)
        status = Status.from_outcome(outcome)
        end = run_end(outcome)
        if ended and end is not None:
            return RunEnded(end.ok, end.message, status)
        message = f"gave up after {timeout:g}s: the run is {status.run_status or 'unknown'}"
        raise CommandTimeout(f"{message}; {status.awaiting}" if status.awaiting else message, status)

    def delete_run(self, run_number: int, targets: Targets = "all") -> Replies:
        """Delete run_number's folder (models, logs, results) at targets; refused for the active run."""
        return self._checked("delete-run", targets, {"run_number": run_number})

    # ---- looking around -------------------------------------------------------------------------------

    def sysinfo(self, targets: Targets = "all") -> Replies:
        """Host, CPU, memory, disk and GPUs of each target."""
        return self._checked("sysinfo", targets)

    def shell(self, target: str, argv: Sequence[str] | str) -> ShellOutput:
        """Run a read-only command (ls, cat, head, tail, grep, pwd) in target's workspace; argv is split, never run
        by a shell."""
        from fedadmin.results import ShellOutput

        words = shlex.split(argv) if isinstance(argv, str) else list(argv)
        if not words or words[0] not in SHELL_COMMANDS:
            first = repr(words[0]) if words else "nothing"
            raise UsageError(f"{first} is not allowed; shell runs only {', '.join(SHELL_COMMANDS)}")
        _one_participant("shell", target)
        outcome = self.execute("shell", [target], {"argv": words})
        result = ShellOutput.from_outcome(outcome, target)
        raise_for(outcome, result)
        return result

    def logs(
        self,
        target: str,
        run_number: int | None = None,
        lines: int = 50,
        level: str | None = None,
        cursor: dict[str, int] | None = None,
    ) -> LogLines:
        """The last lines of target's log (a site's worker log of run_number); cursor: only lines after it."""
        from fedadmin.results import LogLines

        _one_participant("logs", target)
        args: dict[str, Any] = {"lines": lines}
        if run_number is not None:
            args["run_number"] = run_number
        if level:
            args["level"] = level.lower()
        if cursor:
            args["cursor"] = cursor
        outcome = self.execute("logs", [target], args)
        result = LogLines.from_outcome(outcome, target)
        raise_for(outcome, result)
        return result

    def metrics(self, run_number: int | None = None) -> Metrics:
        """A run's metrics per round and site, and their mean (default: the current run)."""
        from fedadmin.results import Metrics

        outcome = self.execute("metrics", "server", _with_run({}, run_number))
        result = Metrics.from_outcome(outcome)
        raise_for(outcome, result)
        return result

    def validate(self, run_number: int | None = None, site: str | None = None, owner: str | None = None) -> Validation:
        """The cross-site validation matrix (site: that site's row; site and owner: one cell with all metrics)."""
        from fedadmin.results import Validation

        args = _with_run({}, run_number)
        args.update({k: v for k, v in (("site", site), ("owner", owner)) if v is not None})
        outcome = self.execute("validate", "server", args)
        result = Validation.from_outcome(outcome)
        raise_for(outcome, result)
        return result

    def start_validation(self, targets: Targets = "client", run_number: int | None = None) -> Replies:
        """Start cross-site validation of a trained run at the sites."""
        return self._checked("run-validation", targets, _with_run({}, run_number))

    # ---- operating ------------------------------------------------------------------------------------

    def restart(self, targets: Targets) -> Replies:
        """Restart the targets' processes; no confirmation is asked."""
        return self._checked("restart", targets)

    def shutdown(self, targets: Targets) -> Replies:
        """Shut the targets down (the server refuses while sites are registered); no confirmation is asked."""
        return self._checked("shutdown", targets)

    def remove_client(self, site: str) -> Replies:
        """Forget a site's registration at the server."""
        return self._checked("remove-client", "server", {"site": site})

    def set_timeout(self, seconds: float) -> Replies:
        """Set how long the server waits for the sites' replies."""
        return self._checked("set-timeout", "server", {"seconds": seconds})

    # ---- jobs -----------------------------------------------------------------------------------------

    def submit(
        self,
        mmar: str | os.PathLike[str],
        sites: Targets | None = None,
        gpus: int = 0,
        name: str | None = None,
        show_progress: bool = False,
    ) -> Job:
        """Upload MMAR once and queue it as a job on sites (default: every site connected now)."""
        args: dict[str, Any] = {"gpus": gpus, "name": name or Path(mmar).resolve().name}
        if sites:
            args["sites"] = [sites] if isinstance(sites, str) else list(sites)
        try:
            declared("submit").check_args({**args, "blob_id": "0" * 64})  # before anything is uploaded
        except ArgumentError as e:
            raise UsageError(str(e)) from None
        uploaded = self.upload(mmar, show_progress)
        return self._job("submit", {**args, "blob_id": uploaded.blob_id})

    def jobs(self) -> JobList:
        """Every job: queued, running and ended."""
        from fedadmin.results import JobList

        outcome = self.execute("jobs", "server")
        result = JobList.from_outcome(outcome)
        raise_for(outcome, result)
        return result

    def job_show(self, job_id: int) -> Job:
        """One job in detail: its state, each site's part, errors, notes and a metrics summary."""
        return self._job("job-show", {"job_id": job_id})

    def job_abort(self, job_id: int) -> Job:
        """Abort a queued or running job; no confirmation is asked."""
        return self._job("job-abort", {"job_id": job_id})

    def job_clone(self, job_id: int) -> Job:
        """Submit a job's archive again as a new job (returned), on the same sites and GPUs."""
        return self._job("job-clone", {"job_id": job_id})

    def job_delete(self, job_id: int) -> Replies:
        """Delete an ended or queued job and its run at the server and its sites; no confirmation is asked."""
        return self._checked("job-delete", "server", {"job_id": job_id})

    def job_download(self, job_id: int, out: str | os.PathLike[str]) -> Downloaded:
        """Fetch a job's models, summary, cross-site results and log tails into out/job-<id>/ (new or empty)."""
        from fedadmin.results import Downloaded

        outcome = self._checked("job-download", "server", {"job_id": job_id})
        data = outcome.server.data if outcome.server is not None else {}
        folder = self._conn.download(str(data.get("download_id")), Path(out) / f"job-{job_id}")
        files = data.get("files") if isinstance(data.get("files"), list) else []
        return Downloaded(job_id, folder, tuple(str(f) for f in files), outcome)

    def wait_job(
        self,
        job_id: int,
        timeout: float | None = None,
        *,
        interval: float = POLL_INTERVAL_S,
        on_change: Callable[[Job], None] | None = None,
    ) -> Job:
        """Follow a job until it ends (COMPLETED, FAILED or ABORTED) and return it; on_change(job) when its state or
        reason changes. CommandTimeout (with the last Job) after timeout seconds."""
        if timeout is not None and not timeout > 0:
            raise UsageError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[str, str] | None = None
        while True:
            job = self.job_show(job_id)
            if on_change is not None and (job.state, job.reason) != seen:
                on_change(job)
            seen = (job.state, job.reason)
            if job.ended:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                reason = f": {job.reason}" if job.reason else ""
                raise CommandTimeout(f"gave up after {timeout:g}s: job {job_id}: {job.state}{reason}", job)
            time.sleep(interval)

    def _job(self, command: str, args: dict[str, Any]) -> Job:
        from fedadmin.results import Job

        outcome = self.execute(command, "server", args)
        server = outcome.server
        job = Job.from_data(server.data if server is not None and server.ok else {}, outcome)
        raise_for(outcome, job)
        return job


def _targets(targets: Targets) -> list[str]:
    names = [targets] if isinstance(targets, str) else list(targets)
    if not names:
        raise UsageError("no targets: name server, client, all or sites")
    for name in names:
        if not isinstance(name, str) or not TARGET_RE.fullmatch(name):
            raise UsageError(f"{name!r} is not a target: use server, client, all or a site name")
    return names


def _one_participant(command: str, target: str) -> None:
    if not isinstance(target, str) or (target in GROUP_TARGETS and target != "server"):
        raise UsageError(f"{command} runs at one participant: name a site or server, not {target!r}")


def _with_run(args: dict[str, Any], run_number: int | None) -> dict[str, Any]:
    return {**args, "run_number": run_number} if run_number is not None else args


# ---- a local federation for scripts and CI (the `fedadmin poc` commands' code) ----------------------------


def poc_prepare(
    workspace: str | os.PathLike[str],
    clients: int,
    *,
    host: str = "127.0.0.1",
    fl_port: int | None = None,
    admin_port: int | None = None,
    project: str = "poc",
    force: bool = False,
) -> PocKits:
    """Issue a CA and kits for server, site-1..site-<clients> and admin in workspace; ports not given are chosen
    free now (a second POC beside a running one gets its own)."""
    from fedadmin.local_federation import admin_kit, free_port
    from fedadmin.results import PocKits
    from fedcommon import pki  # cryptography loads only here
    from fedcommon import provision as provisioning

    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise UsageError(f"clients must be a whole number >= 1, got {clients!r}", "--clients")
    fl_port = fl_port or free_port(avoid={admin_port})
    admin_port = admin_port or free_port(avoid={fl_port})
    if fl_port == admin_port:
        raise UsageError(f"must differ from --fl-port (both are {fl_port})", "--admin-port")
    for check, value, param in ((pki.check_host, host, "--host"), (pki.check_project, project, "--project")):
        try:
            check(value)
        except pki.PkiError as exc:
            raise UsageError(str(exc), param) from None
    folder = Path(workspace)
    participants = provisioning.prepare_poc(folder, clients, host, fl_port, admin_port, project, force)
    folder = folder.resolve()
    return PocKits(folder, project, host, fl_port, admin_port, tuple(participants), admin_kit(folder))


def poc_start(workspace: str | os.PathLike[str], ready_timeout: float = 60.0) -> PocRunning:
    """Start the server and every site of a prepared workspace in the background; return once every site is
    connected (FederationError naming what is not, after ready_timeout). Stop them with poc_stop, also after a
    failure."""
    from fedadmin import local_federation
    from fedadmin.results import PocRunning

    folder = Path(workspace).resolve()
    kit = local_federation.admin_kit(folder)
    with Session(kit, reply_timeout=5.0) as session:

        def not_ready(sites: list[str]) -> str | None:
            try:
                server = session.execute("status", "server").server
            except (NotConnected, RemoteError) as exc:
                return f"the server's admin plane does not answer ({exc})"
            if server is None or not server.ok:
                return f"the server's status failed ({server.error if server is not None else 'no reply'})"
            connected = set(server.data.get("connected_sites") or [])
            missing = [s for s in sites if s not in connected]
            return f"{', '.join(missing)} not connected to the server" if missing else None

        return PocRunning(folder, kit, tuple(local_federation.start(folder, not_ready, ready_timeout)))


def poc_stop(workspace: str | os.PathLike[str], grace: float = 15.0) -> list[Stopped]:
    """Stop every process of the workspace's federation (SIGTERM, then SIGKILL after grace) and check none is left;
    FederationError when none is recorded there."""
    from fedadmin import local_federation
    from fedadmin.local_federation import RECORD, FederationError

    folder = Path(workspace).resolve()
    if not (folder / RECORD).exists() and not local_federation.self_recorded(folder):
        raise FederationError(
            f"no POC federation is recorded in {folder} ({RECORD} is missing, and no "
            "participant's pid.json names a running process)"
        )
    return local_federation.stop(folder, grace)
