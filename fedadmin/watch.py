"""Follow a run by polling `status` about once a second: a live view on a terminal, changed lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedadmin.run_state import (
    failed_run_message,
    run_number,
    run_status,
    site_failure,
    traceback_hint,
    training_sites,
)
from fedcommon.outcome import CommandOutcome, TargetReply

POLL_INTERVAL = 1.0

Printer = Callable[[str], None]


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: completed (ok), aborted, or a site's training exception."""

    ok: bool
    message: str


def run_end(outcome: CommandOutcome) -> RunEnd | None:
    """The end of the current run as a status outcome shows it, or None while it goes on.

    A run completed at the server ends once no site that replied is still starting or training it (its workers
    send their final metrics and leave); a run whose every site failed ends although the server still trains it.
    """
    run = run_number(outcome)
    status = run_status(outcome)
    if status == "completed":
        return None if training_sites(outcome) else RunEnd(True, f"run {run} completed")
    if status == "aborted":
        return RunEnd(False, f"run {run} was aborted")
    lost = failed_run_message(outcome)
    if lost:
        return RunEnd(False, lost)
    server = outcome.server
    ended = (server.data.get("training_ended") or {}) if server is not None and server.ok else {}
    names = [s.target for s in outcome.sites] + [n for n in ended if outcome.reply(n) is None]
    for name in names:
        failure = site_failure(outcome, outcome.reply(name) or TargetReply(name, False))
        if failure:
            return RunEnd(False, f"{name}: {failure} in run {run}{traceback_hint(name, run, failure)}")
    return None


def display_mode(as_json: bool) -> str:
    """ "quiet" under --json, "live" on a terminal, "lines" (plain text) otherwise."""
    if as_json:
        return "quiet"
    return "live" if sys.stdout.isatty() else "lines"


def follow(
    poll: Callable[[], CommandOutcome],
    stop: Callable[[CommandOutcome], bool],
    *,
    mode: str,
    deadline: float | None = None,
    on_poll: Callable[[CommandOutcome, Printer], None] | None = None,
    interval: float = POLL_INTERVAL,
    hint: str = "Ctrl-C stops watching",
) -> tuple[CommandOutcome, bool]:
    """Poll until stop(outcome) or the monotonic deadline; returns the last outcome and whether stop held.

    mode "live" redraws a status view in place (with hint below it), "lines" prints each participant's
    line when it changes, "quiet" prints nothing; on_poll may print notes (above the live view).
    """
    if mode == "live":
        return _follow_live(poll, stop, deadline, on_poll, interval, hint)
    shown: dict[str, str] = {}

    def show_changes(outcome: CommandOutcome) -> None:
        from fedadmin import render

        for line in render.progress_lines(render.shown(outcome)):
            who = line.split(":", 1)[0]
            if shown.get(who) != line:
                print(line, flush=True)
                shown[who] = line

    def note(text: str) -> None:
        if mode != "quiet":
            from fedadmin import render

            print(render.shown(text), flush=True)

    while True:
        started = time.monotonic()
        outcome = poll()
        if mode == "lines":
            show_changes(outcome)
        if on_poll is not None:
            on_poll(outcome, note)
        if stop(outcome):
            return outcome, True
        if deadline is not None and time.monotonic() >= deadline:
            return outcome, False
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def _follow_live(
    poll: Callable[[], CommandOutcome],
    stop: Callable[[CommandOutcome], bool],
    deadline: float | None,
    on_poll: Callable[[CommandOutcome, Printer], None] | None,
    interval: float,
    hint: str,
) -> tuple[CommandOutcome, bool]:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from fedadmin import render

    console = render.terminal()
    with Live(Text("asking the server…"), console=console, refresh_per_second=4) as live:
        while True:
            started = time.monotonic()
            outcome = poll()
            footer = Text(f"updated {time.strftime('%H:%M:%S')} · {hint}", style="dim")
            live.update(Group(render.status_view(render.shown(outcome)), footer))
            if on_poll is not None:
                on_poll(outcome, lambda text: live.console.print(Text(render.shown(text))))
            if stop(outcome):
                return outcome, True
            if deadline is not None and time.monotonic() >= deadline:
                return outcome, False
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
