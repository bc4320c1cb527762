"""Tag and metric names tunelab writes, defined once (see shared/DESIGN.md)."""

TAG_KIND = "tunelab.kind"
TAG_SPEC = "tunelab.spec"
TAG_SPEC_HASH = "tunelab.spec_hash"
TAG_FAMILY = "tunelab.family"
TAG_SEED = "tunelab.seed"
TAG_ROLE = "tunelab.role"
TAG_LEVER = "tunelab.lever"
TAG_TRIAL_ID = "tunelab.trial_id"
TAG_VERDICT = "tunelab.verdict"
TAG_SELECTED = "tunelab.selected"
TAG_SELECTED_SEED = "tunelab.selected_seed"
TAG_SELECTED_RUN = "tunelab.selected_run_id"
TAG_SELECTED_VALUE = "tunelab.selected_value"
TAG_CULLED_AT = "tunelab.culled_at"
TAG_OUTCOME = "tunelab.outcome"
TAG_STATUS = "tunelab.status"
TAG_GIT_COMMIT = "tunelab.git_commit"
TAG_EXPERIMENT_DIR = "tunelab.experiment_dir"

#: Result key holding the iteration number (1-based); schedulers use it as time.
ITERATION = "iteration"
#: Per-iteration wall time of the family's work, seconds.
M_ITER_TIME = "sys/iter_time_s"
#: Time spent writing the checkpoint of this iteration, seconds.
M_CKPT_TIME = "sys/checkpoint_time_s"
#: Size of the checkpoint of this iteration, bytes.
M_CKPT_BYTES = "sys/checkpoint_bytes"

RUN_STATE_FILE = "tunelab.json"
RUNS_FILE = "tunelab_runs.json"
CULL_STATE_FILE = "tunelab_cull.json"
ARTIFACTS_DIR = "trial_artifacts"


def as_float(value: object) -> float:
    """A reported value as a float; NaN for anything that is not a number."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
