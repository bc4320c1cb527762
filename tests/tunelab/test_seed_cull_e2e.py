"""Seed culls end to end through the real CLI, a real local Ray and a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import TOY, cli_json, run_cli, write_spec

pytestmark = pytest.mark.slow

SPEC = """
kind: seed_cull
name: toy-{name}
family: "{toy}"
config: {{hidden: 8, steps_per_iter: 20{extra}}}
seeds: {seeds}
budget: {budget}
metric: {{name: val/score, mode: max}}
cull: {{at: {at}, keep: {keep}, scheduler: {scheduler}, tie_break: val/aux}}
select: {{metric: val/score, mode: max}}
checkpoint: {{every: 1, keep: {ckpt_keep}}}
failure: {{retries: {retries}, tolerate: 0}}
"""


def _spec(tmp: Path, **kw: object) -> Path:
    args = dict(
        name="cull",
        toy=TOY,
        extra="",
        seeds=4,
        budget=6,
        at=0.5,
        keep=2,
        scheduler="sync",
        ckpt_keep="null",
        retries=1,
    )
    args.update(kw)
    return write_spec(tmp / f"{args['name']}.yaml", SPEC.format(**args))


def _runs(summary: dict) -> tuple[MlflowClient, list]:
    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name(summary["mlflow_experiment"])
    return client, client.search_runs([exp.experiment_id])


def test_sync_cull_keeps_exactly_k_and_tags_everything(tmp_path: Path) -> None:
    summary = cli_json("sweep", str(_spec(tmp_path)), "--storage", str(tmp_path / "res"))
    trials = summary["trials"]
    # exactly k seeds reach the budget; the others stop at the milestone
    assert sorted(t["iterations"] for t in trials) == [3, 3, 6, 6]
    assert {t["status"] for t in trials if t["iterations"] == 3} == {"culled"}
    client, runs = _runs(summary)
    children = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]
    ]
    assert len(runs) == 5 and len(children) == 4  # 1 parent + N children
    culled = {r.data.tags["tunelab.seed"]: r.data.tags.get("tunelab.culled_at") for r in children}
    assert sorted(v for v in culled.values() if v) == ["3", "3"]
    # survivors are the top k at the milestone (cull metric recorded per iteration, step = iteration)
    at_cull = {
        r.info.run_id: next(
            m.value for m in client.get_metric_history(r.info.run_id, "val/score") if m.step == 3
        )
        for r in children
    }
    survivors = {t["run_id"] for t in trials if t["status"] == "finished"}
    assert min(at_cull[r] for r in survivors) >= max(
        v for r, v in at_cull.items() if r not in survivors
    )
    # the selection is the best survivor, tagged on the winner and on the parent
    sel = summary["selected"]
    best = max(
        (t for t in trials if t["status"] == "finished"), key=lambda t: t["metrics"]["val/score"]
    )
    assert (sel["seed"], sel["run_id"]) == (best["seed"], best["run_id"])
    tags = {r.info.run_id: r.data.tags for r in runs}
    assert tags[sel["run_id"]]["tunelab.selected"] == "true"
    assert sum(t.get("tunelab.selected") == "true" for t in tags.values()) == 1
    assert tags[summary["parent_run_id"]]["tunelab.selected_seed"] == str(sel["seed"])
    manifest = json.loads(Path(sel["manifest"]).read_text())
    assert manifest["selected_seed"] == sel["seed"] and manifest["hyperparameters"]["hidden"] == 8
    assert Path(manifest["checkpoint"]).is_dir()
    # the seed table exists in both formats; the selected checkpoint was reloaded and re-exported
    exp_dir = Path(summary["experiment_dir"])
    assert (exp_dir / "seed_table.parquet").exists() and (exp_dir / "seed_table.csv").exists()
    assert (exp_dir / "selected" / "prediction.json").exists()
    # per-iteration metrics with step = iteration
    hist = client.get_metric_history(sel["run_id"], "val/score")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5, 6]
    # status reads the folder back
    status = json.loads(run_cli("status", str(exp_dir), "--json").stdout)
    assert status["finished"] and len(status["trials"]) == 4
    assert sorted(t["status"] for t in status["trials"]) == [
        "culled",
        "culled",
        "finished",
        "finished",
    ]


@pytest.mark.parametrize("scheduler", ["asha", "optuna"])
def test_async_culls_stop_some_seeds(tmp_path: Path, scheduler: str) -> None:
    spec = _spec(tmp_path, name=scheduler, scheduler=scheduler, seeds=6, budget=8, at=2, keep=2)
    summary = cli_json("sweep", str(spec), "--storage", str(tmp_path / "res"))
    iters = [t["iterations"] for t in summary["trials"]]
    assert any(i < 8 for i in iters) and any(i == 8 for i in iters), iters
    _client, runs = _runs(summary)
    culled = [r for r in runs if "tunelab.culled_at" in r.data.tags]
    assert len(culled) == sum(i < 8 for i in iters)
    assert summary["selected"]["seed"] in [
        t["seed"] for t in summary["trials"] if t["iterations"] == 8
    ]


def test_retention_keeps_last_n_by_iteration(tmp_path: Path) -> None:
    spec = _spec(tmp_path, name="keep", seeds=2, keep=1, budget=12, at=0.25, ckpt_keep=2)
    summary = cli_json("sweep", str(spec), "--storage", str(tmp_path / "res"))
    winner = next(t for t in summary["trials"] if t["status"] == "finished")
    trial_dir = Path(summary["experiment_dir"]) / "tune" / f"trial_{winner['trial_id']}"
    from tunelab import load_state, sorted_checkpoints

    kept = sorted_checkpoints(trial_dir)
    assert len(kept) == 2
    assert [load_state(p, restore_rng=False)["iteration"] for p in kept] == [11, 12]


def test_failures_past_the_budget_exit_1(tmp_path: Path) -> None:
    spec = _spec(tmp_path, name="fail", extra=", fail_at: 2", seeds=2, keep=1, retries=0)
    proc = run_cli("sweep", str(spec), "--storage", str(tmp_path / "res"), "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["failed"] == 2 and summary["selected"] is None
    assert "failed" in proc.stderr
