"""Cross-site validation of one completed run: the models sites share, what each validated, the matrix (DESIGN §9).

Kept in <run_dir>/cross_site/: models/<owner>.fl and results.json (written atomically), so a restarted
server still has every result and every shared model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcommon.atomic import atomic_write_json, atomic_writer
from fedcommon.dtypes import DTypeError
from fedcommon.metrics import MetricsError, check_metrics, mean_score
from fedcommon.model_file import ModelFileError, ModelFileWriter, read_index
from fedcommon.tensor_codec import CodecError, TensorSpec
from fedcommon.wire import training_pb2 as pb
from fedserver.aggregator import ContributionError, receive_tensors
from fedserver.run import BEST_GLOBAL_MODEL, GLOBAL_MODEL
from fedserver.run_record import COMPLETED, RecordMissing, RunRecord, RunRecordError

log = logging.getLogger(__name__)

SERVER_OWNER = "server"
RESULTS_FILE = "results.json"
# After a run completes, how long the choice of the server's best model waits for the sites' final metrics,
# and how long a site waits for a participant that is not connected to share its model.
FINAL_METRICS_GRACE_S = 30.0
_OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class CrossSiteError(Exception):
    """A refused cross-site validation call or query; the message says why in an operator's words."""


@dataclass(frozen=True)
class ValidationOffer:
    """The answer to a site asking for a model: one to validate, nothing yet, or nothing left."""

    status: str  # "model", "wait" or "end"
    owner: str = ""
    path: Path | None = None
    more: bool = False
    message: str = ""


