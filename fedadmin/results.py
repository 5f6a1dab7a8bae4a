"""The typed records a Session returns: small frozen dataclasses over the server's answers.

Each keeps the command's `outcome` (fedcommon.outcome: every target's TargetReply) and, where the record does
not model everything, the raw `data` with `to_json()`; the console renders these outcomes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcommon.outcome import CommandOutcome, TargetReply

if TYPE_CHECKING:
    from fedadmin.local_federation import ProcessRecord

# A command whose answer is one reply per target is returned as its outcome.
Replies = CommandOutcome

__all__ = [
    "Deployed",
    "Downloaded",
    "Job",
    "JobList",
    "LogLines",
    "Metrics",
    "PocKits",
    "PocRunning",
    "Replies",
    "RunEnded",
    "ShellOutput",
    "SiteStatus",
    "Status",
    "TargetReply",
    "Validation",
]


def _server_data(outcome: CommandOutcome) -> dict[str, Any]:
    server = outcome.server
    return dict(server.data) if server is not None and server.ok else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


@dataclass(frozen=True)
class SiteStatus:
    """One site's answer to status: its training status (the seed's words and code), run and latest progress."""

    name: str
    ok: bool
    status: str = ""
    status_code: int | None = None
    run_number: int | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @classmethod
    def from_reply(cls, reply: TargetReply, progress: dict[str, Any]) -> SiteStatus:
        """The record of a site's reply; progress as fedadmin.run_state.site_progress found it."""
        data = reply.data if reply.ok else {}
        return cls(
            reply.target,
            reply.ok,
            str(data.get("status") or ""),
            _int(data.get("status_code")),
            _int(data.get("run_number")),
            progress,
            reply.error if not reply.ok else str(data.get("error") or ""),
        )


