"""What a site does for each admin request: deploy, start, abort, status, delete a run, restart, shut down."""

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

from fedclient.client_executor import ProcessExecutor, TrainArgs, TrainingError
from fedclient.launchers import LauncherConfigError, make_executor
from fedclient.local_policy import LocalPolicy
from fedcommon import commands, run_folder
from fedcommon.admin_defs import Message
from fedcommon.commands import ClientStatus, Topic, get_status_message
from fedcommon.deployed_code import custom_code

log = logging.getLogger(__name__)

NO_RUN_NUMBER = "no run number set: run `fedadmin set-run N` first"
PROGRESS_INTERVAL_S = 0.5
FINISHING_WAIT_S = 15.0


class RequestRefused(Exception):
    """A request the site refuses; the message is what the operator reads."""


class ClientAdminInterface:
    """The site's side of every admin command; the processors' app_ctx. One training at a time, in a worker process."""

    def __init__(
        self, client, client_name: str, sender, args, rank: int, workers: int = 5, policy: LocalPolicy | None = None
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
        # The site's local/launcher.json chooses where training runs; a broken one refuses every start.
        self.launcher_error = ""
        try:
            self.client_executor = make_executor(self.workspace, self._on_training_event)
        except LauncherConfigError as e:
            self.launcher_error = str(e)
            log.error("%s; every start will be refused until it is fixed", e)
            self.client_executor = ProcessExecutor(on_event=self._on_training_event)
        self.exit_requested = threading.Event()
        self.restart_requested = False
        self._lock = threading.RLock()  # start, deploy's install and delete-run see one state
        self._results = ResultForwarder(sender, PROGRESS_INTERVAL_S)
        self._run_ended: int | None = None
        self.client_executor.resume()

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

    def _training_run(self) -> int | None:
        return self.client_executor.run_number if self.client_executor.is_training() else None

    # ---- status ---------------------------------------------------------------------------------

    def training_status(self) -> str:
        """The training status in words ("training started", ...)."""
        return self.client_executor.check_status(self.client)

    def client_status(self) -> dict[str, Any]:
        """The contract's site status: status words and code, run number, latest progress (and error)."""
        executor = self.client_executor
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
        data.update(executor.status_detail())
        return data

    # ---- runs -----------------------------------------------------------------------------------

    def deploy_mmar(self, data: Mapping[str, str]) -> dict[str, Any]:
        """Fetch the deployed zip the request names, check and extract it into run_N/mmar."""
        from fedcommon.mmar import MMARError, load_mmar
        from fedcommon.safe_zip import UnsafeArchiveError, extract_zip_safely

        checked = _checked(commands.BY_TOPIC[Topic.DEPLOY].check_site_args, data)
        number, blob_id, sha256, size = (checked[k] for k in ("run_number", "blob_id", "sha256", "size"))
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
        log.info("run %d deployed to %s", number, target)
        return {"run_number": number, "path": str(target)}

    def _check_deployed(self, root: Path, load_mmar: Callable[[Path], object]) -> None:
        """Refuse what this site will not install: code its local policy refuses, an MMAR that is not valid."""
        refused = self.policy.code_refusal(custom_code(root))
        if refused is not None:
            raise RequestRefused(f"deploy refused: {refused}")
        load_mmar(root)

    def _refuse_deploy_while_training(self, number: int) -> None:
        if self._training_run() == number:
            raise RequestRefused(f"run {number} is training; abort it before deploying again")

    def _refuse_finished(self, number: int) -> None:
        # Written when this site's worker saw the server end run N: finished results are not overwritten.
        if run_folder.RunFolder(self.run_dir(number)).completed.exists():
            raise RequestRefused(run_folder.already_ran(number, "completed"))

    def start_client(self, run_number) -> dict[str, Any]:
        """Start training run N from run_N/mmar; refused when not deployed or already training."""
        number = _run_number(run_number)
        return self._start(number, lambda args, mmar: self.client_executor.start_train(self.client, args, mmar))

    def _let_finishing_run_end(self) -> None:
        active = self._training_run()
        if active is not None and self._run_ended == active:
            # The server has ended that run and its worker is on its way out: wait for it rather than refuse.
            self.client_executor.wait_training_process_finish(self.client, FINISHING_WAIT_S)

    def _start(self, number: int, launch, validate: bool = False) -> dict[str, Any]:
        """Launch a worker for run N (training, or with `validate` cross-site validation of the finished run)."""
        self._let_finishing_run_end()
        with self._lock:
            active = self._training_run()
            if active is not None and validate:
                raise RequestRefused(f"run {active} is training; cross-site validation waits until it ends")
            if active == number:
                raise RequestRefused(f"run {number} is already training")
            if active is not None:
                raise RequestRefused(f"run {active} is training; abort it first")
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
            self._run_ended = None
            try:
                pid = launch(TrainArgs(self.workspace, number, self.debug, validate=validate), mmar)
            except TrainingError as e:
                raise RequestRefused(str(e)) from None
        return {"run_number": number, "pid": pid}

    def start_mgpu_client(self, run_number, gpu_number) -> dict[str, Any]:
        """Start training run N with one rank per GPU (torchrun); refused when the site has fewer GPUs.

        A site without GPUs runs that many CPU ranks (gloo), at most one per CPU: for trying DDP anywhere.
        """
        number = _run_number(run_number)
        gpus = _checked(commands.count, gpu_number, "gpu_number")
        executor = self.client_executor
        if not executor.runs_here:  # a cluster's launcher places the ranks and says what they can have
            data = self._start(number, lambda args, mmar: executor.start_mgpu_train(self.client, args, mmar, gpus))
            return {**data, "gpus": gpus, "backend": getattr(executor, "backend", "")}
        have, where = available_gpus()
        if have and gpus > have:
            raise RequestRefused(
                f"{self.client_name} has {have} GPU{'s' if have != 1 else ''} ({where}); start-mgpu asked for {gpus}"
            )
        cpus = os.cpu_count() or 1
        if not have and gpus > cpus:
            raise RequestRefused(
                f"{self.client_name} has no GPU ({where}) and {cpus} CPUs; start-mgpu {gpus} would run {gpus} CPU ranks"
            )
        data = self._start(
            number, lambda args, mmar: self.client_executor.start_mgpu_train(self.client, args, mmar, gpus)
        )
        return {**data, "gpus": gpus, "backend": "nccl" if have else "gloo"}

    def abort_client(self) -> dict[str, Any]:
        """Abort the training (nothing of it is left afterwards); fine when nothing trains."""
        try:
            self.client_executor.abort_train(self.client)
        except TrainingError as e:
            raise RequestRefused(f"abort failed: {e}") from None
        return {"status": self.training_status()}

    def delete_run_number(self, num) -> dict[str, Any]:
        """Delete run_N from this site; refused while it trains."""
        number = _run_number(num, missing="delete-run needs a run_number")
        with self._lock:
            try:
                trash = run_folder.set_aside(self.workspace, number, self._training_run())
            except run_folder.RunFolderError as e:
                raise RequestRefused(str(e)) from None
        run_folder.remove(trash)
        log.info("run %d deleted", number)
        return {"deleted": str(self.run_dir(number))}

    def do_validate(self, req: Message) -> dict[str, Any]:
        """Cross-site validation of run N, already trained, in a worker process (ValidateRequestProcessor)."""
        number = request_args(req, Topic.VALIDATE)["run_number"]
        data = self._start(
            number, lambda args, mmar: self.client_executor.start_train(self.client, args, mmar), validate=True
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
        """Abort any training (leaving no process) and send what is left to send; on a restart a cluster's job runs
        on, and the restarted agent takes it up again."""
        if self.restart_requested:
            self.client_executor.detach()
        else:
            self.client_executor.close()
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
            if event.get("exit_code") == 0 and self._run_ended == event.get("run_number"):
                self._mark_completed(ended)
            self._results.ended(ended)
            return
        if kind not in ("progress", "round", "epoch", "end", "validation"):
            return
        if kind == "end":
            self._run_ended = event.get("run_number")
        progress = self.client_executor.progress
        report = {
            "run_number": event.get("run_number"),
            "round": progress.get("round"),
            "epoch": progress.get("epoch"),
            "loss": progress.get("loss"),
            "metrics": progress.get("metrics") or {},
        }
        if "validation" in progress:
            report["validation"] = progress["validation"]
        self._results.progress(report)

    def _mark_completed(self, ended: dict[str, Any]) -> None:
        from fedcommon.atomic import atomic_write_json

        try:
            atomic_write_json(run_folder.RunFolder.of(self.workspace, ended["run_number"]).completed, ended)
        except OSError as e:
            log.error("cannot record that run %s completed: %s", ended["run_number"], e)


def _is_custom_dir(path: Path, workspace: Path) -> bool:
    """Whether path is the custom/ folder of a run's deployed MMAR in workspace."""
    path = path.resolve()
    run = path.parent.parent
    return run.parent == workspace and run_folder.RunFolder(run).mmar / "custom" == path


class ResultForwarder:
    """Sends progress (the latest, at most every `interval` seconds) and training_ended to the server, in order."""

    def __init__(self, sender, interval: float = PROGRESS_INTERVAL_S):
        self.sender = sender
        self.interval = interval
        self._cond = threading.Condition()
        self._progress: dict[str, Any] | None = None
        self._ended: list[dict[str, Any]] = []
        self._closed = False
        self._last = -float("inf")
        self._thread = threading.Thread(target=self._run, name="result-forwarder", daemon=True)
        self._thread.start()

    def progress(self, data: dict[str, Any]) -> None:
        """Queue a progress report; an unsent earlier one is replaced."""
        with self._cond:
            self._progress = data
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
                while self._progress is None and not self._ended and not self._closed:
                    self._cond.wait()
                if self._progress is None and not self._ended:
                    return
                wait = self._last + self.interval - time.monotonic()
                if self._progress is not None and wait > 0 and not self._closed:
                    self._cond.wait(wait)
                    continue
                progress, self._progress = self._progress, None
                ended, self._ended = self._ended, []
            if progress is not None:
                self._last = time.monotonic()
                self._send("progress", progress)
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


def available_gpus(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """How many GPUs training here may use, and where that count comes from (CUDA_VISIBLE_DEVICES respected)."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # CUDA stops at the first invalid entry ("-1" hides every GPU).
        ids = []
        for item in visible.split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break
            ids.append(item)
        return len(ids), f"CUDA_VISIBLE_DEVICES={visible!r}"
    from fedcommon.sysinfo import gpu_info

    return len(gpu_info()), "nvidia-smi"
