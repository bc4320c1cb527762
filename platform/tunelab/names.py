"""tunelab's vocabulary, defined once: MLflow tags, outcome labels, trial statuses,
result keys and the file names of an experiment folder (shared/DESIGN.md, "Tags").

Everything tunelab writes where a user filters or a tool reads (the MLflow UI
search box, ``summary.json``, the results tables, dashboards) is named here and
nowhere else. Family metric names (``val/autonomy``) are defined once at the top
of each family module; Prometheus metric and label names in :mod:`tunelab.metrics`.
"""

from __future__ import annotations

import enum
from typing import TypeGuard

__all__ = [
    "ARM_CONTROL",
    "DIVERGED",
    "ITERATION",
    "LIVE_STATES",
    "M_CKPT_BYTES",
    "M_CKPT_TIME",
    "M_ITER_TIME",
    "OUTCOME_OF_VERDICT",
    "Outcome",
    "Role",
    "TrialStatus",
    "as_float",
]

# -- MLflow tags (one namespace) ---------------------------------------------------------
TAG_KIND = "tunelab.kind"
TAG_SPEC = "tunelab.spec"
TAG_SPEC_HASH = "tunelab.spec_hash"
TAG_FAMILY = "tunelab.family"
TAG_SEED = "tunelab.seed"
TAG_ROLE = "tunelab.role"
TAG_LEVER = "tunelab.lever"
TAG_ROUND = "tunelab.round"
TAG_STAGE = "tunelab.stage"
TAG_TRIAL_ID = "tunelab.trial_id"
TAG_STATUS = "tunelab.status"
TAG_GIT_COMMIT = "tunelab.git_commit"
TAG_EXPERIMENT_DIR = "tunelab.experiment_dir"
TAG_CULLED_AT = "tunelab.culled_at"
TAG_SELECTED = "tunelab.selected"
TAG_SELECTED_SEED = "tunelab.selected_seed"
TAG_SELECTED_RUN = "tunelab.selected_run_id"
TAG_SELECTED_VALUE = "tunelab.selected_value"
#: Why a seed cull selected no seed (every seed diverged, or none finished).
TAG_NO_SELECTION = "tunelab.no_selection"
#: How many seeds a cull actually kept (ASHA / Optuna may keep fewer than ``keep``).
TAG_KEPT = "tunelab.kept"
#: The first iteration a run reported a non-finite (NaN / inf) metric.
TAG_NONFINITE = "tunelab.nonfinite"
TAG_N_TRIALS = "tunelab.n_trials"
TAG_N_FAILED = "tunelab.n_failed"
# verdicts (child run of a lever; the parent carries ``<tag>.<lever>``)
TAG_VERDICT = "tunelab.verdict"
TAG_MEANINGFUL = "tunelab.meaningful"
TAG_EFFECT = "tunelab.effect"
TAG_CI_LOW = "tunelab.ci_low"
TAG_CI_HIGH = "tunelab.ci_high"
TAG_P_VALUE = "tunelab.p_value"
TAG_N_PAIRS = "tunelab.n_pairs"
TAG_OUTCOME = "tunelab.outcome"
TAG_ROUNDS = "tunelab.rounds"
TAG_STACKED = "tunelab.stacked"
#: ``guardrail.<name>`` = ``pass`` | ``fail`` | ``inconclusive``
TAG_GUARDRAIL_PREFIX = "guardrail."
#: Tags that record a decision: finalizing sets them from scratch, and first deletes
#: any of them (and any ``<tag>.<lever>`` / ``guardrail.<name>`` form) left on a run
#: by an earlier, interrupted or older finalization.
DECISION_TAGS: tuple[str, ...] = (
    TAG_CULLED_AT,
    TAG_SELECTED,
    TAG_SELECTED_SEED,
    TAG_SELECTED_RUN,
    TAG_SELECTED_VALUE,
    TAG_NO_SELECTION,
    TAG_KEPT,
    TAG_N_TRIALS,
    TAG_N_FAILED,
    TAG_VERDICT,
    TAG_MEANINGFUL,
    TAG_EFFECT,
    TAG_CI_LOW,
    TAG_CI_HIGH,
    TAG_P_VALUE,
    TAG_N_PAIRS,
    TAG_OUTCOME,
    TAG_ROUNDS,
    TAG_STACKED,
)


def is_decision_tag(key: str) -> bool:
    """True for a :data:`DECISION_TAGS` key, its ``<tag>.<lever>`` form or a guardrail tag."""
    return key.startswith(TAG_GUARDRAIL_PREFIX) or any(
        key == tag or key.startswith(tag + ".") for tag in DECISION_TAGS
    )


#: MLflow's own tag linking a child run to its parent.
TAG_MLFLOW_PARENT = "mlflow.parentRunId"
#: MLflow's run (and experiment) description, shown in the UI: the spec's ``description``.
TAG_MLFLOW_NOTE = "mlflow.note.content"
#: MLflow 3's experiment type: training runs, not the GenAI overview, open first in the UI.
TAG_MLFLOW_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"


class Role(str, enum.Enum):
    """``tunelab.role`` of a trial's run."""

    SEED = "seed"
    VARIANT = "variant"
    CONTROL = "control"


#: The control arm of a lever A/B (``arm`` column, ``tunelab.lever`` of control runs).
ARM_CONTROL = "control"


class Outcome(str, enum.Enum):
    """``tunelab.outcome`` of a lever A/B run: what the experiment decided about it."""

    BASELINE = "baseline"
    CONTROL = "control"
    WIN = "win"
    NEGATIVE = "negative"
    NULL = "null"
    INCONCLUSIVE = "inconclusive"
    SUPERSEDED = "superseded"
    CRASHED_EARLY = "crashed-early"


