"""Progress of a running experiment on stderr.

In a terminal it is a live rich bar. Elsewhere (sbatch, nohup, a log file) it
is plain lines, one per event: a trial starts, reaches a milestone (the cull
point), is culled, finishes, diverges or fails; plus a count line at most every
``TUNELAB_PROGRESS_INTERVAL_S`` seconds (default 30) while trials run.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from tunelab._ray_start import stop_requested
from tunelab.callbacks import DriverCallback
from tunelab.names import HEALTH_DIAGNOSIS, LIVE_STATES, TrialStatus
from tunelab.outcome import result_status

__all__ = ["ProgressCallback", "trial_counts"]


class ProgressCallback(DriverCallback):
    """Show trials running / paused / culled / finished, the best metric so far and elapsed time.

    Args:
        metric: The metric whose best value is shown.
        mode: ``max`` or ``min``.
        budget: Iterations per trial (a trial that ends below it was culled).
        total: Number of trials expected (None if unknown).
        enabled: Force on/off; by default on. A terminal gets the live bar,
            anything else plain lines.
        milestones: Iterations announced when a trial reaches them (cull points).
    """

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        budget: int,
        total: int | None,
        enabled: bool | None = None,
        milestones: tuple[int, ...] = (),
    ) -> None:
        self.metric, self.mode, self.budget, self.total, self.enabled = (
            metric,
            mode,
            budget,
            total,
            enabled,
        )
        self.milestones = tuple(milestones)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._progress: Any = None
        self._task: Any = None
        self._lines = False
        self._best = math.nan
        self._t0 = time.monotonic()
        self._last = 0.0
        self._last_line = time.monotonic()
        self._every = float(os.environ.get("TUNELAB_PROGRESS_INTERVAL_S", "30"))

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        if self.enabled is False:
            return
        if not sys.stderr.isatty():
            self._lines = True
            total = "?" if self.total is None else self.total
            self._say(f"started: {total} trial(s), budget {self.budget} iteration(s)")
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("trials", total=self.total, counts="starting")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = value > self._best if self.mode == "max" else value < self._best
            if math.isnan(self._best) or better:
                self._best = float(value)
        step = result.get("training_iteration")
        if self._lines and step in getattr(self, "milestones", ()):
            self._say(f"{_who(trial)} reached iteration {step}: {self.metric} {_fmt(value)}")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._lines:
            self._say(f"{_who(trial)} started")

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._lines:
            self._say(f"{_who(trial)} restored from its checkpoint")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self._lines:
            return
        result = trial.last_result or {}
        status = result_status("TERMINATED", result, self.budget)
        step = result.get("training_iteration", 0)
        value = _fmt(result.get(self.metric))
        if status is TrialStatus.CULLED:
            self._say(f"{_who(trial)} culled at iteration {step}: {self.metric} {value}")
        elif status is TrialStatus.DIVERGED:
            why = result.get(HEALTH_DIAGNOSIS)
            self._say(f"{_who(trial)} diverged at iteration {step}" + (f": {why}" if why else ""))
        else:
            self._say(f"{_who(trial)} {status.value} at iteration {step}: {self.metric} {value}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._lines:
            error = str(getattr(trial, "error_file", None) or "see the trial's error file")
            self._say(f"{_who(trial)} failed ({error})")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._lines:
            if time.monotonic() - self._last_line >= self._every:
                self._say(self._counts_text(trials))
            return
        if self._progress is None or time.monotonic() - self._last < 0.25:
            return
        self._last = time.monotonic()
        self._refresh(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # A stopped driver says what was left itself (from the saved state): the statuses Tune
        # gives trials while it stops would count a trial stopped mid-run as culled.
        stopped = stop_requested()
        if self._lines:
            if not stopped:
                self._say("all trials ended: " + self._counts_text(trials))
            return
        if self._progress is not None:
            if not stopped:
                self._refresh(trials)
            self._progress.stop()
            self._progress = None

    def _counts_text(self, trials: list) -> str:
        counts = trial_counts(trials, self.budget)
        text = " ".join(f"{k} {v}" for k, v in counts.items() if v or k in ("running", "finished"))
        return text + f" | best {self.metric} {_fmt(self._best)}"

    def _say(self, line: str) -> None:
        """One plain progress line on stderr: ``[tunelab +MM:SS] <event>``."""
        self._last_line = time.monotonic()
        minutes, seconds = divmod(int(time.monotonic() - self._t0), 60)
        sys.stderr.write(f"[tunelab +{minutes:02d}:{seconds:02d}] {line}\n")
        sys.stderr.flush()

    def _refresh(self, trials: list) -> None:
        counts = trial_counts(trials, self.budget)
        text = self._counts_text(trials)
        done = sum(v for k, v in counts.items() if TrialStatus(k).done)
        self._progress.update(
            self._task, completed=done, total=self.total or len(trials), counts=text
        )


def _who(trial: Any) -> str:
    """``trial <id> (seed N[, arm A])`` for a progress line."""
    config = getattr(trial, "config", None) or {}
    parts = [f"seed {config['seed']}"] if "seed" in config else []
    if config.get("arm") is not None:
        parts.append(f"arm {config['arm']}")
    extra = f" ({', '.join(parts)})" if parts else ""
    return f"trial {trial.trial_id}{extra}"


def _fmt(value: Any) -> str:
    """A metric value for humans: 4 significant digits, ``nan`` shown as such, ``-`` if absent."""
    if isinstance(value, (int, float)):
        return f"{float(value):.4g}"
    return "-"


def trial_counts(trials: list, budget: int) -> dict[str, int]:
    """Tune trials per status (:func:`tunelab.outcome.result_status`).

    Every state of :data:`tunelab.names.LIVE_STATES` is present; ``diverged`` and
    ``interrupted`` appear when some trial is in them. Also used by
    :mod:`tunelab.metrics`.
    """
    counts = dict.fromkeys(LIVE_STATES, 0)
    for t in trials:
        status = result_status(t.status, t.last_result, budget)
        counts[status.value] = counts.get(status.value, 0) + 1
    return counts
