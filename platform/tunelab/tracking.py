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

Which tags a decision becomes (a verdict, a selection, a cull) is decided here
too (:func:`verdict_tags`), from :mod:`tunelab.names`; the statistics in
:mod:`tunelab.verdicts` know no tags.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from tunelab._callback import DriverCallback
from tunelab._checkpoint import atomic_write_json, read_json
from tunelab.names import (
    ITERATION,
    OUTCOME_OF_VERDICT,
    TAG_CI_HIGH,
    TAG_CI_LOW,
    TAG_EFFECT,
    TAG_FAMILY,
    TAG_GUARDRAIL_PREFIX,
    TAG_LEVER,
    TAG_MLFLOW_PARENT,
    TAG_N_PAIRS,
    TAG_NONFINITE,
    TAG_OUTCOME,
    TAG_P_VALUE,
    TAG_SEED,
    TAG_STATUS,
    TAG_TRIAL_ID,
    TAG_VERDICT,
)

__all__ = [
    "MetricPoint",
    "MlflowTracker",
    "Tracker",
    "TrackingCallback",
    "default_tracking_uri",
    "flatten",
    "git_commit",
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

            self._client = MlflowClient(self.uri)
        return self._client

    def ensure_experiment(self, name: str, artifact_root: Path | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        location = Path(artifact_root).resolve().as_uri() if artifact_root else None
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except Exception:  # created concurrently
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
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


def default_tracking_uri(storage: Path) -> str:
    """The embedded default store: a sqlite file inside the storage folder."""
    return f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


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
        flush_s: Period of the background sender.

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
    ) -> None:
        self.nonfinite_file = nonfinite_file
        self.tracker, self.experiment_id = tracker, experiment_id
        self.parent_run_id, self.runs_file = parent_run_id, runs_file
        self.base_tags, self.trial_tags = dict(base_tags), trial_tags
        self.artifacts_root, self.flush_s = artifacts_root, flush_s
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._runs: dict[str, str] = {}
        self._nonfinite: dict[str, int] = {}
        self._queue: queue.Queue[tuple[str, list[MetricPoint]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------
    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        self._runs = read_json(Path(self.runs_file), {})
        if self.nonfinite_file:
            self._nonfinite = read_json(Path(self.nonfinite_file), {})
        self._thread = threading.Thread(target=self._sender, name="tunelab-tracking", daemon=True)
        self._thread.start()

    @property
    def runs(self) -> dict[str, str]:
        """trial id -> run id."""
        return dict(self._runs)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_run(trial)

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_run(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        run_id = self._ensure_run(trial)
        step = int(result.get(ITERATION, result.get("training_iteration", 0)))
        ts = int(time.time() * 1000)
        metrics = [
            MetricPoint(k, float(v), step, ts)
            for k, v in result.items()
            if _is_metric_key(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        self._queue.put((run_id, metrics))
        if trial.trial_id not in self._nonfinite and any(
            not math.isfinite(m.value) for m in metrics
        ):
            self._nonfinite[trial.trial_id] = step
            if self.nonfinite_file:
                atomic_write_json(Path(self.nonfinite_file), self._nonfinite)
            try:
                self.tracker.set_tags(run_id, {TAG_NONFINITE: step})
            except Exception:  # tracking must never kill the experiment
                logger.exception("set_tags failed for run %s", run_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.flush()
        run_id = self._ensure_run(trial)
        self.tracker.set_tags(run_id, {TAG_STATUS: "completed"})
        if self.artifacts_root:
            folder = Path(self.artifacts_root) / trial.trial_id
            if folder.is_dir():
                self.tracker.log_artifacts(run_id, folder)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.flush()
        run_id = self._ensure_run(trial)
        self.tracker.set_tags(run_id, {TAG_STATUS: "error"})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.flush()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def flush(self) -> None:
        """Block until every queued result is sent."""
        self._queue.join()

    # -- private ---------------------------------------------------------------
    def _ensure_run(self, trial: Any) -> str:
        with self._lock:
            run_id = self._runs.get(trial.trial_id)
            if run_id is not None:
                return run_id
            config = trial.config
            tags = {
                **self.base_tags,
                TAG_TRIAL_ID: trial.trial_id,
                TAG_SEED: str(config.get("seed")),
            }
            if self.trial_tags is not None:
                tags.update(self.trial_tags(config))
            name = f"{tags.get(TAG_FAMILY, 'trial')}-seed{config.get('seed')}-{trial.trial_id}"
            run_id = self.tracker.start_run(
                self.experiment_id, name, tags, parent_run_id=self.parent_run_id
            )
            self.tracker.log_params(
                run_id, {"seed": config.get("seed"), **flatten(config.get("config", {}))}
            )
            self._runs[trial.trial_id] = run_id
            atomic_write_json(Path(self.runs_file), self._runs)
            return run_id

    def _sender(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            batch: dict[str, list[MetricPoint]] = {item[0]: list(item[1])}
            n = 1
            with contextlib.suppress(queue.Empty):
                while True:  # coalesce what is already queued into one call per run
                    nxt = self._queue.get_nowait()
                    n += 1
                    if nxt is None:
                        self._queue.put(None)
                        n -= 1
                        self._queue.task_done()
                        break
                    batch.setdefault(nxt[0], []).extend(nxt[1])
            for run_id, metrics in batch.items():
                try:
                    self.tracker.log_metrics(run_id, metrics)
                except Exception:  # tracking must never kill the experiment
                    logger.exception("log_metrics failed for run %s", run_id)
            for _ in range(n):
                self._queue.task_done()


_SKIP_KEYS = {
    "done",
    "training_iteration",
    "trial_id",
    "date",
    "timestamp",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "time_total_s",
    "time_this_iter_s",
    "checkpoint_dir_name",
    "should_checkpoint",
}


def _is_metric_key(k: str) -> bool:
    return k not in _SKIP_KEYS and not k.startswith("config")
