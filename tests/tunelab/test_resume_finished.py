"""Resuming a finished experiment changes nothing (issue 13, item 2).

Before, ``platform resume`` on a finished seed cull trained the culled seeds
one more iteration, rewrote the seed table and the MLflow metrics, and exited 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from tests.conftest import TOY, cli_json, run_cli, write_spec
from tunelab.layout import ExperimentLayout

SPEC = f"""
kind: seed_cull
name: toy-resume-finished
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 20}}
seeds: 3
budget: 3
metric: {{name: val/score, mode: max}}
cull: {{at: 1, keep: 1, scheduler: sync}}
select: {{metric: val/score, mode: max}}
"""


def _snapshot(exp_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Every file of the folder (bytes) and every run's metric histories and tags."""
    files = {
        str(p.relative_to(exp_dir)): p.read_bytes()
        for p in sorted(exp_dir.rglob("*"))
        if p.is_file() and "tune" not in p.relative_to(exp_dir).parts[:1]
    }
    layout = ExperimentLayout(exp_dir)
    results = {k: len(v) for k, v in layout.trial_results().items()}
    client = MlflowClient(summary["tracking_uri"])
    runs = {}
    for t in summary["trials"]:
        run = client.get_run(t["run_id"])
        history = {
            key: [(m.step, m.value) for m in client.get_metric_history(t["run_id"], key)]
            for key in run.data.metrics
        }
        runs[t["run_id"]] = (run.info.status, run.data.tags, history)
    return {"files": files, "results": results, "runs": runs}


def test_resuming_a_finished_cull_changes_nothing(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", SPEC)
    summary = cli_json("sweep", str(spec), "--storage", str(tmp_path / "res"))
    exp_dir = Path(summary["experiment_dir"])
    assert any(t["status"] == "culled" for t in summary["trials"])
    before = _snapshot(exp_dir, summary)

    proc = run_cli("resume", str(exp_dir), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already finished" in proc.stderr and "Traceback" not in proc.stderr
    resumed = json.loads(proc.stdout)
    assert resumed["selected"] == json.loads(json.dumps(summary["selected"]))
    assert _snapshot(exp_dir, summary) == before
