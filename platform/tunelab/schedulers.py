"""Culling as Ray Tune trial schedulers.

- :class:`SyncCullScheduler`: the seed document's cull. Every seed trains to
  the milestone and pauses there; once all have arrived (or dropped out),
  the top ``keep`` by the cull metric (ties broken by a second metric)
  continue and the rest are stopped. Decisions are persisted to a JSON file
  so that a driver restarted after a crash makes the same decisions.
- :class:`OptunaPrunerScheduler`: an Optuna pruner (successive halving,
  Hyperband, Wilcoxon) decides which trials stop. Each Tune trial is an Optuna
  trial; every result is reported to it at its iteration and ``should_prune``
  is Tune's STOP.

Both judge a trial on ``time_attr`` (the iteration tunelab reports, in
iterations: the same units as the spec's budget).

Cull schedulers are registered by name in :data:`CULL_SCHEDULERS` (``sync``,
``asha``, ``optuna``); a spec's ``cull.scheduler`` must be one of them, and
:func:`make_cull_scheduler` builds one from a :class:`CullPlan`. A new
scheduler is a factory registered with :func:`register_cull_scheduler`.
:class:`NonFiniteLastASHA` (Tune's ASHA, diverged trials last) and
:func:`replay_curves` (a scheduler driven offline by recorded curves) live
here too.

This module is the public home of every name above: the sync cull (and the
trial helpers :func:`rank_key`, :func:`recorded_results`, :func:`will_retry`)
is written in :mod:`tunelab._sync_cull`, the Optuna pruner in
:mod:`tunelab._optuna_pruner`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from tunelab._optuna_pruner import OptunaPrunerScheduler
from tunelab._sync_cull import SyncCullScheduler, rank_key, recorded_results, will_retry
from tunelab.names import ITERATION, as_float

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

__all__ = [
    "CULL_SCHEDULERS",
    "CullPlan",
    "NonFiniteLastASHA",
    "OptunaPrunerScheduler",
    "ReplayOutcome",
    "SyncCullScheduler",
    "make_cull_scheduler",
    "rank_key",
    "recorded_results",
    "register_cull_scheduler",
    "replay_curves",
    "will_retry",
]


@dataclasses.dataclass(frozen=True)
class CullPlan:
    """What a seed cull asks of its scheduler.

    Args:
        metric: The cull metric (e.g. ``val/autonomy``).
        mode: ``max`` or ``min``.
        milestone: The cull iteration (the first iteration a trial may be stopped at).
        keep: Seeds meant to survive the cull.
        n_trials: Seeds taking part.
        budget: Iterations per trial.
        tie_break: A second metric ranking trials tied on ``metric`` (sync only).
        pruner: The Optuna pruner (``optuna`` only).
        state_path: Where a scheduler may persist its decisions (JSON).
    """

    metric: str
    mode: str
    milestone: int
    keep: int
    n_trials: int
    budget: int
    tie_break: str | None = None
    pruner: str = "successive_halving"
    state_path: str | None = None

    @property
    def reduction_factor(self) -> int:
        """Successive halving's eta that keeps about ``keep`` of ``n_trials``: ``max(2, round(n/keep))``."""
        return max(2, round(self.n_trials / self.keep))


#: Cull schedulers by name: ``name -> factory(plan) -> TrialScheduler``.
CULL_SCHEDULERS: dict[str, Callable[[CullPlan], TrialScheduler]] = {}


def register_cull_scheduler(
    name: str,
) -> Callable[[Callable[[CullPlan], TrialScheduler]], Callable[[CullPlan], TrialScheduler]]:
    """Register a cull scheduler factory under ``name`` (a spec's ``cull.scheduler``)."""

    def deco(
        factory: Callable[[CullPlan], TrialScheduler],
    ) -> Callable[[CullPlan], TrialScheduler]:
        if name in CULL_SCHEDULERS:
            raise ValueError(f"a cull scheduler named {name!r} is already registered")
        CULL_SCHEDULERS[name] = factory
        return factory

    return deco


def make_cull_scheduler(name: str, plan: CullPlan) -> TrialScheduler:
    """Build the registered cull scheduler ``name`` for ``plan``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the names).
    """
    try:
        factory = CULL_SCHEDULERS[name]
    except KeyError:
        raise ValueError(
            f"The value of `scheduler` is {name!r}, but must be one of {sorted(CULL_SCHEDULERS)}."
        ) from None
    return factory(plan)


@register_cull_scheduler("sync")
def _sync(plan: CullPlan) -> TrialScheduler:
    return SyncCullScheduler(
        metric=plan.metric,
        mode=plan.mode,
        milestone=plan.milestone,
        keep=plan.keep,
        expected=plan.n_trials,
        tie_break=plan.tie_break,
        state_path=plan.state_path,
    )


