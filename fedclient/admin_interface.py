"""What a site does for each admin request: deploy, start, abort, status, delete a run, restart, shut down.

A site trains several runs at once when its resources allow (fedclient.site_resources): each in a worker
process group of its own, with its own executor, GPUs and run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedclient.client_executor import ClientExecutor, EventHandler, ProcessExecutor, TrainArgs, TrainingError
from fedclient.launchers import LauncherConfigError, load_launcher_config, make_executor
from fedclient.local_policy import LocalPolicy
from fedclient.site_resources import Allocator, Capacity, ResourcesError, ResourcesShort, load_resources
from fedcommon import commands, run_folder
from fedcommon.admin_defs import Message
from fedcommon.commands import ClientStatus, Topic, get_status_message
from fedcommon.deployed_code import custom_code

log = logging.getLogger(__name__)

NO_RUN_NUMBER = "no run number set: run `fedadmin set-run N` first"
PROGRESS_INTERVAL_S = 0.5
MAX_EPOCH_POINTS = 500  # epoch points one progress report carries (a few KiB; the server takes 64 KiB)
FINISHING_WAIT_S = 15.0
KEPT_RUNS = 16  # ended runs whose executors (status, progress, error) status still shows


class RequestRefused(Exception):
    """A request the site refuses; the message is what the operator reads."""


class ClientAdminInterface:
    """The site's side of every admin command; the processors' app_ctx. Each run trains in a worker process of its
    own, as many at once as the site's resources allow."""

    def __init__(
        self,
        client,
        client_name: str,
        sender,
        args,
        rank: int,
        workers: int = 5,
        policy: LocalPolicy | None = None,
        executor_factory: Callable[[EventHandler], ClientExecutor] | None = None,
    ):
        self.client = client
        self.client_name = client_name
        self.sender = sender
        self.args = args
        self.rank = rank
        self.workers = workers
        self.workspace = Path(args.workspace).resolve()
        # The site's own policy: whether it runs deployed code at all (local/authorization.json "custom_code").
        self.policy = policy if policy is not None else LocalPolicy(self.workspace)
        self.debug = bool(getattr(args, "debug", False))
        # The site's local/launcher.json chooses where training runs (processes here, or Slurm); a broken one refuses
        # every start, naming the file and key.
        self.launcher_error = ""
        if executor_factory is None:
            try:
                load_launcher_config(self.workspace)
                executor_factory = lambda on_event: make_executor(self.workspace, on_event)  # noqa: E731
            except LauncherConfigError as e:
                self.launcher_error = str(e)
                log.error("%s; every start will be refused until it is fixed", e)
                executor_factory = lambda on_event: ProcessExecutor(on_event=on_event)  # noqa: E731
        # Makes each run's executor (given the event handler); a run's executor is reused when it starts again.
        self.executor_factory = executor_factory
        self._executors: dict[int, ClientExecutor] = {}  # by run number, the most recently started last
        self._latest = self.executor_factory(self._on_training_event)
        self._spare: ClientExecutor | None = self._latest  # the next run's executor when it has none yet
        self._allocator = Allocator(client_name)
        self.exit_requested = threading.Event()
        self.restart_requested = False
        self._lock = threading.RLock()  # start, deploy's install, delete-run and the allocations see one state
        self._results = ResultForwarder(sender, PROGRESS_INTERVAL_S)
        self._ended: set[int] = set()  # runs the server has ended, whose workers are on their way out
        self._resume_cluster_job()

    def _resume_cluster_job(self) -> None:
        """Take up again the cluster job (Slurm) an earlier agent left running: it is that run's executor now."""
        executor = self._latest
        executor.resume()
        number = executor.run_number
        if number is None or not executor.is_training():
            return
        self._executors[number] = executor
        self._spare = None
        try:
            self._allocator.reserve(load_resources(self.workspace), number, max(1, executor.ranks))
        except (ResourcesError, ResourcesShort) as e:
            log.warning("run %d: taken up again, but what it holds here cannot be counted: %s", number, e)

    @property
    def client_executor(self) -> ClientExecutor:
        """The executor of the run started last (the seed's attribute); before any start, the one the next uses."""
        return self._latest

    @client_executor.setter
    def client_executor(self, executor: ClientExecutor) -> None:
        # The seed lets its user put an executor here: the next run without one of its own trains on it.
        self._latest = executor
        self._spare = executor

    def set_agent(self, admin_agent) -> None:
        """The seed's hook for the FedAdminAgent that serves this interface; the interface needs nothing of it."""

    def remove_custom_path(self) -> list[str]:
        """Take the runs' custom/ folders off this process's sys.path; returns those removed.

        The seed's clean-up after training in process. Here a run's custom code is put on the worker's PYTHONPATH,
        and components built in process restore sys.path, so this finds nothing unless something else added one.
        """
        runs = self.workspace.resolve()
        custom = [p for p in sys.path if p and _is_custom_dir(Path(p), runs)]
        sys.path[:] = [p for p in sys.path if p not in custom]
        return custom

    def run_dir(self, run_number: int) -> Path:
        """Where run N lives on this site."""
        return run_folder.run_dir(self.workspace, run_number)

    def _training_runs(self) -> list[int]:
        """The runs whose worker is starting or running."""
        executors = [*self._executors.values(), self._latest]
        return sorted({e.run_number for e in executors if e.is_training() and e.run_number is not None})

    def _reap(self) -> None:
        """Give back what runs hold once their processes are gone (an executor stops training only then)."""
        for number in self._allocator.held():
            executor = self._executors.get(number)
            if executor is None or not executor.is_training():
                self._allocator.release(number)

    def _capacity(self) -> Capacity:
        try:
            return load_resources(self.workspace)
        except ResourcesError as e:
            raise RequestRefused(f"{self.client_name}: cannot start a run: {e}") from None

    # ---- status ---------------------------------------------------------------------------------

    def training_status(self) -> str:
        """The training status in words ("training started", ...)."""
        return self.client_executor.check_status(self.client)

    def client_status(self) -> dict[str, Any]:
        """The contract's site status: for the run started last its status words and code, run number, latest
        progress (and error); under "runs" the same, with what each holds, for every run live or recently ended."""
        with self._lock:
            self._reap()
            held = self._allocator.held()
            runs = []
            for number, executor in self._executors.items():
                entry = _executor_status(executor)
                if number in held:
                    entry.update(held[number].shown())
                runs.append(entry)
            return {**_executor_status(self._latest), "runs": runs}

    def resources_report(self) -> dict[str, Any]:
        """The site's resources and what each run holds (sysinfo's "resources"), or {"error"} naming the file."""
        try:
            capacity = load_resources(self.workspace)
        except ResourcesError as e:
            return {"error": str(e)}
        with self._lock:
            self._reap()
            return self._allocator.report(capacity).to_dict()

    # ---- runs -----------------------------------------------------------------------------------

    def deploy_mmar(self, data: Mapping[str, str]) -> dict[str, Any]:
        """Fetch the deployed zip the request names, verify its admin's signature against this site's own CA (and
        CRL), check and extract it into run_N/mmar. An unsigned or untrusted archive is refused, always."""
        from fedcommon.mmar import MMARError, load_mmar
        from fedcommon.safe_zip import UnsafeArchiveError, extract_zip_safely

        checked = _checked(commands.BY_TOPIC[Topic.DEPLOY].check_site_args, data)
        number, blob_id, sha256, size = (checked[k] for k in ("run_number", "blob_id", "sha256", "size"))
        check_signature = _signature_check(self.workspace, checked)  # an unsigned one is refused before a fetch
        self._refuse_deploy_while_training(number)
        self._refuse_finished(number)
        self.workspace.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".deploy-", suffix=".zip", dir=self.workspace)
        os.close(fd)
        archive = Path(tmp)
        try:
            from fedclient.admin import BlobFetchError

            try:
                self.sender.fetch_blob(blob_id, archive, sha256, size)
            except BlobFetchError as e:
                raise RequestRefused(f"deploy refused: {e}") from None
            signer = check_signature(archive)
            target = run_folder.RunFolder(self.run_dir(number)).mmar
            with self._lock:
                self._refuse_deploy_while_training(number)
                self._refuse_finished(number)
                try:
                    extract_zip_safely(archive, target, check=lambda root: self._check_deployed(root, load_mmar))
                except UnsafeArchiveError as e:
                    raise RequestRefused(f"deploy refused: {e}") from None
                except MMARError as e:
                    raise RequestRefused(f"deploy refused: not a valid MMAR:\n{e}") from None
                except zipfile.BadZipFile as e:
                    raise RequestRefused(f"deploy refused: not a readable zip file ({e})") from None
        finally:
            archive.unlink(missing_ok=True)
        log.info("run %d deployed to %s, signed by %s", number, target, signer)
        return {"run_number": number, "path": str(target)}

    def _check_deployed(self, root: Path, load_mmar: Callable[[Path], object]) -> None:
        """Refuse what this site will not install: code its local policy refuses, an MMAR that is not valid."""
        refused = self.policy.code_refusal(custom_code(root))
        if refused is not None:
            raise RequestRefused(f"deploy refused: {refused}")
        load_mmar(root)

    def _refuse_deploy_while_training(self, number: int) -> None:
        if number in self._training_runs():
            raise RequestRefused(f"run {number} is training; abort it before deploying again")

    def _refuse_finished(self, number: int) -> None:
        # Written when this site's worker saw the server end run N: finished results are not overwritten.
        if run_folder.RunFolder(self.run_dir(number)).completed.exists():
            raise RequestRefused(run_folder.already_ran(number, "completed"))

    def start_client(self, run_number) -> dict[str, Any]:
        """Start training run N from run_N/mmar; refused when not deployed or already training."""
        number = _run_number(run_number)
        return self._start(number, lambda executor, args, mmar: executor.start_train(self.client, args, mmar))

    def _let_finishing_runs_end(self) -> None:
        with self._lock:
            ended = sorted(self._ended)
        for number in ended:
            executor = self._executors.get(number)
            if executor is not None and executor.is_training():
                # The server has ended that run and its worker is on its way out: wait for it rather than refuse.
                executor.wait_training_process_finish(self.client, FINISHING_WAIT_S)

    def _start(
        self, number: int, launch, validate: bool = False, ranks: int = 1, capacity: Capacity | None = None
    ) -> dict[str, Any]:
        """Launch a worker for run N (training, or with `validate` cross-site validation of the finished run) on
        what the site can give `ranks` ranks; refused, naming what is in use, when that is not free."""
        self._let_finishing_runs_end()
        capacity = capacity or self._capacity()  # outside the lock: nvidia-smi may take seconds
        with self._lock:
            self._reap()
            if number in self._training_runs():
                if validate:
                    raise RequestRefused(f"run {number} is training; cross-site validation waits until it ends")
                raise RequestRefused(f"run {number} is already training")
            try:
                allocation = self._allocator.reserve(capacity, number, ranks)
            except ResourcesShort as e:
                if e.sole_holder is None:
                    raise RequestRefused(str(e)) from None
                waits = "cross-site validation waits until it ends" if validate else "abort it first"
                raise RequestRefused(f"run {e.sole_holder} is training; {waits}") from None
            try:
                mmar = self._launchable(number, validate)
                executor = self._executor_for(number)
                self._ended.discard(number)
                args = TrainArgs(self.workspace, number, self.debug, validate=validate, env=allocation.worker_env())
                try:
                    pid = launch(executor, args, mmar)
                except TrainingError as e:
                    raise RequestRefused(str(e)) from None
            except BaseException:
                self._allocator.release(number)
                raise
        log.info("run %d started with %s", number, allocation.shown())
        return {"run_number": number, "pid": pid}

    def _launchable(self, number: int, validate: bool) -> Path:
        """Run N's deployed MMAR, refused when it is not deployed, has completed or brings code the site refuses."""
        mmar = run_folder.RunFolder(self.run_dir(number)).mmar
        if not (mmar / "config").is_dir():
            raise RequestRefused(f"run {number} is not deployed" + (f" at {self.client_name}" if validate else ""))
        if not validate:
            self._refuse_finished(number)
        if self.launcher_error:
            raise RequestRefused(f"start refused: {self.launcher_error}")
        refused = self.policy.code_refusal(custom_code(mmar))  # deployed before the site's policy said no
        if refused is not None:
            raise RequestRefused(f"{'validation' if validate else 'start'} refused: {refused}")
        return mmar

    def _executor_for(self, number: int) -> ClientExecutor:
        """Run N's executor (its own from an earlier start, else the spare, else a new one), now the latest."""
        executor = self._executors.pop(number, None)
        if executor is None:
            spare, self._spare = self._spare, None
            idle = spare is not None and not spare.is_training() and spare not in self._executors.values()
            executor = spare if idle else self.executor_factory(self._on_training_event)
        self._executors[number] = executor
        self._latest = executor
        ended = [n for n, e in self._executors.items() if n != number and not e.is_training()]
        for old in ended[: max(0, len(self._executors) - KEPT_RUNS)]:
            del self._executors[old]
        return executor

    def start_mgpu_client(self, run_number, gpu_number) -> dict[str, Any]:
        """Start training run N with one rank per GPU (torchrun); refused when the site has fewer GPUs.

        A site without GPUs runs that many CPU ranks (gloo), at most one per CPU: for trying DDP anywhere.
        """
        number = _run_number(run_number)
        gpus = _checked(commands.count, gpu_number, "gpu_number")
        launcher = self._latest
        if not launcher.runs_here:  # a cluster's launcher places the ranks and says what they can have
            data = self._start(
                number, lambda executor, args, mmar: executor.start_mgpu_train(self.client, args, mmar, gpus)
            )
            return {**data, "gpus": gpus, "backend": getattr(launcher, "backend", "")}
        capacity = self._capacity()
        have, where = len(capacity.gpus), capacity.gpus_from
        if have and gpus > have:
            raise RequestRefused(
                f"{self.client_name} has {have} GPU{'s' if have != 1 else ''} ({where}); start-mgpu asked for {gpus}"
            )
        cpus = os.cpu_count() or 1
        if not have and gpus > cpus:
            raise RequestRefused(
                f"{self.client_name} has no GPU ({where}) and {cpus} CPUs; start-mgpu {gpus} would run {gpus} CPU ranks"
            )
        if not have and capacity.cpu_slots_declared and gpus > capacity.cpu_slots:
            slots = f"{capacity.cpu_slots} CPU slot{'s' if capacity.cpu_slots != 1 else ''}"
            raise RequestRefused(
                f"{self.client_name} has no GPU ({where}) and {slots} (local/resources.json cpu_slots); "
                f"start-mgpu asked for {gpus}"
            )
        data = self._start(
            number,
            lambda executor, args, mmar: executor.start_mgpu_train(self.client, args, mmar, gpus),
            ranks=gpus,
            capacity=capacity,
        )
        return {**data, "gpus": gpus, "backend": "nccl" if have else "gloo"}

    def abort_client(self) -> dict[str, Any]:
        """Abort every run's training (nothing of it is left afterwards); fine when nothing trains."""
        self._abort_all()
        return {"status": self.training_status()}

    def abort_run(self, run_number: int) -> dict[str, Any]:
        """Abort run N's training only (nothing of it is left afterwards); fine when it does not train."""
        number = _run_number(run_number)
        with self._lock:
            executor = self._executors.get(number)
        if executor is None:
            return {"run_number": number, "status": get_status_message(ClientStatus.TRAINING_NOT_STARTED)}
        try:
            executor.abort_train(self.client)
        except TrainingError as e:  # a cluster that would not cancel its job (scancel retried and failed)
            raise RequestRefused(f"abort failed: {e}") from None
        return {"run_number": number, "status": executor.check_status(self.client)}

    def _abort_all(self, close: bool = False) -> None:
        """Abort every run at once (each abort may wait its grace period), or with `close` close every executor
        (on a restart a cluster's jobs run on instead: the restarted agent takes them up again). RequestRefused
        names the runs whose abort failed."""
        with self._lock:
            executors = list(dict.fromkeys([*self._executors.values(), self._latest]))
        failures: list[str] = []

        def stop(executor: ClientExecutor) -> None:
            try:
                if not close:
                    executor.abort_train(self.client)
                elif self.restart_requested:
                    executor.detach()
                else:
                    executor.close()
            except TrainingError as e:
                failures.append(f"run {executor.run_number}: {e}")

        threads = [threading.Thread(target=stop, args=(e,), name="abort-run", daemon=True) for e in executors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures and not close:
            raise RequestRefused(f"abort failed: {'; '.join(failures)}")

    def delete_run_number(self, num) -> dict[str, Any]:
        """Delete run_N from this site; refused while it trains."""
        number = _run_number(num, missing="delete-run needs a run_number")
        with self._lock:
            try:
                trash = run_folder.set_aside(
                    self.workspace, number, number if number in self._training_runs() else None
                )
            except run_folder.RunFolderError as e:
                raise RequestRefused(str(e)) from None
        run_folder.remove(trash)
        log.info("run %d deleted", number)
        return {"deleted": str(self.run_dir(number))}

    def do_validate(self, req: Message) -> dict[str, Any]:
        """Cross-site validation of run N, already trained, in a worker process (ValidateRequestProcessor)."""
        number = request_args(req, Topic.VALIDATE)["run_number"]
        data = self._start(
            number, lambda executor, args, mmar: executor.start_train(self.client, args, mmar), validate=True
        )
        return {**data, "validating": True}

    # ---- the agent's own life -------------------------------------------------------------------

    def restart_client(self) -> dict[str, Any]:
        """Ask the agent process to abort training and start itself again (refused in a restart loop)."""
        from fedcommon.restart_guard import RestartRefused, check_restart

        try:
            check_restart(self.workspace)
        except RestartRefused as e:
            raise RequestRefused(str(e)) from None
        self.restart_requested = True
        self.exit_requested.set()
        log.info("restart requested by an operator")
        return {"restarting": True}

    def shutdown_client(self) -> dict[str, Any]:
        """Ask the agent process to abort training and exit."""
        self.restart_requested = False
        self.exit_requested.set()
        log.info("shutdown requested by an operator")
        return {"shutting_down": True}

    def wait_training_process_finish(self, timeout: float | None = None) -> bool:
        """Wait until the training process has exited; False on timeout."""
        return self.client_executor.wait_training_process_finish(self.client, timeout)

    def wait_process_complete(self, timeout: float | None = None) -> int:
        """Wait until the training has ended and been cleaned up; returns the final status code."""
        return self.client_executor.wait_process_complete(self.client, timeout)

    def close(self) -> None:
        """Abort every run's training (leaving no process) and send what is left to send."""
        self._abort_all(close=True)
        self._results.close()

    # ---- training events → server ---------------------------------------------------------------

    def _on_training_event(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "exit":
            ended = {
                "run_number": event.get("run_number"),
                "status": get_status_message(event.get("status")),
                "exit_code": event.get("exit_code"),
                "error": event.get("error") or "",
            }
            if event.get("exit_code") == 0 and event.get("run_number") in self._ended:
                self._mark_completed(ended)
            self._results.ended(ended)
            return
        if kind not in ("progress", "round", "epoch", "end", "validation"):
            return
        number = event.get("run_number")
        if kind == "end" and isinstance(number, int):
            with self._lock:
                self._ended.add(number)
        progress = self._executors.get(number, self._latest).progress if isinstance(number, int) else {}
        report = {
            "run_number": event.get("run_number"),
            "round": progress.get("round"),
            "epoch": progress.get("epoch"),
            "loss": progress.get("loss"),
            "metrics": progress.get("metrics") or {},
        }
        if "validation" in progress:
            report["validation"] = progress["validation"]
        if kind == "epoch":  # the curve's point; the forwarder keeps the points of reports it replaces
            report["epochs"] = [[event.get("round"), event.get("epoch"), event.get("loss")]]
        self._results.progress(report)

    def _mark_completed(self, ended: dict[str, Any]) -> None:
        from fedcommon.atomic import atomic_write_json

        try:
            atomic_write_json(run_folder.RunFolder.of(self.workspace, ended["run_number"]).completed, ended)
        except OSError as e:
            log.error("cannot record that run %s completed: %s", ended["run_number"], e)


def _executor_status(executor: ClientExecutor) -> dict[str, Any]:
    """One executor's run: status words and code, run number, latest progress, ranks when several, error."""
    code = executor.status
    data: dict[str, Any] = {
        "status": get_status_message(code),
        "status_code": code,
        "run_number": executor.run_number,
        "progress": dict(executor.progress),
    }
    if executor.ranks > 1:
        data["ranks"] = executor.ranks
    if code == ClientStatus.TRAINING_EXCEPTION and executor.error:
        data["error"] = executor.error
    data.update(executor.status_detail())  # a cluster job's state in the cluster's words ("queued in Slurm: ...")
    return data


def _signature_check(workspace: Path, args: Mapping[str, Any]) -> Callable[[Path], str]:
    """The check of a deploy's fetched archive against the signature its request carries, by this site's own kit
    (its CA, and its CRL when it has one); the check returns the signer. RequestRefused now when the request is
    unsigned or its signer is not trusted here, and from the check when the signature does not match the file."""
    from fedcommon.archive_signature import ArchiveSignature, ArchiveVerifier, SignatureError

    try:
        signature = ArchiveSignature.from_text(args.get("signature"), args.get("signer_certificate"))
        verifier = ArchiveVerifier.of_startup(workspace / "startup")
        verifier.check_signer(signature)
    except SignatureError as e:
        raise RequestRefused(f"deploy refused: {e}") from None

    def check(archive: Path) -> str:
        try:
            return verifier.verify_file(archive, signature).describe()
        except SignatureError as e:
            raise RequestRefused(f"deploy refused: {e}") from None

    return check


def _is_custom_dir(path: Path, workspace: Path) -> bool:
    """Whether path is the custom/ folder of a run's deployed MMAR in workspace."""
    path = path.resolve()
    run = path.parent.parent
    return run.parent == workspace and run_folder.RunFolder(run).mmar / "custom" == path


class ResultForwarder:
    """Sends progress (each run's latest, at most every `interval` seconds) and training_ended to the server, in
    order."""

    def __init__(self, sender, interval: float = PROGRESS_INTERVAL_S):
        self.sender = sender
        self.interval = interval
        self._cond = threading.Condition()
        self._progress: dict[Any, dict[str, Any]] = {}  # by run number
        self._ended: list[dict[str, Any]] = []
        self._closed = False
        self._last = -float("inf")
        self._thread = threading.Thread(target=self._run, name="result-forwarder", daemon=True)
        self._thread.start()

    def progress(self, data: dict[str, Any]) -> None:
        """Queue a progress report; an unsent earlier one of the same run is replaced, but for its epoch points
        ("epochs")."""
        with self._cond:
            earlier = self._progress.pop(data.get("run_number"), None)  # the most recently reported run goes last
            if earlier is not None and earlier.get("epochs"):
                points = earlier["epochs"] + data.get("epochs", [])
                data = {**data, "epochs": points[-MAX_EPOCH_POINTS:]}
            self._progress[data.get("run_number")] = data
            self._cond.notify()

    def ended(self, data: dict[str, Any]) -> None:
        """Queue a training_ended report (sent after any pending progress)."""
        with self._cond:
            self._ended.append(data)
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is pending, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._progress and not self._ended and not self._closed:
                    self._cond.wait()
                if not self._progress and not self._ended:
                    return
                wait = self._last + self.interval - time.monotonic()
                if self._progress and wait > 0 and not self._closed:
                    self._cond.wait(wait)
                    continue
                progress, self._progress = list(self._progress.values()), {}
                ended, self._ended = self._ended, []
            if progress:
                self._last = time.monotonic()
            for data in progress:
                self._send("progress", data)
            for data in ended:
                self._send("training_ended", data)

    def _send(self, topic: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # the Sender logs its own failures
            self.sender.send_result(Message(topic, json.dumps(data)))


# Topics whose run number is the server's current one (set-run): a request without it says so.
_CURRENT_RUN_TOPICS = (Topic.DEPLOY, Topic.START, Topic.START_MGPU, Topic.VALIDATE)


def request_args(req: Message, topic: str) -> dict[str, Any]:
    """A request's arguments, decoded and checked by its command's declaration; RequestRefused names what is wrong."""
    if topic in _CURRENT_RUN_TOPICS and not req.get_header("run_number"):
        raise RequestRefused(NO_RUN_NUMBER)
    return _checked(commands.BY_TOPIC[topic].decode_request, req.headers, req.body)


def _checked(check: Callable[..., Any], *args: Any) -> Any:
    """check(*args), with its ArgumentError refused in the same words."""
    try:
        return check(*args)
    except commands.ArgumentError as e:
        raise RequestRefused(str(e)) from None


def _run_number(value: Any, missing: str = NO_RUN_NUMBER) -> int:
    if value is None:
        raise RequestRefused(missing)
    return _checked(commands.run_number, value)
