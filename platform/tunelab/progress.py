"""Terminal progress for a running experiment (rich; silent when not a terminal)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from tunelab._callback import DriverCallback
from tunelab.names import LIVE_STATES, TrialStatus
from tunelab.outcome import result_status

__all__ = ["ProgressCallback", "trial_counts"]


class ProgressCallback(DriverCallback):
    """Show trials running / paused / culled / finished, the best metric so far and elapsed time.

    Args:
        metric: The metric whose best value is shown.
        mode: ``max`` or ``min``.
        budget: Iterations per trial (a trial that ends below it was culled).
        total: Number of trials expected (None if unknown).
        enabled: Force on/off; by default on only when stderr is a terminal.
    """

    def __init__(
        self, *, metric: str, mode: str, budget: int, total: int | None, enabled: bool | None = None
    ) -> None:
        self.metric, self.mode, self.budget, self.total, self.enabled = (
            metric,
            mode,
            budget,
            total,
            enabled,
        )
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._progress: Any = None
        self._task: Any = None
        self._best = math.nan
        self._t0 = time.monotonic()
        self._last = 0.0

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        enabled = sys.stderr.isatty() if self.enabled is None else self.enabled
        if not enabled:
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

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._progress is None or time.monotonic() - self._last < 0.25:
            return
        self._last = time.monotonic()
        self._refresh(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._progress is not None:
            self._refresh(trials)
            self._progress.stop()
            self._progress = None

    def _refresh(self, trials: list) -> None:
        counts = trial_counts(trials, self.budget)
        text = " ".join(f"{k} {v}" for k, v in counts.items() if v or k in ("running", "finished"))
        best = "-" if math.isnan(self._best) else f"{self._best:.4g}"
        text += f" | best {self.metric} {best}"
        done = sum(v for k, v in counts.items() if TrialStatus(k).done)
        self._progress.update(
            self._task, completed=done, total=self.total or len(trials), counts=text
        )


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
