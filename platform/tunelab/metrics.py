"""tunelab's own Prometheus metrics, exported through Ray's metrics agent.

Recorded with ``ray.util.metrics`` by the driver (trial states, verdicts) and
by every trial (iterations, reports, checkpoints, NaN-skipped steps); Ray's
metrics agent on each node serves them to Prometheus at the node's metrics
export port (``ray start --metrics-export-port``, or
``TUNELAB_METRICS_EXPORT_PORT`` for the local Ray the CLI starts). Grafana
shows them with ``dashboards/tunelab.json`` (see ``dashboards/README.md``).

In Prometheus, Ray prefixes each name with ``ray_``; counters also get
``_total`` and histograms the ``_bucket`` / ``_sum`` / ``_count`` series.

=================================== ========= ======= =========== ==============================================
Prometheus name                     type      unit    tags        meaning (recorded by)
=================================== ========= ======= =========== ==============================================
ray_tunelab_trials                  gauge     trials  spec family trials per state: running, paused, pending,
                                                      state       culled, finished, error, diverged (driver)
ray_tunelab_iteration_seconds       histogram seconds spec family wall time of one ``train_iteration`` (trial)
ray_tunelab_reports_total           counter   reports spec family results reported to Tune; ``rate()`` is
                                                                  reports per second (trial)
ray_tunelab_checkpoint_seconds      histogram seconds spec family time to write one checkpoint (trial)
ray_tunelab_checkpoint_bytes        gauge     bytes   spec family size of the trial's last checkpoint (trial)
ray_tunelab_nan_skipped_steps_total counter   steps   spec family optimizer steps skipped as non-finite, from
                                                                  the family's ``health/nan_skipped`` (trial)
ray_tunelab_explosions_total        counter   events  spec family gradient explosions the health monitor detected,
                                                                  from ``health/explosions`` (trial)
ray_tunelab_diverged_trials_total   counter   trials  spec family trials the health monitor ended as diverged
                                                                  (trial)
ray_tunelab_verdicts_total          counter   levers  spec family lever A/B verdicts reached per label: win,
                                                      label       negative, null, inconclusive, crashed (driver)
=================================== ========= ======= =========== ==============================================

``spec`` is the spec name (``tunelab.spec``), ``family`` the registered family
name, ``state`` and ``label`` as listed.

Ray adds the tags ``SessionName``, ``NodeAddress``, ``WorkerId``,
``Component`` and ``Version``. Gauges live as long as the process that sets
them (Ray drops a gauge not refreshed for two export intervals); counters and
histograms stay until the node's metrics agent exits.

Recording is cheap (the metric objects are created once per process, the tags
once per trial) and never raises: if Ray's metrics cannot be created or
recorded, recording switches itself off with one warning. ``TUNELAB_METRICS=0``
switches it off from the start.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tunelab.callbacks import DriverCallback
from tunelab.names import LIVE_STATES, M_HEALTH_EXPLOSIONS, M_HEALTH_NAN_SKIPPED, TrialStatus

__all__ = [
    "CHECKPOINT_BYTES",
    "CHECKPOINT_SECONDS",
    "DIVERGED_TRIALS",
    "EXPLOSIONS",
    "FAMILY_NAN_SKIPPED",
    "ITERATION_SECONDS",
    "METRICS",
    "NAN_SKIPPED",
    "PROMETHEUS_PREFIX",
    "REPORTS",
    "TRIALS",
    "TRIAL_STATES",
    "VERDICTS",
    "MetricDef",
    "TrialRecorder",
    "TrialStateMetrics",
    "prometheus_series",
    "record_verdicts",
]

logger = logging.getLogger(__name__)

# -- names (defined once; the dashboard and its tests read them from here) -------------
TRIALS = "tunelab_trials"
ITERATION_SECONDS = "tunelab_iteration_seconds"
REPORTS = "tunelab_reports"
CHECKPOINT_SECONDS = "tunelab_checkpoint_seconds"
CHECKPOINT_BYTES = "tunelab_checkpoint_bytes"
NAN_SKIPPED = "tunelab_nan_skipped_steps"
EXPLOSIONS = "tunelab_explosions"
DIVERGED_TRIALS = "tunelab_diverged_trials"
VERDICTS = "tunelab_verdicts"

#: Prometheus label keys (Ray calls them tags).
LABEL_SPEC, LABEL_FAMILY, LABEL_STATE, LABEL_VERDICT = "spec", "family", "state", "label"
#: Values of the ``state`` tag of :data:`TRIALS` (a trial the health monitor ended: diverged).
TRIAL_STATES = (*LIVE_STATES, TrialStatus.DIVERGED.value)
#: The health metrics counted by :data:`NAN_SKIPPED` and :data:`EXPLOSIONS`.
FAMILY_NAN_SKIPPED = M_HEALTH_NAN_SKIPPED
FAMILY_EXPLOSIONS = M_HEALTH_EXPLOSIONS
#: Ray prefixes every custom metric with this in Prometheus.
PROMETHEUS_PREFIX = "ray_"
#: Set to ``0`` to switch recording off.
ENV_SWITCH = "TUNELAB_METRICS"

_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
)  # fmt: skip


class MetricDef:
    """One metric: its Ray name, type, unit, tag keys and meaning (the table above)."""

    def __init__(
        self,
        name: str,
        kind: str,
        unit: str,
        tags: tuple[str, ...],
        meaning: str,
        boundaries: tuple[float, ...] = (),
    ) -> None:
        self.name, self.kind, self.unit, self.tags, self.meaning = name, kind, unit, tags, meaning
        self.boundaries = boundaries

    @property
    def prometheus_name(self) -> str:
        """The name Prometheus stores (counters with ``_total``; histograms: the family name)."""
        suffix = "_total" if self.kind == "counter" else ""
        return f"{PROMETHEUS_PREFIX}{self.name}{suffix}"

    def __repr__(self) -> str:
        return f"MetricDef({self.name!r}, {self.kind!r})"


_SF = (LABEL_SPEC, LABEL_FAMILY)
#: Every tunelab metric, by Ray name.
METRICS: dict[str, MetricDef] = {
    m.name: m
    for m in (
        MetricDef(
            TRIALS, "gauge", "trials", (*_SF, LABEL_STATE), "Trials of the experiment per state."
        ),
        MetricDef(
            ITERATION_SECONDS,
            "histogram",
            "seconds",
            _SF,
            "Wall time of one train_iteration.",
            _SECONDS_BUCKETS,
        ),
        MetricDef(
            REPORTS, "counter", "reports", _SF, "Results reported to Tune (rate() = reports/s)."
        ),
        MetricDef(
            CHECKPOINT_SECONDS,
            "histogram",
            "seconds",
            _SF,
            "Time to write one checkpoint.",
            _SECONDS_BUCKETS,
        ),
        MetricDef(CHECKPOINT_BYTES, "gauge", "bytes", _SF, "Size of the trial's last checkpoint."),
        MetricDef(
            NAN_SKIPPED,
            "counter",
            "steps",
            _SF,
            "Optimizer steps skipped as non-finite (health/nan_skipped).",
        ),
        MetricDef(
            EXPLOSIONS,
            "counter",
            "events",
            _SF,
            "Gradient explosions detected by the health monitor (health/explosions).",
        ),
        MetricDef(
            DIVERGED_TRIALS,
            "counter",
            "trials",
            _SF,
            "Trials the health monitor ended as diverged.",
        ),
        MetricDef(
            VERDICTS, "counter", "levers", (*_SF, LABEL_VERDICT), "Lever A/B verdicts per label."
        ),
    )
}


def prometheus_series(name: str) -> tuple[str, ...]:
    """The series names Prometheus stores for the metric ``name`` (a Ray name)."""
    m = METRICS[name]
    if m.kind == "histogram":
        base = f"{PROMETHEUS_PREFIX}{m.name}"
        return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
    return (m.prometheus_name,)


# -- recording ---------------------------------------------------------------------------
class TrialRecorder:
    """What one trial records; build it once per trial, call it per iteration.

    Args:
        spec: The spec name (``tunelab.spec``).
        family: The family name.
    """

    def __init__(self, spec: str, family: str) -> None:
        self.tags = {LABEL_SPEC: spec, LABEL_FAMILY: family}

    def iteration(self, seconds: float, metrics: Mapping[str, Any]) -> None:
        """One iteration of ``seconds`` whose ``metrics`` are about to be reported."""
        m = _metrics()
        if m is None:
            return
        try:
            m[ITERATION_SECONDS].observe(float(seconds), self.tags)
            m[REPORTS].inc(1.0, self.tags)
            for key, counter in (
                (FAMILY_NAN_SKIPPED, NAN_SKIPPED),
                (FAMILY_EXPLOSIONS, EXPLOSIONS),
            ):
                count = metrics.get(key)
                if isinstance(count, (int, float)) and math.isfinite(count) and count > 0:
                    m[counter].inc(float(count), self.tags)
        except Exception as err:
            _disable(err)

    def diverged(self) -> None:
        """The health monitor ended this trial as diverged."""
        m = _metrics()
        if m is None:
            return
        try:
            m[DIVERGED_TRIALS].inc(1.0, self.tags)
        except Exception as err:
            _disable(err)

    def checkpoint(self, seconds: float, nbytes: float) -> None:
        """One checkpoint written in ``seconds``, ``nbytes`` large."""
        m = _metrics()
        if m is None:
            return
        try:
            m[CHECKPOINT_SECONDS].observe(float(seconds), self.tags)
            m[CHECKPOINT_BYTES].set(float(nbytes), self.tags)
        except Exception as err:
            _disable(err)


def record_verdicts(spec: str, family: str, labels: Sequence[str]) -> None:
    """Count the verdicts ``labels`` reached by the levers of ``spec`` (driver side)."""
    m = _metrics()
    if m is None:
        return
    try:
        fam = family_label(family)
        for label in labels:
            m[VERDICTS].inc(1.0, {LABEL_SPEC: spec, LABEL_FAMILY: fam, LABEL_VERDICT: str(label)})
    except Exception as err:
        _disable(err)


class TrialStateMetrics(DriverCallback):
    """Driver-side Tune callback: sets :data:`TRIALS` per state (at most once a second).

    Args:
        spec: The spec name.
        family: The family name (or ``module:ATTR``).
        budget: Iterations per trial (a trial that ends below it was culled).
    """

    def __init__(self, *, spec: str, family: str, budget: int, interval_s: float = 1.0) -> None:
        self.spec, self.family, self.budget, self.interval_s = spec, family, budget, interval_s
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._last = -math.inf

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self.interval_s:
            self._set(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._set(trials)

    def _set(self, trials: list) -> None:
        self._last = time.monotonic()
        m = _metrics()
        if m is None:
            return
        try:
            from tunelab.progress import trial_counts

            counts = trial_counts(trials, self.budget)
            fam = family_label(self.family)
            for state in TRIAL_STATES:
                m[TRIALS].set(
                    float(counts.get(state, 0)),
                    {LABEL_SPEC: self.spec, LABEL_FAMILY: fam, LABEL_STATE: state},
                )
        except Exception as err:
            _disable(err)


# -- helpers -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def family_label(family: str) -> str:
    """The registered family name for a spec's ``family`` (which may be ``module:ATTR``)."""
    if ":" not in family:
        return family
    try:
        from tunelab.family import get_family

        return get_family(family).name
    except Exception:
        return family


_CREATED: dict[str, Any] | None = None
_OFF = False


def _metrics() -> dict[str, Any] | None:
    """This process's metric objects, created on first use; None when recording is off."""
    global _CREATED
    if _OFF:
        return None
    if _CREATED is None:
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            _disable(None)
            return None
        try:
            _CREATED = _create()
        except Exception as err:
            _disable(err)
            return None
    return _CREATED


def _create() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    made: dict[str, Any] = {}
    for m in METRICS.values():
        if m.kind == "counter":
            made[m.name] = Counter(m.name, m.meaning, tag_keys=m.tags)
        elif m.kind == "gauge":
            made[m.name] = Gauge(m.name, m.meaning, tag_keys=m.tags)
        else:
            made[m.name] = Histogram(
                m.name, m.meaning, boundaries=list(m.boundaries), tag_keys=m.tags
            )
    return made


def _disable(err: BaseException | None) -> None:
    global _OFF
    _OFF = True
    if err is not None:
        logger.warning("tunelab metrics switched off in this process: %r", err)


def _reset_for_tests() -> None:
    """Forget the created metrics and the off switch (tests only)."""
    global _CREATED, _OFF
    _CREATED, _OFF = None, False
    family_label.cache_clear()
