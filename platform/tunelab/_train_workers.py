"""A multi-worker trial: a Ray Train data-parallel run inside its Tune trial.

With ``resources.workers: N > 1`` the Tune trial (0 CPUs of its own) fits a
``TorchTrainer`` of N workers, each with ``resources.cpu`` CPUs and
``resources.gpu`` GPUs, sharing a ``torch.distributed`` process group (gloo
on the CPU, nccl with GPUs). Every worker runs the same
:class:`~tunelab._trial.TrialLoop` as a one-worker trial: the family takes
its :func:`~tunelab.distributed.shard` of each global batch, the health
monitor averages the gradients, the metrics are averaged over the workers,
and rank 0 alone saves checkpoints and artifacts.

Tune stays the one source of truth, so culling, selection, lever A/B,
``platform resume`` and the driver's failure policy work unchanged:

- every ``ray.train.report`` reaches the Tune trial through a
  :class:`ForwardToTune` callback (on Ray Train's controller) and a queue;
  the trial reports it to Tune, with rank 0's checkpoint, which Tune copies
  into the trial's folder like any other trial's;
- a trial (re)starts from Tune's checkpoint (a retry, or ``platform resume``
  after the driver was killed), handed to every worker; Ray Train's own
  retries are off (``max_failures=0``) and its inner run (under the trial's
  folder, ``train/``) is scratch, cleared at each start;
- a failed worker (a killed process, a lost node) fails ``fit``; the Tune
  trial raises it and Tune retries the trial from its last checkpoint within
  ``failure.retries``. A node drained as preempted (tunelab's SLURM worker
  jobs do so on SIGTERM) is Ray Train's to recover: it restarts the workers
  from its latest checkpoint without failing the trial
  (``max_preemption_failures=-1``, Ray's default; not exercised here: the
  SLURM test preempts a one-worker trial).

Each ``ray.train.report`` waits for the controller's next poll of the workers
(``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default in Ray; tunelab's
local Ray sets 0.5 s unless it is set): with iterations of seconds that is
the overhead to expect.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

from tunelab._trial import TrialLoop, TrialSetup, exit_if_tune_stops

__all__ = ["ForwardToTune", "run_workers"]

#: The inner Ray Train run's folder in the Tune trial's folder.
TRAIN_DIR = "train"
_POLL_S = 0.2


class ForwardToTune(UserCallback):
    """Ray Train controller callback: put rank 0's metrics and the checkpoint path on a queue.

    Args:
        items: A ``ray.util.queue.Queue`` the Tune trial reads.
    """

    def __init__(self, items: Any) -> None:
        self.items = items

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        self.items.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: the trial's iterations on this worker."""
    import ray.train

    setup: TrialSetup = loop_config["setup"]
    # Ray Train restarts its workers itself only after a node preemption (max_failures=0,
    # max_preemption_failures=-1): then its own latest checkpoint (the one Tune got too)
    # is the start; otherwise the trial's Tune checkpoint.
    own = ray.train.get_checkpoint()
    start = own.path if own is not None else loop_config["checkpoint"]
    loop = TrialLoop(loop_config["config"], setup, Path(start) if start else None)

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        # A Ray Train worker, not a Tune trial: ray.train's report is the one here (the
        # Tune trial that fits this trainer reports to Tune with ray.tune's, run_workers).
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    loop.run(loop_config["trial_id"], report)


def _address_this_ray() -> None:
    """Make Ray Train's controller (and the actors it starts) address this Ray explicitly.

    When Tune stops a trial, Ray Train's placement-group cleaner frees the
    workers' CPUs once it sees, through Ray's state API, that the controller
    died. The state API finds its cluster from ``RAY_ADDRESS`` or, without
    it, by looking for running Ray instances: with two on one machine (a
    second local Ray, a SLURM test cluster) it fails, the CPUs are never
    freed and the next trial waits forever (measured, Ray 2.60). Ray Train
    propagates a fixed set of variables to its controller; ``RAY_ADDRESS`` is
    added to it (a Ray internal, checked at import).
    """
    import ray
    from ray.train.v2._internal import constants

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    propagate = getattr(constants, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagate, set):
        propagate.add("RAY_ADDRESS")


def run_workers(config: dict[str, Any], setup: TrialSetup, trial_dir: Path | None) -> None:
    """Fit the trial's ``TorchTrainer`` and report each of its iterations to Tune.

    Raises:
        Exception: what a worker raised (Ray Train's ``TrainingFailedError``),
            after the iterations reported before it reached Tune.
    """
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    from tunelab._trial import DiskReserve, remove_incomplete

    checkpoint = tune.get_checkpoint()
    reserve = DiskReserve(trial_dir)
    scratch = None
    if trial_dir is not None:
        remove_incomplete(trial_dir, keep=checkpoint.path if checkpoint is not None else None)
        storage = trial_dir
    else:  # storage that is not a local path: the inner run lives in a temporary folder
        scratch = tempfile.TemporaryDirectory(prefix="tunelab-train-")
        storage = Path(scratch.name)
    shutil.rmtree(storage / TRAIN_DIR, ignore_errors=True)  # a previous attempt's scratch
    _address_this_ray()
    items = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": config,
            "setup": setup,
            "checkpoint": checkpoint.path if checkpoint is not None else None,
            "trial_id": tune.get_context().get_trial_id(),
        },
        torch_config=TorchConfig(backend="nccl" if setup.gpu > 0 else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=setup.workers,
            use_gpu=setup.gpu > 0,
            resources_per_worker={"CPU": setup.cpu, **({"GPU": setup.gpu} if setup.gpu else {})},
        ),
        run_config=RunConfig(
            name=TRAIN_DIR,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[ForwardToTune(items)],  # type: ignore[list-item]
        ),
    )
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # handed to the trial's thread, raised there
            errors.append(err)

    thread = threading.Thread(target=fit, name="tunelab-train-fit", daemon=True)
    thread.start()
    try:
        while True:
            try:
                metrics, path = items.get(timeout=_POLL_S)
            except Empty:
                if not thread.is_alive():
                    break
                exit_if_tune_stops()  # the workers wait for the trial's actor to go
                continue
            if path is None:
                tune.report(metrics)
                continue
            reserve.check(trial_dir or Path(path))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(path))
        thread.join()
        if errors:
            raise errors[0]
    finally:
        if scratch is not None:
            scratch.cleanup()
