"""What happened to each trial, decided in one place.

:func:`trial_status` is the only rule that turns what Tune knows about a trial
(its status, the iterations it reached, whether it reported divergence, whether
the driver was stopped) into a :class:`~tunelab.names.TrialStatus`.
:class:`TrialOutcome` carries that status with the trial's identity and final
metrics; the summary, ``platform status``, the progress display, the lever
searcher and the report all use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunelab.checkpoint import read_json
from tunelab.errors import error_summary
from tunelab.layout import ExperimentLayout
from tunelab.names import DIVERGED, HEALTH_DIAGNOSIS, ITERATION, TrialStatus, as_float, is_number

__all__ = [
    "TrialOutcome",
    "final_metrics",
    "is_metric_key",
    "outcome_from_result",
    "outcomes_from_folder",
    "result_status",
    "trial_status",
]

_LIVE = {
    "PENDING": TrialStatus.PENDING,
    "RUNNING": TrialStatus.RUNNING,
    "PAUSED": TrialStatus.PAUSED,
}


def trial_status(
    tune_status: str,
    iterations: int,
    budget: int,
    *,
    diverged: bool = False,
    stopped: bool = False,
) -> TrialStatus:
    """The one rule for a trial's status.

    Args:
        tune_status: Tune's status (``PENDING``, ``RUNNING``, ``PAUSED``,
            ``TERMINATED``, ``ERROR``).
        iterations: The last iteration the trial reported (0 if none).
        budget: The spec's iterations per trial.
        diverged: The trial's last result reported ``health/diverged``.
        stopped: The driver was stopped (signal) before the trial ended.

    A terminated trial is ``finished`` at the budget and ``culled`` below it
    (unless it diverged); an errored one is ``error``; a trial not yet ended is
    ``interrupted`` once the driver was stopped, else pending / running / paused.
    """
    status = tune_status.upper()
    if status == "ERROR":
        return TrialStatus.ERROR
    if status == "TERMINATED":
        if diverged:
            return TrialStatus.DIVERGED
        return TrialStatus.FINISHED if iterations >= budget else TrialStatus.CULLED
    if stopped:
        return TrialStatus.INTERRUPTED
    return _LIVE.get(status, TrialStatus.PENDING)


#: What Tune adds to every result (``ray.tune.result``): bookkeeping, never a metric.
TUNE_RESULT_KEYS = frozenset(
    {
        "done",
        "training_iteration",
        "trial_id",
        "experiment_tag",
        "date",
        "timestamp",
        "pid",
        "hostname",
        "node_ip",
        "time_this_iter_s",
        "time_total_s",
        "time_since_restore",
        "iterations_since_restore",
        "timesteps_total",
        "timesteps_this_iter",
        "timesteps_since_restore",
        "episodes_total",
        "episodes_this_iter",
        "checkpoint_dir_name",
        "should_checkpoint",
        "config",
    }
)


def is_metric_key(key: str) -> bool:
    """Whether a result key is a metric the trial reported (namespaced or not: ``score`` is one).

    Tune's bookkeeping (:data:`TUNE_RESULT_KEYS`) and its flattened config
    (``config/...``) are not.
    """
    return key not in TUNE_RESULT_KEYS and not key.startswith("config/")


def reported_numbers(result: Mapping[str, Any]) -> dict[str, float]:
    """Every metric of a result that is a number (the iteration too), as floats.

    Non-finite values are kept as they are: NaN is a value to show. What is
    logged to MLflow and what the results table holds both come from here.
    """
    return {k: float(v) for k, v in result.items() if is_metric_key(k) and is_number(v)}


def final_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a result (every reported number but the iteration), as floats.

    A family's metric names need no ``group/`` prefix: ``score`` and ``aux``
    are kept like ``val/score``.
    """
    metrics = reported_numbers(result)
    metrics.pop(ITERATION, None)
    return metrics


