"""What the job commands print: the jobs table, one job in detail, a submitted or downloaded job."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fedadmin.replies import ServerAnswer
from fedcommon.outcome import CommandOutcome


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def state_text(job: dict[str, Any]) -> str:
    """A job's state with its reason ("WAITING: site-2 is not connected")."""
    reason = job.get("reason")
    return f"{job.get('state')}: {reason}" if reason else str(job.get("state"))


@dataclass(frozen=True)
class JobAnswer(ServerAnswer):
    """The server's answer to one job command (submit, jobs, job show|abort|clone|delete|download)."""

    outcome: CommandOutcome
    command: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        if not self.ok:
            return self.failure_json()
        return {**self.server_data, **self.extra}

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from fedadmin import render

        if not self.ok:
            return render.failure_line(self.command, self.error)
        data = {**self.server_data, **self.extra}
        if "jobs" in data:
            table = Table(title=f"jobs (max_jobs {data.get('max_jobs')})")
            for column in ("id", "name", "submitter", "state", "sites", "submitted", "started", "ended"):
                table.add_column(column)
            for job in data["jobs"]:
                table.add_row(
                    str(job.get("job_id")),
                    str(job.get("name")),
                    str(job.get("submitter")),
                    state_text(job),
                    ", ".join(job.get("sites") or []),
                    _when(job.get("submitted_at")),
                    _when(job.get("started_at")),
                    _when(job.get("ended_at")),
                )
            return table if data["jobs"] else Text("no jobs")
        lines = [Text(f"job {data.get('job_id')}: {state_text(data)}", style="bold")]
        for key in ("name", "submitter", "sites", "gpus", "digest", "run_status", "clone_of", "download", "files"):
            if data.get(key) not in (None, "", []):
                value = data[key]
                lines.append(Text(f"  {key}: {', '.join(map(str, value)) if isinstance(value, list) else value}"))
        for key in ("submitted_at", "started_at", "ended_at"):
            if data.get(key) is not None:
                lines.append(Text(f"  {key.replace('_at', '')}: {_when(data[key])}"))
        for site, state in (data.get("site_states") or {}).items():
            lines.append(Text(f"  {site}: {state}"))
        for site, error in (data.get("errors") or {}).items():
            lines.append(Text(f"  error at {site}: {error}", style="red"))
        metrics = data.get("metrics")
        if metrics:
            lines.append(
                Text(
                    f"  metrics: {metrics.get('rounds')} round(s); last mean {render.metrics_text(metrics.get('mean'))}"
                )
            )
        for note in data.get("notes") or []:
            lines.append(Text(f"  · {note}", style="dim"))
        return Group(*lines)
