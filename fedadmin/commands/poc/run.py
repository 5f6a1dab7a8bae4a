"""`fedadmin poc run MMAR`: a whole local run: fresh kits, start, set-run 1, deploy, start, follow, results, stop."""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import click

from fedadmin.commands import ConsoleOptions, emit
from fedadmin.commands.poc.start import READY_TIMEOUT
from fedadmin.replies import CommandOutcome
from fedcommon.run_folder import RunFolder

MARKER = ".fedlearn-poc"
# Workspaces that scripts/demo.py made before `make demo` became `poc run`: also safe to replace.
OLD_MARKERS = (".fedlearn-demo",)
RUN_NUMBER = 1
SETTLE_TIMEOUT = 30.0


class StepFailed(Exception):
    """A step of the run was refused by a target (exit 1)."""


@dataclass(frozen=True)
class PocRunResult:
    """The run's outcome and its record as the server's `metrics` answers it (per round: sites and their metrics;
    final metrics)."""

    workspace: Path
    ok: bool
    message: str
    record: dict[str, Any]
    summary_path: Path
    stopped: list[dict[str, Any]] = field(default_factory=list)
    kept: bool = False  # --keep: the federation is still running
    command: ClassVar[str] = "poc run"

    def to_json(self) -> dict[str, Any]:
        return {
            "workspace": str(self.workspace),
            "result": self.message,
            "run_number": RUN_NUMBER,
            "status": self.record.get("run_status"),
            "rounds": self.record.get("rounds", []),
            "final_metrics": (self.record.get("final") or {}).get("sites", {}),
            "summary": str(self.summary_path),
            "processes": self.stopped,
            "running": self.kept,
        }

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        from fedadmin import render

        parts: list[Any] = [render.summary_view(self.record)] if self.record.get("rounds") else []
        parts.append(Text(self.message, style="bold green" if self.ok else "bold red"))
        parts.append(Text(f"summary: {self.summary_path}; logs: {self.workspace}/*/log.txt"))
        ws = self.workspace
        prog = _program()
        look = [f"export FEDADMIN_KIT={ws}/admin"]
        look += [] if self.kept else [f"{prog} poc start --workspace {ws}"]
        look += [
            f"{prog} metrics",
            f"{prog} logs site-1 --run {RUN_NUMBER}",
            f"{prog} logs server",
            f"{prog} poc stop --workspace {ws}",
        ]
        head = (
            "The federation is still running; to look around:"
            if self.kept
            else f"To look around (`poc start` brings the same federation back, run {RUN_NUMBER} kept):"
        )
        parts.append(Text(head + "\n" + "\n".join(f"  {line}" for line in look), style="dim"))
        return Group(*parts)


def _program() -> str:
    """How the operator runs this console: `fedadmin` when it is on PATH, else the path they typed."""
    import sys

    typed = sys.argv[0] if sys.argv and sys.argv[0].endswith("fedadmin") else "fedadmin"
    return "fedadmin" if shutil.which("fedadmin") else typed


def fresh_workspace(workspace: Path) -> None:
    """Make workspace empty and marked as ours; refuse (exit 2) a non-empty one this command did not make."""
    from fedadmin import local_federation

    if workspace.exists():
        if not workspace.is_dir():
            raise click.UsageError(f"{workspace} exists and is not a folder; choose another --workspace")
        if any(workspace.iterdir()):
            if not any((workspace / m).exists() for m in (MARKER, *OLD_MARKERS)):
                raise click.UsageError(
                    f"{workspace} is not empty and was not made by `fedadmin poc run`; choose another --workspace"
                )
            if local_federation.running(workspace):
                raise click.UsageError(
                    f"a POC federation from {workspace} is still running: "
                    f"`fedadmin poc stop --workspace {workspace}` first"
                )
            shutil.rmtree(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / MARKER).write_text("made by `fedadmin poc run`; replaced by the next one\n")


