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
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from tunelab.checkpoint import atomic_write_json, read_json
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

logger = logging.getLogger(__name__)


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


class OptunaPrunerScheduler(FIFOScheduler):
    """Let an Optuna pruner decide which Tune trials stop.

    Args:
        metric: The metric reported to Optuna.
        mode: ``max`` or ``min`` (the study's direction).
        pruner: ``successive_halving``, ``hyperband`` or ``wilcoxon``, or an
            ``optuna.pruners.BasePruner`` instance.
        max_t: The budget in iterations (Hyperband's ``max_resource``).
        min_t: The first iteration a trial may be pruned at.
        reduction_factor: Successive halving's eta.
        time_attr: The result key used as Optuna's step.

    For ``wilcoxon`` the steps are the paired instances: a trial is pruned when
    its values over the steps it shares with the best trial are significantly
    worse (Optuna's WilcoxonPruner).
    """

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        pruner: Any = "successive_halving",
        max_t: int,
        min_t: int = 1,
        reduction_factor: int = 2,
        time_attr: str = ITERATION,
    ) -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"The value of `mode` is {mode!r}, but must be 'max' or 'min'.")
        self._metric, self._mode, self.time_attr = metric, mode, time_attr
        self._pruner_arg, self.max_t, self.min_t, self.eta = pruner, max_t, min_t, reduction_factor
        self._study: Any = None
        self._trials: dict[str, Any] = {}
        self.pruned: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_study"], state["_trials"] = None, {}
        return state

    def _ensure_study(self) -> Any:
        if self._study is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._study = optuna.create_study(
                # fixed: Hyperband assigns trials to brackets by a hash of the study name,
                # so a random name made its culls differ from run to run
                study_name="tunelab-cull",
                direction="maximize" if self._mode == "max" else "minimize",
                pruner=_make_pruner(self._pruner_arg, self.min_t, self.max_t, self.eta),
            )
        return self._study

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        otrial = self._trials[trial.trial_id] = self._ensure_study().ask()
        # A restored driver starts with an empty study: replay what the trial already reported.
        for row in recorded_results(trial):
            step, value = int(row.get(self.time_attr, 0) or 0), as_float(row.get(str(self._metric)))
            otrial.report(value if math.isfinite(value) else math.nan, step)
            otrial.should_prune()  # records the rung it reached, as the live run did
        if trial.status == Trial.TERMINATED:
            last = otrial.storage.get_trial(otrial._trial_id).intermediate_values
            if last and max(last) < self.max_t:
                self.pruned[trial.trial_id] = max(last)
                self._finish(trial, pruned=True)
            else:
                self._finish(trial, pruned=False, value=last[max(last)] if last else math.nan)
        elif trial.status == Trial.ERROR:
            self._finish(trial, pruned=False, failed=True)

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        if trial.trial_id not in self._trials:  # restored trial
            self.on_trial_add(tune_controller, trial)
        otrial = self._trials[trial.trial_id]
        step = int(result.get(self.time_attr, 0))
        value = as_float(result.get(self._metric))
        if not math.isfinite(value):
            value = math.nan  # Optuna's rule for a diverged value (SH/Hyperband prune it)
        if step in otrial.storage.get_trial(otrial._trial_id).intermediate_values:
            return TrialScheduler.CONTINUE
        otrial.report(value, step)
        # Non-finite is worst for every pruner (Wilcoxon never prunes NaN by itself).
        diverged = math.isnan(value) and step >= self.min_t
        if step < self.max_t and (diverged or otrial.should_prune()):
            self.pruned[trial.trial_id] = step
            self._finish(trial, pruned=True)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(
        self, tune_controller: TuneController, trial: Trial, result: dict
    ) -> None:
        self._finish(trial, pruned=False, value=as_float((result or {}).get(self._metric)))

    def on_trial_error(self, tune_controller: TuneController, trial: Trial) -> None:
        if not will_retry(trial):  # a retried trial keeps its Optuna trial and its history
            self._finish(trial, pruned=False, failed=True)

    def _finish(
        self, trial: Trial, *, pruned: bool, value: float = math.nan, failed: bool = False
    ) -> None:
        import optuna

        otrial = self._trials.pop(trial.trial_id, None)
        if otrial is None:
            return
        if pruned:
            self._study.tell(otrial, state=optuna.trial.TrialState.PRUNED)
        elif failed or math.isnan(value):
            self._study.tell(otrial, state=optuna.trial.TrialState.FAIL)
        else:
            self._study.tell(otrial, value)

    def debug_string(self) -> str:
        return f"OptunaPruner({self._pruner_arg}, pruned={len(self.pruned)})"


def _make_pruner(pruner: Any, min_t: int, max_t: int, eta: int) -> Any:
    import optuna

    if not isinstance(pruner, str):
        return pruner
    if pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_t, reduction_factor=eta)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_t, max_resource=max_t, reduction_factor=eta
        )
    if pruner == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=min_t)
    raise ValueError(
        f"The value of `pruner` is {pruner!r}, but must be one of successive_halving, hyperband, wilcoxon."
    )


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
