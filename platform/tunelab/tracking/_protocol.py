"""The tracking seam's types: the :class:`Tracker` protocol, what the driver needs from a
tracking backend, and :class:`MetricPoint`, one metric value it logs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["MetricPoint", "Tracker"]


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
