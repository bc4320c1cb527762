"""A diverged seed ranks last everywhere, and NaN reaches the user (issue 9, items 1, 2, 6, 8).

Offline: every registered cull scheduler (and every Optuna pruner) culls a
seed whose metric turns NaN at the milestone, driven by recorded curves.
End to end: a real seed cull through the CLI, Ray and MLflow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import TOY, cli_json, run_cli, write_spec
from tests.mlflow_ui import MlflowUI, browser_available
from tunelab import SpecError, atomic_write_json, parse_spec
from tunelab.kinds.sweep import best_trial
from tunelab.names import TrialStatus
from tunelab.outcome import TrialOutcome
from tunelab.schedulers import (
    CULL_SCHEDULERS,
    CullPlan,
    make_cull_scheduler,
    rank_key,
    replay_curves,
)

BUDGET = 6
FINALS = [0.5, 0.9, 0.7, 0.3]  # seed 1 would be the best, but it diverges at iteration 2


def _curves(nan_seed: int = 1, nan_from: int = 2) -> list[list[dict[str, float]]]:
    return [
        [
            {"score": math.nan if (i == nan_seed and t + 1 >= nan_from) else f * (t + 1) / BUDGET}
            for t in range(BUDGET)
        ]
        for i, f in enumerate(FINALS)
    ]


def _plan(pruner: str = "successive_halving") -> CullPlan:
    return CullPlan(
        metric="score", mode="max", milestone=2, keep=2, n_trials=4, budget=BUDGET, pruner=pruner
    )


CASES = [
    *[(name, "successive_halving") for name in sorted(CULL_SCHEDULERS) if name != "optuna"],
    ("optuna", "successive_halving"),
    ("optuna", "hyperband"),
    ("optuna", "wilcoxon"),
]


@pytest.mark.parametrize(("name", "pruner"), CASES)
def test_every_cull_scheduler_culls_the_diverged_seed(name: str, pruner: str) -> None:
    # the NaN seed stops at the milestone; the best healthy seed trains to the budget
    out = replay_curves(make_cull_scheduler(name, _plan(pruner)), _curves(), BUDGET)
    assert out.iterations[1] == 2
    assert out.iterations[2] == BUDGET


@pytest.mark.parametrize(
    ("values", "mode"),
    [
        ([1.0, math.nan, 0.5], "max"),
        ([1.0, math.inf, 0.5], "max"),
        ([1.0, -math.inf, 0.5], "min"),
        ([1.0, math.nan, 0.5], "min"),
    ],
)
def test_non_finite_ranks_last_in_either_mode(values: list[float], mode: str) -> None:
    # +inf in max mode is a blow-up, not a record
    ranked = sorted(range(3), key=lambda i: rank_key([values[i]], mode))
    assert ranked[-1] == 1


def test_sweep_best_never_picks_a_non_finite_trial() -> None:
    # an infinite value is not the best config
    outcomes = [
        TrialOutcome(str(i), 0, TrialStatus.FINISHED, 3, {"val/score": v})
        for i, v in enumerate([0.2, math.inf, 0.4, math.nan])
    ]
    best = best_trial(outcomes, "val/score", "max")
    assert best is not None and best["trial_id"] == "2"


def test_experiment_json_files_are_strict(tmp_path: Path) -> None:
    # NaN and inf become null: no bare NaN token for jq / JavaScript to choke on
    path = tmp_path / "s.json"
    atomic_write_json(path, {"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.0], "c": {"d": None}}


def _cull_spec(max_concurrent: int, scheduler: str) -> dict:
    return {
        "kind": "seed_cull",
        "name": "t",
        "family": TOY,
        "seeds": 4,
        "budget": 4,
        "metric": {"name": "val/score", "mode": "max"},
        "cull": {"at": 2, "keep": 2, "scheduler": scheduler},
        "select": {"metric": "val/score", "mode": "max"},
        "max_concurrent": max_concurrent,
    }


def test_sync_cull_below_the_seed_count_is_refused_naming_both_keys() -> None:
    # paused seeds hold their slots: the rest would never start (a hang); refuse it up front
    with pytest.raises(SpecError) as err:
        parse_spec(_cull_spec(2, "sync"))
    assert "max_concurrent" in str(err.value) and "seeds" in str(err.value)


@pytest.mark.parametrize("scheduler", ["asha", "optuna"])
def test_asynchronous_culls_accept_fewer_slots_than_seeds(scheduler: str) -> None:
    assert parse_spec(_cull_spec(1, scheduler)).max_concurrent == 1


# -- end to end --------------------------------------------------------------------------
SPEC = """
kind: seed_cull
name: toy-nan-{name}
family: "{toy}"
config: {{hidden: 8, steps_per_iter: 5, nan_at: 2, nan_seed: {nan_seed}}}
seeds: 4
budget: 4
metric: {{name: val/score, mode: max}}
cull: {{at: 2, keep: 2, scheduler: {scheduler}}}
select: {{metric: val/score, mode: max}}
failure: {{retries: 0, tolerate: 0}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["sync", "asha"])
def test_a_diverged_seed_is_culled_tagged_and_logged_as_nan(tmp_path: Path, scheduler: str) -> None:
    spec = write_spec(
        tmp_path / "s.yaml",
        SPEC.format(name=scheduler, toy=TOY, nan_seed=1, scheduler=scheduler),
    )
    summary = cli_json("sweep", str(spec), "--storage", str(tmp_path / "r"))
    by_seed = {t["seed"]: t for t in summary["trials"]}
    assert by_seed[1]["status"] == "culled" and by_seed[1]["iterations"] == 2
    assert by_seed[1]["metrics"]["val/score"] is None  # strict JSON: null, not NaN
    assert summary["selected"]["seed"] != 1
    assert summary["cull"]["kept"] == sum(t["status"] == "finished" for t in summary["trials"])
    text = (Path(summary["experiment_dir"]) / "summary.json").read_text()
    assert "NaN" not in text
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(by_seed[1]["run_id"])
    assert run.data.tags["tunelab.nonfinite"] == "2"
    assert run.data.tags["tunelab.culled_at"] == "2"
    history = client.get_metric_history(run.info.run_id, "val/score")
    assert math.isnan({m.step: m.value for m in history}[2])  # the NaN itself, not the last finite
    healthy = client.get_run(by_seed[0]["run_id"])
    assert "tunelab.nonfinite" not in healthy.data.tags
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["tunelab.kept"] == str(summary["cull"]["kept"])


