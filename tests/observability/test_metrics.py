"""tunelab.metrics without a Ray cluster: names, lazy creation, never breaking a trial."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from tunelab import metrics as tm
from tunelab.progress import trial_counts


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(tm.ENV_SWITCH, raising=False)
    tm._reset_for_tests()
    yield
    tm._reset_for_tests()


class _Recorded:
    """Stands in for a ray.util.metrics object; remembers what it was given."""

    made = 0

    def __init__(self, name: str, *args: Any, **kw: Any) -> None:
        type(self).made += 1
        self.name = name
        self.calls: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append((value, dict(tags)))

    observe = set = inc


def _fake_create() -> dict[str, Any]:
    return {name: _Recorded(name) for name in tm.METRICS}


def test_prometheus_names_follow_rays_prefix_and_suffixes() -> None:
    assert tm.prometheus_series(tm.REPORTS) == ("ray_tunelab_reports_total",)
    assert tm.prometheus_series(tm.TRIALS) == ("ray_tunelab_trials",)
    assert tm.prometheus_series(tm.ITERATION_SECONDS) == (
        "ray_tunelab_iteration_seconds_bucket",
        "ray_tunelab_iteration_seconds_sum",
        "ray_tunelab_iteration_seconds_count",
    )


def test_every_metric_is_tagged_with_spec_and_family() -> None:
    assert all(m.tags[:2] == ("spec", "family") for m in tm.METRICS.values())
    assert tm.METRICS[tm.VERDICTS].tags == ("spec", "family", "label")


def test_metric_objects_are_created_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tm, "_create", _fake_create)
    _Recorded.made = 0
    rec = tm.TrialRecorder("s", "f")
    for _ in range(50):
        rec.iteration(0.1, {tm.FAMILY_NAN_SKIPPED: 0.0})
        rec.checkpoint(0.01, 123.0)
    assert _Recorded.made == len(tm.METRICS)


def test_iteration_records_time_report_and_nan_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tm, "_create", _fake_create)
    rec = tm.TrialRecorder("spec-a", "toy")
    rec.iteration(0.25, {tm.FAMILY_NAN_SKIPPED: 3.0})
    rec.iteration(0.5, {tm.FAMILY_NAN_SKIPPED: 0.0})
    made = tm._metrics()
    assert made is not None
    tags = {"spec": "spec-a", "family": "toy"}
    assert made[tm.ITERATION_SECONDS].calls == [(0.25, tags), (0.5, tags)]
    assert made[tm.REPORTS].calls == [(1.0, tags), (1.0, tags)]
    assert made[tm.NAN_SKIPPED].calls == [(3.0, tags)]  # zero is not an increment


def test_failing_metrics_switch_off_without_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kw: Any) -> None:
        raise RuntimeError("no metrics agent")

    made = _fake_create()
    monkeypatch.setattr(made[tm.ITERATION_SECONDS], "observe", broken)
    monkeypatch.setattr(tm, "_create", lambda: made)
    rec = tm.TrialRecorder("s", "f")
    rec.iteration(0.1, {})  # must not raise
    assert tm._metrics() is None
    rec.checkpoint(0.1, 1.0)
    assert made[tm.CHECKPOINT_SECONDS].calls == []


def test_unavailable_ray_metrics_do_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> dict[str, Any]:
        raise ImportError("ray.util.metrics")

    monkeypatch.setattr(tm, "_create", unavailable)
    tm.TrialRecorder("s", "f").iteration(0.1, {})
    tm.record_verdicts("s", "f", ["win"])
    assert tm._metrics() is None


def test_env_switch_turns_recording_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tm.ENV_SWITCH, "0")
    monkeypatch.setattr(tm, "_create", _fake_create)
    assert tm._metrics() is None


def test_verdicts_are_counted_per_label(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tm, "_create", _fake_create)
    tm.record_verdicts("levers", "toy", ["win", "null"])
    made = tm._metrics()
    assert made is not None
    labels = [tags["label"] for _, tags in made[tm.VERDICTS].calls]
    assert labels == ["win", "null"]


def test_family_label_resolves_module_paths() -> None:
    assert tm.family_label("tests.tunelab.toy_family:FAMILY") == "toy"
    assert tm.family_label("ouroboros") == "ouroboros"


def _trial(status: str, iteration: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        status=status, last_result=None if iteration is None else {"iteration": iteration}
    )


def test_trial_states_split_terminated_into_culled_and_finished() -> None:
    trials = [
        _trial("RUNNING"),
        _trial("PAUSED"),
        _trial("TERMINATED", 3),
        _trial("TERMINATED", 6),
        _trial("ERROR"),
    ]
    counts = trial_counts(trials, budget=6)
    assert counts == {
        "running": 1,
        "paused": 1,
        "pending": 0,
        "culled": 1,
        "finished": 1,
        "error": 1,
    }
    assert set(counts) | {"diverged"} == set(tm.TRIAL_STATES)  # the gauge adds diverged


def test_trial_state_callback_sets_every_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tm, "_create", _fake_create)
    cb = tm.TrialStateMetrics(spec="s", family="tests.tunelab.toy_family:FAMILY", budget=6)
    cb.on_experiment_end(trials=[_trial("TERMINATED", 6), _trial("TERMINATED", 2)])
    made = tm._metrics()
    assert made is not None
    got = {tags["state"]: value for value, tags in made[tm.TRIALS].calls}
    assert got == {
        "running": 0,
        "paused": 0,
        "pending": 0,
        "culled": 1,
        "finished": 1,
        "error": 0,
        "diverged": 0,
    }
    assert {tags["family"] for _, tags in made[tm.TRIALS].calls} == {"toy"}


def test_explosions_and_diverged_trials_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tm, "_create", _fake_create)
    rec = tm.TrialRecorder("spec-a", "cascade_mixer")
    rec.iteration(0.25, {tm.FAMILY_EXPLOSIONS: 1.0, tm.FAMILY_NAN_SKIPPED: 2.0})
    rec.iteration(0.25, {tm.FAMILY_EXPLOSIONS: 0.0})
    rec.diverged()
    made = tm._metrics()
    assert made is not None
    tags = {"spec": "spec-a", "family": "cascade_mixer"}
    assert made[tm.EXPLOSIONS].calls == [(1.0, tags)]
    assert made[tm.NAN_SKIPPED].calls == [(2.0, tags)]
    assert made[tm.DIVERGED_TRIALS].calls == [(1.0, tags)]
