"""Seed cull: train N seeds, cull at a milestone, select one survivor.

shared/seeds/ouroboros_spectral_rollout_pr.txt: every seed trains to the
milestone (a fraction of the budget); there they are ranked by the cull metric
(ties broken by a second metric) and all but the top ``keep`` are stopped; the
survivors train to the budget and one is selected by ``select.metric``. The
selected checkpoint is reloaded and its artifacts regenerated, which proves the
checkpoint is usable; ``selected_model.json`` is its manifest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tunelab.checkpoint import atomic_write_json, read_json
from tunelab.family import get_family
from tunelab.kinds._base import ExperimentKind, FinalizeContext
from tunelab.layout import write_table
from tunelab.names import (
    TAG_KEPT,
    TAG_NO_SELECTION,
    TAG_SELECTED,
    TAG_SELECTED_RUN,
    TAG_SELECTED_SEED,
    TAG_SELECTED_VALUE,
    Role,
    TrialStatus,
)
from tunelab.outcome import TrialOutcome
from tunelab.spec import (
    MAX_BUDGET,
    MAX_SEEDS,
    BaseSpec,
    ConfigUse,
    Finite,
    Seed,
    Strict,
    WholeNumber,
)
from tunelab.tracking import log_summary

__all__ = ["CullSpec", "SeedCull", "SeedCullSpec", "SelectSpec"]


class CullSpec(Strict):
    """When to cull and how many seeds survive.

    ``at`` is a fraction of the budget (0 < at < 1) or an iteration (an
    integer >= 1, below the budget). ``scheduler`` is a registered cull
    scheduler (:data:`tunelab.schedulers.CULL_SCHEDULERS`): ``sync`` waits for
    every seed at the milestone, then keeps the top ``keep`` (ties broken by
    ``tie_break``); ``asha`` is Tune's asynchronous successive halving;
    ``optuna`` lets an Optuna pruner decide (``pruner``).
    """

    at: Annotated[Finite, Field(gt=0, le=MAX_BUDGET)]
    keep: Annotated[WholeNumber, Field(ge=1, le=MAX_SEEDS)]
    scheduler: str = "sync"
    tie_break: str | None = None
    pruner: Literal["successive_halving", "hyperband", "wilcoxon"] = "successive_halving"

    @field_validator("scheduler")
    @classmethod
    def _registered(cls, v: str) -> str:
        from tunelab.schedulers import CULL_SCHEDULERS

        if v not in CULL_SCHEDULERS:
            raise ValueError(f"must be one of {sorted(CULL_SCHEDULERS)} (got {v!r})")
        return v

    def milestone(self, budget: int) -> int:
        """The cull iteration for a budget."""
        if self.at < 1:
            return max(1, math.ceil(self.at * budget))
        return int(self.at)


class SelectSpec(Strict):
    """How the surviving seed is selected at the end."""

    metric: str
    mode: Literal["max", "min"]


class SeedCullSpec(BaseSpec):
    """Train N seeds, cull at a milestone, select the best survivor."""

    kind: Literal["seed_cull"]
    seeds: list[Seed]
    cull: CullSpec
    select: SelectSpec

    @model_validator(mode="after")
    def _check_cull(self) -> SeedCullSpec:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: seeds must be distinct")
        if self.cull.keep >= len(self.seeds):
            raise ValueError(
                f"cull.keep: must be smaller than the number of seeds ({len(self.seeds)}), "
                f"got {self.cull.keep}; lower keep or add seeds"
            )
        if self.cull.at >= 1 and (self.cull.at != int(self.cull.at) or self.cull.at >= self.budget):
            raise ValueError(
                f"cull.at: an iteration must be an integer below the budget ({self.budget}), "
                f"got {self.cull.at}; or give a fraction 0 < at < 1"
            )
        if (
            self.cull.scheduler == "sync"
            and self.max_concurrent is not None
            and self.max_concurrent < len(self.seeds)
        ):
            # Paused seeds keep their Tune slots: the seeds beyond max_concurrent would never start.
            raise ValueError(
                f"max_concurrent: a sync cull pauses every seed at the milestone until all "
                f"{len(self.seeds)} seeds (seeds) arrive, so max_concurrent ({self.max_concurrent}) "
                f"must be at least the number of seeds; raise max_concurrent, remove it, or use "
                f"cull.scheduler: asha"
            )
        return self

    def family_configs(self) -> Iterator[ConfigUse]:
        yield ConfigUse("config", dict(self.config))

    def metric_refs(self) -> list[tuple[str, str]]:
        refs = [*super().metric_refs(), ("select.metric", self.select.metric)]
        if self.cull.tie_break:
            refs.append(("cull.tie_break", self.cull.tie_break))
        return refs


class SeedCull(ExperimentKind):
    """The seed cull kind (see the module docstring)."""

    spec_cls = SeedCullSpec
    role = Role.SEED
    spec: SeedCullSpec

    @property
    def milestone(self) -> int:
        return self.spec.cull.milestone(self.spec.budget)

    def milestones(self) -> tuple[int, ...]:
        return (self.milestone,)

    def scheduler(self) -> Any:
        from tunelab.schedulers import CullPlan, make_cull_scheduler

        spec, cull = self.spec, self.spec.cull
        plan = CullPlan(
            metric=spec.metric.name,
            mode=spec.metric.mode,
            milestone=self.milestone,
            keep=cull.keep,
            n_trials=len(spec.seeds),
            budget=spec.budget,
            tie_break=cull.tie_break,
            pruner=cull.pruner,
            state_path=str(self.layout.cull_state_file),
        )
        return make_cull_scheduler(cull.scheduler, plan)

    def finalize(self, ctx: FinalizeContext, outcomes: list[TrialOutcome]) -> dict[str, Any]:
        """Write the seed table, select a seed; report how many seeds the cull kept.

        A seed whose selection metric is non-finite (diverged) is never
        selected. When no seed can be selected, ``selected`` is None and
        ``no_selection`` says why; the parent run is tagged
        ``tunelab.no_selection`` (the CLI exits 3).
        """
        write_table(ctx.table, self.layout.seed_table_stem)
        kept = sum(o.status is TrialStatus.FINISHED for o in outcomes)
        ctx.tracker.set_tags(ctx.state.parent_run_id, {TAG_KEPT: kept})
        out: dict[str, Any] = {"cull": {**self._cull_block(), "kept": kept}}
        out["selected"] = self._select(ctx, outcomes)
        if out["selected"] is None:
            reason = self._no_selection_reason(outcomes)
            out["no_selection"] = reason
            ctx.tracker.set_tags(
                ctx.state.parent_run_id, {TAG_NO_SELECTION: reason, TAG_SELECTED_SEED: "none"}
            )
        return out

    # -- private ---------------------------------------------------------------------------
    def _cull_block(self) -> dict[str, Any]:
        cull = self.spec.cull
        return {"at": self.milestone, "keep": cull.keep, "scheduler": cull.scheduler}

    def _selectable(self, o: TrialOutcome) -> bool:
        return o.status is TrialStatus.FINISHED and math.isfinite(o.value(self.spec.select.metric))

    def _no_selection_reason(self, outcomes: list[TrialOutcome]) -> str:
        finished = [o for o in outcomes if o.status is TrialStatus.FINISHED]
        metric = self.spec.select.metric
        if finished:
            return (
                f"every seed that finished diverged: {metric} is not finite for seeds "
                + ", ".join(str(o.seed) for o in finished)
            )
        return "no seed reached the budget (every seed was culled, diverged or failed)"

    def _select(self, ctx: FinalizeContext, outcomes: list[TrialOutcome]) -> dict[str, Any] | None:
        from tunelab._trial import restore_experiment
        from tunelab.schedulers import rank_key

        spec, layout, tracker = self.spec, self.layout, ctx.tracker
        finished = [o for o in outcomes if self._selectable(o)]
        if not finished:
            return None
        tie = spec.cull.tie_break

        def score(o: TrialOutcome) -> list[float]:
            return [o.value(spec.select.metric), o.value(tie) if tie else 0.0]

        best = min(finished, key=lambda o: (rank_key(score(o), spec.select.mode), o.seed))
        value = best.metrics.get(spec.select.metric)
        # Reload the selected checkpoint and regenerate its artifacts: proves the checkpoint is usable.
        exported: dict[str, Any] = {}
        if best.checkpoint:
            exp, _ = restore_experiment(
                spec.family,
                best.config,
                int(best.seed or 0),
                ctx.state.data_root,
                Path(best.checkpoint),
            )
            exported = exp.export(layout.selected_dir)
        hyper = dataclasses.asdict(get_family(spec.family).make_config(best.config))
        trial_manifest = read_json(layout.trial_artifacts(best.trial_id) / "manifest.json", {})
        manifest = {
            "spec": spec.name,
            "family": spec.family,
            "selected_seed": best.seed,
            "trial_id": best.trial_id,
            "run_id": best.run_id,
            "selection": {
                "metric": spec.select.metric,
                "mode": spec.select.mode,
                "value": value,
                "tie_break": tie,
            },
            "cull": self._cull_block(),
            "val": {k: v for k, v in best.metrics.items() if k.startswith("val/")},
            "test": _scores(exported, "test") or _scores(trial_manifest, "test"),
            "export": exported,
            "sample_rate": exported.get("sample_rate", trial_manifest.get("sample_rate")),
            "hyperparameters": hyper,
            "budget": spec.budget,
            "checkpoint": best.checkpoint,
            "seeds": [o.seed for o in outcomes],
        }
        path = layout.selected_manifest
        atomic_write_json(path, manifest)
        for o in outcomes:
            if o.run_id:
                tracker.set_tags(o.run_id, {TAG_SELECTED: "true" if o is best else "false"})
        parent = ctx.state.parent_run_id
        tracker.set_tags(
            parent,
            {
                TAG_SELECTED_SEED: best.seed,
                TAG_SELECTED_RUN: best.run_id,
                TAG_SELECTED_VALUE: value,
            },
        )
        log_summary(tracker, parent, {spec.select.metric: value})  # the list sorts by it
        tracker.log_artifact(parent, path)
        tracker.log_artifact(parent, layout.seed_table_stem.with_suffix(".csv"))
        if layout.selected_dir.is_dir():
            tracker.log_artifacts(parent, layout.selected_dir, "selected")
        return {
            "seed": best.seed,
            "trial_id": best.trial_id,
            "run_id": best.run_id,
            "metric": spec.select.metric,
            "value": value,
            "manifest": str(path),
            "checkpoint": best.checkpoint,
        }


def _scores(manifest: dict[str, Any], split: str) -> dict[str, Any]:
    """A family manifest's scores of ``split``: a ``{split: {...}}`` block or ``split/...`` keys."""
    block = manifest.get(split)
    if isinstance(block, dict):
        return block
    return {k: v for k, v in manifest.items() if k.startswith(f"{split}/")}
