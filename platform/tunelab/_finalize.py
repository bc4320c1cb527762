"""The driver's post-processing: trial outcomes -> tags, the results table, ``summary.json``.

:func:`finalize` runs once every trial has ended (after a resume too): it
decides each trial's outcome (:mod:`tunelab.outcome`), rewrites the decision
tags, ends the runs, writes the results table, asks the kind for its part of
the summary (:meth:`~tunelab.kinds.ExperimentKind.finalize`) and writes
``summary.json`` last, which marks the experiment finalized. It knows no
experiment kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.checkpoint import atomic_write_json, read_json, sorted_checkpoints, strict_json
from tunelab.kinds import ExperimentKind, FinalizeContext
from tunelab.layout import RunState, write_table
from tunelab.names import TAG_CULLED_AT, TAG_N_FAILED, TAG_N_TRIALS, TrialStatus, is_decision_tag
from tunelab.outcome import TrialOutcome, outcome_from_result
from tunelab.spec import AnySpec
from tunelab.tracking import Tracker

__all__ = ["finalize"]


def finalize(
    state: RunState, spec: AnySpec, kind: ExperimentKind, tracker: Tracker, grid: Any
) -> dict[str, Any]:
    layout = state.layout
    runs = read_json(layout.runs_file, {})
    outcomes = [
        outcome_from_result(result, spec.budget, runs=runs, checkpoint=_last_checkpoint(result))
        for result in grid
    ]
    outcomes.sort(key=lambda o: (o.seed if isinstance(o.seed, int) else 0, o.trial_id))
    # Decisions are written from scratch: none left by an earlier finalization survives.
    for run_id in [state.parent_run_id, *(o.run_id for o in outcomes if o.run_id)]:
        tracker.clear_tags(run_id, is_decision_tag)
    for o in outcomes:
        if o.run_id is None:
            continue
        if o.status is TrialStatus.CULLED:
            tracker.set_tags(o.run_id, {TAG_CULLED_AT: o.iterations})
        tracker.end_run(o.run_id, "FAILED" if o.status is TrialStatus.ERROR else "FINISHED")
    table = _results_table(outcomes, kind.placement)
    write_table(table, layout.results_stem)
    failed = sum(o.status is TrialStatus.ERROR for o in outcomes)
    summary: dict[str, Any] = {
        "experiment_dir": str(layout.root),
        "tracking_uri": state.tracking_uri,
        "mlflow_experiment": state.mlflow_experiment,
        "mlflow_experiment_id": state.mlflow_experiment_id,
        "parent_run_id": state.parent_run_id,
        "spec": spec.name,
        "kind": spec.kind,
        "metric": spec.metric.model_dump(),
        "trials": [_summary_trial(o, kind.placement) for o in outcomes],
        "failed": failed,
        "failure_budget": spec.failure.tolerate,
    }
    ctx = FinalizeContext(state=state, layout=layout, tracker=tracker, table=table)
    summary.update(kind.finalize(ctx, outcomes))
    parent = state.parent_run_id
    tracker.set_tags(parent, {TAG_N_TRIALS: len(outcomes), TAG_N_FAILED: failed})
    tracker.log_artifact(parent, layout.results_csv)
    tracker.log_dict(parent, strict_json(summary), layout.summary_file.name)
    tracker.end_run(parent, "FAILED" if failed > spec.failure.tolerate else "FINISHED")
    # Last: summary.json marks the experiment finalized (resume then changes nothing).
    atomic_write_json(layout.summary_file, summary)
    return summary


def _summary_trial(o: TrialOutcome, placement: tuple[str, ...]) -> dict[str, Any]:
    return {
        "trial_id": o.trial_id,
        "run_id": o.run_id,
        "seed": o.seed,
        **{k: getattr(o, k) for k in placement},
        "iterations": o.iterations,
        "status": o.status.value,
        "metrics": o.metrics,
        "error": o.error,
        "diagnosis": o.diagnosis,
    }


def _results_table(outcomes: list[TrialOutcome], placement: tuple[str, ...]) -> Any:
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "trial_id": o.trial_id,
                "run_id": o.run_id,
                "seed": o.seed,
                **{k: getattr(o, k) for k in placement},
                "status": o.status.value,
                "iterations": o.iterations,
                "culled_at": o.culled_at,
                "diagnosis": o.diagnosis,
                **{
                    f"config.{k}": v
                    for k, v in o.config.items()
                    if isinstance(v, (int, float, str, bool))
                },
                **o.metrics,
            }
            for o in outcomes
        ]
    )


def _last_checkpoint(result: Any) -> str | None:
    if result.checkpoint is not None:
        return str(result.checkpoint.path)
    found = (
        sorted_checkpoints(Path(result.path)) if result.path and Path(result.path).is_dir() else []
    )
    return str(found[-1]) if found else None
