"""One federated run: the round state machine, aggregation, the global model file and summary.json."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any

import numpy as np
import psutil

from fedcommon.algorithms import SCAFFOLD_DELTA_PREFIX
from fedcommon.atomic import atomic_write_json, atomic_writer
from fedcommon.dtypes import is_float
from fedcommon.metrics import MetricsError, check_metrics, mean_metrics, mean_score
from fedcommon.mmar import ClientConfig, ServerConfig, excluded
from fedcommon.model_file import ModelIndex, read_index
from fedcommon.tensor_codec import TensorSpec
from fedserver.aggregate_round import aggregate_in_child
from fedserver.aggregation import (
    StateFiles,
    UpdateStore,
    build_aggregator,
    control_accumulator,
    control_tensors,
    split_scaffold,
    store_deltas,
    write_next_model,
)
from fedserver.aggregator import AggregateError, ContributionError, UpdateAccumulator, VarSpec, check_weight
from fedserver.disk_sum import DiskSum, remove_term_files
from fedserver.memory_sum import MemorySum, keep_in_memory
from fedserver.run_record import ABORTED, COMPLETED, TRAINING, RunRecord, RunRecordError
from fedserver.staged_upload import DROP, KEEP, STAGE, StagedUpload

log = logging.getLogger(__name__)

GLOBAL_MODEL = "global_model.fl"
# The global model the sites scored best, as they measured it at the start of a round (DESIGN §9).
BEST_GLOBAL_MODEL = "best_global_model.fl"
# The open round's snapshot: who it holds and the files of its running sums (fedserver.disk_sum), rewritten
# atomically after each contribution that leaves it open; the sums themselves are never rewritten for it.
OPEN_ROUND = "open_round.json"
# SCAFFOLD: the open round's sums of the sites' delta c_i, kept beside OPEN_ROUND.
OPEN_ROUND_CONTROL = "open_round_control.fl"
# The open round's updates, for the aggregators that need every update at once (and custom ones).
ROUND_UPDATES = "round_updates"
# Uploads being received, each in its own file until it is committed or refused.
STAGING = "staging"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot of the machine: the open round's files are trusted after a restart only within the same boot."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


class RunStateError(Exception):
    """A run's files on disk do not allow it to be resumed."""


class Phase(Enum):
    TRAINING = TRAINING
    COMPLETED = COMPLETED
    ABORTED = ABORTED


@dataclass
class Offer:
    """What a site gets when it asks for work: a round to train, an end, or nothing yet."""

    phase: str  # "train", "end" or "wait"
    round: int
    model: IO[bytes] | None = None  # open file of the global model to send; caller closes it
    index: ModelIndex | None = None
    control: list[tuple[str, np.ndarray]] = field(default_factory=list)  # SCAFFOLD's c, sent after the model


