"""MLflow tracking: one parent run per experiment, one nested child run per trial.

Runs are written from the driver by :class:`MlflowTrialCallback`, a Tune
callback, so trials never talk to MLflow and never wait on it: results are
queued and a background thread sends them with ``log_batch`` (step =
iteration). Params are logged once, when a trial's run is created; a restored
driver finds the runs it created in ``tunelab_runs.json`` and keeps using them,
so re-logging can never hit MLflow's "changing param values" error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tunelab._checkpoint import atomic_write_json, read_json
from tunelab._names import (
    ITERATION,
    TAG_FAMILY,
    TAG_SEED,
    TAG_STATUS,
    TAG_TRIAL_ID,
)

__all__ = [
    "DriverCallback",
    "MlflowTrialCallback",
    "default_tracking_uri",
    "ensure_experiment",
    "flatten",
    "git_commit",
    "start_parent_run",
]

logger = logging.getLogger(__name__)
_MAX_PARAMS_PER_BATCH = 100


def default_tracking_uri(storage: Path) -> str:
    """The embedded default store: a sqlite file inside the storage folder."""
    return f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


def ensure_experiment(client: Any, name: str, artifact_root: Path | None) -> str:
    """Get or create the MLflow experiment ``name``; returns its id."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except Exception:  # created concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def start_parent_run(
    client: Any, experiment_id: str, run_name: str, tags: Mapping[str, str]
) -> str:
    """Create the experiment's parent run; returns its id."""
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    return str(run.info.run_id)


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


class MlflowTrialCallback(DriverCallback):
    """Mirror Tune trials into nested MLflow runs under a parent run.

    Args:
        tracking_uri: MLflow tracking URI (sqlite file or server).
        experiment_id: The MLflow experiment.
        parent_run_id: The experiment's parent run.
        runs_file: JSON file mapping trial ids to run ids (survives restarts).
        base_tags: Tags set on every child run (kind, spec, hash, family...).
        trial_tags: ``f(config) -> tags`` for per-trial tags (seed, role, lever).
        artifacts_root: Folder holding ``<trial_id>/`` artifacts to upload on completion.
        flush_s: Period of the background sender.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        runs_file: str,
        base_tags: Mapping[str, str],
        trial_tags: Any = None,
        artifacts_root: str | None = None,
        flush_s: float = 1.0,
    ) -> None:
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.runs_file = parent_run_id, runs_file
        self.base_tags, self.trial_tags = dict(base_tags), trial_tags
        self.artifacts_root, self.flush_s = artifacts_root, flush_s
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._client: Any = None
        self._runs: dict[str, str] = {}
        self._queue: queue.Queue[tuple[str, list[Any]] | None] = queue.Queue()
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
        from mlflow import MlflowClient

        self._client = MlflowClient(self.tracking_uri)
        self._runs = read_json(Path(self.runs_file), {})
        self._thread = threading.Thread(target=self._sender, name="tunelab-mlflow", daemon=True)
        self._thread.start()

    @property
    def runs(self) -> dict[str, str]:
        """trial id -> MLflow run id."""
        return dict(self._runs)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_run(trial)

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_run(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        from mlflow.entities import Metric

        run_id = self._ensure_run(trial)
        step = int(result.get(ITERATION, result.get("training_iteration", 0)))
        ts = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), ts, step)
            for k, v in result.items()
            if _is_metric_key(k)
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(float(v))
        ]
        self._queue.put((run_id, metrics))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.flush()
        run_id = self._ensure_run(trial)
        self._client.set_tag(run_id, TAG_STATUS, "completed")
        if self.artifacts_root:
            folder = Path(self.artifacts_root) / trial.trial_id
            if folder.is_dir():
                self._client.log_artifacts(run_id, str(folder))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.flush()
        run_id = self._ensure_run(trial)
        self._client.set_tag(run_id, TAG_STATUS, "error")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.flush()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def flush(self) -> None:
        """Block until every queued result is in MLflow."""
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
                "mlflow.parentRunId": self.parent_run_id,
                TAG_TRIAL_ID: trial.trial_id,
                TAG_SEED: str(config.get("seed")),
            }
            if self.trial_tags is not None:
                tags.update(self.trial_tags(config))
            name = f"{tags.get(TAG_FAMILY, 'trial')}-seed{config.get('seed')}-{trial.trial_id}"
            run = self._client.create_run(self.experiment_id, run_name=name, tags=tags)
            run_id = str(run.info.run_id)
            self._log_params(
                run_id, {"seed": config.get("seed"), **flatten(config.get("config", {}))}
            )
            self._runs[trial.trial_id] = run_id
            atomic_write_json(Path(self.runs_file), self._runs)
            return run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def _sender(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            batch: dict[str, list[Any]] = {item[0]: list(item[1])}
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
                for i in range(0, len(metrics), 1000):
                    try:
                        self._client.log_batch(run_id, metrics=metrics[i : i + 1000])
                    except Exception:  # tracking must never kill the experiment
                        logger.exception("MLflow log_batch failed for run %s", run_id)
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


def set_tags(client: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set several tags on a run in one call."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_runs(client: Any, run_ids: Iterable[str], status: str = "FINISHED") -> None:
    """Mark runs terminated."""
    for run_id in run_ids:
        client.set_terminated(run_id, status=status)
