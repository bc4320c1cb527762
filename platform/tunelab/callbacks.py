"""tunelab's driver-side Tune callbacks: their base, and the trial failure policy.

:class:`TrialFailures` decides what a trial's failure means beyond Tune's
``FailureConfig(max_failures=N)`` (which retries every error N times):

- A **full disk** (``ENOSPC`` / ``EDQUOT``, :class:`~tunelab.errors.DiskFullError`
  raised by the trial) is no fault of the trial: it is not counted against its
  retries, and the whole experiment stops gracefully (Tune's own stop: the
  experiment state is saved, trials keep their last complete checkpoint). The
  space that lets Tune's last writes complete is held from the start
  (:func:`~tunelab.checkpoint.reserve_space` in the experiment folder) and
  released at that moment. The free space of the experiment's disk is also
  watched between Tune's steps: below ``$TUNELAB_LOW_SPACE_BYTES`` (1 MiB)
  the experiment stops the same way before the driver's own writes fail. The
  driver then raises the error (:func:`raise_if_disk_full`), and ``platform
  resume`` continues once space is freed.
- A **deterministic setup error** fails fast: a trial that fails twice in a
  row before reporting its first result (building the family from a bad
  config, missing data, a checkpoint that cannot be restored) is not retried
  any further, whatever N is. A trial that reports a result after such a
  failure gets its N back. A worker that died (``RayActorError``, e.g. a node
  lost) does not count as deterministic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tunelab.checkpoint import RESERVE_BYTES, release_space, reserve_space
from tunelab.errors import DiskFullError, error_summary, find_disk_full

__all__ = ["DriverCallback", "TrialFailures", "disk_full_guard", "raise_if_disk_full"]

log = logging.getLogger(__name__)

LOW_SPACE_BYTES = 2**20
_WATCH_EVERY_S = 0.5

# The full disk a trial reported in this driver process (the callback instance that
# sees it may be one Tune unpickled on resume, which the driver holds no reference to).
_disk_full: list[DiskFullError] = []


class DriverCallback(Callback):
    """A Tune callback whose ``_private`` attributes are runtime state.

    ``Tuner`` pickles its callbacks into the experiment (``tuner.pkl``) and
    ``Tuner.restore`` unpickles them: only the public configuration travels;
    the runtime state (clients, threads, timers) is rebuilt by
    :meth:`_init_runtime` in the restored driver.
    """

    def _init_runtime(self) -> None:
        """Create the runtime state; called at construction and after unpickling."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()