@dataclasses.dataclass
class TrialOutcome:
    """One trial, as the summary, ``status``, progress and reports see it.

    Attributes:
        trial_id: Tune's trial id.
        seed: The trial's seed.
        status: See :func:`trial_status`.
        iterations: The last iteration it reported.
        metrics: Its last reported metrics (:func:`final_metrics`; NaN kept).
        run_id: Its MLflow run (None if none was created).
        arm, round, stage: Lever A/B placement (None for other kinds).
        config: The family config it ran.
        checkpoint: Its latest checkpoint folder, if any.
        error: The first line of its error, if it failed.
        diagnosis: The health monitor's one-line diagnosis, if it diverged.
    """

    trial_id: str
    seed: int | None
    status: TrialStatus
    iterations: int
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    run_id: str | None = None
    arm: str | None = None
    round: int | None = None
    stage: str | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: str | None = None
    error: str | None = None
    diagnosis: str | None = None

    def value(self, metric: str | None) -> float:
        """A final metric as a float (NaN when missing)."""
        return as_float(self.metrics.get(metric)) if metric else math.nan

    @property
    def culled_at(self) -> int | None:
        return self.iterations if self.status is TrialStatus.CULLED else None


def result_status(
    tune_status: str, result: Mapping[str, Any] | None, budget: int, *, stopped: bool = False
) -> TrialStatus:
    """:func:`trial_status` of a trial whose last result is ``result`` (iteration, divergence)."""
    result = result or {}
    return trial_status(
        tune_status,
        _iterations(result),
        budget,
        diverged=as_float(result.get(DIVERGED)) > 0,
        stopped=stopped,
    )


def outcome_from_result(
    result: Any,
    budget: int,
    *,
    runs: Mapping[str, str] | None = None,
    checkpoint: str | None = None,
) -> TrialOutcome:
    """The outcome of a ``ray.tune.Result`` of a finished ``Tuner.fit`` (finalizing).

    ``runs`` maps trial ids to run ids (``tunelab_runs.json``).
    """
    m = dict(result.metrics or {})
    tid = str(m.get("trial_id") or Path(result.path).name.removeprefix("trial_"))
    failed = result.error is not None
    o = _outcome(tid, m, dict(result.config or {}), "ERROR" if failed else "TERMINATED", budget)
    o.run_id = (runs or {}).get(tid)
    o.checkpoint = checkpoint
    o.error = error_summary(result.error) if failed else None
    return o


def outcomes_from_folder(
    layout: ExperimentLayout, budget: int, runs: Mapping[str, str] | None = None
) -> list[TrialOutcome]:
    """Every trial of an experiment folder that reported at least once, by folder name.

    A finalized experiment keeps the statuses its summary recorded; otherwise
    Tune's last snapshot decides which trials are still pending / running / paused.
    """
    runs = dict(runs or {})
    summary = read_json(layout.summary_file, {})
    stopped = layout.stopped_file.exists()  # the driver was stopped: live trials are interrupted
    recorded = {t["trial_id"]: t["status"] for t in summary.get("trials", [])}
    tune_states = layout.tune_trial_states()
    out = []
    for tid, rows in layout.trial_results().items():
        last = rows[-1]
        o = _outcome(
            tid,
            last,
            dict(last.get("config") or {}),
            tune_states.get(tid, "PENDING"),
            budget,
            stopped=stopped,
        )
        o.run_id = runs.get(tid)
        if tid in recorded:
            o.status = TrialStatus(recorded[tid])
        out.append(o)
    return out


def _outcome(
    trial_id: str,
    last: Mapping[str, Any],
    config: Mapping[str, Any],
    tune_status: str,
    budget: int,
    *,
    stopped: bool = False,
) -> TrialOutcome:
    return TrialOutcome(
        trial_id=trial_id,
        seed=config.get("seed"),
        status=result_status(tune_status, last, budget, stopped=stopped),
        iterations=_iterations(last),
        metrics=final_metrics(last),
        config=dict(config.get("config") or {}),
        arm=config.get("arm"),
        round=config.get("round"),
        stage=config.get("stage"),
        diagnosis=_text(last.get(HEALTH_DIAGNOSIS)),
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _iterations(result: Mapping[str, Any]) -> int:
    return int(result.get(ITERATION, 0) or 0)