@dataclass
class _RoundState:
    number: int
    opened_at: float
    accumulator: DiskSum | None  # streaming built-ins: the weighted sums, on disk
    store: UpdateStore | None = None  # the other aggregators: every update, on disk
    control: UpdateAccumulator | None = None  # SCAFFOLD: the sums of the sites' delta c_i
    contributors: dict[str, float] = field(default_factory=dict)  # site -> a_i * n_i
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> {"protocol", "epsilon"}
    rejected: list[dict[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # sites dropped for silence while the round was open
    receiving: set[str] = field(default_factory=set)
    min_reached_at: float | None = None


class FederatedRun:
    """Rounds of one run; thread-safe; the global model, the uploads being received and the sums live on disk."""

    def __init__(
        self,
        run_number: int,
        run_dir: Path,
        config: ServerConfig,
        resume: bool = False,
        *,
        client: ClientConfig | None = None,
        code_policy: Any = None,
    ):
        """A new run whose initial model is in models/; with `resume`, the run summary.json and the global model
        say where it stood (a server that stopped mid-run carries on at the round that was open).

        client: the MMAR's site config, for its site algorithms (SCAFFOLD's control variates travel through the
        server); code_policy: the server's fedserver.untrusted_code policy, for a custom aggregator.
        """
        self.run_number = run_number
        self.run_dir = run_dir
        self.config = config
        self.record = RunRecord(run_dir, run_number)
        models = self.record.folder.models
        self.model_path = models / GLOBAL_MODEL
        self.best_model_path = models / BEST_GLOBAL_MODEL
        self.open_round_path = models / OPEN_ROUND
        self.open_control_path = models / OPEN_ROUND_CONTROL
        self.updates_folder = models / ROUND_UPDATES
        self.staging_folder = models / STAGING
        for stale in self.staging_folder.glob("upload-*.fl"):  # uploads a stopped server was receiving
            stale.unlink(missing_ok=True)
        self.choice = config.aggregator
        self._aggregator = build_aggregator(self.choice) if self.choice.name is not None else None
        self._states = StateFiles(models)
        self._code_policy = code_policy
        self.scaffold = bool(client and client.scaffold)
        self.fedprox_mu = client.fedprox_mu if client else None
        if self.scaffold and self._aggregator is None:
            raise RunStateError(
                f"run {run_number}: SCAFFOLD with a custom aggregator ({self.choice.label}) is not "
                "supported; use a built-in aggregator"
            )
        self.summary_path = self.record.folder.summary
        self.state_path = self.record.folder.state
        self._cond = threading.Condition()
        with open(self.model_path, "rb") as f:
            index = read_index(f, self.model_path)
        self._specs = {e.name: VarSpec(e.dtype, e.shape) for e in index.entries}
        self._excluded = frozenset(n for n in self._specs if excluded(n, config.exclude_vars))
        # Weights enter the sums divided by the largest weight a contribution can have (see fedserver.aggregator).
        self._largest = config.max_contribution_weight * max([1.0, *config.aggregation_weights.values()])
        self._checker = UpdateAccumulator(self._specs, self._excluded, self._largest)
        self._memory_sum: MemorySum | None = None
        self.phase = Phase.TRAINING
        self._rounds: list[dict[str, Any]] = []
        self._final_metrics: dict[str, dict[str, float]] = {}
        self._epsilon_spent: dict[str, float] = {}  # site -> epsilon its accepted contributions spent
        self._best_global: dict[str, Any] | None = None  # {"round", "score"} of best_global_model.fl
        first = self._restore(index) if resume else config.start_round
        if first >= self.end_round:  # its last round closed as the server stopped
            self.phase, first = Phase.COMPLETED, self.end_round - 1
        memory = MemorySum(self._specs, self._excluded)  # nothing allocated before prepare
        wanted = keep_in_memory(config.round_sum, memory.nbytes, psutil.virtual_memory().available)
        if wanted and self._streaming and self.phase is Phase.TRAINING:
            self._memory_sum = memory
            memory.prepare()
            log.info("run %d: each round's sum is also kept in memory (%.0f MiB)", run_number, memory.nbytes / 2**20)
        self._round = self._new_round(first)
        if not (resume and self.phase is Phase.TRAINING and self._restore_open_round()):
            self._round = self._new_round(first)  # nothing half-restored stays
            self._forget_open_round(self._round)
        self._write_summary()

    def _restore(self, index: ModelIndex) -> int:
        """Take back what summary.json kept; returns the round to open (the global model's own round)."""
        try:
            summary = self.record.load()
        except RunRecordError as e:
            raise RunStateError(f"{self.summary_path}: cannot resume run {self.run_number}: {e}") from None
        if summary.get("run_number") != self.run_number:
            raise RunStateError(f"{self.summary_path}: not the summary of run {self.run_number}")
        self._rounds = [r for r in summary.get("rounds") or [] if isinstance(r, dict)]
        self._final_metrics = dict(summary.get("final_metrics") or {})
        self._epsilon_spent = dict(summary.get("privacy_epsilon_total") or {})
        best = summary.get("best_global")
        self._best_global = best if isinstance(best, dict) and self.best_model_path.exists() else None
        # The model file is replaced before summary.json is written: its round is the one to open, even when
        # the server stopped between the two writes (that round's record is then lost, its result is not).
        model_round = index.meta.get("round", self.config.start_round)
        recorded = [r.get("round") for r in self._rounds]
        if not isinstance(model_round, int) or isinstance(model_round, bool) or model_round < self.config.start_round:
            raise RunStateError(f"{self.model_path}: its round {model_round!r} is not one of run {self.run_number}")
        if model_round - 1 >= self.config.start_round and model_round - 1 not in recorded:
            self._rounds.append(
                {
                    "round": model_round - 1,
                    "recovered": True,
                    "note": "closed as the server stopped; its record was not written",
                }
            )
        self._rounds = [r for r in self._rounds if isinstance(r.get("round"), int) and r["round"] < model_round]
        return model_round

    def _restore_open_round(self) -> bool:
        """Take back the open round's accepted contributions, when the snapshot is of this round."""
        r = self._round
        try:
            meta = json.loads(self.open_round_path.read_text())
            if meta.get("run_number") != self.run_number or meta.get("round") != r.number:
                return False
            # The sums are not fsynced (DESIGN §11 trade: a GiB fsync per contribution): after a reboot they may
            # hold what the disk had, not what was written; within the same boot the page cache holds them.
            if meta.get("boot_id") != boot_id():
                raise ValueError("the machine restarted since they were written")
            contributors = {str(k): float(v) for k, v in (meta.get("contributors") or {}).items()}
            kept = (
                dict(meta.get("metrics") or {}),
                dict(meta.get("privacy") or {}),
                list(meta.get("rejected") or []),
                list(meta.get("dropped") or []),
                dict(meta.get("epsilon_total") or self._epsilon_spent),
            )
            if r.accumulator is not None:
                r.accumulator.restore(meta.get("terms"), len(contributors))
                remove_term_files(self.open_round_path.parent, {t["file"] for t in meta["terms"]})
            elif sorted(r.store.sites) != sorted(contributors):
                raise ValueError(
                    f"the updates kept in {self.updates_folder} are of {', '.join(sorted(r.store.sites)) or 'no site'}"
                )
            if r.control is not None:
                with open(self.open_control_path, "rb") as f:
                    control = read_index(f, self.open_control_path)
                    if control.meta.get("round") != r.number or control.meta.get("contributors") != sorted(
                        contributors
                    ):
                        raise ValueError(f"{self.open_control_path} does not hold the same contributions")
                    r.control.load(f, control)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:  # torn or foreign: starts empty
            log.warning(
                "run %d round %d: the accepted contributions in %s are not usable (%s); the round starts empty",
                self.run_number,
                r.number,
                self.open_round_path,
                e,
            )
            return False
        r.contributors = contributors
        r.metrics, r.privacy, r.rejected, r.dropped, self._epsilon_spent = kept
        if len(r.contributors) >= self.config.min_num_clients:
            r.min_reached_at = time.monotonic()
        log.info(
            "run %d round %d: resumed with the contributions of %s",
            self.run_number,
            r.number,
            ", ".join(sorted(r.contributors)),
        )
        return True

    def _save_open_round(self) -> None:
        r = self._round
        meta = {
            "run_number": self.run_number,
            "round": r.number,
            "contributors": r.contributors,
            "metrics": r.metrics,
            "privacy": r.privacy,
            "rejected": r.rejected,
            "dropped": r.dropped,
            "epsilon_total": self._epsilon_spent,
            "boot_id": boot_id(),
            "terms": r.accumulator.describe() if r.accumulator is not None else [],
        }
        try:
            # The control sums first: a snapshot of the round is only taken back with its own control sums.
            if r.control is not None:
                with atomic_writer(self.open_control_path) as f:
                    r.control.save(
                        f, {"run_number": self.run_number, "round": r.number, "contributors": sorted(r.contributors)}
                    )
            # The sums' files and the on-disk family's updates are on disk already: the snapshot names them.
            atomic_write_json(self.open_round_path, meta)
        except OSError as e:  # the contribution stands; only a restart before the round closes would lose it
            log.warning(
                "run %d round %d: could not keep the accepted contributions in %s: %s",
                self.run_number,
                r.number,
                self.open_round_path,
                e,
            )

    # ---- what sites see -------------------------------------------------------------------------

    @property
    def current_round(self) -> int:
        return self._round.number

    @property
    def end_round(self) -> int:
        return self.config.start_round + self.config.num_rounds

    def offer(self, site: str, wait_seconds: float) -> Offer:
        """Hold until there is something new for `site` or `wait_seconds` pass (the long-poll)."""
        deadline = time.monotonic() + wait_seconds
        with self._cond:
            while True:
                if self.phase is not Phase.TRAINING:
                    return self._open_offer("end")
                if site not in self._round.contributors and site not in self._round.receiving:
                    return self._open_offer("train")
                left = deadline - time.monotonic()
                if left <= 0:
                    return Offer("wait", self._round.number)
                self._cond.wait(left)

    def _open_offer(self, phase: str) -> Offer:
        # Opened under the lock: a later atomic rename cannot swap the model under a reader.
        f = open(self.model_path, "rb")
        try:
            index = read_index(f, self.model_path)
            control = (
                list(control_tensors(self._states, self._round.number, index, self._excluded))
                if self.scaffold and phase == "train"
                else []
            )
            return Offer(phase, self._round.number, f, index, control)
        except BaseException:
            f.close()
            raise

    # ---- contributions --------------------------------------------------------------------------

    def begin_contribution(self, site: str, round_number: int) -> None:
        """Claim the open round for `site`'s upload, or refuse it as stale, duplicate or late."""
        with self._cond:
            self._check_open(site, round_number)
            self._round.receiving.add(site)

    def _check_open(self, site: str, round_number: int) -> None:
        if self.phase is not Phase.TRAINING:
            raise ContributionError(f"run {self.run_number} is {self.phase.value}; no round is open")
        if round_number != self._round.number:
            raise ContributionError(
                f"stale contribution: it is for round {round_number}, the open round is {self._round.number}"
            )
        if site in self._round.contributors or site in self._round.receiving:
            raise ContributionError(f"duplicate contribution: {site} already contributed to round {round_number}")

    def check_tensor(self, spec: TensorSpec) -> bool:
        """Refuse a tensor that does not fit the global model; False when it is excluded from aggregation.

        With SCAFFOLD, a site's delta c_i of a floating variable that is aggregated comes beside its update.
        """
        if self.scaffold and spec.name.startswith(SCAFFOLD_DELTA_PREFIX):
            name = spec.name[len(SCAFFOLD_DELTA_PREFIX) :]
            var = self._specs.get(name)
            if var is None or name in self._excluded or not is_float(var.dtype):
                raise ContributionError(f"{spec.name!r}: SCAFFOLD's delta c of a variable that is not aggregated")
            return self._checker.check_tensor(TensorSpec(name, spec.dtype, spec.shape))
        return self._checker.check_tensor(spec)

    def route_tensor(self, spec: TensorSpec) -> str:
        """Where an upload's tensor goes once checked (see check_tensor): STAGE, KEEP (SCAFFOLD's delta c) or DROP."""
        kept = self.check_tensor(spec)
        if self.scaffold and spec.name.startswith(SCAFFOLD_DELTA_PREFIX):
            return KEEP
        return STAGE if kept else DROP

    def stage_upload(self, site: str = "", weight: float | None = None) -> StagedUpload:
        """A new staging file for one upload, under the run's models folder; given the site and the weight its upload
        claims, the upload also streams into the round's sum in memory, where the run keeps one."""
        accumulator = self._round.accumulator
        memory = accumulator.memory if accumulator is not None else None  # read once: a close or abort may clear it
        mirror = None
        if memory is not None and weight is not None and site:
            try:
                check_weight(weight, self.config.max_contribution_weight)
            except ContributionError:  # refused in commit: nothing to mirror
                return StagedUpload(self.staging_folder, self._specs, self._excluded)
            a = self.config.aggregation_weights.get(site, 1.0)
            try:
                mirror = memory.writer((a * weight) / self._largest)  # as DiskSum.add scales it
            except (MemoryError, OSError) as e:  # the buffer could not be had: the run goes on with the disk
                log.warning("run %d: the round sum stays on disk only: %s", self.run_number, e)
                with self._cond:
                    self._drop_memory_sum()
        return StagedUpload(self.staging_folder, self._specs, self._excluded, mirror)

    def _drop_memory_sum(self) -> None:
        """No more round sum in memory for this run (its memory goes back once no upload writes to it)."""
        self._memory_sum = None
        if self._round.accumulator is not None:
            self._round.accumulator.memory = None

    def abandon_contribution(self, site: str, round_number: int, reason: str) -> None:
        """Release `site`'s claim after a refused or broken upload, and note why."""
        with self._cond:
            if round_number == self._round.number:
                self._round.receiving.discard(site)
            self._round.rejected.append({"site": site, "reason": reason})
            self._cond.notify_all()

    def note_refusal(self, site: str, reason: str) -> None:
        """Record a refused contribution in the open round's summary."""
        with self._cond:
            self._round.rejected.append({"site": site, "reason": reason})

    def commit_contribution(
        self,
        site: str,
        round_number: int,
        update: dict[str, np.ndarray] | StagedUpload,
        weight: float,
        metrics: dict[str, float],
        active_sites: Callable[[], set[str]],
        privacy_protocol: str = "",
        privacy_epsilon: float = 0.0,
        on_accepted: Callable[[], None] | None = None,
    ) -> None:
        """Add a complete, checked update (arrays, or a staged upload) to the open round's sums; may close the round.

        on_accepted: called once the update is in the sums, before the round may close (so a counter of accepted
        contributions is never behind the round a reader sees open).

        A staged upload is taken (its file becomes part of the sums) or deleted, whatever happens.
        privacy_protocol / privacy_epsilon: the filter the site applied and the epsilon it spent, as the
        site reports them; recorded per round and totalled per site for the run.
        """
        staged = update if isinstance(update, StagedUpload) else None
        if staged is None and self._round.accumulator is not None and update:
            staged = update = StagedUpload.from_arrays(self.staging_folder, self._specs, self._excluded, update)
        try:
            if not (update.received or update.extra if isinstance(update, StagedUpload) else update):
                raise ContributionError("contribution holds no variables")
            if not math.isfinite(privacy_epsilon) or privacy_epsilon < 0:
                raise ContributionError(f"privacy_epsilon must be a finite number >= 0, got {privacy_epsilon}")
            if len(privacy_protocol) > 200:
                raise ContributionError("privacy_protocol names more than 200 characters")
            if metrics:
                try:
                    metrics = check_metrics(metrics, f"{site}'s contribution")
                except MetricsError as e:
                    raise ContributionError(str(e)) from None
            cap = self.config.max_contribution_weight
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
                or (not 0 < weight <= cap)
            ):
                raise ContributionError(
                    f"weight {weight!r}: a contribution's weight must be a positive number of at "
                    f"most max_contribution_weight {cap:g} (config_fed_server.json)"
                )
            a = self.config.aggregation_weights.get(site, 1.0)
            delta_c: dict[str, np.ndarray] = {}
            if isinstance(update, StagedUpload):
                if self.scaffold:  # checked as split_scaffold checks it: the staged variables stand for themselves
                    carried = {name: None for name in update.received}
                    _, delta_c = split_scaffold({**carried, **update.extra}, self._specs, self._excluded)
            elif self.scaffold:
                update, delta_c = split_scaffold(update, self._specs, self._excluded)
            with self._cond:
                if round_number == self._round.number:
                    self._round.receiving.discard(site)
                self._check_open(site, round_number)
                r = self._round
                if r.accumulator is not None:
                    r.accumulator.add(update, a * weight)
                elif isinstance(update, StagedUpload):
                    r.store.add_staged(update, a * weight, site)
                else:
                    r.store.add(update, a * weight, site)
                if r.control is not None:
                    r.control.add(delta_c, 1.0)
                self._round.contributors[site] = a * weight
                self._round.metrics[site] = dict(metrics)
                if privacy_protocol:
                    self._round.privacy[site] = {"protocol": privacy_protocol, "epsilon": privacy_epsilon}
                    self._epsilon_spent[site] = self._epsilon_spent.get(site, 0.0) + privacy_epsilon
                n = len(self._round.contributors)
                if n >= self.config.min_num_clients and self._round.min_reached_at is None:
                    self._round.min_reached_at = time.monotonic()
                log.info(
                    "run %d round %d: accepted %s (weight %g), %d contribution(s)",
                    self.run_number,
                    round_number,
                    site,
                    a * weight,
                    n,
                )
                if on_accepted is not None:
                    on_accepted()
                self._maybe_close(active_sites())
                if (
                    self.config.persist_open_round
                    and self._round.number == round_number
                    and (self.phase is Phase.TRAINING)
                ):
                    self._save_open_round()
                if self._round.accumulator is not None:
                    self._round.accumulator.drop_retired()
                self._cond.notify_all()
        finally:
            if staged is not None:
                staged.discard()

    def report_final_metrics(self, site: str, metrics: dict[str, float]) -> None:
        """Record what a site measured on the final global model; MetricsError for metrics that are not numbers."""
        metrics = check_metrics(metrics, f"{site}'s final metrics")
        with self._cond:
            self._final_metrics[site] = dict(metrics)
            self._write_summary()

    def final_metrics_sites(self) -> set[str]:
        """The sites that have reported their metrics of the final global model."""
        with self._cond:
            return set(self._final_metrics)

    def tick(self, active_sites: set[str], dropped: list[str] = ()) -> None:
        """Close the round when its wait has run out or dropped sites leave it complete.

        `dropped`: sites the server just dropped for silence; the open round records them (DESIGN §7).
        """
        with self._cond:
            if dropped and self.phase is Phase.TRAINING:
                self._round.dropped += [s for s in dropped if s not in self._round.dropped]
                self._write_summary()
            self._maybe_close(active_sites)

    def abort(self) -> None:
        with self._cond:
            if self.phase is Phase.TRAINING:
                self.phase = Phase.ABORTED
                self._drop_memory_sum()
                self._write_summary()
                self._cond.notify_all()

    # ---- round closing --------------------------------------------------------------------------

    def _maybe_close(self, active: set[str]) -> None:
        if self.phase is not Phase.TRAINING:
            return
        r = self._round
        n = len(r.contributors)
        if n < self.config.min_num_clients:
            return
        waiting_on = (active - set(r.contributors)) | r.receiving
        waited = r.min_reached_at is not None and (
            time.monotonic() - r.min_reached_at >= self.config.wait_after_min_clients
        )
        if n >= self.config.max_num_clients or not waiting_on or waited:
            self._close_round(len(active | set(r.contributors)))

    def _close_round(self, num_sites: int) -> None:
        r = self._round
        started = time.monotonic()
        self._keep_if_best(r)
        try:
            self._aggregate(r, num_sites)
        except AggregateError as e:
            self._refuse_round(r, str(e))
            return
        if r.store is not None:
            r.store.clear()
        from_memory = r.accumulator is not None and r.accumulator.read_from_memory
        if r.accumulator is not None:
            r.accumulator.clear()
        self._rounds.append(
            {
                "round": r.number,
                "contributors": sorted(r.contributors),
                "weights": dict(sorted(r.contributors.items())),
                "metrics": dict(sorted(r.metrics.items())),
                "privacy": dict(sorted(r.privacy.items())),
                "rejected": r.rejected,
                "dropped": sorted(r.dropped),
                "duration_s": round(time.monotonic() - r.opened_at, 3),
            }
        )
        log.info(
            "run %d round %d closed with %s (aggregated in %.2fs, its sum read from %s)",
            self.run_number,
            r.number,
            ", ".join(sorted(r.contributors)),
            time.monotonic() - started,
            "memory" if from_memory else "disk" if r.accumulator is not None else "the updates",
        )
        if r.number + 1 >= self.end_round:
            self.phase = Phase.COMPLETED
            self._memory_sum = None  # the last round's sum: its memory goes back
            log.info("run %d completed after round %d", self.run_number, r.number)
        else:
            self._round = self._new_round(r.number + 1)
        self._write_summary()
        self.open_round_path.unlink(missing_ok=True)
        self.open_control_path.unlink(missing_ok=True)
        self._cond.notify_all()

    def _aggregate(self, r: _RoundState, num_sites: int) -> None:
        """Replace the global model (and the aggregator's state) with the round's result; AggregateError: neither
        is replaced."""
        meta = {"run_number": self.run_number, "round": r.number + 1}
        if self._aggregator is None:
            aggregate_in_child(
                self.record.folder.mmar,
                self._code_policy,
                f"run {self.run_number}",
                self.choice,
                self.model_path,
                self._states,
                r.number,
                meta,
                self._excluded,
                r.store.folder,
                self._largest,
            )
            return
        delta_of = r.accumulator.take_mean if r.accumulator is not None else store_deltas(self._aggregator, r.store)
        try:
            write_next_model(
                self._aggregator,
                self.choice.label,
                delta_of,
                self.model_path,
                self._states,
                r.number,
                meta,
                self._excluded,
                control=r.control,
                control_fraction=len(r.contributors) / max(1, num_sites),
            )
        except ValueError as e:  # an aggregator state that is not this run's
            if isinstance(e, AggregateError):
                raise
            raise AggregateError(str(e)) from None

    def _keep_if_best(self, r: _RoundState) -> None:
        # The contributions' metrics score the global model the round started from, which is the file about
        # to be replaced: a hard link keeps it (no copy) when it scores best so far.
        score = mean_score(r.metrics)
        if score is None or (self._best_global is not None and score <= self._best_global["score"]):
            return
        tmp = self.best_model_path.with_name(f".{BEST_GLOBAL_MODEL}.{r.number}.tmp")
        tmp.unlink(missing_ok=True)
        os.link(self.model_path, tmp)
        os.replace(tmp, self.best_model_path)
        self._best_global = {"round": r.number, "score": score}

    def _refuse_round(self, r: _RoundState, why: str) -> None:
        """No non-finite model is ever written: the round's contributions are refused by name, the last good
        model stays, and the round opens again."""
        names = sorted(r.contributors)
        log.error(
            "run %d round %d: %s; refused the contributions of %s, the global model is kept",
            self.run_number,
            r.number,
            why,
            ", ".join(names),
        )
        fresh = self._new_round(r.number)
        fresh.rejected = [
            *r.rejected,
            *(
                {"site": s, "reason": f"refused with the round: {why}; the model the round started from is kept"}
                for s in names
            ),
        ]
        fresh.dropped = list(r.dropped)
        self._round = fresh
        self._write_summary()
        self._forget_open_round(fresh)
        self._cond.notify_all()

    @property
    def _streaming(self) -> bool:
        """A built-in aggregator that sums the updates as they come (else each update is kept)."""
        return self._aggregator is not None and not self._aggregator.needs_all_updates

    def _new_round(self, number: int) -> _RoundState:
        r = _RoundState(number, time.monotonic(), None)
        if self._streaming:
            r.accumulator = DiskSum(
                self.open_round_path.parent, self._specs, self._excluded, self._largest, memory=self._memory_sum
            )
        else:  # reopens the updates a stopped server kept; _forget_open_round clears them
            r.store = UpdateStore(self.updates_folder, self._specs, self._excluded, self._largest)
        if self.scaffold:
            r.control = control_accumulator(self._specs, self._excluded)
        return r

    def _forget_open_round(self, r: _RoundState) -> None:
        """The round `r` starts empty: no snapshot of an earlier one, no updates kept on disk."""
        self.open_round_path.unlink(missing_ok=True)
        self.open_control_path.unlink(missing_ok=True)
        remove_term_files(self.open_round_path.parent)
        if r.store is not None:
            r.store.clear()

    def _write_summary(self) -> None:
        self.record.write(
            {
                "run_number": self.run_number,
                "task_name": self.config.task_name,
                "aggregator": self.choice.spec(),
                "site_algorithms": self.site_algorithms,
                "status": self.phase.value,
                "start_round": self.config.start_round,
                "num_rounds": self.config.num_rounds,
                "current_round": self._round.number,
                "rounds": self._rounds,
                "final_metrics": dict(sorted(self._final_metrics.items())),
                "best_global": self._best_global,
                # Summed as sequential composition: an upper bound on what each site's data gave away.
                "privacy_epsilon_total": dict(sorted(self._epsilon_spent.items())),
            },
            {"run_number": self.run_number, "status": self.phase.value, "next_round": self._next_round()},
        )

    @property
    def site_algorithms(self) -> list[str]:
        """The site algorithms of the run, for operators: "FedProx(mu=0.01)", "SCAFFOLD"."""
        out = [f"FedProx(mu={self.fedprox_mu:g})"] if self.fedprox_mu is not None else []
        return out + (["SCAFFOLD"] if self.scaffold else [])

    def _next_round(self) -> int:
        return self._round.number + 1 if self.phase is Phase.COMPLETED else self._round.number

    def status(self) -> dict[str, Any]:
        """A snapshot for operators."""
        with self._cond:
            return {
                "run_number": self.run_number,
                "status": self.phase.value,
                "current_round": self._round.number,
                "start_round": self.config.start_round,
                "num_rounds": self.config.num_rounds,
                "aggregator": self.choice.label,
                "site_algorithms": self.site_algorithms,
                "contributors": sorted(self._round.contributors),
                "last_global_metrics": self._last_global_metrics(),
            }

    def _last_global_metrics(self) -> dict[str, Any] | None:
        """The mean metrics the sites reported of the newest global model they scored: {"round", "mean"}."""
        for record in reversed(self._rounds):
            means = mean_metrics(record.get("metrics") or {})
            if means:
                return {"round": record.get("round"), "mean": means}
        return None
