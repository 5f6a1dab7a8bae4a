"""The training worker: one site's federated training for one MMAR (`python -m fedclient.worker`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedclient.distributed import RankInfo, rank_info
from fedcommon import run_folder

log = logging.getLogger("fedclient.worker")
# SCAFFOLD's delta c_i is computed from the unfiltered local update (x - y) / (K * lr): sent beside a filtered
# update it would give away what the privacy filter protects.
SCAFFOLD_WITH_PRIVACY = (
    "config_fed_client.json: scaffold with a privacy filter is refused: SCAFFOLD's delta c_i "
    "carries the unfiltered local update; turn one of them off"
)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 3
RUN_WAIT_POLL_S = 1.0


class TrainingAborted(BaseException):
    """Raised in the main thread by SIGTERM: unwinds whatever the trainer is doing (not an Exception)."""


class WorkerSetupError(Exception):
    """The kit, the MMAR or one of its components cannot be used; the message names the file and the fault."""


def kit_ssl_args(kit) -> dict[str, str]:
    """The seed's ssl_* client arguments for a startup kit."""
    startup = kit.folder / "startup"
    return {
        "ssl_root_cert": str(startup / "rootCA.pem"),
        "ssl_cert": str(startup / "cert.pem"),
        "ssl_private_key": str(startup / "key.pem"),
    }


