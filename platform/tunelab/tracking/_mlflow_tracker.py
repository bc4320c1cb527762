"""The MLflow backend, the only place tunelab calls MLflow.

:class:`MlflowTracker` (a sqlite store, a folder or a tracking server), the
embedded default store (:func:`default_tracking_uri`) and the split between a
write MLflow *refuses* (:func:`is_rejection`: dropped with a warning) and an
outage (spooled and replayed by :mod:`tunelab.tracking._outbox`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tunelab.checkpoint import data_lock
from tunelab.names import EXPERIMENT_KIND_TRAINING, TAG_MLFLOW_EXPERIMENT_KIND, TAG_MLFLOW_PARENT
from tunelab.tracking._protocol import MetricPoint

__all__ = ["MlflowTracker", "default_tracking_uri", "is_rejection"]

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

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
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: Sequence[MetricPoint]) -> None:
        from mlflow.entities import Metric

        items = [Metric(m.key, m.value, m.timestamp, m.step) for m in metrics]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

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


def error_reason(err: BaseException) -> str:
    """``Type: first line`` of a tracking error (at most 300 characters), for messages."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__
