"""``platform status``: an experiment's trials read from its folder (no Ray needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tunelab._checkpoint import read_json
from tunelab._spec import parse_spec
from tunelab.errors import ExperimentError
from tunelab.layout import ExperimentLayout, find_experiments, read_state
from tunelab.names import as_float
from tunelab.outcome import outcomes_from_folder
from tunelab.schedulers import rank_key

__all__ = ["experiment_status", "latest_experiment"]


def latest_experiment(storage: str | Path = "tunelab_results") -> Path:
    """The most recently created experiment folder under ``storage``.

    Raises:
        ExperimentError: there is none.
    """
    found = find_experiments(Path(storage))
    if not found:
        raise ExperimentError(f"no tunelab experiment under {Path(storage).resolve()}")
    return found[-1].root


def experiment_status(experiment_dir: str | Path) -> dict[str, Any]:
    """Trials, their statuses, iterations and metric, read from the folder.

    Returns:
        ``experiment_dir``, ``spec`` (name), ``kind``, ``budget``, ``metric``
        (name), ``best`` (the best value of the metric over the trials, NaN
        and infinite values never best; None if none), ``finished`` (finalized), and ``trials``:
        each ``trial_id``, ``seed``, ``status`` (finished, culled, error,
        diverged once finalized; pending, running, paused before), ``iterations``,
        ``<metric>`` (its last value) and ``run_id``. A truncated last line of
        a trial's ``result.json`` (a crash mid-write) is skipped.

    Raises:
        ExperimentError: not an experiment folder.
    """
    state = read_state(experiment_dir)
    spec = parse_spec(state.spec, source=state.spec_file)
    layout: ExperimentLayout = state.layout
    runs = read_json(layout.runs_file, {})
    metric = spec.metric.name
    trials = [
        {
            "trial_id": o.trial_id,
            "seed": o.seed,
            "status": o.status.value,
            "iterations": o.iterations,
            metric: o.metrics.get(metric),
            "run_id": o.run_id,
        }
        for o in outcomes_from_folder(layout, spec.budget, runs)
    ]
    values = [v for v in (as_float(t[metric]) for t in trials) if math.isfinite(v)]
    best = min(values, key=lambda v: rank_key([v], spec.metric.mode)) if values else None
    return {
        "experiment_dir": str(layout.root),
        "spec": spec.name,
        "kind": spec.kind,
        "budget": spec.budget,
        "metric": metric,
        "best": best,
        "finished": layout.is_finalized(),
        "trials": trials,
    }