@pytest.mark.slow
def test_every_seed_diverged_selects_nothing_and_exits_3(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path / "s.yaml", SPEC.format(name="all", toy=TOY, nan_seed=-1, scheduler="sync")
    )
    proc = run_cli("sweep", str(spec), "--storage", str(tmp_path / "r"), "--json")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "no seed selected" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["selected"] is None and "diverged" in summary["no_selection"]
    exp = Path(summary["experiment_dir"])
    assert not (exp / "selected_model.json").exists()
    parent = MlflowClient(summary["tracking_uri"]).get_run(summary["parent_run_id"])
    assert parent.data.tags["tunelab.selected_seed"] == "none"
    assert "diverged" in parent.data.tags["tunelab.no_selection"]


HEALTH_SPEC = """
kind: seed_cull
name: toy-health
family: "{toy}"
config: {{hidden: 8, steps_per_iter: 5, nan_loss_at: 2, nan_seed: 1}}
seeds: 3
budget: 4
metric: {{name: val/score, mode: max}}
cull: {{at: 3, keep: 1, scheduler: sync}}
select: {{metric: val/score, mode: max}}
failure: {{retries: 0, tolerate: 0}}
health: {{max_consecutive_skips: 2}}
description: seed 1's aux loss term turns NaN
"""


@pytest.mark.slow
def test_a_trial_the_health_monitor_ends_is_diverged_everywhere(tmp_path: Path) -> None:
    # seed 1's "aux" loss term turns NaN at iteration 2: two skipped steps end it (issue 11)
    spec = write_spec(tmp_path / "s.yaml", HEALTH_SPEC.format(toy=TOY))
    storage = tmp_path / "r"
    summary = cli_json("sweep", str(spec), "--storage", str(storage))
    by_seed = {t["seed"]: t for t in summary["trials"]}
    bad = by_seed[1]
    assert bad["status"] == "diverged" and bad["iterations"] == 2
    line = bad["diagnosis"]
    # step 7 of the trial (5 per iteration); no watched module: no layer for a NaN loss
    assert line == "iteration 2 step 7 (main): non-finite loss; term aux; norm nan"
    assert bad["metrics"]["val/score"] is None and bad["metrics"]["health/diverged"] == 1.0
    assert summary["selected"]["seed"] != 1  # ranked last: never selected
    assert all(t["status"] != "diverged" for s, t in by_seed.items() if s != 1)
    # MLflow: the diagnosis tag and the status reviewers filter on
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(bad["run_id"])
    assert run.data.tags["tunelab.health.diagnosis"] == line
    assert run.data.tags["tunelab.status"] == "diverged"
    found = client.search_runs([run.info.experiment_id], "tags.`tunelab.status` = 'diverged'")
    assert [r.info.run_id for r in found] == [bad["run_id"]]
    assert "health/layer_grad_norm_max/0" in client.get_run(by_seed[0]["run_id"]).data.metrics
    # the results table, the artifact, status and the report
    exp = Path(summary["experiment_dir"])
    import pandas as pd

    table = pd.read_csv(exp / "results.csv")
    row = table[table["seed"] == 1].iloc[0]
    assert row["status"] == "diverged" and row["diagnosis"] == line
    health = json.loads((exp / "trial_artifacts" / bad["trial_id"] / "health.json").read_text())
    assert health["diagnosis"]["line"] == line and health["diagnosis"]["term"] == "aux"
    assert [r["iteration"] for r in health["layer_norm_history"]] == [1, 2]
    status = cli_json("status", str(exp))
    rows = {t["seed"]: t for t in status["trials"]}
    assert rows[1]["status"] == "diverged"
    page = tmp_path / "report.html"
    proc = run_cli("report", "toy-health", "--storage", str(storage), "--out", str(page))
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = page.read_text()
    assert 'class="health"' in html and f'data-trial="{bad["trial_id"]}"' in html
    assert "term aux" in html and 'class="layer-norms' in html
    # the real MLflow UI: the README's filters show the right rows (issue 13, item 8)
    if not browser_available():
        pytest.skip("needs playwright and Debian chromium for the MLflow UI part")
    exp_id = run.info.experiment_id
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["mlflow.note.content"] == "seed 1's aux loss term turns NaN"
    assert parent.data.metrics["val/score"] == summary["selected"]["value"]
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    names = {t["run_id"]: client.get_run(t["run_id"]).info.run_name for t in summary["trials"]}
    name_of = {s: names[t["run_id"]] for s, t in by_seed.items()}
    culled = [s for s, t in by_seed.items() if t["status"] == "culled"]
    with MlflowUI(summary["tracking_uri"], tmp_path / "ui-artifacts") as ui:
        heading, shown = ui.rows(exp_id, "tags.`tunelab.selected` = 'true'")
        assert heading == "Training runs"  # not MLflow's GenAI overview
        assert shown == [parent.info.run_name, name_of[summary["selected"]["seed"]]]
        _, shown = ui.rows(exp_id, "tags.`tunelab.culled_at` != ''")
        assert shown[1:] == [name_of[s] for s in culled] and len(culled) == 1
        _, shown = ui.rows(exp_id, "tags.`tunelab.status` = 'diverged'")
        assert shown[1:] == [name_of[1]] and name_of[1].startswith("toy-seed1-")
