"""`fedadmin metrics`: per round, the global model's validation metrics as each site measured them, and the mean."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import click

from fedadmin.commands import ConsoleOptions, emit, outcome_of
from fedadmin.replies import ServerAnswer
from fedcommon.outcome import CommandOutcome

CHART_HEIGHT = 8
CHART_WIDTH = 60


def chosen_metric(data: dict[str, Any], wanted: str | None) -> str | None:
    """The metric to show: `wanted`, else the one that ranks models among those the sites reported."""
    from fedcommon.metrics import primary_metric

    names: dict[str, None] = {}
    for record in [*(data.get("rounds") or []), data.get("final") or {}]:
        names.update(dict.fromkeys(record.get("mean") or {}))
    if wanted is not None:
        return wanted
    return primary_metric(names) if names else None


@dataclass(frozen=True)
class MetricsResult(ServerAnswer):
    """The server's per-round metrics of a run, or why there are none."""

    outcome: CommandOutcome
    metric: str | None = None
    png: Path | None = None
    command: ClassVar[str] = "metrics"

    @property
    def error(self) -> str:
        """Why the metrics could not be shown; empty when they can."""
        failure = self.outcome.server_failure()
        if failure:
            return failure
        if self.metric is not None and not any(self.metric in (r.get("mean") or {}) for r in self.records):
            return f"no site reported {self.metric!r} in run {self.data.get('run_number')}"
        return (
            ""
            if chosen_metric(self.data, self.metric) is not None or not self.records
            else "the sites reported no metrics"
        )

    @property
    def data(self) -> dict[str, Any]:
        return self.server_data

    @property
    def records(self) -> list[dict[str, Any]]:
        """One record per round (then "final"), each with every site's metrics and their mean."""
        data = self.data
        out = [dict(r) for r in data.get("rounds") or []]
        if data.get("final"):
            out.append({"round": "final", **data["final"]})
        return out

    def to_json(self) -> dict[str, Any]:
        if not self.ok:
            return self.failure_json()
        out = {
            "run_number": self.data.get("run_number"),
            "run_status": self.data.get("run_status"),
            "aggregator": self.data.get("aggregator"),
            "site_algorithms": self.data.get("site_algorithms") or [],
            "metric": chosen_metric(self.data, self.metric),
            "records": self.records,
        }
        if self.png is not None:
            out["png"] = str(self.png)
        return out

    def __rich__(self) -> Any:
        from fedadmin import render

        if not self.ok:
            return render.failure_line(self.command, self.error)
        algorithms = (
            render.algorithms_text(self.data.get("aggregator"), self.data.get("site_algorithms"))
            if self.data.get("aggregator")
            else ""
        )
        return render.metrics_view(
            self.data.get("run_number"),
            self.data.get("run_status"),
            self.records,
            chosen_metric(self.data, self.metric),
            self.png,
            algorithms,
        )


@click.command("metrics")
@click.option(
    "--run",
    "run_number",
    type=click.IntRange(min=1),
    default=None,
    help="The run to show (default: the current run number).",
)
@click.option("--metric", "-m", default=None, help="The metric to show (default: accuracy, else the first loss).")
@click.option(
    "--png",
    "png",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write the learning curves (each site and the mean) to this PNG file (needs matplotlib).",
)
@click.pass_obj
def metrics(options: ConsoleOptions, run_number: int | None, metric: str | None, png: Path | None) -> None:
    """Show per round the global model's metrics as each site measured them, their mean, and a chart of it."""
    if png is not None:
        try:
            import matplotlib  # noqa: F401  (optional: only --png needs it)
        except ImportError:
            raise click.UsageError("--png needs matplotlib: pip install 'fedlearn[plot]'") from None
    result = MetricsResult(outcome_of(options, lambda s: s.metrics(run_number)).outcome, metric, png)
    if png is not None and result.ok:
        from fedadmin.plot import write_learning_curves

        write_learning_curves(
            png, result.records, chosen_metric(result.data, metric) or "", f"run {result.data.get('run_number')}"
        )
    emit(options, result)
