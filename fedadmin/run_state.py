"""What a `status` outcome says about the current run: its number and status, each site's progress and failure."""

from __future__ import annotations

from typing import Any

from fedcommon.commands import ClientStatus, get_status_message
from fedcommon.outcome import CommandOutcome, TargetReply

EXCEPTION_STATUS = get_status_message(ClientStatus.TRAINING_EXCEPTION)
# The codes of a site that is starting or training.
TRAINING_CODES = (ClientStatus.TRAINING_STARTING, ClientStatus.TRAINING_STARTED)


def run_number(outcome: CommandOutcome) -> int | None:
    """The server's current run number in a status outcome."""
    server = outcome.server
    return server.data.get("run_number") if server is not None and server.ok else None


def run_status(outcome: CommandOutcome) -> str | None:
    """The server's run_status ("none", "deployed", "training", "completed", "aborted") in a status outcome."""
    server = outcome.server
    return server.data.get("run_status") if server is not None and server.ok else None


def _server_record(outcome: CommandOutcome, key: str, site: str) -> dict[str, Any]:
    """What the server keeps about a site under key ("site_progress", "training_ended") for the current run."""
    server = outcome.server
    if server is None or not server.ok:
        return {}
    record = (server.data.get(key) or {}).get(site)
    if not isinstance(record, dict) or record.get("run_number") not in (None, server.data.get("run_number")):
        return {}
    return record


def site_progress(outcome: CommandOutcome, site: TargetReply) -> dict[str, Any]:
    """A site's latest progress (round, epoch, loss, metrics): from its own reply, else the server's record."""
    own = site.data.get("progress") if site.ok else None
    return own if isinstance(own, dict) and own else _server_record(outcome, "site_progress", site.target)


def site_failure(outcome: CommandOutcome, site: TargetReply) -> str | None:
    """Why a site's training failed in the current run ("training exception: ..."), or None."""
    data = site.data if site.ok else {}
    ended = _server_record(outcome, "training_ended", site.target)
    failed = data.get("status") == EXCEPTION_STATUS or data.get("status_code") == ClientStatus.TRAINING_EXCEPTION
    if failed and data.get("run_number") not in (None, run_number(outcome)):
        failed = False
    if not failed and ended.get("status") != EXCEPTION_STATUS:
        return None
    detail = data.get("error") or ended.get("error")
    return f"{EXCEPTION_STATUS}: {detail}" if detail else EXCEPTION_STATUS


def training_sites(outcome: CommandOutcome) -> list[str]:
    """The sites whose own reply says they are starting or training the current run."""
    number = run_number(outcome)
    return [
        s.target
        for s in outcome.sites
        if s.ok and s.data.get("status_code") in TRAINING_CODES and s.data.get("run_number") == number
    ]


def stalled(outcome: CommandOutcome) -> dict[str, str] | None:
    """{site: error} when every site that started the current run failed and none trains it; else None.

    The server says so (`stalled`: none is left in its training plane); a site whose own reply says it is starting
    the run (a worker that has not registered yet) means the run is not lost.
    """
    server = outcome.server
    if server is None or not server.ok or not server.data.get("stalled") or training_sites(outcome):
        return None
    failed = server.data.get("failed_sites")
    return {str(k): str(v) for k, v in failed.items()} if isinstance(failed, dict) and failed else None


def traceback_hint(site: str, run: int | None, error: str) -> str:
    """The command that shows a failed site's traceback, unless its error names it already."""
    command = f"fedadmin logs {site} --run {run if run is not None else 'N'} --level error"
    return "" if "fedadmin logs" in error else f"; traceback: `{command}`"


def awaited(outcome: CommandOutcome) -> str | None:
    """What the current run is waiting for, in words (with the operator's command where one is needed); or None.

    A site trains a run the server has not started; a training run has fewer sites than min_num_clients; the server
    completed the run but sites still run their part of it.
    """
    server = outcome.server
    if server is None or not server.ok or run_number(outcome) is None:
        return None
    number, status, data = run_number(outcome), run_status(outcome), server.data
    training = training_sites(outcome)
    if status in ("none", "deployed") and training:
        return f"server has not started run {number}: fedadmin start server"
    if status == "training" and isinstance(data.get("min_num_clients"), int):
        started = training if outcome.sites else list(data.get("registered_sites") or [])
        needed = data["min_num_clients"]
        if len(started) < needed:
            idle = [s.target for s in outcome.sites if s.ok and s.target not in training]
            text = (
                f"run {number} needs min_num_clients={needed}, {len(started)} site"
                f"{'' if len(started) == 1 else 's'} started"
            )
            return text + (f": fedadmin start {' '.join(idle)}" if idle else "")
    if status == "completed" and training:
        return f"run {number} completed at the server; {', '.join(training)} still finishing"
    return None


def failed_run_message(outcome: CommandOutcome) -> str | None:
    """ "run 1 failed at every site that started it: ..." with each site's error and next steps, or None."""
    lost = stalled(outcome)
    if not lost:
        return None
    run = run_number(outcome)
    errors = "; ".join(f"{site}: {error}{traceback_hint(site, run, error)}" for site, error in lost.items())
    return (
        f"run {run} failed at every site that started it: {errors}; the server still counts it as training: "
        "end it with `fedadmin abort server`"
    )
