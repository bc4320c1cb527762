"""The in-trial side: the Ray Tune function trainable every family runs in.

tunelab owns the loop so that every family gets the same reporting,
checkpointing and resume: build the family's experiment from the trial's
config and seed, restore the exact training state from Tune's checkpoint if
there is one, then per iteration train, report and (every ``checkpoint_every``
iterations, at every cull milestone and at the end) checkpoint. At the budget
the experiment exports its artifacts (before the last report, so a scheduler
stopping the trial at the budget cannot lose them).

Every checkpoint folder gets its completion marker last (:func:`save_state`);
before restoring, a trial deletes its incomplete checkpoint folders (a copy
into storage that a full disk or a crash stopped half way). A full disk or
quota anywhere in a trial raises :class:`~tunelab.errors.DiskFullError`
naming the path; the driver's :class:`~tunelab._callback.TrialFailures`
then stops the experiment for ``platform resume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab._checkpoint import (
    RESERVE_FILE,
    STATE_FILE,
    atomic_write_json,
    has_marked_checkpoints,
    is_complete_checkpoint,
    load_state,
    save_state,
    seed_everything,
    sorted_checkpoints,
)
from tunelab._family import Experiment, get_family
from tunelab.errors import DiskFullError, find_disk_full
from tunelab.health import Diagnosis, HealthPolicy, TrialDiverged, monitor_of
from tunelab.layout import HEALTH_ARTIFACT
from tunelab.metrics import TrialRecorder, family_label
from tunelab.names import (
    DIVERGED,
    HEALTH_DIAGNOSIS,
    ITERATION,
    M_CKPT_BYTES,
    M_CKPT_TIME,
    M_ITER_TIME,
    as_float,
)

if TYPE_CHECKING:
    from tunelab.layout import HEALTH_ARTIFACT
from tunelab.health import HealthMonitor

__all__ = ["TrialSetup", "build_experiment", "restore_experiment", "run_trial"]


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What every trial of one experiment shares (the trainable's constants).

    Args:
        family: The family name (or ``module:ATTR``).
        spec: The spec name (metric tags).
        budget: Iterations per trial.
        checkpoint_every: Checkpoint period in iterations.
        milestones: Iterations that always checkpoint (cull points).
        data_root: Shared folder for generated data.
        artifacts_root: Folder receiving ``<trial_id>/`` artifacts at the budget.
        threads: torch intra-op threads per trial.
        health: The numerical-health policy (the spec's ``health:`` block),
            given to the family's :class:`~tunelab.health.HealthMonitor`.
    """

    family: str
    budget: int
    spec: str = ""
    checkpoint_every: int = 1
    milestones: tuple[int, ...] = ()
    data_root: str = ""
    artifacts_root: str = ""
    threads: int = 1
    health: HealthPolicy = dataclasses.field(default_factory=HealthPolicy)


def build_experiment(
    family_name: str, config: dict[str, Any], seed: int, data_root: Path
) -> Experiment:
    """Seed everything and build a family's experiment from a plain config dict."""
    family = get_family(family_name)
    cfg = family.make_config(config)
    seed_everything(seed)
    return family.build(cfg, seed, data_root)


def restore_experiment(
    family_name: str, config: dict[str, Any], seed: int, data_root: Path, checkpoint_dir: Path
) -> tuple[Experiment, int]:
    """Build an experiment and load a checkpoint into it; returns it and the iteration.

    The health monitor's state (its norm windows) is restored too, when the
    checkpoint has one.
    """
    exp = build_experiment(family_name, config, seed, data_root)
    payload = load_state(checkpoint_dir)
    exp.load_state_dict(payload["family"])
    monitor = monitor_of(exp)
    health = (payload.get("extra") or {}).get(_HEALTH_STATE)
    if monitor is not None and health is not None:
        monitor.load_state_dict(health)
    return exp, int(payload["iteration"])


