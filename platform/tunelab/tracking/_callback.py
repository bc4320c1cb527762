"""The Tune callback that writes the runs: :class:`TrackingCallback`.

It registers each trial's run and queues its results, tags and artifact
uploads, in order, to one background sender (:class:`_Outbox` of
:mod:`tunelab.tracking._outbox`), so the driver never waits on tracking.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tunelab.callbacks import DriverCallback
from tunelab.checkpoint import atomic_write_json, read_json
from tunelab.layout import ExperimentLayout
from tunelab.metrics import family_label
from tunelab.names import (
    HEALTH_DIAGNOSIS,
    ITERATION,
    TAG_FAMILY,
    TAG_HEALTH_DIAGNOSIS,
    TAG_LEVER,
    TAG_NONFINITE,
    TAG_SEED,
    TAG_STATUS,
    TAG_TRIAL_ID,
    TrialStatus,
)
from tunelab.outcome import reported_numbers
from tunelab.tracking._outbox import _Outbox
from tunelab.tracking._protocol import MetricPoint, Tracker
from tunelab.tracking._run_data import flatten
from tunelab.tracking._spool import Backlog

__all__ = ["TrackingCallback"]

logger = logging.getLogger("tunelab.tracking")  # the package's logger, one for all its modules

#: MLflow keeps tag values up to 8000 characters (5000 in older servers).
_MAX_TAG = 5000


class TrackingCallback(DriverCallback):
    """Mirror Tune trials into nested runs under the experiment's parent run.

    Args:
        tracker: The backend (:class:`MlflowTracker` by default in the driver).
        experiment_id: The tracking experiment.
        parent_run_id: The experiment's parent run.
        runs_file: JSON file mapping trial ids to run ids (survives restarts).
        base_tags: Tags set on every child run (kind, spec, hash, family...).
        trial_tags: ``f(config) -> tags`` for per-trial tags (role, lever); picklable.
        artifacts_root: Folder holding ``<trial_id>/`` artifacts to upload on completion.
        nonfinite_file: JSON file recording each trial's first non-finite iteration.
        flush_s: Kept for compatibility (the sender sends as soon as results arrive).
        retry_s: While tracking is down, how often the sender tries to replay the spool.
        spool_file, pending_file: The spool and the pending runs (default: the
            :class:`~tunelab.layout.ExperimentLayout` paths beside ``runs_file``).

    The driver thread never talks to the tracker: runs, metrics, tags and
    artifact uploads are queued, in order, to one background sender. When
    tracking is unavailable (past the client's own retries) the sender spools
    them (see the module docstring) and retries every ``retry_s``; a restored
    driver's sender replays the spool first.

    Non-finite values (NaN, +-inf) are logged as they are (MLflow 3 stores
    them), so a diverged run shows NaN rather than its last finite value; the
    run is tagged ``tunelab.nonfinite=<first iteration>`` once.
    """

    def __init__(
        self,
        *,
        tracker: Tracker,
        experiment_id: str,
        parent_run_id: str,
        runs_file: str,
        base_tags: Mapping[str, str],
        trial_tags: Callable[[dict[str, Any]], dict[str, str]] | None = None,
        artifacts_root: str | None = None,
        nonfinite_file: str | None = None,
        flush_s: float = 1.0,
        retry_s: float = 30.0,
        spool_file: str | None = None,
        pending_file: str | None = None,
    ) -> None:
        self.nonfinite_file = nonfinite_file
        self.tracker, self.experiment_id = tracker, experiment_id
        self.parent_run_id, self.runs_file = parent_run_id, runs_file
        self.base_tags, self.trial_tags = dict(base_tags), trial_tags
        self.artifacts_root, self.flush_s = artifacts_root, flush_s
        self.retry_s = retry_s
        layout = ExperimentLayout(Path(runs_file).parent)
        self.spool_file = spool_file or str(layout.tracking_spool_file)
        self.pending_file = pending_file or str(layout.pending_runs_file)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._nonfinite: dict[str, int] = {}
        self._diverged: set[str] = set()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._box: _Outbox | None = None
        self._next_try = 0.0

    # -- lifecycle -----------------------------------------------------------
    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        self._box = self._new_outbox()
        if self.nonfinite_file:
            self._nonfinite = read_json(Path(self.nonfinite_file), {})
        self._next_try = 0.0  # a restored driver replays what an earlier one spooled, first
        self._thread = threading.Thread(target=self._sender, name="tunelab-tracking", daemon=True)
        self._thread.start()

    @property
    def runs(self) -> dict[str, str]:
        """trial id -> run id (runs created so far)."""
        box = self._outbox
        with box._lock:
            return dict(box.runs)

    @property
    def backlog(self) -> Backlog:
        """What is spooled and not sent yet."""
        return self._outbox.backlog()

    @property
    def refused(self) -> dict[str, int]:
        """Metric name -> points the backend refused (e.g. a name with ``@``)."""
        return dict(self._outbox.refused)

    @property
    def failures(self) -> int:
        """How many attempts found tracking unavailable."""
        return self._outbox.failures

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_run(trial)

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_run(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        tid = self._ensure_run(trial)
        step = int(result.get(ITERATION, result.get("training_iteration", 0)))
        ts = int(time.time() * 1000)
        # NaN / inf are logged as they are (MLflow stores them); they only add the tag below
        metrics = [MetricPoint(k, v, step, ts) for k, v in reported_numbers(result).items()]
        self._queue.put({"op": "metrics", "trial": tid, "points": metrics})
        if tid not in self._nonfinite and any(not math.isfinite(m.value) for m in metrics):
            self._nonfinite[tid] = step
            if self.nonfinite_file:
                atomic_write_json(Path(self.nonfinite_file), self._nonfinite)
            self._queue.put({"op": "tags", "trial": tid, "tags": {TAG_NONFINITE: str(step)}})
        diagnosis = result.get(HEALTH_DIAGNOSIS)
        if isinstance(diagnosis, str) and diagnosis:
            self._diverged.add(tid)
            tags = {
                TAG_HEALTH_DIAGNOSIS: diagnosis[:_MAX_TAG],
                TAG_STATUS: TrialStatus.DIVERGED.value,
            }
            self._queue.put({"op": "tags", "trial": tid, "tags": tags})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = self._ensure_run(trial)
        status = TrialStatus.DIVERGED.value if tid in self._diverged else "completed"
        self._queue.put({"op": "tags", "trial": tid, "tags": {TAG_STATUS: status}})
        if self.artifacts_root:
            folder = Path(self.artifacts_root) / tid
            if folder.is_dir():
                self._queue.put({"op": "artifacts", "trial": tid, "folder": str(folder)})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = self._ensure_run(trial)
        self._queue.put({"op": "tags", "trial": tid, "tags": {TAG_STATUS: "error"}})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.flush()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def flush(self) -> None:
        """Block until every queued write is sent or spooled.

        While tracking is down this returns after at most one failing attempt
        (the client's retry window); what could not be sent is in the spool.
        """
        self._queue.join()

    # -- private ---------------------------------------------------------------
    @property
    def _outbox(self) -> _Outbox:
        if self._box is None:  # used before setup (tests, tools)
            self._box = self._new_outbox()
        return self._box

    def _new_outbox(self) -> _Outbox:
        layout = ExperimentLayout(Path(self.runs_file).parent)  # a callback pickled before the
        spool = getattr(self, "spool_file", None) or layout.tracking_spool_file  # spool existed
        pending = getattr(self, "pending_file", None) or layout.pending_runs_file
        return _Outbox(self.tracker, Path(self.runs_file), Path(pending), Path(spool))

    def _ensure_run(self, trial: Any) -> str:
        """Register the trial's run (created by the sender; pending on disk until then)."""
        tid = str(trial.trial_id)
        box = self._outbox
        if box.has_run(tid):
            return tid
        config = trial.config
        tags = {**self.base_tags, TAG_TRIAL_ID: tid, TAG_SEED: str(config.get("seed"))}
        if self.trial_tags is not None:
            tags.update(self.trial_tags(config))
        # the arm where there is one, else the family's registered name
        who = tags.get(TAG_LEVER) or family_label(tags.get(TAG_FAMILY, "trial"))
        name = f"{who}-seed{config.get('seed')}-{tid}"
        params = {"seed": config.get("seed"), **flatten(config.get("config", {}))}
        box.add_pending(
            tid,
            {
                "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id,
                "name": name,
                "tags": tags,
                "params": {k: str(v)[:6000] for k, v in params.items()},
            },
        )
        self._queue.put({"op": "run", "trial": tid})
        return tid

    def _sender(self) -> None:
        box = self._outbox
        while True:
            timeout: float | None = None
            if box.down:
                timeout = max(0.0, self._next_try - time.monotonic())
            try:
                if timeout is None:
                    item = self._queue.get()
                elif timeout > 0:
                    item = self._queue.get(timeout=timeout)
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                self._retry()
                continue
            items = [item]
            with contextlib.suppress(queue.Empty):
                while True:  # what is already queued goes in one pass (metrics coalesced)
                    items.append(self._queue.get_nowait())
            failures = box.failures
            try:
                box.deliver(_coalesce([x for x in items if x is not None]))
            except Exception:  # tracking must never kill the experiment
                logger.exception("tracking: unexpected error in the sender")
            finally:
                for _ in items:
                    self._queue.task_done()
            if any(x is None for x in items):
                return
            if box.failures != failures:  # just found tracking down: retry in retry_s
                self._next_try = time.monotonic() + getattr(self, "retry_s", 30.0)
            elif box.down and time.monotonic() >= self._next_try:
                self._retry()

    def _retry(self) -> None:
        try:
            self._outbox.replay()
        except Exception:  # tracking must never kill the experiment
            logger.exception("tracking: unexpected error replaying the spool")
        self._next_try = time.monotonic() + getattr(self, "retry_s", 30.0)


def _coalesce(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One metrics operation per trial (points in order); other operations as they came."""
    out: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, Any]] = {}
    for op in ops:
        if op["op"] != "metrics":
            out.append(op)
        elif op["trial"] in metrics:
            metrics[op["trial"]]["points"].extend(op["points"])
        else:
            metrics[op["trial"]] = {**op, "points": list(op["points"])}
            out.append(metrics[op["trial"]])
    return out
