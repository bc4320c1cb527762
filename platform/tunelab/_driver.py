"""The driver: spec -> Ray Tune experiment -> tracked runs -> results and summary.

:func:`run_experiment` starts a new experiment from a spec file and
:func:`resume_experiment` continues one from its folder (after Ctrl-C, a
crash or a SIGKILL of the driver); both end in the same post-processing, so a
resumed experiment reaches the same final state as an uninterrupted one.

The driver knows no experiment kind: it asks the spec's
:class:`~tunelab.kinds.ExperimentKind` for the milestones, scheduler, search
algorithm, param space, per-trial tags, the trial count, the child runs' role
and the post-processing. The folder's
paths are :class:`~tunelab.layout.ExperimentLayout`'s; trial outcomes are
decided by :mod:`tunelab.outcome`; tracking goes through a
:class:`~tunelab.tracking.Tracker`.

This module owns the run: the experiment folder and parent run, the
``Tuner`` (its trainable, callbacks, scheduler and search algorithm) and
telling a finished run from an interrupted one. Ray start-up and the stop
signals are :mod:`tunelab._ray_start`'s; the results table and
``summary.json`` are :mod:`tunelab._finalize`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tunelab import _preemption as preemption
from tunelab._finalize import finalize
from tunelab._ray_start import StopSignals, init_ray, ray_keeps_sigterm, stdout_to_stderr
from tunelab._trial import TrialSetup, run_trial
from tunelab.callbacks import TrialFailures, disk_full_guard, raise_if_disk_full
from tunelab.checkpoint import atomic_write_json, read_json, remove_incomplete_checkpoints
from tunelab.errors import ExperimentInterrupted
from tunelab.family import check_family_data
from tunelab.kinds import ExperimentKind, get_kind
from tunelab.layout import ExperimentLayout, RunState, read_state, shared_data_root
from tunelab.names import (
    TAG_EXPERIMENT_DIR,
    TAG_FAMILY,
    TAG_GIT_COMMIT,
    TAG_KIND,
    TAG_MLFLOW_NOTE,
    TAG_ROLE,
    TAG_SPEC,
    TAG_SPEC_HASH,
    TrialStatus,
)
from tunelab.spec import AnySpec, load_spec, parse_spec, spec_hash
from tunelab.tracking import (
    GuardedTracker,
    MlflowTracker,
    Tracker,
    TrackingCallback,
    default_tracking_uri,
    drain_tracking,
    git_commit,
    tracking_guard,
)

__all__ = ["resume_experiment", "run_experiment"]

logger = logging.getLogger(__name__)


def run_experiment(
    spec_file: str | Path,
    *,
    quick: bool = False,
    storage: str | Path = "tunelab_results",
    tracking_uri: str | None = None,
    address: str | None = None,
    progress: bool | None = None,
    overrides: Sequence[str] = (),
    tracker: Tracker | None = None,
    dashboard: bool = True,
) -> dict[str, Any]:
    """Validate ``spec_file`` and run it to the end.

    Args:
        spec_file: The YAML spec.
        quick: Apply the spec's ``quick:`` block.
        storage: Folder for experiment folders and the embedded MLflow store.
        tracking_uri: MLflow tracking URI (default ``$MLFLOW_TRACKING_URI`` or
            sqlite under ``storage``).
        address: Ray address (default ``$RAY_ADDRESS`` or a local Ray).
        progress: Force the terminal progress display on or off.
        overrides: ``dotted.key=value`` changes applied after ``quick``.
        tracker: A tracking backend (default: :class:`~tunelab.tracking.MlflowTracker`
            on ``tracking_uri``); its ``uri`` is recorded for resume.
        dashboard: Start the Ray dashboard with the local Ray (see :func:`init_ray`;
            ``$TUNELAB_NO_DASHBOARD=1`` turns it off); always on for multi-worker trials.

    Returns:
        The summary (also written to ``summary.json``): ``experiment_dir``,
        ``tracking_uri``, ``mlflow_experiment``, ``mlflow_experiment_id``,
        ``parent_run_id``, ``spec``, ``kind``, ``metric`` (``{name, mode}``),
        ``trials`` (each ``trial_id``, ``run_id``, ``seed``, ``iterations``,
        ``status``, ``metrics``, ``error``, ``diagnosis``, and ``arm`` / ``round`` /
        ``stage`` for a lever A/B), ``failed``, ``failure_budget``, and per kind
        ``cull`` + ``selected`` (seed cull; ``selected`` None with
        ``no_selection`` saying why), ``best`` (sweep) or
        ``verdicts`` + ``rounds`` + ``stacked`` + ``final_control`` (lever A/B).

    Raises:
        SpecError: the spec is invalid (nothing has started).
        DataError: the family's data folder has a bad file (nothing has started).
        ExperimentInterrupted: the driver was stopped (SIGINT / SIGTERM) with
            trials unfinished; nothing was finalized; ``resume_experiment`` continues.
        TrackingUnavailable: the tracking server is down at the start (nothing
            started) or still down at the end (writes spooled in the folder,
            nothing finalized; ``resume_experiment`` sends them and finalizes).
        DiskFullError: a write failed for lack of space or quota; the experiment
            was stopped with its state saved; ``resume_experiment`` continues
            once space is freed.
    """
    spec = load_spec(spec_file, quick=quick, overrides=overrides)
    storage = Path(storage).resolve()
    # bad data fails here, before any folder, run or trial exists (exit 2, naming the file)
    _check_data(spec, shared_data_root(storage))
    storage.mkdir(parents=True, exist_ok=True)
    if tracker is None:
        tracking_uri = (
            tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(storage)
        )
        tracker = MlflowTracker(tracking_uri)
    tracking_uri = tracker.uri
    layout = ExperimentLayout.new(storage, spec.name)
    artifact_root = storage / "mlartifacts" if tracking_uri.startswith("sqlite") else None
    commit = git_commit(Path(spec_file).resolve().parent)
    with tracking_guard(tracker):  # tracking down now: exit 75, nothing started
        exp_id = tracker.ensure_experiment(spec.name, artifact_root)
        parent = tracker.start_run(
            exp_id,
            layout.root.name,
            {
                **_base_tags(spec, commit),
                TAG_EXPERIMENT_DIR: str(layout.root),
                **({TAG_MLFLOW_NOTE: spec.description} if spec.description else {}),
            },
        )
    layout.root.mkdir(parents=True)
    with _fail_parent_on_error(tracker, parent):
        tracker.log_dict(parent, spec.model_dump(mode="json"), "spec.json")
        state = RunState(
            spec=spec.model_dump(mode="json"),
            spec_file=str(Path(spec_file).resolve()),
            quick=quick,
            experiment_dir=str(layout.root),
            storage=str(storage),
            tracking_uri=tracking_uri,
            mlflow_experiment=spec.name,
            mlflow_experiment_id=exp_id,
            parent_run_id=parent,
            git_commit=commit,
            created=layout.root.name.removeprefix(f"{spec.name}-"),
        )
        atomic_write_json(layout.state_file, dataclasses.asdict(state))
        with disk_full_guard(layout.root):
            return _run(
                state,
                spec,
                tracker,
                address=address,
                progress=progress,
                restore=False,
                dashboard=dashboard,
            )


def resume_experiment(
    experiment_dir: str | Path,
    *,
    address: str | None = None,
    progress: bool | None = None,
    tracker: Tracker | None = None,
    dashboard: bool = True,
) -> dict[str, Any]:
    """Continue an interrupted experiment from its folder to the same final state.

    ``dashboard``: start the Ray dashboard with the local Ray (:func:`init_ray`).

    Trials keep reporting through the tracker the experiment started with
    (Tune restores its callbacks from the experiment state); ``tracker`` is
    the one the post-processing tags and ends runs with, by default
    :class:`~tunelab.tracking.MlflowTracker` on the recorded tracking URI.
    Returns the same summary as :func:`run_experiment`. A finished
    (finalized) experiment is left untouched: its recorded summary is returned.

    Raises:
        ExperimentError: the folder is not a tunelab experiment. (One stopped
            before Tune saved any state starts from the beginning.)
        ExperimentInterrupted: stopped again before the end.
        SpecError: the recorded spec no longer validates (e.g. its family's
            package was uninstalled).
        DataError: the family's data folder has a bad file (nothing resumed).
        TrackingUnavailable: tracking is still down at the end (nothing
            finalized; resume again).
        DiskFullError: as in :func:`run_experiment`.
    """
    state = read_state(experiment_dir)
    finished = read_json(state.layout.summary_file, None)
    if finished is not None:  # finalized: resuming changes nothing (no trial, table or tag)
        sys.stderr.write(
            f"{state.layout.root} already finished; nothing to resume, nothing changed.\n"
        )
        return dict(finished)
    spec = parse_spec(state.spec, source=state.spec_file)
    _check_data(spec, state.data_root)
    tracker = tracker or MlflowTracker(state.tracking_uri)
    with (
        _fail_parent_on_error(tracker, state.parent_run_id),
        disk_full_guard(state.layout.root),
    ):
        return _run(
            state,
            spec,
            tracker,
            address=address,
            progress=progress,
            restore=True,
            dashboard=dashboard,
        )


def _check_data(spec: AnySpec, data_root: Path) -> None:
    """The family's check of its data folder for every config the spec runs (DataError)."""
    check_family_data(spec.family, data_root, [use.values for use in spec.family_configs()])


