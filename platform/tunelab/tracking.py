"""Tracking: one parent run per experiment, one nested child run per trial.

The driver needs a handful of operations from a tracking backend; they form
the :class:`Tracker` protocol. :class:`MlflowTracker` implements it, and it is
the only place tunelab calls MLflow. Another backend (Weights & Biases, a
database of your own) implements the same methods and is passed to
:func:`tunelab.run_experiment` as ``tracker``.

Runs are written from the driver by :class:`TrackingCallback`, a Tune
callback, so trials never talk to the tracking server and never wait on it:
results are queued and a background thread sends them in batches (step =
iteration). Params are logged once, when a trial's run is created; a restored
driver finds the runs it created in ``tunelab_runs.json`` and keeps using them,
so re-logging can never hit MLflow's "changing param values" error.

Nothing is lost when tracking is down longer than the client's retries (a
server restart, a network cut): every write that cannot be sent now (metric
points, tags, params, artifact uploads) is appended, fsync'd, to the
experiment folder's spool (:class:`TrackingSpool`, JSON lines), and a trial
whose run cannot be created yet is recorded as pending. The sender retries in
the background and replays the spool, in order, once tracking answers again;
a resumed driver does the same, and :func:`drain_tracking` (called at
finalization) raises :class:`~tunelab.errors.TrackingUnavailable` while
anything is left, so ``platform resume`` fills in what is missing. A write
the backend *refuses* (MLflow's ``INVALID_PARAMETER_VALUE``: a metric name
with ``@``) is not an outage: only the refused metric is dropped, with a
warning, and the other metrics of its batch are logged.

Which tags a decision becomes (a verdict, a selection, a cull) is decided here
too (:func:`verdict_tags`), from :mod:`tunelab.names`; the statistics in
:mod:`tunelab.verdicts` know no tags.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from tunelab.callbacks import DriverCallback
from tunelab.checkpoint import atomic_write_bytes, atomic_write_json, data_lock, read_json
from tunelab.errors import TrackingUnavailable
from tunelab.layout import ExperimentLayout
from tunelab.metrics import family_label
from tunelab.names import (
    EXPERIMENT_KIND_TRAINING,
    HEALTH_DIAGNOSIS,
    ITERATION,
    OUTCOME_OF_VERDICT,
    TAG_CI_HIGH,
    TAG_CI_LOW,
    TAG_EFFECT,
    TAG_FAMILY,
    TAG_GUARDRAIL_PREFIX,
    TAG_HEALTH_DIAGNOSIS,
    TAG_LEVER,
    TAG_MLFLOW_EXPERIMENT_KIND,
    TAG_MLFLOW_PARENT,
    TAG_N_PAIRS,
    TAG_NONFINITE,
    TAG_OUTCOME,
    TAG_P_VALUE,
    TAG_SEED,
    TAG_STATUS,
    TAG_TRIAL_ID,
    TAG_VERDICT,
    TrialStatus,
    is_number,
)
from tunelab.outcome import reported_numbers

#: MLflow keeps tag values up to 8000 characters (5000 in older servers).
_MAX_TAG = 5000

__all__ = [
    "Backlog",
    "MetricPoint",
    "MlflowTracker",
    "Tracker",
    "TrackingCallback",
    "TrackingSpool",
    "default_tracking_uri",
    "drain_tracking",
    "flatten",
    "git_commit",
    "is_rejection",
    "log_summary",
    "replay_spool",
    "spool_backlog",
    "tracking_guard",
    "verdict_tags",
]

logger = logging.getLogger(__name__)
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


class MetricPoint(NamedTuple):
    """One metric value: ``key``, ``value``, ``step`` (iteration), ``timestamp`` (ms since epoch)."""

    key: str
    value: float
    step: int
    timestamp: int


@runtime_checkable
class Tracker(Protocol):
    """What the driver needs from a tracking backend.

    Implementations must be picklable (Tune pickles the callback holding one):
    open connections lazily. Run statuses are ``FINISHED``, ``FAILED`` or ``KILLED``.

    A method raises when a write fails: an error that refuses the write
    (:func:`is_rejection`) drops it with a warning; any other error means the
    backend is unavailable, and the write is spooled and replayed later. An
    optional ``reachable() -> bool`` (one quick request) makes retries during
    an outage cheap.
    """

    uri: str

    def ensure_experiment(self, name: str, artifact_root: Path | None) -> str:
        """Get or create the experiment ``name``; returns its id."""
        ...

    def start_run(
        self,
        experiment_id: str,
        name: str,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> str:
        """Create a run (nested under ``parent_run_id`` if given); returns its id."""
        ...

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params once per run (values are stringified)."""
        ...

    def log_metrics(self, run_id: str, metrics: Sequence[MetricPoint]) -> None:
        """Log a batch of metric points."""
        ...

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags (values are stringified)."""
        ...

    def clear_tags(self, run_id: str, predicate: Callable[[str], bool]) -> list[str]:
        """Delete the run's tags whose key satisfies ``predicate``; returns the deleted keys."""
        ...

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload one file."""
        ...

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        """Upload a folder's files."""
        ...

    def log_dict(self, run_id: str, obj: Any, name: str) -> None:
        """Store a JSON-able object as the artifact ``name``."""
        ...

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run terminated."""
        ...


class MlflowTracker:
    """:class:`Tracker` on MLflow (a sqlite store, a folder or a tracking server).

    Args:
        uri: MLflow tracking URI.

    A local sqlite store is created under an inter-process file lock
    (``<db>.lock``): two drivers starting on the same new store at once would
    otherwise both run MLflow's schema set-up, and the second would fail.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.uri, self._client = state["uri"], None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            with _store_lock(self.uri):  # MlflowClient sets up a new store's schema
                self._client = MlflowClient(self.uri)
        return self._client

    def ensure_experiment(self, name: str, artifact_root: Path | None) -> str:
        self.client  # noqa: B018 - set up the store first (its own lock; flock does not nest)
        with _store_lock(self.uri):  # and create the experiment once
            return self._ensure_experiment(name, artifact_root)

    def _ensure_experiment(self, name: str, artifact_root: Path | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = Path(artifact_root).resolve().as_uri() if artifact_root else None
            try:
                exp = self.client.get_experiment(
                    self.client.create_experiment(name, artifact_location=location)
                )
            except Exception:  # created concurrently
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if TAG_MLFLOW_EXPERIMENT_KIND not in exp.tags:  # a user's own choice stays
            # MLflow 3 opens an untyped experiment on its GenAI overview: these are training runs
            self.client.set_experiment_tag(
                exp.experiment_id, TAG_MLFLOW_EXPERIMENT_KIND, EXPERIMENT_KIND_TRAINING
            )
        return str(exp.experiment_id)

    def start_run(
        self,
        experiment_id: str,
        name: str,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> str:
        tags = dict(tags)
        if parent_run_id:
            tags[TAG_MLFLOW_PARENT] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        return str(run.info.run_id)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: Sequence[MetricPoint]) -> None:
        from mlflow.entities import Metric

        items = [Metric(m.key, m.value, m.timestamp, m.step) for m in metrics]
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def clear_tags(self, run_id: str, predicate: Callable[[str], bool]) -> list[str]:
        stale = [k for k in self.client.get_run(run_id).data.tags if predicate(k)]
        for key in stale:
            self.client.delete_tag(run_id, key)
        return stale

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_dict(self, run_id: str, obj: Any, name: str) -> None:
        self.client.log_dict(run_id, obj, name)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def reachable(self, timeout: float = 5.0) -> bool:
        """Whether a tracking server answers at all: one quick request, none of the client's
        retries (a local store always does). Optional for other backends."""
        if not self.uri.startswith(("http://", "https://")):
            return True
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=timeout):
                return True
        except urllib.error.HTTPError:
            return True  # it answered
        except (OSError, ValueError):
            return False