def _check(outcome: CommandOutcome, step: str) -> CommandOutcome:
    if not outcome.ok:
        raise StepFailed(f"{step} failed: " + "; ".join(outcome.failures()))
    return outcome


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ignore Ctrl-C while the federation is stopped, so that a second one cannot leave processes behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Rounds:
    """Prints each round once, as it closes (the demo's per-round metrics), from the server's `metrics` answer."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}  # the latest answer; kept when one fails (the run has not started)
        self.shown = 0

    def fetch(self, conn: Any) -> dict[str, Any]:
        outcome = conn.execute("metrics", ["server"], {"run_number": RUN_NUMBER})
        server = outcome.server
        if not outcome.error and server is not None and server.ok:
            self.record = dict(server.data)
        return self.record

    def show_new(self, conn: Any, say: Any) -> None:
        from fedadmin import render

        rounds = self.fetch(conn).get("rounds") or []
        for record in rounds[self.shown :]:
            for line in render.round_lines(record):
                say(line)
        self.shown = max(self.shown, len(rounds))


@click.command("run")
@click.argument("mmar", type=click.Path(exists=True, path_type=Path))
@click.option("--clients", "-n", default=2, show_default=True, type=click.IntRange(min=1), help="Number of sites.")
@click.option(
    "--workspace",
    "-w",
    default=Path("workspace/poc"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for kits, logs and results; replaced if an earlier `poc run` made it.",
)
@click.option(
    "--ready-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=READY_TIMEOUT,
    show_default=True,
    help="Seconds to wait until every site is connected.",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the federation running at the end, to look around with fedadmin; `poc stop` ends it.",
)
@click.pass_obj
def run(options: ConsoleOptions, mmar: Path, clients: int, workspace: Path, ready_timeout: float, keep: bool) -> None:
    """Prepare a fresh local federation, train MMAR on it once, show the results, and stop it (unless --keep)."""
    from fedadmin import local_federation, render
    from fedadmin.run_state import run_status
    from fedadmin.session import Session, poc_start
    from fedadmin.upload import check_mmar
    from fedadmin.watch import RunEnd, display_mode, follow, run_end
    from fedcommon.provision import prepare_poc

    check_mmar(mmar)
    workspace = workspace.resolve()
    fresh_workspace(workspace)
    console = render.terminal(quiet=options.json, highlight=False)

    def say(text: str) -> None:
        console.print(render.shown(text))  # round lines carry the sites' metric names

    fl_port = local_federation.free_port()
    prepare_poc(workspace, clients, "127.0.0.1", fl_port, local_federation.free_port(avoid={fl_port}), "poc", False)
    say(f"poc: kits for server, site-1..site-{clients} and admin in {workspace}")
    rounds = _Rounds()
    mode = display_mode(options.json)
    finished = False
    try:
        kit = poc_start(workspace, ready_timeout).admin_kit
        say(f"poc: server and {clients} sites running, all connected; logs: {workspace}/*/log.txt")
        with Session(kit, options.timeout) as session:
            _check(session.execute("set-run", ["server"], {"run_number": RUN_NUMBER}), "set-run")
            uploaded = session.upload(mmar, show_progress=not options.json)
            _check(session.execute("deploy", ["all"], {"blob_id": uploaded.blob_id}), "deploy")
            say(f"poc: run {RUN_NUMBER} deployed from {mmar} ({uploaded.size} bytes)")
            _check(session.execute("start", ["all"]), "start")
            say(f"poc: run {RUN_NUMBER} started")

            def poll() -> CommandOutcome:
                return session.execute("status", ["all"])

            outcome, _ = follow(
                poll,
                lambda o: run_end(o) is not None or run_status(o) == "completed",
                mode=mode,
                on_poll=lambda _o, note: rounds.show_new(session, note),
                hint="Ctrl-C stops the run and the federation",
            )
            if run_end(outcome) is None:
                # Completed at the server: sites send their metrics on the final model as their workers end.
                outcome, _ = follow(
                    poll, lambda o: run_end(o) is not None, mode="quiet", deadline=time.monotonic() + SETTLE_TIMEOUT
                )
            end = run_end(outcome) or RunEnd(True, f"run {RUN_NUMBER} completed")
            rounds.show_new(session, say)
        finished = True
    finally:
        if not (keep and finished):  # a failure or Ctrl-C stops it even with --keep
            with _uninterrupted():
                stopped = [
                    {"name": s.name, "pid": s.pid, "outcome": s.outcome} for s in local_federation.stop(workspace)
                ]
            say(f"poc: stopped {len(stopped)} processes")
    kept = keep and finished
    summary_path = RunFolder.of(workspace / "server", RUN_NUMBER).summary
    emit(
        options,
        PocRunResult(workspace, end.ok, end.message, rounds.record, summary_path, [] if kept else stopped, kept),
    )