#: Verdict label (:mod:`tunelab.verdicts`) -> run outcome.
OUTCOME_OF_VERDICT = {
    "win": Outcome.WIN,
    "negative": Outcome.NEGATIVE,
    "null": Outcome.NULL,
    "inconclusive": Outcome.INCONCLUSIVE,
    "crashed": Outcome.CRASHED_EARLY,
}


class TrialStatus(str, enum.Enum):
    """What happened to a trial, decided once by :func:`tunelab.outcome.trial_status`.

    ``finished``: reached the budget. ``culled``: a scheduler stopped it early.
    ``error``: failed for the last time. ``interrupted``: the driver stopped
    before it was done (never finalized). ``diverged``: it ended on a
    non-finite value (``health/diverged`` reported by the trial).
    Before a trial ends it is ``pending``, ``running`` or ``paused``.
    """

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    CULLED = "culled"
    ERROR = "error"
    INTERRUPTED = "interrupted"
    DIVERGED = "diverged"

    @property
    def done(self) -> bool:
        """Whether the trial has ended for good."""
        return self in _DONE

    def __str__(self) -> str:
        return self.value


#: The statuses a live experiment is counted in (progress, the Prometheus trial gauge).
LIVE_STATES: tuple[str, ...] = tuple(
    s.value
    for s in (
        TrialStatus.RUNNING,
        TrialStatus.PAUSED,
        TrialStatus.PENDING,
        TrialStatus.CULLED,
        TrialStatus.FINISHED,
        TrialStatus.ERROR,
    )
)

_DONE = frozenset(
    {TrialStatus.FINISHED, TrialStatus.CULLED, TrialStatus.ERROR, TrialStatus.DIVERGED}
)

# -- result keys (what a trial reports every iteration besides the family's metrics) --
#: The iteration number (1-based); schedulers use it as time.
ITERATION = "iteration"
#: Per-iteration wall time of the family's work, seconds.
M_ITER_TIME = "sys/iter_time_s"
#: Time spent writing the checkpoint of this iteration, seconds.
M_CKPT_TIME = "sys/checkpoint_time_s"
#: Size of the checkpoint of this iteration, bytes.
M_CKPT_BYTES = "sys/checkpoint_bytes"
#: Reported as 1.0 by a trial the health monitor ended (non-finite loss or weights).
DIVERGED = "health/diverged"
#: The one-line diagnosis of a diverged trial (a string in its last result; also a tag).
HEALTH_DIAGNOSIS = "health/diagnosis"
TAG_HEALTH_DIAGNOSIS = "tunelab.health.diagnosis"

# -- health metrics (tunelab.health; per iteration; other optimizers: health/<name>/...) --
#: Global gradient 2-norm before clipping: mean over the iteration's applied steps.
M_HEALTH_GRAD_NORM = "health/grad_norm"
#: ... and its largest value (a spike is never averaged away).
M_HEALTH_GRAD_NORM_MAX = "health/grad_norm_max"
#: Fraction of applied steps whose gradients were clipped.
M_HEALTH_CLIP_RATE = "health/clip_rate"
#: Optimizer steps skipped as non-finite (loss or gradients).
M_HEALTH_NAN_SKIPPED = "health/nan_skipped"
#: Steps fp16 AMP's grad scaler skipped on overflow (dynamic loss scaling, not divergence).
M_HEALTH_AMP_SKIPPED = "health/amp_skipped"
#: Explosion events this iteration (step rule and sustained-growth rule).
M_HEALTH_EXPLOSIONS = "health/explosions"
#: ||delta theta|| / ||theta|| (after the step) of a step, mean over the measured steps.
M_HEALTH_UPDATE_RATIO = "health/update_ratio"
#: Prefixes: ``health/layer_grad_norm_max/<layer>``, ``.../layer_grad_norm_mean/<layer>``.
M_HEALTH_LAYER_NORM_MAX = "health/layer_grad_norm_max"
M_HEALTH_LAYER_NORM_MEAN = "health/layer_grad_norm_mean"
#: Prefix: ``health/loss_share/<term>`` = mean over steps of |w v| / sum |w v|.
M_HEALTH_LOSS_SHARE = "health/loss_share"
#: Prefixes: ``health/act_rms/<module>`` (mean) and ``health/act_rms_max/<module>``.
M_HEALTH_ACT_RMS = "health/act_rms"
M_HEALTH_ACT_RMS_MAX = "health/act_rms_max"
#: What :meth:`tunelab.health.HealthMonitor.end_iteration` always returns (one optimizer,
#: no grad scaler); families list them in ``Family.metrics``.
HEALTH_METRICS: tuple[str, ...] = (
    M_HEALTH_GRAD_NORM,
    M_HEALTH_GRAD_NORM_MAX,
    M_HEALTH_CLIP_RATE,
    M_HEALTH_NAN_SKIPPED,
    M_HEALTH_EXPLOSIONS,
    M_HEALTH_UPDATE_RATIO,
)
_PER_NAME = (
    M_HEALTH_LAYER_NORM_MAX,
    M_HEALTH_LAYER_NORM_MEAN,
    M_HEALTH_LOSS_SHARE,
    M_HEALTH_ACT_RMS,
    M_HEALTH_ACT_RMS_MAX,
)


def is_per_name_health_metric(name: str) -> bool:
    """``health/<group>/<layer|term|module>``: one metric per layer, loss term or watch."""
    return name.startswith(tuple(p + "/" for p in _PER_NAME))


def is_number(value: object) -> TypeGuard[float]:
    """A reported number: any real (Python or numpy int / float), NaN and inf included; not a bool."""
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_float(value: object) -> float:
    """A reported value as a float; NaN for anything that is not a number."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