#: The key of the health monitor's state in a checkpoint's ``extra``.
_HEALTH_STATE = "health"


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable (bind ``setup`` with ``tune.with_parameters``).

    ``config`` holds ``seed`` and ``config`` (the family config) plus any
    keys the runner adds (``arm`` for lever A/B).

    Raises:
        DiskFullError: a write (checkpoint, its copy into storage, artifacts,
            data) found no space left or the quota used up.
    """
    trial_dir = _storage_trial_dir()
    with _disk_full_names(trial_dir or Path(setup.data_root)):
        _run_trial(config, setup, trial_dir)


def _run_trial(config: dict[str, Any], setup: TrialSetup, trial_dir: Path | None) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(max(1, setup.threads))
    seed = int(config["seed"])
    data_root = Path(setup.data_root)
    start = 0
    checkpoint = tune.get_checkpoint()
    # The driver's reserved space (experiment folder = <root>/tune/<trial>): once it is
    # released, the disk is full and the experiment is stopping: write no more checkpoints.
    reserve = trial_dir.parent.parent / RESERVE_FILE if trial_dir is not None else None
    had_reserve = reserve is not None and reserve.is_file()
    if trial_dir is not None:
        _remove_incomplete(trial_dir, keep=checkpoint.path if checkpoint is not None else None)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            exp, start = restore_experiment(
                setup.family, config["config"], seed, data_root, Path(d)
            )
    else:
        exp = build_experiment(setup.family, config["config"], seed, data_root)
    trial_id = tune.get_context().get_trial_id()
    recorder = TrialRecorder(
        setup.spec, family_label(setup.family)
    )  # Prometheus metrics (tunelab.metrics)
    monitor = monitor_of(exp)
    if monitor is not None:
        monitor.policy = setup.health
    out = Path(setup.artifacts_root) / trial_id if setup.artifacts_root else None
    for it in range(start + 1, setup.budget + 1):
        t0 = time.perf_counter()
        metrics, diagnosis = _train_iteration(exp, monitor, setup.family)
        metrics[M_ITER_TIME] = time.perf_counter() - t0
        metrics[ITERATION] = it
        recorder.iteration(metrics[M_ITER_TIME], metrics)
        if diagnosis is not None:
            # Diverged: report it (NaN for the family's metrics), keep the diagnosis, end.
            recorder.diverged()
            if out is not None and monitor is not None:
                with _disk_full_names(out):
                    atomic_write_json(out / HEALTH_ARTIFACT, monitor.report())
            tune.report({**metrics, DIVERGED: 1.0, HEALTH_DIAGNOSIS: diagnosis.line()})
            return
        if it == setup.budget and out is not None:
            with _disk_full_names(out):
                if monitor is not None:
                    atomic_write_json(out / HEALTH_ARTIFACT, monitor.report())
                manifest = exp.export(out)
                where = {
                    "hostname": socket.gethostname(),
                    "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                }
                atomic_write_json(
                    out / "manifest.json", {"seed": seed, "iteration": it, **where, **manifest}
                )
        if it % setup.checkpoint_every == 0 or it in setup.milestones or it == setup.budget:
            with tempfile.TemporaryDirectory(prefix="tunelab-ckpt-") as d:
                t1 = time.perf_counter()
                extra = {_HEALTH_STATE: monitor.state_dict()} if monitor is not None else None
                save_state(Path(d), exp.state_dict(), iteration=it, extra=extra, durable=False)
                metrics[M_CKPT_TIME] = time.perf_counter() - t1
                metrics[M_CKPT_BYTES] = float((Path(d) / STATE_FILE).stat().st_size)
                recorder.checkpoint(metrics[M_CKPT_TIME], metrics[M_CKPT_BYTES])
                if had_reserve and reserve is not None and not reserve.exists():
                    raise DiskFullError(trial_dir or d)
                # Tune copies the folder into the experiment's storage here.
                with _disk_full_names(trial_dir or Path(d)):
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)


def _train_iteration(
    exp: Experiment, monitor: HealthMonitor | None, family: str
) -> tuple[dict[str, float], Diagnosis | None]:
    """One ``train_iteration``: its metrics and, if the trial diverged, the diagnosis.

    A step that ends the trial raises :class:`~tunelab.health.TrialDiverged`
    mid-iteration: the family's metrics of that iteration are NaN (a value to
    show), the monitor's partial ``health/*`` metrics are kept. A decision at
    the iteration's end (sustained growth) keeps the iteration's metrics.
    """
    try:
        metrics = {k: as_float(v) for k, v in exp.train_iteration().items()}
    except TrialDiverged as stop:
        metrics = dict.fromkeys(get_family(family).metrics, math.nan)
        if monitor is not None:
            metrics.update(monitor.end_iteration())
        return metrics, stop.diagnosis
    return metrics, monitor.diagnosis if monitor is not None else None


@contextlib.contextmanager
def _disk_full_names(path: Path) -> Iterator[None]:
    """A full disk or quota in the block raises :class:`DiskFullError` (its file, else ``path``)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        full = find_disk_full(err, path)
        if full is None:
            raise
        raise full from err


def _storage_trial_dir() -> Path | None:
    """This trial's folder in the experiment's storage, when that is a local (or shared) path."""
    try:
        import pyarrow.fs
        from ray.train._internal.session import get_storage  # Ray's developer API

        storage = get_storage()
        if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            return None
        return Path(storage.trial_fs_path)
    except Exception:  # no Tune session (a direct call), or Ray moved it: skip the clean-up
        return None


def _remove_incomplete(trial_dir: Path, keep: str | None) -> None:
    """Delete the trial's incomplete checkpoint folders (a copy that stopped half way).

    Only this trial writes there, and not now: it has not started. The folder
    Tune restores from is left for :func:`load_state` to refuse by name, and
    nothing is deleted in an experiment written before markers existed.
    """
    if not trial_dir.is_dir() or not has_marked_checkpoints(trial_dir.parent):
        return
    for folder in sorted_checkpoints(trial_dir, complete_only=False):
        if str(folder) != str(keep) and not is_complete_checkpoint(folder):
            shutil.rmtree(folder, ignore_errors=True)