class TrialFailures(DriverCallback):
    """Fail fast on deterministic setup errors; stop the experiment on a full disk.

    Add it last to ``RunConfig(callbacks=...)``; after ``Tuner.fit`` returns,
    call :func:`raise_if_disk_full`.

    Args:
        experiment_dir: The experiment folder: it holds the reserved space
            while Tune runs (none if empty).
        reserve_bytes: How much space to hold (default ``$TUNELAB_RESERVE_BYTES``,
            else 16 MiB; 0 holds none).
    """

    def __init__(self, experiment_dir: str | Path = "", reserve_bytes: int | None = None) -> None:
        self.experiment_dir = str(experiment_dir)
        env = os.environ.get("TUNELAB_RESERVE_BYTES")
        self.reserve_bytes = (
            reserve_bytes if reserve_bytes is not None else int(env) if env else RESERVE_BYTES
        )
        low = os.environ.get("TUNELAB_LOW_SPACE_BYTES")
        self.low_space_bytes = int(low) if low else LOW_SPACE_BYTES
        self._init_runtime()
        self._reserve()  # before Tune writes anything: no room to start is a DiskFullError

    def _reserve(self) -> None:
        if self.experiment_dir and self.reserve_bytes > 0:
            reserve_space(Path(self.experiment_dir), self.reserve_bytes)

    def _init_runtime(self) -> None:
        self._reported: dict[str, bool] = {}  # trial id -> reported since its last start
        self._max_failures: dict[str, int] = {}  # trial id -> its N, while lowered
        self._watched = 0.0  # when the free space was last looked at

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        _disk_full.clear()
        self._reserve()  # again on resume (released when the last run ended)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.experiment_dir:
            release_space(Path(self.experiment_dir))

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if not self.experiment_dir or _disk_full or now - self._watched < _WATCH_EVERY_S:
            return
        self._watched = now
        try:
            st = os.statvfs(self.experiment_dir)
        except (OSError, AttributeError):
            return
        if st.f_bavail * st.f_frsize < self.low_space_bytes:
            self._stop(DiskFullError(self.experiment_dir), "the experiment's disk is full")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._reported[trial.trial_id] = False

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._reported[trial.trial_id] = True
        if trial.trial_id in self._max_failures:  # the setup error was not deterministic
            trial.max_failures = self._max_failures.pop(trial.trial_id)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _trial_error(trial)
        if self._disk_full(trial, error):
            return
        if self._reported.get(trial.trial_id, False) or _worker_died(error):
            return
        # Failed before its first result: if the retry fails before it too, that is final.
        self._max_failures.setdefault(trial.trial_id, trial.max_failures)
        trial.max_failures = trial.run_metadata.num_failures
        log.warning(
            "trial %s failed before its first result (%s); retried once: if that attempt "
            "fails before its first result too, the error is deterministic and not retried",
            trial.trial_id,
            error_summary(error),
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _trial_error(trial)
        if self._disk_full(trial, error):
            return
        if trial.trial_id in self._max_failures:
            log.warning(
                "trial %s failed before its first result twice in a row: not retried (%s)",
                trial.trial_id,
                error_summary(error),
            )

    def _disk_full(self, trial: Any, error: BaseException | None) -> bool:
        full = find_disk_full(error)
        if full is None:
            return False
        trial.run_metadata.num_failures = max(0, trial.run_metadata.num_failures - 1)
        self._stop(full, f"trial {trial.trial_id}")
        return True

    def _stop(self, full: DiskFullError, who: str) -> None:
        first = not _disk_full
        _disk_full.append(full)
        if first:
            log.error("%s: %s; stopping the experiment", who, full)
            if self.experiment_dir:  # room for Tune's last writes (state, results, errors)
                release_space(Path(self.experiment_dir))
            _stop_tune(full)


def raise_if_disk_full(experiment_dir: str | Path) -> None:
    """Raise the :class:`DiskFullError` a trial of this driver hit (naming ``experiment_dir``)."""
    if _disk_full:
        full = _disk_full[0]
        _disk_full.clear()
        raise full.in_experiment(experiment_dir)


@contextlib.contextmanager
def disk_full_guard(experiment_dir: str | Path) -> Iterator[None]:
    """Turn a full disk anywhere in the block (Tune's and MLflow's wrappers included) into
    :class:`DiskFullError` naming ``experiment_dir``'s resume command."""
    try:
        yield
    except DiskFullError as err:
        _disk_full.clear()
        if err.experiment_dir == str(experiment_dir):
            raise
        raise err.in_experiment(experiment_dir) from err
    except Exception as err:
        # A trial's full disk makes other reads fail too (a file cut short): it is the cause.
        full = find_disk_full(err) or (_disk_full[0] if _disk_full else None)
        _disk_full.clear()
        if full is None:
            raise
        raise full.in_experiment(experiment_dir) from err


def _stop_tune(error: DiskFullError) -> None:
    """Tune's graceful stop (its SIGUSR1 handler saves the state and ends ``fit``)."""
    sigusr1 = getattr(signal, "SIGUSR1", None)
    if sigusr1 is not None and callable(signal.getsignal(sigusr1)):
        os.kill(os.getpid(), sigusr1)
    else:  # no handler to ask: end fit with the error (the last periodic state is kept)
        raise error


def _trial_error(trial: Any) -> BaseException | None:
    """The exception of a trial's latest failure, as Tune pickled it on the driver."""
    path = getattr(trial, "pickled_error_file", None)
    if path and os.path.exists(path):
        with contextlib.suppress(Exception):
            from ray import cloudpickle

            with open(path, "rb") as f:
                error = cloudpickle.load(f)
            if isinstance(error, BaseException):
                return error
    text_file = getattr(trial, "error_file", None)
    if text_file and os.path.exists(text_file):
        with contextlib.suppress(OSError):
            with open(text_file) as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
            return RuntimeError(lines[-1]) if lines else None
    return None


def _worker_died(error: BaseException | None) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError) or isinstance(
        getattr(error, "cause", None), RayActorError
    )