class SiteTraining:
    """One site's training of one MMAR: built from the kit and the MMAR, run with run(), stopped with abort().

    `client`: a FederatedClient to train (ThreadExecutor's) instead of one built from the kit; it keeps its servers,
    TLS and filters, and takes the MMAR's trainer and cross-site settings.
    """

    def __init__(
        self,
        workspace: Path,
        mmar_path: Path,
        run_number: int | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        validate_only: bool = False,
        ranks: RankInfo | None = None,
        client=None,
    ):
        from fedcommon.components import ComponentError, build_component
        from fedcommon.kit import KitError, load_kit
        from fedcommon.mmar import MMARError, load_mmar

        try:
            self.kit = load_kit(workspace)
            self.mmar = load_mmar(mmar_path)
        except (KitError, MMARError) as e:
            raise WorkerSetupError(str(e)) from None
        from fedclient.fed_client import FederatedClient

        privacy = None
        if self.mmar.client.scaffold and self.mmar.client.privacy is not None:
            raise WorkerSetupError(SCAFFOLD_WITH_PRIVACY)
        if self.mmar.client.privacy is not None:
            try:
                privacy = build_component(self.mmar.client.privacy, [self.mmar.custom_dir])
            except ComponentError as e:
                raise WorkerSetupError(f"config_fed_client.json: privacy: {e}") from None
        self.workspace = Path(workspace)
        self.run_number = run_number
        self.on_event = on_event
        self._stop = threading.Event()
        self.client = (
            client
            if client is not None
            else FederatedClient(
                self.kit.name,
                kit_ssl_args(self.kit),
                True,
                server_args=[{"name": self.mmar.client.task_name, "target": self.kit.fl_target}],
                exclude_vars=self.mmar.client.exclude_vars,
                privacy=privacy,
                retry_timeout=self.mmar.client.retry_timeout,
                weight_by=self.mmar.client.weight_by,
                on_progress=on_event,
            )
        )
        if client is not None and on_event is not None:
            own = client.on_progress

            def progress(event: dict[str, Any]) -> None:
                if own is not None:
                    own(event)
                on_event(event)

            client.on_progress = progress
        self.client.register_run = run_number or 0  # the server keeps this run's session apart from others
        self.client.cross_site_validate = self.mmar.client.cross_site_validate
        self.client.is_participating = self.mmar.client.is_participating
        self.client.cross_site_validation_timeout = self.mmar.client.cross_site_validation_timeout
        if validate_only and run_number is None:
            raise WorkerSetupError("cross-site validation needs the run number (--run-number)")
        self.validate_only = validate_only
        self.ranks = ranks or RankInfo()
        if self.ranks.distributed and (validate_only or run_number is None):
            raise WorkerSetupError("several ranks train one given run (--run-number); validation runs on one")

    @property
    def aborted(self) -> bool:
        """Whether abort() was called."""
        return self._stop.is_set()

    def abort(self) -> None:
        """Stop waiting for the run, or stop training after the current step."""
        self._stop.set()
        self.client.abort()

    def run(self) -> None:
        """Register, wait for the run (run_number, or any), build the trainer and train until the run ends.

        Under torchrun with several ranks, rank 0 does that and the other ranks train in step with it.
        """
        if self.validate_only:
            self._validate_only()
            return
        sync = None
        if self.ranks.distributed:
            from fedclient.distributed import RankSync

            sync = RankSync(self.ranks)  # waits until every rank has joined
        try:
            if not self.ranks.is_main:
                self._follow(sync)
                return
            self._train(sync)
        except Exception as e:
            if sync is not None and self.on_event is not None:
                # Before leaving the group, which makes the other ranks fail too: the cause is reported first.
                from fedclient.client_status import ClientStatus

                self.on_event(
                    {
                        "kind": "status",
                        "status": ClientStatus.TRAINING_EXCEPTION,
                        "error": failure_message(e, self.validate_only, self.kit.name, self.run_number),
                    }
                )
            raise
        finally:
            if sync is not None:
                sync.close()

    def _follow(self, sync) -> None:
        """A rank other than 0: build the trainer and train each phase rank 0 starts; never talks to the server."""
        run_dir = run_folder.run_dir(self.workspace, self.run_number)
        sync.follow(self._build_fitter(run_dir), self._site_algorithms(run_dir))

    def _train(self, sync) -> None:
        from fedclient.client_status import ClientStatus

        client, mmar = self.client, self.mmar
        try:
            client.register()
            fitter = None
            if self.run_number is not None:
                # The run is known: build the trainer (torch, the data) while the server prepares the run,
                # not after it.
                fitter = self._build_fitter(self._prepare_run_dir(self.run_number))
                warm_torch_optim()
            self._wait_for_run()
            if self.aborted:
                client.close()
                return
            if mmar.client.heartbeat_interval:
                client.heartbeat_interval = mmar.client.heartbeat_interval
            run_dir = self._prepare_run_dir(client.run_number)
            client.run_dir = run_dir
            if fitter is None:
                fitter = self._build_fitter(run_dir)
            update_client_properties(client, fitter)
            client.ranks = sync
            client.site_algorithms = self._site_algorithms(run_dir)
        except BaseException:
            client.close()
            raise
        if self.on_event is not None:
            self.on_event({"kind": "status", "status": ClientStatus.TRAINING_STARTED, "run_number": client.run_number})
        client.admin_run(fitter)

    def _prepare_run_dir(self, run_number: int) -> Path:
        run_dir = run_folder.run_dir(self.workspace, run_number)
        run_folder.RunFolder(run_dir).models.mkdir(parents=True, exist_ok=True)  # a site starting to train makes it
        return run_dir

    def _site_algorithms(self, run_dir: Path):
        """FedProx / SCAFFOLD as config_fed_client.json says, or None when it turns on neither."""
        from fedclient.site_algorithms import SiteAlgorithms

        algorithms = SiteAlgorithms.from_config(self.mmar.client, run_dir)
        if algorithms.active:
            log.info("%s: run %s: site algorithms %s", self.kit.name, run_dir.name, ", ".join(algorithms.names))
        return algorithms if algorithms.active else None

    def _build_fitter(self, run_dir: Path):
        """The MMAR's trainer for run_dir, built after seeding torch with config_train.json's seed."""
        import torch

        from fedcommon.components import ComponentError, build_component

        torch.manual_seed(self.mmar.train.seed)
        try:
            return build_component(
                self.mmar.train.trainer, [self.mmar.custom_dir], site_name=self.kit.name, run_dir=str(run_dir)
            )
        except ComponentError as e:
            raise WorkerSetupError(f"config_train.json: trainer: {e}") from None

    def _validate_only(self) -> None:
        """Cross-site validation of run N, already trained: share its best local model, validate the others."""
        from fedclient.client_status import ClientStatus

        client, number = self.client, self.run_number
        assert number is not None
        run_dir = run_folder.run_dir(self.workspace, number)
        client.run_dir = run_dir
        try:
            update_client_properties(client, self._build_fitter(run_dir))
            if client.is_participating and not client.model_manager.load_best_model(client.best_model_path):
                log.warning(
                    "%s: run %d left no best local model (%s); validating the others only",
                    self.kit.name,
                    number,
                    client.best_model_path,
                )
                client.is_participating = False
            client.register()
            client.start_heartbeat()
            if self.on_event is not None:
                self.on_event({"kind": "status", "status": ClientStatus.TRAINING_STARTED, "run_number": number})
            results = client.run_cross_site_validation(number)
            log.info(
                "%s: cross-site validation of run %d: validated %s",
                self.kit.name,
                number,
                ", ".join(sorted(results)) or "nothing new",
            )
        finally:
            client.close()

    def _wait_for_run(self) -> None:
        client, wanted = self.client, self.run_number
        told = False
        while not self.aborted and (client.run_number == 0 if wanted is None else client.run_number != wanted):
            if not told:
                log.info(
                    "waiting for the server to start run %s (the server's run: %s)",
                    wanted or "",
                    client.run_number or "none",
                )
                told = True
            self._stop.wait(RUN_WAIT_POLL_S)
            client.heartbeat()