@dataclass(frozen=True)
class Status:
    """The federation as status shows it: the server's current run, its status, and every site that replied."""

    run_number: int | None
    run_status: str | None
    sites: tuple[SiteStatus, ...]
    connected_sites: tuple[str, ...]
    awaiting: str | None
    outcome: CommandOutcome

    @classmethod
    def from_outcome(cls, outcome: CommandOutcome) -> Status:
        from fedadmin.run_state import awaited, run_number, run_status, site_progress

        connected = _server_data(outcome).get("connected_sites")
        return cls(
            run_number(outcome),
            run_status(outcome),
            tuple(SiteStatus.from_reply(r, site_progress(outcome, r)) for r in outcome.sites),
            tuple(s for s in connected if isinstance(s, str)) if isinstance(connected, list) else (),
            awaited(outcome),
            outcome,
        )

    @property
    def data(self) -> dict[str, Any]:
        """The server's own status data (rounds, min_num_clients, registered_sites, ...)."""
        return _server_data(self.outcome)

    def site(self, name: str) -> SiteStatus | None:
        """The status of one site, or None when it did not reply."""
        return next((s for s in self.sites if s.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {"replies": [r.to_json() for r in self.outcome.replies]}


@dataclass(frozen=True)
class RunEnded:
    """How a wait for the current run ended: completed (ok), aborted, or a site's failure; the last status."""

    ok: bool
    message: str
    status: Status


@dataclass(frozen=True)
class Deployed:
    """An MMAR uploaded (under blob_id) and deployed: every target's reply."""

    blob_id: str
    size: int
    outcome: CommandOutcome


@dataclass(frozen=True)
class ShellOutput:
    """A shell command's output at one participant."""

    target: str
    exit_code: int | None
    stdout: str
    truncated: bool
    outcome: CommandOutcome

    @classmethod
    def from_outcome(cls, outcome: CommandOutcome, target: str) -> ShellOutput:
        reply = outcome.reply(target)
        data = reply.data if reply is not None and reply.ok else {}
        return cls(
            target, _int(data.get("exit_code")), str(data.get("stdout") or ""), bool(data.get("truncated")), outcome
        )


@dataclass(frozen=True)
class LogLines:
    """The last lines of one participant's log; `cursor` asks the next call for only what is newer."""

    target: str
    file: str | None
    lines: tuple[str, ...]
    truncated: bool
    missing: bool
    cursor: dict[str, int] | None
    outcome: CommandOutcome

    @classmethod
    def from_outcome(cls, outcome: CommandOutcome, target: str) -> LogLines:
        reply = outcome.reply(target)
        data = reply.data if reply is not None and reply.ok else {}
        lines = data.get("lines") if isinstance(data.get("lines"), list) else []
        cursor = data.get("cursor")
        return cls(
            target,
            str(data["file"]) if data.get("file") is not None else None,
            tuple(str(x) for x in lines),
            bool(data.get("truncated")),
            bool(data.get("missing")),
            dict(cursor) if isinstance(cursor, dict) else None,
            outcome,
        )


@dataclass(frozen=True)
class Metrics:
    """A run's metrics: one record per round (then "final"), each with every site's metrics and their mean."""

    run_number: int | None
    run_status: str | None
    aggregator: str | None
    records: tuple[dict[str, Any], ...]
    outcome: CommandOutcome

    @classmethod
    def from_outcome(cls, outcome: CommandOutcome) -> Metrics:
        data = _server_data(outcome)
        records = [dict(r) for r in data.get("rounds") or [] if isinstance(r, dict)]
        if isinstance(data.get("final"), dict) and data["final"]:
            records.append({"round": "final", **data["final"]})
        aggregator = data.get("aggregator")
        return cls(
            _int(data.get("run_number")),
            data.get("run_status") if isinstance(data.get("run_status"), str) else None,
            aggregator if isinstance(aggregator, str) else None,
            tuple(records),
            outcome,
        )

    @property
    def data(self) -> dict[str, Any]:
        return _server_data(self.outcome)

    @property
    def metric(self) -> str | None:
        """The metric that ranks models (accuracy, else a loss, ...) among those the sites reported."""
        from fedcommon.metrics import primary_metric

        names: dict[str, None] = {}
        for record in self.records:
            names.update(dict.fromkeys(record.get("mean") or {}))
        return primary_metric(names) if names else None

    def series(self, metric: str) -> list[tuple[Any, float]]:
        """(round, mean over the sites) of one metric, in order; the final validation last as "final"."""
        out = []
        for record in self.records:
            value = _number((record.get("mean") or {}).get(metric))
            if value is not None:
                out.append((record.get("round"), value))
        return out

    def final(self, metric: str | None = None) -> float | None:
        """The last mean of metric (default: the ranking metric): the final validation's if there was one."""
        name = metric or self.metric
        values = self.series(name) if name else []
        return values[-1][1] if values else None

    def to_json(self) -> dict[str, Any]:
        return self.data


@dataclass(frozen=True)
class Validation:
    """The cross-site validation matrix: `results[site][owner]`, a site's metrics on an owner's model; or one cell."""

    run_number: int | None
    results: dict[str, dict[str, dict[str, Any]]]
    cell: dict[str, Any] | None
    outcome: CommandOutcome

    @classmethod
    def from_outcome(cls, outcome: CommandOutcome) -> Validation:
        data = _server_data(outcome)
        results = data.get("results") if isinstance(data.get("results"), dict) else {}
        cell = data.get("cell") if isinstance(data.get("cell"), dict) else None
        return cls(_int(data.get("run_number")), results, cell, outcome)

    @property
    def data(self) -> dict[str, Any]:
        return _server_data(self.outcome)

    def to_json(self) -> dict[str, Any]:
        return self.data


FINAL_JOB_STATES = ("COMPLETED", "FAILED", "ABORTED")


@dataclass(frozen=True)
class Job:
    """One job as the server shows it; `data` holds what is not modelled (site_states, errors, metrics, notes)."""

    job_id: int
    name: str
    state: str
    reason: str
    submitter: str
    sites: tuple[str, ...]
    gpus: int
    submitted_at: float | None
    started_at: float | None
    ended_at: float | None
    data: dict[str, Any]
    outcome: CommandOutcome | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_data(cls, data: dict[str, Any], outcome: CommandOutcome | None = None) -> Job:
        sites = data.get("sites") if isinstance(data.get("sites"), list) else []
        return cls(
            _int(data.get("job_id")) or 0,
            str(data.get("name") or ""),
            str(data.get("state") or ""),
            str(data.get("reason") or ""),
            str(data.get("submitter") or ""),
            tuple(str(s) for s in sites),
            _int(data.get("gpus")) or 0,
            _number(data.get("submitted_at")),
            _number(data.get("started_at")),
            _number(data.get("ended_at")),
            dict(data),
            outcome,
        )

    @property
    def run_number(self) -> int:
        """The run the job trains as: its id."""
        return self.job_id

    @property
    def ended(self) -> bool:
        return self.state in FINAL_JOB_STATES

    @property
    def completed(self) -> bool:
        return self.state == "COMPLETED"

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)


@dataclass(frozen=True)
class JobList:
    """Every job the server keeps, and how many may run at once."""

    jobs: tuple[Job, ...]
    max_jobs: int | None
    outcome: CommandOutcome

    @classmethod
    def from_outcome(cls, outcome: CommandOutcome) -> JobList:
        data = _server_data(outcome)
        jobs = data.get("jobs") if isinstance(data.get("jobs"), list) else []
        return cls(tuple(Job.from_data(j) for j in jobs if isinstance(j, dict)), _int(data.get("max_jobs")), outcome)

    def job(self, job_id: int) -> Job | None:
        return next((j for j in self.jobs if j.job_id == job_id), None)

    def to_json(self) -> dict[str, Any]:
        return _server_data(self.outcome)


@dataclass(frozen=True)
class Downloaded:
    """A job's results, extracted into folder."""

    job_id: int
    folder: Path
    files: tuple[str, ...]
    outcome: CommandOutcome


@dataclass(frozen=True)
class PocKits:
    """The CA and kits of a local POC federation: where its server listens, every participant, the admin's kit."""

    workspace: Path
    project: str
    host: str
    fl_port: int
    admin_port: int
    participants: tuple[str, ...]
    admin_kit: Path


@dataclass(frozen=True)
class PocRunning:
    """A POC federation started in the background, every site connected; operate it with Session(admin_kit)."""

    workspace: Path
    admin_kit: Path
    processes: tuple[ProcessRecord, ...]
