"""Graceful preemption: on SIGTERM, running trials checkpoint before the driver stops.

SLURM sends SIGTERM ahead of the kill (``#SBATCH --signal=B:TERM@<grace>``,
cluster.yaml's ``site.preempt_grace_s``) and ``scancel`` sends it at once.
The driver then (:meth:`Preemption.start`):

1. writes the experiment's preemption file
   (:attr:`~tunelab.layout.ExperimentLayout.preempt_file`): every running
   trial checkpoints at the end of its current iteration and starts no other
   (:class:`~tunelab._trial.TrialLoop`);
2. waits until every running trial has reported that checkpoint
   (:class:`PreemptionCallback`), or until the grace time less a margin for
   Tune's own last writes has passed;
3. stops Tune (its state is saved) and exits 130 with the resume command.

A second signal stops at once. The grace time is ``$TUNELAB_PREEMPT_GRACE_S``
(default 60 s; 0 stops at once, as SIGINT does).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.callbacks import DriverCallback
from tunelab.checkpoint import atomic_write_json

__all__ = ["Preemption", "PreemptionCallback", "grace_s"]

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 60.0

_active: list[Preemption] = []  # the preemption under way in this driver process


def grace_s() -> float:
    """The grace time in seconds (``$TUNELAB_PREEMPT_GRACE_S``, default 60)."""
    try:
        return max(0.0, float(os.environ.get("TUNELAB_PREEMPT_GRACE_S", DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


def _margin(grace: float) -> float:
    """Time kept for Tune's last writes after the wait (a quarter of the grace, at most 10 s)."""
    return min(10.0, grace / 4)


class Preemption:
    """One preemption under way: the request file, the wait, then the stop.

    Args:
        preempt_file: The experiment's preemption file.
        grace: Seconds until the kill.
        stop: Called once to stop Tune (the driver's graceful stop).
    """

    def __init__(self, preempt_file: Path, grace: float, stop: Callable[[], None]) -> None:
        self.preempt_file = preempt_file
        self.grace = grace
        self.stop = stop
        self.started = time.monotonic()
        self.checkpointed: set[str] = set()
        self.all_checkpointed = threading.Event()
        self.checkpointed_s: float | None = None

    def start(self) -> None:
        """Write the request and wait in a thread (call from the signal handler)."""
        _active[:] = [self]
        threading.Thread(target=self._run, name="tunelab-preempt", daemon=True).start()

    def _run(self) -> None:
        try:
            atomic_write_json(
                self.preempt_file,
                {
                    "grace_s": self.grace,
                    "signalled": datetime.datetime.now().isoformat(timespec="seconds"),
                },
            )
        except OSError as err:  # no request, no wait: stop now (trials redo their iteration)
            log.warning("could not write %s (%s): stopping at once", self.preempt_file, err)
        else:
            wait = max(0.0, self.grace - _margin(self.grace))
            if not self.all_checkpointed.wait(wait):
                log.warning(
                    "preemption: not every running trial checkpointed within %.0f s; stopping",
                    wait,
                )
        self.stop()

    def on_trials(self, trials: list[Any]) -> None:
        """Set the event once every running trial has checkpointed since the signal."""
        running = [t.trial_id for t in trials if t.status == "RUNNING"]
        if all(t in self.checkpointed for t in running) and not self.all_checkpointed.is_set():
            self.checkpointed_s = time.monotonic() - self.started
            self.all_checkpointed.set()

    def record(self) -> dict[str, Any]:
        """What ``tunelab_stopped.json`` keeps of it (the measured time to the checkpoints)."""
        return {
            "grace_s": self.grace,
            "trials_checkpointed": len(self.checkpointed),
            "all_checkpointed_s": self.checkpointed_s,
        }


def active() -> Preemption | None:
    """The preemption under way in this process, if any."""
    return _active[0] if _active else None


def finish() -> dict[str, Any] | None:
    """End the preemption (at the driver's exit): its record, or None."""
    p = _active.pop() if _active else None
    return p.record() if p is not None else None


class PreemptionCallback(DriverCallback):
    """Tells the preemption under way which running trials have checkpointed since the signal."""

    def on_checkpoint(
        self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any
    ) -> None:
        p = active()
        if p is not None:
            p.checkpointed.add(trial.trial_id)
            p.on_trials(trials)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        p = active()
        if p is not None and p.preempt_file.exists():
            p.on_trials(trials)