def default_tracking_uri(storage: Path) -> str:
    """The embedded default store: a sqlite file inside the storage folder."""
    return f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An inter-process lock on a local sqlite store (``<db>.lock``); nothing for other URIs."""
    prefix = "sqlite:///"
    path = uri[len(prefix) :].split("?", 1)[0] if uri.startswith(prefix) else ""
    if not path or path == ":memory:":
        yield
        return
    with data_lock(Path(path)):
        yield


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(cwd: Path | None = None) -> str:
    """The current git commit of ``cwd`` (``unknown`` outside a repository)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def verdict_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """Tags of a lever's verdict record (:func:`tunelab.verdicts.verdict_to_dict`).

    ``tunelab.lever``, ``tunelab.verdict``, ``tunelab.effect``,
    ``tunelab.ci_low``, ``tunelab.ci_high``, ``tunelab.p_value``,
    ``tunelab.n_pairs``, ``tunelab.outcome`` (``win`` | ``negative`` |
    ``null`` | ``inconclusive`` | ``crashed-early``) and
    ``guardrail.<name>`` = ``pass`` | ``fail`` | ``inconclusive``.
    """
    tags = {
        TAG_LEVER: str(record["lever"]),
        TAG_VERDICT: str(record["verdict"]),
        TAG_EFFECT: _fmt(record.get("effect")),
        TAG_CI_LOW: _fmt(record.get("ci_low")),
        TAG_CI_HIGH: _fmt(record.get("ci_high")),
        TAG_P_VALUE: _fmt(record.get("p_value")),
        TAG_N_PAIRS: str(int(record.get("n_pairs") or 0)),
        TAG_OUTCOME: OUTCOME_OF_VERDICT[record["verdict"]].value,
    }
    for name, g in (record.get("guardrails") or {}).items():
        tags[TAG_GUARDRAIL_PREFIX + name] = str(g["status"])
    return tags


