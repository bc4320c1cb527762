"""Tests for tunelab.tracking: the tags a verdict becomes, the tracker seam, metric names
at run time (refused and flat ones), and the local store created by two processes at once."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import cli_json, generous, write_spec
from tunelab.layout import ExperimentLayout
from tunelab.outcome import final_metrics
from tunelab.tracking import MlflowTracker, Tracker, TrackingCallback, verdict_tags
from tunelab.verdicts import WIN, Decision, Guardrail, analyze_lever, verdict_to_dict

FLAT = "tests.tunelab.flat_metric_family:FAMILY"


def test_verdict_tags() -> None:
    # a verdict record becomes string tags: verdict, outcome, guardrails, figures
    rng = np.random.default_rng(13)
    control = rng.normal(0.0, 1.0, 20)
    variant = 0.9 * control + math.sqrt(1 - 0.81) * rng.normal(0.0, 1.0, 20) + 1.5
    g = {"val/bounded_frac": (control, control + 0.0, Guardrail("val/bounded_frac", "max", 0.5))}
    v = analyze_lever(control, variant, mode="max", decision=Decision(0.1), guardrails=g)
    tags = verdict_tags(verdict_to_dict(v))
    assert tags["tunelab.verdict"] == tags["tunelab.outcome"] == WIN
    assert tags["guardrail.val/bounded_frac"] == "pass"
    assert float(tags["tunelab.ci_low"]) == pytest.approx(v.ci_low, rel=1e-5)
    assert tags["tunelab.n_pairs"] == "20"
    assert all(isinstance(x, str) for x in tags.values())


def test_mlflow_tracker_is_a_picklable_tracker(tmp_path) -> None:
    # Tune pickles the callback holding the tracker: only the URI travels
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert isinstance(tracker, Tracker)
    exp = tracker.ensure_experiment("t", tmp_path / "art")
    run = tracker.start_run(exp, "parent", {"a": "1"})
    clone = pickle.loads(pickle.dumps(tracker))
    child = clone.start_run(exp, "child", {}, parent_run_id=run)
    clone.set_tags(child, {"b": 2})
    got = clone.client.get_run(child)
    assert got.data.tags["mlflow.parentRunId"] == run
    assert got.data.tags["b"] == "2"


# -- metric names at run time ----------------------------------------------------------------
class _Flaky:
    """A tracker whose backend can be cut off (``down``), like a server that went away."""

    def __init__(self, inner: MlflowTracker) -> None:
        self.inner, self.uri, self.down = inner, inner.uri, False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kw: Any) -> Any:
            if self.down:
                raise ConnectionError("connection refused")
            return attr(*args, **kw)

        return call


def _wait(cond: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + generous(timeout)
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_refused_name_never_loses_the_other_metrics(tmp_path: Path) -> None:
    # MLflow refuses '@' in a name: that metric alone is dropped (counted, warned), the rest
    # of every batch is logged; flat names (score, aux) are logged like namespaced ones. A
    # short outage in the middle is spooled and replayed by the sender once it is back.
    inner = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = _Flaky(inner)
    exp = inner.ensure_experiment("names", tmp_path / "art")
    parent = inner.start_run(exp, "parent", {})
    layout = ExperimentLayout(tmp_path / "exp")
    cb = TrackingCallback(
        tracker=tracker,  # type: ignore[arg-type]
        experiment_id=exp,
        parent_run_id=parent,
        runs_file=str(layout.runs_file),
        base_tags={},
        retry_s=0.05,
    )
    layout.root.mkdir()
    cb.setup()
    trial = SimpleNamespace(trial_id="t1", config={"seed": 3, "config": {}})
    cb.on_trial_start(0, [], trial)
    for it in range(1, 9):
        if it == 4:
            cb.flush()
            tracker.down = True
        if it == 7:
            _wait(lambda: cb.failures >= 3)
            tracker.down = False
        result = {"val/score": it / 10, "bad@key": 1.0, "score": float(it), "aux": -it}
        cb.on_trial_result(0, [], trial, {**result, "iteration": it, "time_total_s": 1.0})
    _wait(lambda: cb.backlog.empty)
    cb.on_experiment_end([])
    run_id = cb.runs["t1"]
    for key in ("val/score", "score", "aux"):
        assert [m.step for m in inner.client.get_metric_history(run_id, key)] == list(range(1, 9))
    assert inner.client.get_metric_history(run_id, "bad@key") == []
    assert cb.refused == {"bad@key": 8}
    assert "time_total_s" not in inner.client.get_run(run_id).data.metrics
    assert not layout.tracking_spool_file.exists()


def test_final_metrics_keep_flat_names() -> None:
    result = {
        "score": 2.5,
        "aux": 7,
        "val/score": float("nan"),
        "iteration": 3,
        "training_iteration": 3,
        "time_total_s": 1.0,
        "done": True,
        "trial_id": "x",
        "config": {"seed": 1},
        "config/seed": 1,
    }
    got = final_metrics(result)
    assert set(got) == {"score", "aux", "val/score"} and got["aux"] == 7.0
    assert math.isnan(got["val/score"])


@pytest.mark.slow
def test_flat_metric_names_select_the_right_seed(tmp_path: Path) -> None:
    # a family reporting `score` and `aux` (no group/ prefix): culled, ranked and selected on them
    spec = write_spec(
        tmp_path / "flat.yaml",
        f"""
kind: seed_cull
name: flat-cull
family: "{FLAT}"
config: {{best_seed: 7}}
seeds: [5, 7, 9, 4]
budget: 4
metric: {{name: score, mode: max}}
cull: {{at: 2, keep: 2, scheduler: sync, tie_break: aux}}
select: {{metric: score, mode: max}}
""",
    )
    summary = cli_json("sweep", str(spec), "--storage", str(tmp_path / "res"))
    assert summary["selected"]["seed"] == 7
    assert summary["selected"]["value"] == pytest.approx(0.04)
    by_seed = {t["seed"]: t for t in summary["trials"]}
    assert by_seed[7]["metrics"]["score"] == pytest.approx(0.04)
    assert by_seed[5]["metrics"]["aux"] == 5.0
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["selected"]["run_id"])
    assert run.data.metrics["score"] == pytest.approx(0.04) and run.data.metrics["aux"] == 7.0
    assert "manifest.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


# -- the local store, created by two processes at once --------------------------------------
_CREATE = """
import sys, time
from pathlib import Path
from tunelab.tracking import MlflowTracker
folder = Path(sys.argv[1])
(folder / f"ready-{sys.argv[2]}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
print(MlflowTracker(f"sqlite:///{folder / 'mlflow.db'}").ensure_experiment("race", None))
"""


def test_two_processes_create_the_same_new_store(tmp_path: Path) -> None:
    # this process and another one, released at once on a store nobody has created yet
    other = subprocess.Popen(
        [sys.executable, "-c", _CREATE, str(tmp_path), "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait(lambda: (tmp_path / "ready-1").exists() or other.poll() is not None, 120)
    (tmp_path / "go").touch()
    mine = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}").ensure_experiment("race", None)
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err[-3000:]
    assert out.strip() == mine  # one experiment, the same id for both