class NonFiniteLastASHA(ASHAScheduler):
    """Tune's ASHA, except that a non-finite metric at or after the grace period stops the trial.

    Tune's ASHA compares ``value < cutoff``, which is False for NaN, so a
    diverged trial would be promoted past every healthy one. Here a trial
    whose metric is NaN or infinite once it may be culled ranks last: it is
    stopped and not recorded in the rung (it competes with no healthy trial).
    A restored driver refills the rungs from each trial's recorded results, so
    a resumed cull judges late seeds against the same rungs as a straight run.
    Arguments are ASHA's.
    """

    def __init__(self, *, grace_period: int = 1, **kwargs: Any) -> None:
        super().__init__(grace_period=grace_period, **kwargs)
        self.grace_period = grace_period

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # A restored driver starts with empty rungs: refill them from the trial's recorded results.
        metric, op = str(self._metric), float(self._metric_op or 1.0)
        rows = {int(r.get(self._time_attr, 0) or 0): r for r in recorded_results(trial)}
        for milestone, recorded in self._trial_info[trial.trial_id]._rungs:
            value = as_float(rows.get(milestone, {}).get(metric))
            if milestone in rows and math.isfinite(value):
                recorded[trial.trial_id] = op * value

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        value = as_float(result.get(str(self._metric)))
        if not math.isfinite(value) and result.get(self._time_attr, 0) >= self.grace_period:
            self._num_stopped += 1
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)


@register_cull_scheduler("asha")
def _asha(plan: CullPlan) -> TrialScheduler:
    return NonFiniteLastASHA(
        time_attr=ITERATION,
        metric=plan.metric,
        mode=plan.mode,
        max_t=plan.budget,
        grace_period=plan.milestone,
        reduction_factor=plan.reduction_factor,
        brackets=1,
    )


@register_cull_scheduler("optuna")
def _optuna(plan: CullPlan) -> TrialScheduler:
    return OptunaPrunerScheduler(
        metric=plan.metric,
        mode=plan.mode,
        pruner=plan.pruner,
        max_t=plan.budget,
        min_t=plan.milestone,
        reduction_factor=plan.reduction_factor,
    )


@dataclasses.dataclass
class ReplayOutcome:
    """What a scheduler did to recorded curves: iterations each trial trained, its final status."""

    iterations: list[int]
    status: list[str]


def replay_curves(
    scheduler: TrialScheduler,
    curves: list[list[dict[str, float]]],
    budget: int,
    *,
    workers: int = 2,
    crashes: dict[int, tuple[int, bool]] | None = None,
) -> ReplayOutcome:
    """Drive a Tune scheduler with recorded learning curves, offline (no Ray).

    ``curves[i][t]`` is trial ``i``'s result at iteration ``t + 1``. Up to
    ``workers`` trials run at once and advance in lockstep; the scheduler's
    CONTINUE / PAUSE / STOP and its ``choose_trial_to_run`` decide everything
    else, exactly as in Tune's controller loop. Used to test culls and to
    measure their efficiency on recorded seeds (bench/bench_cull.py).

    ``crashes[i] = (iteration, retried)``: trial ``i`` crashes once while
    training that iteration. As in Tune, the scheduler's ``on_trial_error``
    is called; a retried trial goes back to PENDING and resumes from its last
    checkpoint (the iteration before), otherwise it ends in ERROR.
    """
    trials = [_ReplayTrial(f"t{i:04d}", c) for i, c in enumerate(curves)]
    pending_crashes = dict(crashes or {})
    ctl = _ReplayController(trials)
    for t in trials:
        scheduler.on_trial_add(ctl, t)  # type: ignore[arg-type]
    while True:
        running = [t for t in trials if t.status == Trial.RUNNING]
        while len(running) < workers:
            nxt = scheduler.choose_trial_to_run(ctl)  # type: ignore[arg-type]
            if nxt is None:
                break
            nxt.status = Trial.RUNNING
            running.append(nxt)  # type: ignore[arg-type]
        if not running:
            break
        t = min(running, key=lambda x: x.it)
        t.it += 1
        index = trials.index(t)
        if index in pending_crashes and pending_crashes[index][0] == t.it:
            t.retry = pending_crashes.pop(index)[1]
            scheduler.on_trial_error(ctl, t)  # type: ignore[arg-type]
            t.it -= 1
            t.status = Trial.PENDING if t.retry else Trial.ERROR
            continue
        result = {
            **t.curve[t.it - 1],
            ITERATION: t.it,
            "training_iteration": t.it,
            "trial_id": t.trial_id,
        }
        decision = scheduler.on_trial_result(ctl, t, result)  # type: ignore[arg-type]
        if t.it >= budget or decision == TrialScheduler.STOP:
            t.status = Trial.TERMINATED
            scheduler.on_trial_complete(ctl, t, result)  # type: ignore[arg-type]
        elif decision == TrialScheduler.PAUSE:
            t.status = Trial.PAUSED
    return ReplayOutcome([t.it for t in trials], [t.status for t in trials])


@dataclasses.dataclass(eq=False)
class _ReplayTrial:
    trial_id: str
    curve: list[dict[str, float]]
    status: str = Trial.PENDING
    it: int = 0
    is_saving: bool = False
    retry: bool = False

    def should_recover(self) -> bool:
        return self.retry


class _ReplayController:
    def __init__(self, trials: list[_ReplayTrial]) -> None:
        self.trials = trials

    def get_trials(self) -> list[_ReplayTrial]:
        return self.trials

    def stop_trial(self, trial: _ReplayTrial) -> None:
        trial.status = Trial.TERMINATED
