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
naming the path; the driver's :class:`~tunelab.callbacks.TrialFailures`
then stops the experiment for ``platform resume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab import distributed
from tunelab.checkpoint import (
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
from tunelab.errors import DiskFullError, find_disk_full
from tunelab.family import Experiment, get_family
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

__all__ = ["TrialLoop", "TrialSetup", "build_experiment", "restore_experiment", "run_trial"]


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
        workers: Ray Train workers per trial (1: the trial trains in its own
            process; N > 1: a data-parallel ``TorchTrainer`` run).
        cpu: CPUs per worker (with ``workers > 1``; the trial's own otherwise).
        gpu: GPUs per worker (with ``workers > 1``; the trial's own otherwise).
        preempt_file: The driver's preemption request (see
            :attr:`~tunelab.layout.ExperimentLayout.preempt_file`); empty: none.
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
    workers: int = 1
    cpu: float = 1.0
    gpu: float = 0.0
    preempt_file: str = ""


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
    keys the runner adds (``arm`` for lever A/B). With ``setup.workers > 1``
    the trial is a Ray Train data-parallel run (:mod:`tunelab._train_workers`).

    Raises:
        DiskFullError: a write (checkpoint, its copy into storage, artifacts,
            data) found no space left or the quota used up.
    """
    trial_dir = _storage_trial_dir()
    with _disk_full_names(trial_dir or Path(setup.data_root)):
        if setup.workers > 1:
            from tunelab._train_workers import run_workers

            run_workers(config, setup, trial_dir)
        else:
            _run_trial(config, setup, trial_dir)


#: ``report(metrics, checkpoint_dir)``: hand one iteration's metrics (and a checkpoint
#: folder, only on the lead worker) to Tune or to Ray Train.
Report = Callable[[dict[str, Any], "Path | None"], None]


def _run_trial(config: dict[str, Any], setup: TrialSetup, trial_dir: Path | None) -> None:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    reserve = DiskReserve(trial_dir)
    if trial_dir is not None:
        remove_incomplete(trial_dir, keep=checkpoint.path if checkpoint is not None else None)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            loop = TrialLoop(config, setup, Path(d))
    else:
        loop = TrialLoop(config, setup, None)

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            tune.report(metrics)
            return
        reserve.check(trial_dir or checkpoint_dir)
        # Tune copies the folder into the experiment's storage here.
        with _disk_full_names(trial_dir or checkpoint_dir):
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    loop.run(tune.get_context().get_trial_id(), report)


class DiskReserve:
    """The driver's reserved space (experiment folder = <root>/tune/<trial>).

    Once the driver released it, the disk is full and the experiment is
    stopping: no more checkpoints are written.
    """

    def __init__(self, trial_dir: Path | None) -> None:
        self.file = trial_dir.parent.parent / RESERVE_FILE if trial_dir is not None else None
        self.held = self.file is not None and self.file.is_file()

    def check(self, where: Path) -> None:
        """Raise :class:`DiskFullError` naming ``where`` if the reserve was released."""
        if self.held and self.file is not None and not self.file.exists():
            raise DiskFullError(where)


class TrialLoop:
    """One trial's iterations on one worker: build or restore, train, report, checkpoint.

    Shared by the one-worker trial and every worker of a data-parallel trial.
    The lead worker (rank 0) alone writes checkpoints, artifacts and the
    Prometheus metrics; every worker reports the same (averaged) metrics.

    Args:
        config: The trial's config (``seed``, ``config``).
        setup: The experiment's trial constants.
        checkpoint_dir: A checkpoint folder to restore from, or None.
    """

    def __init__(
        self, config: dict[str, Any], setup: TrialSetup, checkpoint_dir: Path | None
    ) -> None:
        import torch

        torch.set_num_threads(max(1, setup.threads))
        self.setup = setup
        self.seed = int(config["seed"])
        self.lead = distributed.rank() == 0
        data_root = Path(setup.data_root)
        self.start = 0
        if checkpoint_dir is not None:
            self.exp, self.start = restore_experiment(
                setup.family, config["config"], self.seed, data_root, checkpoint_dir
            )
        else:
            self.exp = build_experiment(setup.family, config["config"], self.seed, data_root)
        self.monitor = monitor_of(self.exp)
        if self.monitor is not None:
            self.monitor.policy = setup.health

    def run(self, trial_id: str, report: Report) -> None:
        """Train from the restored iteration to the budget, reporting every iteration."""
        setup, exp, monitor = self.setup, self.exp, self.monitor
        recorder = TrialRecorder(setup.spec, family_label(setup.family)) if self.lead else None
        out = Path(setup.artifacts_root) / trial_id if setup.artifacts_root and self.lead else None
        for it in range(self.start + 1, setup.budget + 1):
            t0 = time.perf_counter()
            metrics, diagnosis = _train_iteration(exp, monitor, setup.family)
            metrics[M_ITER_TIME] = time.perf_counter() - t0
            if distributed.is_distributed():
                metrics = distributed.average_metrics(metrics)
            metrics[ITERATION] = it
            if recorder is not None:
                recorder.iteration(metrics[M_ITER_TIME], metrics)
            if diagnosis is not None:
                # Diverged: report it (NaN for the family's metrics), keep the diagnosis, end.
                if recorder is not None:
                    recorder.diverged()
                if out is not None and monitor is not None:
                    with _disk_full_names(out):
                        atomic_write_json(out / HEALTH_ARTIFACT, monitor.report())
                report({**metrics, DIVERGED: 1.0, HEALTH_DIAGNOSIS: diagnosis.line()}, None)
                return
            if it == setup.budget and out is not None:
                self._export(out, it)
            preempted = self._preempt_requested()
            due = it % setup.checkpoint_every == 0 or it in setup.milestones
            if not (due or preempted or it == setup.budget):
                report(metrics, None)
                continue
            if not self.lead:
                report(metrics, None)
            else:
                with tempfile.TemporaryDirectory(prefix="tunelab-ckpt-") as d:
                    t1 = time.perf_counter()
                    extra = {_HEALTH_STATE: monitor.state_dict()} if monitor is not None else None
                    save_state(Path(d), exp.state_dict(), iteration=it, extra=extra, durable=False)
                    metrics[M_CKPT_TIME] = time.perf_counter() - t1
                    metrics[M_CKPT_BYTES] = float((Path(d) / STATE_FILE).stat().st_size)
                    if recorder is not None:
                        recorder.checkpoint(metrics[M_CKPT_TIME], metrics[M_CKPT_BYTES])
                    report(metrics, Path(d))
            if preempted and it < setup.budget:
                self._wait_for_stop()

    def _export(self, out: Path, it: int) -> None:
        with _disk_full_names(out):
            if self.monitor is not None:
                atomic_write_json(out / HEALTH_ARTIFACT, self.monitor.report())
            manifest = self.exp.export(out)
            where = {
                "hostname": socket.gethostname(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "workers": distributed.world_size(),
            }
            atomic_write_json(
                out / "manifest.json", {"seed": self.seed, "iteration": it, **where, **manifest}
            )

    def _preempt_requested(self) -> bool:
        """Whether the driver asked trials to checkpoint now (one decision for all workers)."""
        path = self.setup.preempt_file
        return distributed.broadcast_flag(bool(path) and os.path.exists(path))

    def _wait_for_stop(self) -> None:
        """After the preemption checkpoint: start no new iteration until the driver stops Tune.

        Waits while the driver's preemption file exists, at most its grace time
        (then training goes on: the stop did not come).
        """
        path = Path(self.setup.preempt_file)
        try:
            grace = float(json.loads(path.read_text()).get("grace_s", 60.0))
        except (OSError, ValueError, AttributeError):
            grace = 60.0
        deadline = time.monotonic() + grace
        while path.exists() and time.monotonic() < deadline:
            exit_if_tune_stops()
            time.sleep(0.2)


def exit_if_tune_stops() -> None:
    """End this trial's thread the way Tune's own ``report`` does once Tune stops the trial.

    A trial waiting for the stop (preemption) would otherwise hold Tune's
    stop for its forced-cleanup timeout (10 s). Outside a Tune session, nothing.
    """
    try:
        from ray.train._internal.session import get_session  # Ray's developer API

        session = get_session()
    except Exception:  # no Tune session (a Ray Train worker, a direct call)
        return
    stop = getattr(session, "stop_event", None)
    if stop is not None and stop.is_set():
        stop.clear()
        sys.exit(0)  # what ray.train._internal.session does on a stopped trial's report


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


def remove_incomplete(trial_dir: Path, keep: str | None) -> None:
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