class CrossSiteValidation:
    """One run's cross-site validation; thread-safe; every change is persisted before it is acknowledged."""

    def __init__(
        self,
        run_number: int,
        run_dir: Path,
        active_sites: Callable[[], set[str]] = set,
        grace_s: float = FINAL_METRICS_GRACE_S,
    ):
        self.run_number = run_number
        self.run_dir = run_dir
        self._record = RunRecord(run_dir, run_number)
        self._run_models = self._record.folder.models
        self.folder = self._record.folder.cross_site
        self.models = self.folder / "models"
        self.path = self.folder / RESULTS_FILE
        self._active_sites = active_sites
        self._grace_s = grace_s
        self._grace_until = time.monotonic() + grace_s
        self._waiting_since: dict[str, float] = {}  # site -> when it was first told to wait
        self._receiving: set[str] = set()  # sites whose best model is being uploaded
        self._closed = False  # the run was deleted: nothing may be written for it any more
        self._cond = threading.Condition()
        summary = self._summary()
        if summary.get("status") != COMPLETED:
            raise CrossSiteError(f"run {run_number} has not completed; cross-site validation needs a completed run")
        rounds = summary.get("rounds") or []
        # The sites that took part in the run validate, and each may share its best model.
        self.participants = sorted({s for r in rounds for s in r.get("contributors", [])})
        self._last_contributors = set(rounds[-1].get("contributors", [])) if rounds else set()
        with open(self._run_models / GLOBAL_MODEL, "rb") as f:
            self._index = read_index(f, self._run_models / GLOBAL_MODEL)
        self._specs = {e.name: (e.dtype, e.shape) for e in self._index.entries}
        self._state = self._load()

    # ---- persistence ----------------------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        try:
            return self._record.load()
        except RecordMissing as e:
            raise CrossSiteError(f"{e}: it was never trained") from None
        except RunRecordError as e:
            raise CrossSiteError(str(e)) from None

    def _load(self) -> dict[str, Any]:
        empty = {
            "run_number": self.run_number,
            "owners": {},
            "declined": [],
            "refused": {},
            "offered": {},
            "results": {},
        }
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return empty
        except (OSError, ValueError) as e:
            raise CrossSiteError(f"{self.path}: unreadable ({e}); fix or remove it") from None
        if not isinstance(state, dict) or not all(
            isinstance(state.get(k), t)
            for k, t in (("owners", dict), ("declined", list), ("offered", dict), ("results", dict))
        ):
            raise CrossSiteError(f"{self.path}: not a cross-site validation record; fix or remove it")
        return {**empty, **state}

    def _save(self) -> None:
        self._writable()
        atomic_write_json(self.path, self._state)

    def _writable(self) -> None:
        """Refuse writes once the run is gone; never create the run folder again."""
        if self._closed or not self.run_dir.is_dir():
            raise CrossSiteError(f"run {self.run_number} was deleted")
        self.folder.mkdir(exist_ok=True)  # no parents: a deleted run folder is not made again
        self.models.mkdir(exist_ok=True)

    def close(self) -> None:
        """The run is being deleted: every later call is refused and nothing is written."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- what sites call ------------------------------------------------------------------------

    def _require_participant(self, site: str) -> None:
        if site not in self.participants:
            raise CrossSiteError(
                f"{site} did not take part in run {self.run_number}; "
                f"its participants are {', '.join(self.participants) or 'none'}"
            )

    def decline(self, site: str) -> str:
        """`site` validates the others but does not share its model; returns what was recorded."""
        with self._cond:
            self._require_participant(site)
            if site in self._state["owners"]:
                return f"{site} already shared its best model for run {self.run_number}; it stays offered"
            if site in self._receiving:
                raise CrossSiteError(
                    f"{site} is uploading its best model for run {self.run_number}; it cannot decline now"
                )
            if site not in self._state["declined"]:
                self._state["declined"].append(site)
                self._save()
                self._cond.notify_all()
            return f"{site} does not share its model for run {self.run_number}"

    def submit_best_model(
        self, site: str, metrics: Mapping[str, float], chunks: Iterator[pb.ModelChunk], num_tensors: int
    ) -> str:
        """Store `site`'s best local model from its tensor chunks; it must match the global model exactly.

        Returns what was recorded. A refused or broken upload leaves nothing behind.
        """
        self._require_participant(site)
        if not _OWNER_RE.fullmatch(site):
            raise CrossSiteError(f"site name {site!r} cannot name a model file")
        try:
            own = check_metrics(metrics, f"{site}'s best model") if metrics else {}
        except MetricsError as e:
            raise CrossSiteError(str(e)) from None
        with self._cond:
            if site in self._state["owners"]:
                return f"{site} already shared its best model for run {self.run_number}; the first one is kept"
            if site in self._receiving:
                raise CrossSiteError(f"{site} is already uploading its best model for run {self.run_number}")
            self._receiving.add(site)  # until it is recorded: no decline or second upload in between
        try:
            with self._cond:
                self._writable()
            try:
                if num_tensors != len(self._specs):
                    raise ContributionError(
                        f"best model announces {num_tensors} variables; the global model has {len(self._specs)}"
                    )
                with atomic_writer(self.models / f"{site}.fl") as f:
                    writer = ModelFileWriter(
                        f,
                        [(e.name, e.dtype, e.shape) for e in self._index.entries],
                        {"owner": site, "run_number": self.run_number, "metrics": own},
                    )
                    for name, arr in receive_tensors(chunks, self._check_spec, "a best model"):
                        writer.write(name, arr)
                    writer.check_complete()
            except (ContributionError, CodecError, DTypeError, ModelFileError) as e:
                with self._cond:  # the others do not wait for a model that was refused; a later share may come
                    self._state["refused"][site] = str(e)[:500]
                    self._save()
                    self._cond.notify_all()
                raise CrossSiteError(f"best model refused: {e}") from None
            with self._cond:
                self._state["owners"][site] = {"metrics": own}
                if site in self._state["declined"]:
                    self._state["declined"].remove(site)  # it changed its mind: the model is offered
                self._state["refused"].pop(site, None)
                self._save()
                self._cond.notify_all()
        finally:
            with self._cond:
                self._receiving.discard(site)
        log.info("run %d: %s shared its best model for cross-site validation", self.run_number, site)
        return f"{site}'s best model is offered for validation"

    def _check_spec(self, spec: TensorSpec) -> None:
        expected = self._specs.get(spec.name)
        if expected is None:
            raise ContributionError(f"variable {spec.name!r} is not in the global model")
        if (spec.dtype, spec.shape) != expected:
            raise ContributionError(
                f"variable {spec.name!r} is {spec.dtype}{list(spec.shape)}; the global model has "
                f"{expected[0]}{list(expected[1])}"
            )

    def next_model(self, site: str, validated: set[str], wait_seconds: float) -> ValidationOffer:
        """A model `site` has not validated yet; holds up to `wait_seconds` while the rest is still to come."""
        deadline = time.monotonic() + wait_seconds
        with self._cond:
            self._require_participant(site)
            while True:
                if self._closed:
                    raise CrossSiteError(f"run {self.run_number} was deleted")
                self._choose_server_model()
                done = validated | set(self._state["results"].get(site, {}))
                ready = [o for o in self._offered_owners() if o not in done]
                pending = [o for o in self._pending_owners() if o not in done and o != site]
                if ready:
                    self._waiting_since.pop(site, None)
                    owner = ready[0]
                    offered = self._state["offered"].setdefault(site, [])
                    if owner not in offered:
                        offered.append(owner)
                        self._save()
                    return ValidationOffer(
                        "model", owner, self.models / f"{owner}.fl", more=len(ready) > 1 or bool(pending)
                    )
                if not pending:
                    return ValidationOffer("end", message=f"{site} has validated every model of run {self.run_number}")
                absent = self._given_up(site, pending)
                if absent:
                    return ValidationOffer(
                        "end",
                        message=(
                            f"{', '.join(absent)} did not share a model and {'is' if len(absent) == 1 else 'are'} not "
                            f"connected; `fedadmin validate --start` later includes "
                            f"{'it' if len(absent) == 1 else 'them'}"
                        ),
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    return ValidationOffer(
                        "wait", more=True, message=f"waiting for the best models of {', '.join(pending)}"
                    )
                self._cond.wait(min(left, 1.0))  # the server's model may become ready without a notify

    def _given_up(self, site: str, pending: list[str]) -> list[str]:
        """The pending owners, once all of them are sites not connected and `site` has waited out the grace."""
        if SERVER_OWNER in pending:
            return []
        active = self._active_sites()
        if any(owner in active for owner in pending):
            self._waiting_since.pop(site, None)
            return []
        since = self._waiting_since.setdefault(site, time.monotonic())
        return pending if time.monotonic() - since >= self._grace_s else []

    def record_results(self, site: str, results: Mapping[str, Mapping[str, float]]) -> int:
        """Record `site`'s metrics per model owner; all or nothing; returns how many were recorded."""
        with self._cond:
            self._require_participant(site)
            offered = set(self._state["offered"].get(site, []))
            checked = {}
            for owner, metrics in results.items():
                if owner not in offered:
                    raise CrossSiteError(
                        f"results for {owner!r}'s model, which was never offered to {site} in run {self.run_number}"
                    )
                try:
                    checked[owner] = check_metrics(metrics, f"{site}'s result for {owner}")
                except MetricsError as e:
                    raise CrossSiteError(str(e)) from None
            if not checked:
                raise CrossSiteError("no results given")
            self._state["results"].setdefault(site, {}).update(checked)
            self._save()
        log.info("run %d: %s validated %s", self.run_number, site, ", ".join(sorted(checked)))
        return len(checked)

    # ---- the server's own model -----------------------------------------------------------------

    def _offered_owners(self) -> list[str]:
        sites = sorted(o for o in self._state["owners"] if o != SERVER_OWNER)
        return sites + ([SERVER_OWNER] if SERVER_OWNER in self._state["owners"] else [])

    def _pending_owners(self) -> list[str]:
        owners, skipped = self._state["owners"], set(self._state["declined"]) | set(self._state["refused"])
        pending = [s for s in self.participants if s not in owners and s not in skipped]
        return pending + ([] if SERVER_OWNER in owners else [SERVER_OWNER])

    def _choose_server_model(self) -> None:
        """Offer the best global model as "server" once the sites' scores of the final model are in (or late)."""
        if SERVER_OWNER in self._state["owners"]:
            return
        summary = self._summary()
        # Only the run's participants score its final model; a site outside it has no say.
        final = {s: m for s, m in (summary.get("final_metrics") or {}).items() if s in self.participants}
        active = self._active_sites()
        waiting = [s for s in self._last_contributors if s not in final and s in active]
        if waiting and time.monotonic() < self._grace_until:
            return
        best = summary.get("best_global") or None
        final_score = mean_score(final)
        source = self._run_models / GLOBAL_MODEL
        chosen = {"model": "final", "score": final_score}
        if (
            best
            and (final_score is None or best["score"] > final_score)
            and (self._run_models / BEST_GLOBAL_MODEL).exists()
        ):
            source = self._run_models / BEST_GLOBAL_MODEL
            chosen = {"model": f"round {best['round']}", "score": best["score"]}
        self._writable()
        target = self.models / f"{SERVER_OWNER}.fl"
        tmp = target.with_name(f".{SERVER_OWNER}.fl.tmp")
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)  # the run's files are replaced, never rewritten in place: a link is a copy
        os.replace(tmp, target)
        self._state["owners"][SERVER_OWNER] = chosen
        self._save()
        log.info(
            "run %d: the server offers its %s global model for cross-site validation", self.run_number, chosen["model"]
        )

    # ---- what operators see ---------------------------------------------------------------------

    def matrix(self) -> dict[str, Any]:
        """Everything `fedadmin validate` shows: rows, columns, results, who declined, what is still awaited."""
        with self._cond:
            return {
                "run_number": self.run_number,
                "validating_sites": list(self.participants),
                "owners": self._offered_owners(),
                "declined": sorted(self._state["declined"]),
                "refused": dict(sorted(self._state["refused"].items())),
                "pending_owners": self._pending_owners(),
                "server_model": self._state["owners"].get(SERVER_OWNER),
                "results": {site: dict(sorted(row.items())) for site, row in sorted(self._state["results"].items())},
            }
