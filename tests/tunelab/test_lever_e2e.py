"""Lever A/B on paired seeds end to end: verdicts, tags, stacking, crashes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import TOY, run_cli, write_spec
from tests.mlflow_ui import MlflowUI, browser_available
from tests.tunelab.test_report import CHROMIUM, card, chip, chromium_dom, parse

pytestmark = pytest.mark.slow

SPEC = f"""
kind: lever_ab
name: toy-levers
family: "{TOY}"
control: {{hidden: 8, steps_per_iter: 100, lr: 0.001}}
levers:
  fast: {{lr: 0.03}}
  broken: {{fail_at: 2}}
  wide: {{hidden: 16}}
seeds: [1, 2, 3, 4, 5]
budget: 3
metric: {{name: val/log_mse, mode: min}}
guardrails: [{{name: train/loss, mode: min, margin: 1.0}}]
decision: {{min_effect: 0.2, alpha: 0.05, correction: none, confirm_seeds: [100]}}
rounds: 2
failure: {{retries: 0, tolerate: 10}}
"""


def test_lever_ab_verdicts_tags_and_stack_on_win(tmp_path: Path) -> None:
    proc = run_cli(
        "sweep",
        str(write_spec(tmp_path / "lever.yaml", SPEC)),
        "--storage",
        str(tmp_path / "res"),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    # Tune's start-up box shows the searcher's upper bound, not sys.maxsize (Tune's "-1")
    assert "9223372036854775807" not in proc.stderr
    assert re.search(r"Number of trials\s+(\d+)", proc.stderr)
    verdicts = {(v["round"], v["lever"]): v for v in summary["verdicts"]}
    # a large learning-rate lever is a meaningful win, confirmed on the confirmation seed and stacked
    fast = verdicts[(1, "fast")]
    assert fast["verdict"] == "win" and fast["meaningful"] and fast["confirmed"]
    assert summary["stacked"] == [[1, "fast"]]
    assert summary["final_control"]["lr"] == 0.03
    # the end of a run says the answer, per lever (resume of a finished run prints it again)
    shown = run_cli("resume", summary["experiment_dir"])
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert re.search(
        r"fast \(round 1\): win \(meaningful\); effect \+[\d.e-]+ \[[\d.e-]+, [\d.e-]+\] "
        r"[\d.]+% CI, p( \(holm\))? [\d.e-]+, n \d+; confirmed; stacked into the control",
        shown.stdout,
    ), shown.stdout
    assert re.search(r"broken \(round 1\): crashed; .*crashed seeds 1, 2, 3, 4, 5", shown.stdout)
    assert "final control: " in shown.stdout
    # a lever whose trials fail is crashed, never silently dropped
    broken = verdicts[(1, "broken")]
    assert broken["verdict"] == "crashed" and sorted(broken["crashed_seeds"]) == [1, 2, 3, 4, 5]
    # round 2 re-tests the remaining lever against the new control
    assert (2, "wide") in verdicts and (2, "fast") not in verdicts
    # MLflow: every trial a child run; verdict and outcome tags reviewers filter on
    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name("toy-levers")
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'"
    )
    assert len(children) == len(summary["trials"])
    winners = client.search_runs(
        [exp.experiment_id], filter_string="tags.`tunelab.verdict` = 'win'"
    )
    assert {r.data.tags["tunelab.lever"] for r in winners} == {"fast"}
    outcomes = {
        (r.data.tags["tunelab.lever"], r.data.tags["tunelab.round"]): r.data.tags["tunelab.outcome"]
        for r in children
    }
    assert outcomes[("control", "1")] == "superseded" and outcomes[("control", "2")] == "control"
    assert outcomes[("broken", "1")] == "crashed-early"
    parent = client.get_run(summary["parent_run_id"]).data.tags
    for lever in ("fast", "broken", "wide"):
        latest = max(
            (v for v in summary["verdicts"] if v["lever"] == lever), key=lambda v: v["round"]
        )
        assert parent[f"tunelab.verdict.{lever}"] == latest["verdict"]
    # same seeds for every arm, and the results table says which arm each trial was
    exp_dir = Path(summary["experiment_dir"])
    table = (exp_dir / "results.csv").read_text().splitlines()
    assert table[0].split(",")[:6] == ["trial_id", "run_id", "seed", "arm", "round", "stage"]
    assert json.loads((exp_dir / "verdicts.json").read_text())[0]["lever"]
    # the HTML report of this real run, by spec name, renders every lever card in Chromium
    out = tmp_path / "report.html"
    proc = run_cli("report", "toy-levers", "--storage", str(tmp_path / "res"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    if CHROMIUM.exists():
        dom = parse(chromium_dom(out, tmp_path))
        for v in summary["verdicts"]:
            assert chip(card(dom, v["lever"], v["round"])).text() == v["verdict"]
    # the parent reads in the experiment list: per-lever effect metrics
    effects = client.get_run(summary["parent_run_id"]).data.metrics
    assert effects["effect/fast"] == verdicts[(1, "fast")]["effect"]
    # the real MLflow UI: the README's win filter shows the fast lever's runs (issue 13, item 8)
    if browser_available():
        with MlflowUI(summary["tracking_uri"], tmp_path / "ui-artifacts") as ui:
            heading, shown = ui.rows(exp.experiment_id, "tags.`tunelab.verdict` = 'win'")
        assert heading == "Training runs"
        expected = sorted(r.info.run_name for r in winners)
        assert sorted(shown[1:]) == expected and all(n.startswith("fast-seed") for n in expected)
