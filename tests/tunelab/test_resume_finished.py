"""A finished seed cull through the real CLI, without a terminal (issue 13, items 2 and 3).

- Progress: where stderr is no terminal (sbatch, nohup, a log file), plain
  lines tell trial starts, the cull point, culls and ends.
- Resuming a finished experiment changes nothing. Before, ``platform resume``
  on a finished seed cull trained the culled seeds one more iteration, rewrote
  the seed table and the MLflow metrics, and exited 0.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.conftest import TOY, run_cli, write_spec
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


@pytest.fixture(scope="module")
def finished(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict]:
    tmp = tmp_path_factory.mktemp("finished")
    spec = write_spec(tmp / "s.yaml", SPEC)
    proc = run_cli("sweep", str(spec), "--storage", str(tmp / "res"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(proc.stdout)


def test_progress_without_a_terminal_is_plain_lines(
    finished: tuple[subprocess.CompletedProcess[str], dict],
) -> None:
    proc, summary = finished
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[tunelab +")]
    assert all(re.match(r"\[tunelab \+\d\d:\d\d\] \S", ln) for ln in lines)
    text = "\n".join(lines)
    assert "started: 3 trial(s), budget 3 iteration(s)" in text
    for t in summary["trials"]:
        who = f"trial {t['trial_id']} (seed {t['seed']})"
        assert f"{who} started" in text
        assert f"{who} reached iteration 1: val/score" in text  # the cull point
        if t["status"] == "culled":
            assert f"{who} culled at iteration 1: val/score" in text
        else:
            value = f"{t['metrics']['val/score']:.4g}"
            assert f"{who} finished at iteration 3: val/score {value}" in text
    assert lines[-1].split("] ", 1)[1].startswith("all trials ended: ")
    assert "culled 2" in lines[-1] and "finished 1" in lines[-1]


def test_resuming_a_finished_cull_changes_nothing(
    finished: tuple[subprocess.CompletedProcess[str], dict],
) -> None:
    _, summary = finished
    exp_dir = Path(summary["experiment_dir"])
    assert any(t["status"] == "culled" for t in summary["trials"])
    before = _snapshot(exp_dir, summary)

    proc = run_cli("resume", str(exp_dir), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already finished" in proc.stderr and "Traceback" not in proc.stderr
    resumed = json.loads(proc.stdout)
    assert resumed["selected"] == summary["selected"]
    assert _snapshot(exp_dir, summary) == before
