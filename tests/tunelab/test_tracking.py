"""Tests for tunelab.tracking: the tags a verdict becomes, and the tracker seam."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from tunelab.tracking import MlflowTracker, Tracker, verdict_tags
from tunelab.verdicts import WIN, Decision, Guardrail, analyze_lever, verdict_to_dict


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
