"""A run's record on the server: summary.json and state.json, the run's status, and what `metrics` answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcommon.atomic import atomic_write_json
from fedcommon.metrics import mean_metrics
from fedcommon.run_folder import RunFolder

TRAINING = "training"
COMPLETED = "completed"
ABORTED = "aborted"
DEPLOYED = "deployed"
NONE = "none"
# What a closed round's record tells besides the metrics (the sites, their weights, who was refused or dropped).
_ROUND_FACTS = ("contributors", "weights", "duration_s", "privacy", "rejected", "dropped")
UNREAD = object()  # status(): the caller has not read the summary


class RunRecordError(Exception):
    """A run's summary cannot be used; the message names the run and the file."""


class RecordMissing(RunRecordError):
    """The run has no summary.json: it never started training."""


class RunRecord:
    """Run N's record in its folder: written by the training run, read for status, metrics, resume and validation."""

    def __init__(self, root: Path, run_number: int):
        self.folder = RunFolder(Path(root))
        self.run_number = run_number
        # Told each summary written, after the files are replaced (the server's experiment tracking).
        self.on_write: Callable[[dict[str, Any]], None] | None = None

    @classmethod
    def of(cls, workspace: Path, run_number: int) -> RunRecord:
        return cls(RunFolder.of(workspace, run_number).root, run_number)

    def load(self) -> dict[str, Any]:
        """The run's summary; RecordMissing when there is none, RunRecordError when it cannot be read."""
        path = self.folder.summary
        try:
            summary = json.loads(path.read_text())
        except FileNotFoundError:
            raise RecordMissing(f"run {self.run_number} has no {path.name}") from None
        except (OSError, ValueError) as e:
            raise RunRecordError(f"run {self.run_number}: {path} cannot be read: {e}") from None
        if not isinstance(summary, dict):
            raise RunRecordError(f"run {self.run_number}: {path} is not a run summary")
        return summary

    def read(self) -> dict[str, Any] | None:
        """The run's summary, or None when there is none or it cannot be read."""
        try:
            return self.load()
        except RunRecordError:
            return None

    def write(self, summary: dict[str, Any], state: dict[str, Any]) -> None:
        """Replace summary.json, then state.json, each atomically."""
        atomic_write_json(self.folder.summary, summary)
        atomic_write_json(self.folder.state, state)
        if self.on_write is not None:
            self.on_write(summary)

    def status(self, summary: Any = UNREAD) -> str:
        """ "none", "deployed", "completed" or "aborted", for a run that no live run holds.

        summary: the run's summary when the caller has read it already (None: there is none).
        """
        if summary is UNREAD:
            summary = self.read()
        status = summary.get("status") if isinstance(summary, dict) else None
        if status in (COMPLETED, ABORTED):
            return status
        if status == TRAINING:
            return ABORTED  # it was training when an earlier server process stopped
        return DEPLOYED if self.folder.is_deployed() else NONE

    def was_training(self) -> bool:
        """True when the summary says the run was training (the server stopped during it)."""
        summary = self.read()
        return summary is not None and summary.get("status") == TRAINING


def metrics_answer(run_number: int, status: str, summary: dict[str, Any]) -> dict[str, Any]:
    """What `metrics` answers for a run: per round its record with each site's metrics and their mean; then the
    same for the final model, and the best global model."""
    rounds, final = metric_records(summary)
    return {
        "run_number": run_number,
        "run_status": status,
        **recorded_algorithms(summary),
        "rounds": rounds,
        "final": final,
        "best_global": summary.get("best_global"),
    }


def recorded_algorithms(summary: dict[str, Any] | None) -> dict[str, Any]:
    """{"aggregator": its label, "site_algorithms": [...]} as a run's summary records them (FedAvg before issue 20)."""
    spec = (summary or {}).get("aggregator")
    spec = spec if isinstance(spec, dict) else {}
    label = spec.get("name") or spec.get("path") or "FedAvg"
    sites = (summary or {}).get("site_algorithms")
    return {"aggregator": str(label), "site_algorithms": [str(s) for s in sites] if isinstance(sites, list) else []}


def metric_records(summary: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Per closed round {"round", "sites", "mean", and the round's facts}; {"sites", "mean"} of the final model."""
    rounds = []
    for r in summary.get("rounds") or []:
        if isinstance(r, dict) and isinstance(r.get("round"), int):
            sites = _numeric(r.get("metrics"))
            facts = {k: r[k] for k in _ROUND_FACTS if k in r}
            rounds.append({"round": r["round"], **facts, "sites": sites, "mean": mean_metrics(sites)})
    final = _numeric(summary.get("final_metrics"))
    return rounds, {"sites": final, "mean": mean_metrics(final)} if final else None


def last_recorded_metrics(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The mean metrics of a finished run's final model, else of its newest scored round."""
    rounds, final = metric_records(summary)
    if final is not None and final["mean"]:
        return {"round": "final", "mean": final["mean"]}
    scored = [r for r in rounds if r["mean"]]
    return {"round": scored[-1]["round"], "mean": scored[-1]["mean"]} if scored else None


def _numeric(reports: Any) -> dict[str, dict[str, float]]:
    """{site: {metric: number}} from a summary's record, skipping anything else."""
    if not isinstance(reports, dict):
        return {}
    out = {}
    for site, metrics in reports.items():
        if isinstance(metrics, dict):
            kept = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if kept:
                out[str(site)] = kept
    return out