@contextlib.contextmanager
def _fail_parent_on_error(tracker: Tracker, parent_run_id: str) -> Iterator[None]:
    """End the experiment's MLflow parent run FAILED if a non-resumable error escapes.

    An interruption, or an error that ``platform resume`` can continue from
    (:attr:`TunelabError.resumable`), leaves it RUNNING: the experiment is open.
    """
    try:
        yield
    except Exception as exc:
        if not getattr(exc, "resumable", False):
            try:
                tracker.end_run(parent_run_id, "FAILED")
            except Exception:  # the tracking server may be what failed
                logger.warning("could not mark parent run %s FAILED", parent_run_id)
        raise


# -- running ----------------------------------------------------------------------------
def _run(
    state: RunState,
    spec: AnySpec,
    tracker: Tracker,
    *,
    address: str | None,
    progress: bool | None,
    restore: bool,
    dashboard: bool = True,
) -> dict[str, Any]:
    kind = get_kind(spec.kind)(spec, state.layout)
    state.layout.stopped_file.unlink(missing_ok=True)  # running again: not stopped any more
    state.layout.preempt_file.unlink(missing_ok=True)  # trials wait while it exists
    try:
        return _run_once(
            state,
            spec,
            tracker,
            kind,
            address=address,
            progress=progress,
            restore=restore,
            dashboard=dashboard,
        )
    except ExperimentInterrupted as stop:
        # what `platform status` reads: trials Tune had started were interrupted, not running
        stopped: dict[str, Any] = {"stopped": datetime.datetime.now().isoformat(timespec="seconds")}
        preempted = preemption.finish()
        if preempted is not None:
            stopped["preemption"] = preempted
            took = preempted["all_checkpointed_s"]
            print(
                f"preemption: {preempted['trials_checkpointed']} running trial(s) checkpointed "
                + (f"in {took:.1f} s" if took is not None else "(not all within the grace)")
                + f" (grace {preempted['grace_s']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        atomic_write_json(state.layout.stopped_file, stopped)
        if stop.unfinished < 0:  # stopped before Tune ran
            raise
        left = _left_after_stop(state.layout.root)
        if left is None:
            raise
        raise ExperimentInterrupted(stop.experiment_dir, sum(left.values()), left) from None
    finally:
        preemption.finish()
        state.layout.preempt_file.unlink(missing_ok=True)


def _run_once(
    state: RunState,
    spec: AnySpec,
    tracker: Tracker,
    kind: ExperimentKind,
    *,
    address: str | None,
    progress: bool | None,
    restore: bool,
    dashboard: bool = True,
) -> dict[str, Any]:
    root = state.layout.root
    with StopSignals(state.layout) as stop, stdout_to_stderr():  # stdout stays for --json
        with ray_keeps_sigterm():
            # multi-worker trials need Ray's state API to free a culled trial's workers
            on = True if spec.resources.workers > 1 else (None if dashboard else False)
            url = init_ray(address, dashboard=on)
        if url:
            print(f"Ray dashboard: {url}", file=sys.stderr, flush=True)
        stop.reinstall()
        stop.raise_if_signalled()
        tuner = _tuner(state, spec, kind, tracker, progress=progress, restore=restore)
        stop.raise_if_signalled()
        stop.start_tune()
        grid = tuner.fit()
        stop.tune_running = False
        raise_if_disk_full(root)  # the experiment was stopped for a full disk: exit 74
        # Interrupted is decided by the signal and by tunelab's own count, never by the
        # statuses Tune gives trials while it cleans up after a stop.
        unfinished = _unfinished_trials(grid)
        if stop.signalled or unfinished:
            raise ExperimentInterrupted(root, unfinished)
        stop.finalizing = True  # every trial has ended: a signal now waits for the summary
        # Every tracking write spooled during an outage is sent first (TrackingUnavailable,
        # exit 75, resumable, if the server is still down); an outage in a tracker call
        # while finalizing is the same error, and resume finalizes again from scratch.
        drain_tracking(state.layout, tracker)
        return finalize(state, spec, kind, GuardedTracker(tracker, root), grid)


def _left_after_stop(experiment_dir: Path) -> dict[str, int] | None:
    """The trials a stopped experiment has left, by status, as ``platform status`` counts them.

    Read from the experiment state Tune saved at the stop (trials it had
    started are ``interrupted``, planned ones it never created ``pending``);
    the statuses Tune gives trials in memory while it stops are not used: a
    trial stopped mid-run ends there as TERMINATED, like a culled one.
    None if the folder cannot be read (the caller keeps Tune's count).
    """
    from tunelab._status import experiment_status

    try:
        counts = experiment_status(experiment_dir)["counts"]
        return {k: int(n) for k, n in counts.items() if n and not TrialStatus(k).done}
    except Exception:  # a count must never hide the interruption itself
        logger.warning("could not count the trials left in %s", experiment_dir, exc_info=True)
        return None


def _unfinished_trials(grid: Any) -> int:
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return sum(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _trainable(state: RunState, spec: AnySpec, kind: ExperimentKind) -> Any:
    from ray import tune

    layout = state.layout
    setup = TrialSetup(
        family=spec.family,
        spec=spec.name,
        budget=spec.budget,
        checkpoint_every=spec.checkpoint.every,
        milestones=kind.milestones(),
        data_root=str(state.data_root),
        artifacts_root=str(layout.artifacts_dir),
        threads=max(1, int(spec.resources.cpu)),
        health=spec.health,
        workers=spec.resources.workers,
        cpu=spec.resources.cpu,
        gpu=spec.resources.gpu,
        preempt_file=str(layout.preempt_file),
    )
    resources: dict[str, float] = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    if spec.resources.workers > 1:  # the Ray Train workers hold the CPUs and GPUs
        resources = {"cpu": 0, "gpu": 0, "memory": 1}  # a bundle Ray accepts, holding nothing
    if spec.resources.memory_gb:
        resources["memory"] = spec.resources.memory_gb * 1024**3
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)


def _tuner(
    state: RunState,
    spec: AnySpec,
    kind: ExperimentKind,
    tracker: Tracker,
    *,
    progress: bool | None,
    restore: bool,
) -> Any:
    from ray import tune

    from tunelab.metrics import TrialStateMetrics  # Prometheus gauges of trial states
    from tunelab.progress import ProgressCallback

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    layout = state.layout
    trainable = _trainable(state, spec, kind)
    # Restore only once Tune has saved experiment state: with tuner.pkl alone, Tune
    # "restarts" and its trials lose their config (KeyError: 'seed').
    if restore and layout.tuner_state_file.exists() and layout.tune_state_files:
        remove_incomplete_checkpoints(layout.tune_dir)  # cut short by a full disk or a kill
        return tune.Tuner.restore(
            str(layout.tune_dir),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
        )
    child_tags = _base_tags(spec, state.git_commit)
    if kind.role is not None:
        child_tags[TAG_ROLE] = kind.role.value
    callbacks: list[Any] = [
        TrackingCallback(
            tracker=tracker,
            experiment_id=state.mlflow_experiment_id,
            parent_run_id=state.parent_run_id,
            runs_file=str(layout.runs_file),
            base_tags=child_tags,
            trial_tags=kind.trial_tags(),
            artifacts_root=str(layout.artifacts_dir),
            nonfinite_file=str(layout.nonfinite_file),
        ),
        ProgressCallback(
            metric=spec.metric.name,
            mode=spec.metric.mode,
            budget=spec.budget,
            total=kind.total_trials(),
            enabled=progress,
            milestones=kind.milestones(),
        ),
        TrialStateMetrics(spec=spec.name, family=spec.family, budget=spec.budget),
        preemption.PreemptionCallback(),
        # last, so Tune's own logger callbacks still run when it stops the experiment
        TrialFailures(experiment_dir=str(layout.root)),
    ]
    return tune.Tuner(
        trainable,
        param_space=kind.param_space(),
        tune_config=tune.TuneConfig(
            scheduler=kind.scheduler(),
            search_alg=kind.search_alg(),
            num_samples=kind.num_samples(),
            # a multi-worker trial's actor must go with it: its Ray Train workers are freed then
            reuse_actors=spec.resources.workers == 1,
            max_concurrent_trials=spec.max_concurrent,
            trial_dirname_creator=_trial_dirname,
            trial_name_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=layout.tune_dir.name,
            storage_path=str(layout.root),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            failure_config=tune.FailureConfig(max_failures=spec.failure.retries),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def _trial_dirname(trial: Any) -> str:
    return ExperimentLayout.trial_dirname(trial.trial_id)


def _base_tags(spec: AnySpec, commit: str) -> dict[str, str]:
    return {
        TAG_KIND: spec.kind,
        TAG_SPEC: spec.name,
        TAG_SPEC_HASH: spec_hash(spec),
        TAG_FAMILY: spec.family,
        TAG_GIT_COMMIT: commit,
    }
