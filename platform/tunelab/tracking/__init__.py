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

The tags of a lever's verdict are decided here too (:func:`verdict_tags`),
from :mod:`tunelab.names`; the statistics in :mod:`tunelab.verdicts` know no
tags. (A seed cull's selection tags are set by its kind,
:mod:`tunelab.kinds.seed_cull`; ``tunelab.culled_at`` by the post-processing.)

Everything public is imported from here; the private modules hold the code:
``_protocol`` (:class:`Tracker`, :class:`MetricPoint`), ``_mlflow_tracker``
(:class:`MlflowTracker`, :func:`is_rejection`), ``_run_data`` (tags, params
and summary metrics of runs), ``_spool`` (:class:`TrackingSpool`),
``_outbox`` (delivery, replay and outage errors) and ``_callback``
(:class:`TrackingCallback`).
"""

from __future__ import annotations

from tunelab.tracking._callback import TrackingCallback
from tunelab.tracking._mlflow_tracker import MlflowTracker, default_tracking_uri, is_rejection
from tunelab.tracking._outbox import (
    GuardedTracker,
    drain_tracking,
    replay_spool,
    spool_backlog,
    tracking_guard,
)
from tunelab.tracking._protocol import MetricPoint, Tracker
from tunelab.tracking._run_data import flatten, git_commit, log_summary, verdict_tags
from tunelab.tracking._spool import Backlog, TrackingSpool

__all__ = [
    "Backlog",
    "GuardedTracker",
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