def update_client_properties(client, trainer, cross_site_val_conf=None) -> None:
    """Attach the trainer (the "fitter") and the cross-site validation settings to a FederatedClient."""
    client.model_manager.set_fitter(trainer)
    if cross_site_val_conf is not None:
        client.cross_site_val_conf = cross_site_val_conf
        client.cross_site_validate = True


def failure_message(e: Exception, validating: bool = False, site: str = "SITE", run_number: int | None = None) -> str:
    """How a failed training (or cross-site validation) is reported to the agent."""
    if isinstance(e, WorkerSetupError):
        return str(e)
    what = "cross-site validation failed" if validating else "training failed"
    run = run_number if run_number is not None else "N"
    return f"{what}: {e} ({_raised_where(e)}; traceback: `fedadmin logs {site} --run {run} --level error`)"


def _raised_where(e: BaseException) -> str:
    """ "ValueError at trainer.py:42, in train": the exception's type and the last frame of its traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return type(e).__name__
    last = frames[-1]
    return f"{type(e).__name__} at {Path(last.filename).name}:{last.lineno}, in {last.name}"


def run_worker(
    workspace: Path,
    mmar_path: Path,
    debug: bool = False,
    run_number: int | None = None,
    parent: str | None = None,
    validate_only: bool = False,
    events: Path | None = None,
) -> int:
    """Train this site in the run the server offers (or run `run_number`) until it ends; returns the exit code.

    With `parent` (HOST:PORT of the agent that started it) the worker reports status and progress there,
    obeys its abort, and exits when the agent goes away. With `events` (a folder: a cluster job's) it appends them
    to events-RANK.jsonl there instead, and outlives the agent; the cluster's cancel is its abort (SIGTERM).
    """
    from fedclient.client_status import ClientStatus
    from fedclient.executor_channel import connect_parent, send_event, start_command_listener
    from fedcommon.logging_config import LoggingConfigError
    from fedcommon.logs import configure_logging

    parent_pid = os.getppid()
    try:
        ranks = rank_info()
    except ValueError as e:
        print(f"fedclient.worker: {e}", file=sys.stderr)
        return EXIT_CONFIG
    # Under an agent, stderr goes through the agent to run_N/logs/worker.log; standalone, the site's log.txt.
    try:
        configure_logging(
            None if parent or events else workspace / "log.txt",
            debug,
            f"rank {ranks.rank}" if ranks.distributed else "",
            role="worker",
            local=workspace / "local",
            own_file_config=not (parent or events),  # under an agent, stderr is the log: the agent writes worker.log
        )
    except LoggingConfigError as e:
        print(f"fedclient.worker: {e}", file=sys.stderr)
        return EXIT_CONFIG
    conn: Any = None  # the agent's Connection, or an EventFile
    if events is not None:
        conn = EventFile(events / f"events-{ranks.rank}.jsonl")
    elif parent:
        try:
            conn = connect_parent(parent)
        except Exception as e:  # bad address, refused, or authentication failed
            log.error("cannot connect to the agent at %s: %s", parent, e)
            return EXIT_CONFIG
    lock = threading.Lock()

    def report(event: dict[str, Any]) -> None:
        if conn is None:
            return
        if ranks.distributed:
            # Progress and status come from rank 0; the other ranks report only what went wrong.
            if not ranks.is_main and not event.get("error"):
                return
            event = {**event, "rank": ranks.rank}
        try:
            with lock:
                send_event(conn, **event)
        except (OSError, ValueError) as e:
            log.debug("cannot report %s to the agent: %s", event.get("kind"), e)

    report({"kind": "status", "status": ClientStatus.TRAINING_STARTING})
    try:
        training = SiteTraining(
            workspace, mmar_path, run_number, on_event=report, validate_only=validate_only, ranks=ranks
        )
    except WorkerSetupError as e:
        log.error("%s", e)
        report({"kind": "status", "status": ClientStatus.TRAINING_EXCEPTION, "error": str(e)})
        return EXIT_CONFIG
    if conn is not None and events is None:
        start_command_listener(training, conn, parent_pid)

    def on_sigterm(*_) -> None:
        training.abort()
        raise TrainingAborted  # interrupts a long local training phase at once

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        training.run()
    except TrainingAborted:
        log.info("%s: training aborted (SIGTERM)", training.kit.name)
        training.client.close()
        logging.shutdown()
        # skip the interpreter's slow teardown of torch: an abort should leave within a second
        os._exit(EXIT_OK)
    except WorkerSetupError as e:
        log.error("%s", e)
        report({"kind": "status", "status": ClientStatus.TRAINING_EXCEPTION, "error": str(e)})
        return EXIT_CONFIG
    except Exception as e:
        log.error("training failed: %s", e, exc_info=True)  # the traceback is what `fedadmin logs` shows
        report(
            {
                "kind": "status",
                "status": ClientStatus.TRAINING_EXCEPTION,
                "error": failure_message(e, validate_only, training.kit.name, run_number),
            }
        )
        return EXIT_FAILED
    name, number = training.kit.name, training.client.run_number
    log.info("%s: run %s %s", name, number or run_number, "aborted" if training.aborted else "finished")
    return EXIT_OK


class EventFile:
    """A cluster job's side of the channel: events appended as JSON lines to a file the agent follows."""

    def __init__(self, path: Path):
        self.path = path
        run_folder.make_folders(path.parent)

    def send_bytes(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data + b"\n")
        finally:
            os.close(fd)


def warm_torch_optim() -> None:
    """Import what torch.optim's first optimizer imports (torch._dynamo: about 1.5 s on 2 cores) while the worker
    waits for its run, instead of in round 0."""
    try:
        import torch._dynamo  # noqa: F401
    except Exception as e:  # a torch without it: the trainer meets the same at its first optimizer
        log.debug("torch._dynamo not imported ahead: %s", e)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workspace", type=Path, required=True, help="the site's participant folder")
    parser.add_argument("--mmar", type=Path, required=True)
    parser.add_argument(
        "--run-number", type=int, default=None, help="train only this run (its folder is <workspace>/run_N)"
    )
    parser.add_argument(
        "--parent",
        default=None,
        help="HOST:PORT of the agent that started this worker (its key: see FEDLEARN_PARENT_KEY_FROM)",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="cross-site validation of run --run-number, already trained, instead of training",
    )
    parser.add_argument(
        "--events", type=Path, default=None, help="folder to append events to (a cluster job's channel to the agent)"
    )
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.run_number is not None and args.run_number < 1:
        parser.error("--run-number must be >= 1")
    if args.validate and args.run_number is None:
        parser.error("--validate needs --run-number")
    if args.events is not None and args.parent is not None:
        parser.error("--events and --parent are two channels to the agent: give one")
    sys.exit(
        run_worker(args.workspace, args.mmar, args.debug, args.run_number, args.parent, args.validate, args.events)
    )


if __name__ == "__main__":
    main()
