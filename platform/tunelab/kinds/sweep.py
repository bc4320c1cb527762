"""Sweep: search a space of family configs with Tune's search algorithms and ASHA.

Used for the sigma-ramp trajectory augmentation band
(shared/seeds/trajectory_augmentation_notes.txt): each sampled config runs on
every seed; the best trial by the spec's metric is reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from tunelab.kinds._base import ExperimentKind, FinalizeContext
from tunelab.names import ITERATION, Role, TrialStatus
from tunelab.outcome import TrialOutcome
from tunelab.spec import (
    MAX_BUDGET,
    MAX_SAMPLES,
    BaseSpec,
    ConfigUse,
    Domain,
    Finite,
    Strict,
    WholeNumber,
)

__all__ = ["SchedulerSpec", "Sweep", "SweepSpec", "best_trial"]


class SchedulerSpec(Strict):
    """Early stopping for sweeps: ``fifo`` (none) or Tune's ASHA on ``metric``."""

    type: Literal["fifo", "asha"] = "fifo"
    grace_period: Annotated[WholeNumber, Field(ge=1, le=MAX_BUDGET)] = 1
    reduction_factor: Annotated[Finite, Field(gt=1, le=1000)] = 3.0


class SweepSpec(BaseSpec):
    """Search a space of family configs (Tune search algorithms and schedulers).

    ``num_samples`` is 1..10 000 (:data:`~tunelab.spec.MAX_SAMPLES`);
    ``search_alg: optuna_tpe`` runs on one seed (the searcher needs one result
    per suggestion).
    """

    kind: Literal["sweep"]
    search: dict[str, Domain]
    num_samples: Annotated[WholeNumber, Field(ge=1, le=MAX_SAMPLES)] = 1
    search_alg: Literal["random", "optuna_tpe"] = "random"
    scheduler: SchedulerSpec = SchedulerSpec()

    @model_validator(mode="after")
    def _check_search(self) -> SweepSpec:
        if not self.search:
            raise ValueError(
                "search: needs at least one key, e.g. {lr: {loguniform: [1e-4, 1e-2]}}"
            )
        if self.scheduler.type == "asha" and self.scheduler.grace_period > self.budget:
            raise ValueError(
                f"scheduler.grace_period: must be at most the budget ({self.budget}), "
                f"got {self.scheduler.grace_period}; lower it or raise the budget"
            )
        if self.search_alg == "optuna_tpe" and any(d.kind == "grid" for d in self.search.values()):
            raise ValueError("search: grid domains cannot be used with search_alg optuna_tpe")
        if self.search_alg == "optuna_tpe" and len(self.seeds) > 1:
            raise ValueError(
                f"search_alg: optuna_tpe runs each suggestion on one seed, but seeds lists "
                f"{len(self.seeds)}; give one seed (seeds: [{self.seeds[0]}]) or use "
                f"search_alg: random"
            )
        return self

    def planned_trials(self) -> tuple[int, str, str]:
        grid = math.prod(len(d.grid) for d in self.search.values() if d.grid is not None)
        how = f"{len(self.seeds)} seeds x {self.num_samples} samples x {grid} grid points"
        return len(self.seeds) * self.num_samples * grid, "num_samples", how

    def family_configs(self) -> Iterator[ConfigUse]:
        yield ConfigUse("config", dict(self.config))
        for key, domain in self.search.items():
            for i, value in enumerate(domain.sample_values()):
                yield ConfigUse(
                    f"search.{key}",
                    {**self.config, key: value},
                    keys=((f"search.{key}", key),) if i == 0 else (),
                    append_loc=False,
                )


class Sweep(ExperimentKind):
    """The sweep kind (see the module docstring)."""

    spec_cls = SweepSpec
    role = Role.VARIANT
    spec: SweepSpec

    def scheduler(self) -> Any:
        spec = self.spec
        if spec.scheduler.type != "asha":
            return super().scheduler()
        from tunelab.schedulers import NonFiniteLastASHA

        return NonFiniteLastASHA(
            time_attr=ITERATION,
            metric=spec.metric.name,
            mode=spec.metric.mode,
            max_t=spec.budget,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )

    def search_alg(self) -> Any:
        spec = self.spec
        if spec.search_alg != "optuna_tpe":
            return None
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=spec.metric.name, mode=spec.metric.mode, seed=spec.seeds[0])

    def num_samples(self) -> int:
        return self.spec.num_samples

    def param_space(self) -> dict[str, Any] | None:
        space = super().param_space() or {"config": {}}
        space["config"].update({k: d.to_tune() for k, d in self.spec.search.items()})
        return space

    def finalize(self, ctx: FinalizeContext, outcomes: list[TrialOutcome]) -> dict[str, Any]:
        return {"best": best_trial(outcomes, self.spec.metric.name, self.spec.metric.mode)}


def best_trial(outcomes: list[TrialOutcome], metric: str, mode: str) -> dict[str, Any] | None:
    """The best trial by ``metric`` among those that did not fail and have a finite value."""
    from tunelab.schedulers import rank_key

    ok = [
        o for o in outcomes if o.status is not TrialStatus.ERROR and not math.isnan(o.value(metric))
    ]
    if not ok:
        return None
    best = min(ok, key=lambda o: rank_key([o.value(metric)], mode))
    return {
        "trial_id": best.trial_id,
        "run_id": best.run_id,
        "seed": best.seed,
        "config": best.config,
        "value": best.metrics.get(metric),
    }
