"""Delivery of an experiment's tracking writes through outages.

:class:`_Outbox` sends the writes (run creation, params, metrics, tags,
artifact uploads) and spools what cannot be sent now; :func:`replay_spool`,
:func:`spool_backlog` and :func:`drain_tracking` work on an experiment
folder's spool; :func:`tracking_guard` and :class:`GuardedTracker` turn an
outage into :class:`~tunelab.errors.TrackingUnavailable`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tunelab.checkpoint import atomic_write_json, read_json
from tunelab.errors import TrackingUnavailable
from tunelab.layout import ExperimentLayout
from tunelab.tracking._mlflow_tracker import MAX_METRICS_PER_BATCH, error_reason, is_rejection
from tunelab.tracking._protocol import MetricPoint, Tracker
from tunelab.tracking._spool import Backlog, TrackingSpool, decode_record, encode_record

__all__ = [
    "GuardedTracker",
    "drain_tracking",
    "replay_spool",
    "spool_backlog",
    "tracking_guard",
]

logger = logging.getLogger("tunelab.tracking")  # the package's logger, one for all its modules


def spool_backlog(layout: ExperimentLayout) -> Backlog:
    """What an experiment folder still has to send to tracking (nothing is sent)."""
    points, records = TrackingSpool(layout.tracking_spool_file).backlog()
    return Backlog(points, records, len(read_json(layout.pending_runs_file, {}) or {}))


def replay_spool(layout: ExperimentLayout, tracker: Tracker) -> Backlog:
    """Create the pending runs and send the spooled writes of an experiment folder.

    Returns what is still unsent (empty when everything went through). Call it
    only when no :class:`TrackingCallback` of this experiment is running.
    """
    box = _outbox(layout, tracker)
    if box.down:
        box.replay()
    return box.backlog()


def drain_tracking(layout: ExperimentLayout, tracker: Tracker) -> None:
    """Send everything spooled, or raise :class:`~tunelab.errors.TrackingUnavailable`.

    The driver calls it after ``Tuner.fit`` and before finalizing: finalizing
    reads the trials' runs and tags them, so it must not start while writes
    are missing. The error leaves the experiment to ``platform resume``.
    """
    box = _outbox(layout, tracker)
    if not box.down or box.replay():
        return
    left = box.backlog()
    raise TrackingUnavailable(
        tracker.uri,
        box.last_error,
        layout.root,
        points=left.points,
        records=left.records,
        runs=left.runs,
    )


@contextlib.contextmanager
def tracking_guard(tracker: Tracker, experiment_dir: str | Path | None = None) -> Iterator[None]:
    """Turn a tracking outage inside the block into :class:`~tunelab.errors.TrackingUnavailable`.

    Refusals (:func:`is_rejection`) and tunelab's own errors pass through. With
    ``experiment_dir`` the message counts what is spooled there and names the
    resume command; without it, it says nothing started.
    """
    try:
        yield
    except TrackingUnavailable:
        raise
    except Exception as err:
        from tunelab.errors import TunelabError

        if isinstance(err, TunelabError) or is_rejection(err):
            raise
        if experiment_dir is None:
            raise TrackingUnavailable(tracker.uri, error_reason(err)) from err
        left = spool_backlog(ExperimentLayout(Path(experiment_dir)))
        raise TrackingUnavailable(
            tracker.uri,
            error_reason(err),
            experiment_dir,
            points=left.points,
            records=left.records,
            runs=left.runs,
        ) from err


class GuardedTracker:
    """A :class:`Tracker` whose every call runs under :func:`tracking_guard`.

    Only an outage inside a tracker call becomes
    :class:`~tunelab.errors.TrackingUnavailable`; an error in the code between
    the calls (a family's export, a bug) passes through unchanged.
    """

    def __init__(self, tracker: Tracker, experiment_dir: str | Path | None = None) -> None:
        self._tracker = tracker
        self._experiment_dir = experiment_dir
        self.uri = tracker.uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._tracker, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with tracking_guard(self._tracker, self._experiment_dir):
                return attr(*args, **kwargs)

        return call


class _Unavailable(Exception):
    """Tracking is unavailable; ``leftover`` is the part of the operation not sent (or None)."""

    def __init__(self, err: BaseException, leftover: dict[str, Any] | None) -> None:
        super().__init__(error_reason(err))
        self.err, self.leftover = err, leftover


_OP_ORDER = {"run": 0, "params": 1, "metrics": 2, "tags": 3, "artifacts": 4}


class _Outbox:
    """Delivers one experiment's tracking writes; spools what cannot be delivered now.

    Operations are dicts ``{"op", "trial", ...}`` addressed to a trial; the run
    is looked up when the write is sent (``runs_file``), so a write can wait
    for a run that is still pending (``pending_file``). While tracking is
    down, everything goes to the spool, in order, until :meth:`replay` has sent
    the whole spool again.
    """

    def __init__(
        self, tracker: Tracker, runs_file: Path, pending_file: Path, spool_file: Path
    ) -> None:
        self.tracker = tracker
        self.runs_file, self.pending_file = Path(runs_file), Path(pending_file)
        self.spool = TrackingSpool(spool_file)
        self.runs: dict[str, str] = dict(read_json(self.runs_file, {}))
        self.pending: dict[str, dict[str, Any]] = dict(read_json(self.pending_file, {}))
        self.down = bool(self.pending) or self.spool.path.exists()
        self.failures = 0  # attempts that found tracking unavailable
        self.last_error = ""
        self.refused: dict[str, int] = {}  # metric key -> points the backend refused
        self._lock = threading.Lock()

    # -- called from the driver thread --------------------------------------------------
    def has_run(self, trial_id: str) -> bool:
        with self._lock:
            return trial_id in self.runs or trial_id in self.pending

    def add_pending(self, trial_id: str, spec: dict[str, Any]) -> None:
        with self._lock:
            self.pending[trial_id] = spec
            atomic_write_json(self.pending_file, self.pending)

    # -- called from the sender thread (or after it ended) ----------------------------
    def backlog(self) -> Backlog:
        points, records = self.spool.backlog()
        with self._lock:
            return Backlog(points, records, len(self.pending))

    def deliver(self, ops: Sequence[dict[str, Any]]) -> None:
        """Send ``ops`` now, or spool them (all of them once one finds tracking down)."""
        deferred: list[dict[str, Any]] = []
        for op in sorted(ops, key=lambda o: _OP_ORDER[o["op"]]):
            if self.down:
                if op["op"] != "run":  # a pending run is already on disk
                    deferred.append(op)
                continue
            try:
                self._send(op)
            except _Unavailable as u:
                self._mark_down(u.err)
                if u.leftover is not None:
                    deferred.append(u.leftover)
        self._spool(deferred)

    def replay(self) -> bool:
        """Create pending runs, then send the spool in order; True when nothing is left.

        While tracking is known to be down, a backend with a ``reachable()`` probe
        (:meth:`MlflowTracker.reachable`) is asked first, so a retry costs one quick
        request rather than the client's whole retry window.
        """
        if self.down and not self._reachable():
            return False
        records = self.spool.read()
        try:
            for trial_id in list(self.pending):
                self._create_run(trial_id)
        except _Unavailable as u:
            self._mark_down(u.err)
            if u.leftover is not None:
                self._spool([u.leftover])
            return False
        for i, rec in enumerate(records):
            op = decode_record(rec)
            try:
                self._send(op)
            except _Unavailable as u:
                self._mark_down(u.err)
                if i or u.leftover is not op:  # progress was made: keep only what is left
                    left = [encode_record(u.leftover)] if u.leftover is not None else []
                    self.spool.rewrite(left + records[i + 1 :])
                return False
        self.spool.rewrite([])
        if self.down:
            logger.warning("tracking at %s is back: the spooled writes were sent", self.tracker.uri)
        self.down = False
        return True

    # -- private ----------------------------------------------------------------------
    def _reachable(self) -> bool:
        probe = getattr(self.tracker, "reachable", None)
        if not callable(probe):
            return True
        try:
            ok = bool(probe())
        except Exception as err:
            ok, cause = False, err
        else:
            cause = ConnectionError(f"{self.tracker.uri} does not answer")
        if not ok:
            self._mark_down(cause)
        return ok

    def _mark_down(self, err: BaseException) -> None:
        self.failures += 1
        self.last_error = error_reason(err)
        if not self.down:
            logger.warning(
                "tracking at %s is unavailable (%s): writes are spooled to %s and sent "
                "once it is back",
                self.tracker.uri,
                self.last_error,
                self.spool.path,
            )
        self.down = True

    def _spool(self, ops: Sequence[dict[str, Any]]) -> None:
        if not ops:
            return
        try:
            self.spool.append([encode_record(op) for op in ops])
        except OSError:
            n = sum(len(op.get("points") or ()) for op in ops)
            logger.exception(
                "could not spool %d tracking write(s) (%d metric points) to %s: they are lost "
                "to tracking (Tune's result.json still has the metrics)",
                len(ops),
                n,
                self.spool.path,
            )

    def _run_of(self, op: Mapping[str, Any]) -> str | None:
        trial_id = op["trial"]
        with self._lock:
            run_id = self.runs.get(trial_id)
            pending = trial_id in self.pending
        if run_id is None and pending:
            self._create_run(trial_id)
            with self._lock:
                run_id = self.runs.get(trial_id)
        if run_id is None:
            logger.warning(
                "tracking: trial %s has no run; its %s write is dropped", trial_id, op["op"]
            )
        return run_id

    def _send(self, op: dict[str, Any]) -> None:
        """Send one operation; raises :class:`_Unavailable` with what is left unsent."""
        kind = op["op"]
        if kind == "run":
            self._create_run(op["trial"])
            return
        try:
            run_id = self._run_of(op)
        except _Unavailable as u:
            raise _Unavailable(u.err, op) from None
        if run_id is None:
            return
        if kind == "metrics":
            self._send_metrics(run_id, op)
            return
        try:
            if kind == "tags":
                self.tracker.set_tags(run_id, op["tags"])
            elif kind == "params":
                self.tracker.log_params(run_id, op["params"])
            elif kind == "artifacts" and Path(op["folder"]).is_dir():
                self.tracker.log_artifacts(run_id, Path(op["folder"]))
        except Exception as err:
            if not is_rejection(err):
                raise _Unavailable(err, op) from None
            logger.warning("tracking refused the %s of run %s: %s", kind, run_id, error_reason(err))

    def _send_metrics(self, run_id: str, op: dict[str, Any]) -> None:
        points = [m for m in op["points"] if m.key not in self.refused]
        for m in op["points"]:  # a refused name is dropped, never spooled again
            if m.key in self.refused:
                self.refused[m.key] += 1
        whole = op if len(points) == len(op["points"]) else {**op, "points": points}
        for start in range(0, len(points), MAX_METRICS_PER_BATCH):
            chunk = points[start : start + MAX_METRICS_PER_BATCH]
            later = points[start + len(chunk) :]
            try:
                self.tracker.log_metrics(run_id, chunk)
                continue
            except Exception as err:
                if not is_rejection(err):
                    left = whole if start == 0 else {**op, "points": chunk + later}
                    raise _Unavailable(err, left) from None
            # A name was refused: send each metric on its own, drop only the refused ones.
            by_key: dict[str, list[MetricPoint]] = {}
            for m in chunk:
                by_key.setdefault(m.key, []).append(m)
            keys = list(by_key)
            for j, key in enumerate(keys):
                try:
                    self.tracker.log_metrics(run_id, by_key[key])
                except Exception as err:
                    if not is_rejection(err):
                        rest = [m for k in keys[j:] for m in by_key[k]] + later
                        raise _Unavailable(err, {**op, "points": rest}) from None
                    self.refused[key] = self.refused.get(key, 0) + len(by_key[key])
                    logger.warning(
                        "tracking refused the metric %r (%s): it is not logged; the other "
                        "metrics are",
                        key,
                        error_reason(err),
                    )

    def _create_run(self, trial_id: str) -> None:
        with self._lock:
            if trial_id in self.runs:
                self.pending.pop(trial_id, None)
                return
            spec = self.pending.get(trial_id)
        if spec is None:
            return
        try:
            run_id = self.tracker.start_run(
                spec["experiment_id"],
                spec["name"],
                spec["tags"],
                parent_run_id=spec.get("parent_run_id"),
            )
        except Exception as err:
            if not is_rejection(err):
                raise _Unavailable(err, None) from None
            logger.error(
                "tracking refused to create the run of trial %s (%s): its writes are dropped",
                trial_id,
                error_reason(err),
            )
            with self._lock:
                self.pending.pop(trial_id, None)
                atomic_write_json(self.pending_file, self.pending)
            return
        with self._lock:  # the run first: a crash in between never creates it twice
            self.runs[trial_id] = run_id
            atomic_write_json(self.runs_file, self.runs)
            self.pending.pop(trial_id, None)
            atomic_write_json(self.pending_file, self.pending)
        params: dict[str, Any] = dict(spec.get("params") or {})
        try:
            self.tracker.log_params(run_id, params)
        except Exception as err:
            if not is_rejection(err):
                raise _Unavailable(
                    err, {"op": "params", "trial": trial_id, "params": params}
                ) from None
            logger.warning("tracking refused the params of run %s: %s", run_id, error_reason(err))


def _outbox(layout: ExperimentLayout, tracker: Tracker) -> _Outbox:
    return _Outbox(tracker, layout.runs_file, layout.pending_runs_file, layout.tracking_spool_file)
