"""Culling by an Optuna pruner: :class:`OptunaPrunerScheduler`.

An Optuna pruner (successive halving, Hyperband, Wilcoxon) decides which
trials stop. Each Tune trial is an Optuna trial; every result is reported to
it at its iteration and ``should_prune`` is Tune's STOP. A restored driver
rebuilds the study from each trial's recorded results. Imported from
:mod:`tunelab.schedulers`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from tunelab._sync_cull import recorded_results, will_retry
from tunelab.names import ITERATION, as_float

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

__all__ = ["OptunaPrunerScheduler"]


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
