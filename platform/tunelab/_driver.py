"""The driver: spec -> Ray Tune experiment -> tracked runs -> results and summary.

:func:`run_experiment` starts a new experiment from a spec file and
:func:`resume_experiment` continues one from its folder (after Ctrl-C, a
crash or a SIGKILL of the driver); both end in the same post-processing, so a
resumed experiment reaches the same final state as an uninterrupted one.

The driver knows no experiment kind: it asks the spec's
:class:`~tunelab.kinds.ExperimentKind` for the milestones, scheduler, search
algorithm, param space, per-trial tags and the post-processing. The folder's
paths are :class:`~tunelab.layout.ExperimentLayout`'s; trial outcomes are
decided by :mod:`tunelab.outcome`; tracking goes through a
:class:`~tunelab.tracking.Tracker`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tunelab import _preemption as preemption
from tunelab._trial import TrialSetup, run_trial
from tunelab.callbacks import TrialFailures, disk_full_guard, raise_if_disk_full
from tunelab.checkpoint import (
    atomic_write_json,
    read_json,
    remove_incomplete_checkpoints,
    sorted_checkpoints,
    strict_json,
)
from tunelab.errors import ExperimentInterrupted
from tunelab.family import check_family_data
from tunelab.kinds import ExperimentKind, FinalizeContext, get_kind
from tunelab.layout import (
    ExperimentLayout,
    RunState,
    read_state,
    shared_data_root,
    write_table,
)
from tunelab.names import (
    TAG_CULLED_AT,
    TAG_EXPERIMENT_DIR,
    TAG_FAMILY,
    TAG_GIT_COMMIT,
    TAG_KIND,
    TAG_MLFLOW_NOTE,
    TAG_N_FAILED,
    TAG_N_TRIALS,
    TAG_ROLE,
    TAG_SPEC,
    TAG_SPEC_HASH,
    TrialStatus,
    is_decision_tag,
)
from tunelab.outcome import TrialOutcome, outcome_from_result
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

__all__ = ["init_ray", "resume_experiment", "run_experiment"]

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
        dashboard: Start the Ray dashboard with the local Ray (see :func:`init_ray`).

    Returns:
        The summary (also written to ``summary.json``): ``experiment_dir``,
        ``tracking_uri``, ``mlflow_experiment``, ``mlflow_experiment_id``,
        ``parent_run_id``, ``spec``, ``kind``, ``metric`` (``{name, mode}``),
        ``trials`` (each ``trial_id``, ``run_id``, ``seed``, ``iterations``,
        ``status``, ``metrics``, ``error``, and ``arm`` / ``round`` / ``stage``
        for a lever A/B), ``failed``, ``failure_budget``, and per kind
        ``cull`` + ``selected`` (seed cull), ``best`` (sweep) or
        ``verdicts`` + ``rounds`` + ``stacked`` + ``final_control`` (lever A/B).

    Raises:
        SpecError: the spec is invalid (nothing has started).
        DataError: the family's data folder has a bad file (nothing has started).
        ExperimentInterrupted: the driver was stopped (SIGINT / SIGTERM) with
            trials unfinished; nothing was finalized; ``resume_experiment`` continues.
        TrackingUnavailable: the tracking server is down at the start (nothing
            started) or still down at the end (writes spooled in the folder,
            nothing finalized; ``resume_experiment`` sends them and finalizes).
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


def init_ray(address: str | None, *, dashboard: bool | None = None) -> str | None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a local Ray with one CPU per core.

    The local Ray starts the Ray dashboard on 127.0.0.1, port 8265 or the
    next free one, unless ``dashboard`` is False (None: unless
    ``$TUNELAB_NO_DASHBOARD`` is 1). Ray's state API, which frees the workers of a culled multi-worker
    trial, needs it. Ray Train's controller polls its workers every
    ``$RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (0.5 s here unless set; each
    report waits for a poll).

    Returns:
        The dashboard's URL, or None (no dashboard, or a cluster's own).

    Ray's token authentication is on unless ``RAY_AUTH_MODE=disabled``. The
    local Ray listens on 127.0.0.1 only; its token file (``$RAY_AUTH_TOKEN_PATH``,
    default ``~/.ray/auth_token``) is created user-only (0600) where Ray would
    create it readable by everyone. A driver connecting to ``address`` sends a
    token when one is available (Ray itself does so only for ``address="auto"``).

    ``TUNELAB_METRICS_EXPORT_PORT`` serves Ray's and tunelab's metrics to
    Prometheus from the local Ray (dashboards/README.md).
    """
    import secrets

    import ray
    from ray._private import ray_constants
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray._raylet import Config  # type: ignore[attr-defined]

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        ray.init(address=address, log_to_driver=False)
        return None
    if "RAY_AUTH_MODE" not in os.environ:  # Ray's own default, set here without its warning
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")
    if os.environ["RAY_AUTH_MODE"].lower() == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with contextlib.suppress(FileExistsError), open(os.open(token, flags, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        if token.stat().st_mode & 0o077 and token.stat().st_uid == os.getuid():
            token.chmod(0o600)
    port = os.environ.get("TUNELAB_METRICS_EXPORT_PORT")
    extra: dict[str, Any] = {"_metrics_export_port": int(port)} if port else {}
    if dashboard is None:
        dashboard = os.environ.get("TUNELAB_NO_DASHBOARD", "") not in ("1", "true")
    if dashboard:
        extra.update(dashboard_host="127.0.0.1", dashboard_port=_free_port(DASHBOARD_PORT))
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Ray binds its servers to 127.0.0.1 when that is the node's address, which it
    # picks only where it does not expect a multi-node cluster (ENABLE_RAY_CLUSTER).
    on_network, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        context = ray.init(
            num_cpus=os.cpu_count() or 1, log_to_driver=False, include_dashboard=dashboard, **extra
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = on_network
    url = getattr(context, "dashboard_url", None) if dashboard else None
    return f"http://{url}" if url and "://" not in url else url or None


#: The Ray dashboard's usual port; the next free one is taken when it is in use.
DASHBOARD_PORT = 8265


def _free_port(first: int, tries: int = 100) -> int:
    """``first`` or the next port after it that 127.0.0.1 can bind."""
    import socket

    for port in range(first, first + tries):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return 0


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
    except ExperimentInterrupted:
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
        raise
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
    with _StopSignals(state.layout) as stop, _stdout_to_stderr():  # stdout stays for --json
        with _ray_keeps_sigterm():
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
        return _finalize(state, spec, kind, GuardedTracker(tracker, root), grid)


class _StopSignals:
    """SIGINT and SIGTERM (Ctrl-C, ``scancel``, SLURM preemption) stop the driver the same way.

    The handler never raises: an exception thrown from a signal handler lands
    wherever the main thread happens to be, and Python drops it silently inside
    fork hooks, finalizers and logging. It only records the signal. Before Tune
    runs, the driver checks the record between phases (Ray start-up, building
    the tuner) and raises :class:`ExperimentInterrupted`. While Tune runs, the
    signal becomes Tune's graceful stop (SIGUSR1: the experiment state is saved
    one last time and ``fit`` returns); a signal that arrives before Tune has
    installed its handler is forwarded as soon as it has. Either way the
    experiment is not finalized and ``platform resume`` continues it. Once
    every trial has ended, a signal no longer interrupts: the few seconds of
    post-processing finish, so a decision is never half written. Tune's own
    SIGINT handler is switched off (``TUNE_DISABLE_SIGINT_HANDLER``) so that
    both signals take this path.
    """

    _SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, layout: ExperimentLayout) -> None:
        self.layout = layout
        self.experiment_dir = layout.root
        self.signalled = False
        self.tune_running = False
        self.finalizing = False
        self._forwarded = False
        self._lock = threading.Lock()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        import signal

        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            for name in self._SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        self.tune_running = False
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def reinstall(self) -> None:
        """Put tunelab's handlers back after ``ray.init``.

        Ray's core worker installs a C-level failure handler for SIGTERM (it
        prints "SIGTERM received" and aborts at exit) that Python's
        ``signal.getsignal`` cannot see; ``signal.signal`` replaces it.
        """
        import signal

        for sig in self._previous:
            signal.signal(sig, self._on_signal)

    def raise_if_signalled(self) -> None:
        """Raise :class:`ExperimentInterrupted` if a stop signal arrived (before Tune runs)."""
        if self.signalled:
            raise ExperimentInterrupted(self.experiment_dir, -1)

    def start_tune(self) -> None:
        """Mark Tune as running; from now on a signal becomes Tune's graceful stop."""
        import signal

        if self._previous and hasattr(signal, "SIGUSR1"):
            # A Tune run earlier in this process leaves its SIGUSR1 handler behind
            # (Tune never restores it); ignored until this run's Tune installs its own.
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.tune_running = True

    def _tune_handler_installed(self) -> bool:
        import signal

        handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        return handler not in (signal.SIG_DFL, signal.SIG_IGN, None)

    def _forward_to_tune(self) -> None:
        """Send Tune its stop signal once it listens (polled; Tune installs it within seconds)."""
        import signal
        import time

        while self.tune_running and not self._tune_handler_installed():
            time.sleep(0.05)
        with self._lock:
            if not self.tune_running or self._forwarded:
                return
            self._forwarded = True
        os.kill(os.getpid(), signal.SIGUSR1)

    def _on_signal(self, sig: int, frame: Any) -> None:
        import signal

        first = not self.signalled
        self.signalled = True
        if self.finalizing or not self.tune_running:
            return
        if not first and preemption.active() is None:
            return
        grace = preemption.grace_s()
        if first and sig == signal.SIGTERM and grace > 0:
            # preemption: running trials checkpoint their current iteration first
            preemption.Preemption(self.layout.preempt_file, grace, self._forward_to_tune).start()
            return
        if self._tune_handler_installed():
            self._forward_to_tune()
        else:
            threading.Thread(target=self._forward_to_tune, name="tunelab-stop", daemon=True).start()


@contextlib.contextmanager
def _ray_keeps_sigterm() -> Iterator[None]:
    """Keep tunelab's SIGTERM handler while ``ray.init`` runs.

    ``ray.init`` installs a SIGTERM handler that calls ``sys.exit`` wherever the
    signal lands; inside a fork hook Python drops that exception, and the stop
    is lost. Ray installs it through ``ray._private.utils.set_sigterm_handler``
    (Ray 2.x), which is skipped here; :meth:`_StopSignals.reinstall` puts
    tunelab's back right after start-up whatever Ray installed.
    (``ray.init`` cannot run in a helper thread instead: Ray's daemons are
    started with ``PR_SET_PDEATHSIG`` and die with the thread that started them.)
    """
    import ray._private.utils as ray_utils

    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


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


# -- post-processing --------------------------------------------------------------------
def _finalize(
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


def _base_tags(spec: AnySpec, commit: str) -> dict[str, str]:
    return {
        TAG_KIND: spec.kind,
        TAG_SPEC: spec.name,
        TAG_SPEC_HASH: spec_hash(spec),
        TAG_FAMILY: spec.family,
        TAG_GIT_COMMIT: commit,
    }


def _last_checkpoint(result: Any) -> str | None:
    if result.checkpoint is not None:
        return str(result.checkpoint.path)
    found = (
        sorted_checkpoints(Path(result.path)) if result.path and Path(result.path).is_dir() else []
    )
    return str(found[-1]) if found else None


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Keep stdout clean for ``--json``: anything Ray/Tune prints goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