def _fmt(x: Any) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.6g}"


# -- refused writes and outages ---------------------------------------------------------
#: MLflow error codes that mean "this write is refused" (a bad name, a deleted run), not
#: "tracking is unavailable": retrying never helps, so the write is dropped with a warning.
_REFUSED_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_STATE",
    }
)


def is_rejection(err: BaseException) -> bool:
    """Whether a tracking error refuses the write itself (retrying never helps).

    An MLflow error with a refusal code (``INVALID_PARAMETER_VALUE``...), or a
    ``ValueError`` / ``TypeError`` / ``KeyError`` of another backend. Anything
    else (connection refused, timeouts, 5xx after the client's retries, a locked
    database) means tracking is unavailable: the write is spooled and retried.
    """
    code = getattr(err, "error_code", None)
    if isinstance(code, str):
        return code in _REFUSED_CODES
    return isinstance(err, (ValueError, TypeError, KeyError)) and not isinstance(err, OSError)


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


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
            raise TrackingUnavailable(tracker.uri, _reason(err)) from err
        left = spool_backlog(ExperimentLayout(Path(experiment_dir)))
        raise TrackingUnavailable(
            tracker.uri,
            _reason(err),
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


# -- the spool ------------------------------------------------------------------------------
class Backlog(NamedTuple):
    """What is still unsent: metric ``points``, other ``records`` (tags, params,
    artifact uploads) and trial ``runs`` not created yet."""

    points: int = 0
    records: int = 0
    runs: int = 0

    @property
    def empty(self) -> bool:
        return not (self.points or self.records or self.runs)


def _encode_value(v: float) -> float | str:
    """Strict JSON has no NaN / inf: they are written as the strings ``nan``, ``inf``, ``-inf``."""
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _encode(op: Mapping[str, Any]) -> dict[str, Any]:
    rec = {k: v for k, v in op.items() if k != "points"}
    rec.setdefault("id", uuid.uuid4().hex)
    if "points" in op:
        rec["points"] = [[m.key, _encode_value(m.value), m.step, m.timestamp] for m in op["points"]]
    return rec


def _decode(rec: Mapping[str, Any]) -> dict[str, Any]:
    op = dict(rec)
    if "points" in rec:
        op["points"] = [
            MetricPoint(str(k), float(v), int(s), int(t)) for k, v, s, t in rec["points"]
        ]
    return op


class TrackingSpool:
    """Tracking writes not sent yet: an append-only JSON-lines file in the experiment folder.

    One record per line, strict JSON (``allow_nan=False``; non-finite metric
    values are the strings ``nan`` / ``inf`` / ``-inf``), each append flushed
    and fsync'd before it returns. Records are ``{"id", "op", "trial", ...}``
    with ``op`` one of ``metrics`` (``points``: ``[key, value, step,
    timestamp_ms]``), ``tags``, ``params``, ``artifacts`` (``folder``). A line
    cut short by a crash is skipped when read (and never glued to the next
    append). Once replayed, the file is rewritten atomically with what is left,
    or removed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        data = "".join(
            json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records
        ).encode()
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a line cut short by a crash: keep it apart
                    data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if new:
            _fsync_dir(self.path.parent)

    def read(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                logger.warning("%s:%d: unreadable spool line skipped (cut short?)", self.path, n)
                continue
            if isinstance(rec, dict) and "op" in rec:
                out.append(rec)
        return out

    def rewrite(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Replace the spool with ``records`` (atomically), or remove it when there are none."""
        if records:
            data = "".join(
                json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records
            )
            atomic_write_bytes(self.path, data.encode())
        elif self.path.exists():
            self.path.unlink()
            _fsync_dir(self.path.parent)

    def backlog(self) -> tuple[int, int]:
        """(metric points, other records) in the spool."""
        points = records = 0
        for rec in self.read():
            if rec["op"] == "metrics":
                points += len(rec.get("points") or ())
            else:
                records += 1
        return points, records


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Unavailable(Exception):
    """Tracking is unavailable; ``leftover`` is the part of the operation not sent (or None)."""

    def __init__(self, err: BaseException, leftover: dict[str, Any] | None) -> None:
        super().__init__(_reason(err))
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
            op = _decode(rec)
            try:
                self._send(op)
            except _Unavailable as u:
                self._mark_down(u.err)
                if i or u.leftover is not op:  # progress was made: keep only what is left
                    left = [_encode(u.leftover)] if u.leftover is not None else []
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
        self.last_error = _reason(err)
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
            self.spool.append([_encode(op) for op in ops])
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
            logger.warning("tracking refused the %s of run %s: %s", kind, run_id, _reason(err))

    def _send_metrics(self, run_id: str, op: dict[str, Any]) -> None:
        points = [m for m in op["points"] if m.key not in self.refused]
        for m in op["points"]:  # a refused name is dropped, never spooled again
            if m.key in self.refused:
                self.refused[m.key] += 1
        whole = op if len(points) == len(op["points"]) else {**op, "points": points}
        for start in range(0, len(points), _MAX_METRICS_PER_BATCH):
            chunk = points[start : start + _MAX_METRICS_PER_BATCH]
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
                        _reason(err),
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
                _reason(err),
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
            logger.warning("tracking refused the params of run %s: %s", run_id, _reason(err))


def _outbox(layout: ExperimentLayout, tracker: Tracker) -> _Outbox:
    return _Outbox(tracker, layout.runs_file, layout.pending_runs_file, layout.tracking_spool_file)


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


def log_summary(tracker: Tracker, run_id: str, values: Mapping[str, float | None]) -> None:
    """Log an experiment's decision as metrics of its parent run (step 0), so that the
    MLflow experiment list sorts and reads by it (the selected value, per-lever effects).
    Non-numbers are skipped; NaN is logged as it is.
    """
    from tunelab.spec import metric_name_problem

    ts = int(time.time() * 1000)
    points = [
        MetricPoint(k, float(v), 0, ts)
        for k, v in values.items()
        if is_number(v) and metric_name_problem(k) is None  # a lever named so MLflow refuses it
    ]
    if points:
        tracker.log_metrics(run_id, points)


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


# -- the callback ---------------------------------------------------------------------------
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
