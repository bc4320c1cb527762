"""The seed document's synchronous cull, and what every cull scheduler reads of a Tune trial.

:class:`SyncCullScheduler` pauses every seed at the milestone and, once all
have arrived (or dropped out), keeps the top ``keep`` by the cull metric
(ties broken by a second metric); its decisions are persisted to a JSON file
so that a restarted driver makes the same ones. :func:`rank_key` is its
ranking (non-finite last), also used by the kinds' selection.
:func:`recorded_results` (a restored trial's past results) and
:func:`will_retry` (whether Tune retries a failed trial) serve every cull
scheduler. Imported from :mod:`tunelab.schedulers`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from tunelab.checkpoint import atomic_write_json, read_json
from tunelab.names import ITERATION, as_float

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

__all__ = ["SyncCullScheduler", "rank_key", "recorded_results", "will_retry"]

logger = logging.getLogger(__name__)


class SyncCullScheduler(FIFOScheduler):
    """Pause every trial at ``milestone``; when all are there, keep the top ``keep``.

    Args:
        metric: The cull metric (e.g. ``val/autonomy``).
        mode: ``max`` or ``min``.
        milestone: The cull iteration (units of ``time_attr``).
        keep: Trials that continue after the cull.
        expected: How many trials take part (the number of seeds); the cull
            waits until this many have arrived or dropped out.
        tie_break: A second metric (same mode) ranking trials tied on ``metric``.
        state_path: A JSON file where arrivals and the decision are kept.

    Trials whose metric is NaN rank last; trials that error or end before the
    milestone drop out of the cull.
    """

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        milestone: int,
        keep: int,
        expected: int,
        tie_break: str | None = None,
        state_path: str | None = None,
        time_attr: str = ITERATION,
    ) -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"The value of `mode` is {mode!r}, but must be 'max' or 'min'.")
        if not 1 <= keep < expected:
            raise ValueError(
                f"The value of `keep` is {keep}, but must be `1 <= keep < expected` ({expected})."
            )
        if milestone < 1:
            raise ValueError(
                f"The value of `milestone` is {milestone}, but must be `milestone >= 1`."
            )
        self._metric, self._mode, self.milestone, self.keep = metric, mode, milestone, keep
        self.expected, self.tie_break, self.time_attr = expected, tie_break, time_attr
        self.state_path = state_path
        # trial_id -> [score, tie] at the milestone (None if the trial dropped out)
        self._arrived: dict[str, list[float] | None] = {}
        self._survivors: list[str] | None = None
        self._load()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore unpickles the scheduler as it was at the start: reload the decisions.
        self.__dict__.update(state)
        self._load()

    # -- Tune hooks ------------------------------------------------------------
    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        # A restored driver requeues every unfinished trial as PENDING, and Tune starts every
        # PENDING trial whatever the scheduler says: a seed that already reached the milestone
        # would train past it before the cull. Put it back where the cull left it.
        if trial.status != Trial.PENDING or self._arrived.get(trial.trial_id) is None:
            return
        if self._survivors is None:
            trial.set_status(Trial.PAUSED)
        elif trial.trial_id not in self._survivors:
            trial.set_status(Trial.TERMINATED)  # culled before the driver stopped

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        if result.get(self.time_attr, 0) < self.milestone:
            return TrialScheduler.CONTINUE
        if self._survivors is not None:
            return (
                TrialScheduler.CONTINUE
                if trial.trial_id in self._survivors
                else TrialScheduler.STOP
            )
        if trial.trial_id not in self._arrived:
            self._arrived[trial.trial_id] = [
                as_float(result.get(self._metric)),
                as_float(result.get(self.tie_break)) if self.tie_break else 0.0,
            ]
            self._save()
        self._maybe_decide(tune_controller, current=trial)
        if self._survivors is None:
            return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE if trial.trial_id in self._survivors else TrialScheduler.STOP

    def on_trial_complete(
        self, tune_controller: TuneController, trial: Trial, result: dict
    ) -> None:
        self._drop(tune_controller, trial)

    def on_trial_error(self, tune_controller: TuneController, trial: Trial) -> None:
        if not will_retry(trial):  # a trial Tune retries from its checkpoint stays in the cull
            self._drop(tune_controller, trial)

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        self._drop(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: TuneController) -> Trial | None:
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING:
                return trial
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PAUSED and self._may_resume(trial):
                return trial
        return None

    def debug_string(self) -> str:
        state = (
            "decided"
            if self._survivors is not None
            else f"{len(self._arrived)}/{self.expected} arrived"
        )
        return f"SyncCull(at={self.milestone}, keep={self.keep}, {state})"

    # -- public views ----------------------------------------------------------
    @property
    def survivors(self) -> list[str] | None:
        """Trial ids that survived the cull (None until it is decided)."""
        return None if self._survivors is None else list(self._survivors)

    # -- private ---------------------------------------------------------------
    def _may_resume(self, trial: Trial) -> bool:
        if self._survivors is not None:
            return trial.trial_id in self._survivors
        # a trial paused before it reached the milestone (e.g. restored) may go on
        return trial.trial_id not in self._arrived

    def _drop(self, tune_controller: TuneController, trial: Trial) -> None:
        if self._survivors is None and trial.trial_id not in self._arrived:
            self._arrived[trial.trial_id] = None
            self._save()
            self._maybe_decide(tune_controller, current=None)

    def _maybe_decide(self, tune_controller: TuneController, current: Trial | None) -> None:
        if self._survivors is not None or len(self._arrived) < self.expected:
            return
        scored = {tid: s for tid, s in self._arrived.items() if s is not None}
        ranked = sorted(scored, key=lambda tid: rank_key(scored[tid], self._mode))
        self._survivors = ranked[: self.keep]
        self._save()
        logger.info("sync cull at %s: survivors %s", self.milestone, self._survivors)
        for trial in tune_controller.get_trials():
            if trial is current or trial.trial_id in self._survivors:
                continue
            if trial.status == Trial.PAUSED or trial.is_saving:
                tune_controller.stop_trial(trial)

    def _save(self) -> None:
        if self.state_path:
            atomic_write_json(
                Path(self.state_path),
                {
                    "milestone": self.milestone,
                    "arrived": self._arrived,
                    "survivors": self._survivors,
                },
            )

    def _load(self) -> None:
        state = read_json(Path(self.state_path)) if self.state_path else None
        if state is not None:
            self._arrived = dict(state["arrived"])
            self._survivors = state["survivors"]


def recorded_results(trial: Trial) -> list[dict[str, Any]]:
    """The results a trial reported before (Tune's ``result.json`` in its folder); [] if none.

    Read from the trial's storage folder (a local ``storage_path``) or the
    driver's staging folder, whichever holds more.
    """
    from tunelab.layout import TRIAL_RESULT, read_result_lines

    rows: list[dict[str, Any]] = []
    for attr in ("path", "local_path"):  # the storage copy, then the driver's staging copy
        try:
            folder = getattr(trial, attr, None)
        except RuntimeError:  # a new trial has no folder yet
            continue
        if folder:
            found = read_result_lines(Path(folder) / TRIAL_RESULT)
            rows = found if len(found) > len(rows) else rows
    return rows


def will_retry(trial: Trial) -> bool:
    """Whether Tune will retry ``trial`` after the failure it is reporting.

    Tune calls ``on_trial_error`` both for a failure it retries from the last
    checkpoint (``FailureConfig(max_failures)``, then requeues the trial) and
    for the last one; only the last one takes the trial out of a cull.
    """
    should_recover = getattr(trial, "should_recover", None)
    return bool(should_recover()) if callable(should_recover) else False


def rank_key(score: list[float], mode: str) -> tuple[float, float]:
    """Sort key putting the best (score, tie) first and non-finite (NaN, +-inf) last.

    A diverged value is never better than a finite one, in either mode:
    ``+inf`` in ``max`` mode is a blow-up, not a record.
    """
    sign = -1.0 if mode == "max" else 1.0
    return tuple(sign * v if math.isfinite(v) else math.inf for v in score)  # type: ignore[return-value]
