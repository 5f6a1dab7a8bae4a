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

