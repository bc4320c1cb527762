"""Multi-worker trials (``resources.workers: 2``): Ray Train data parallelism inside Tune.

One sync cull of 3 seeds x 2 gloo workers, each worker holding 1 of the
machine's 2 CPUs: a trial holds every CPU, so a seed starts only once the
previous trial's workers were freed (paused at the cull, or culled). Seed 1's
rank-1 worker process is SIGKILLed once at iteration 2: the trial is retried
from its iteration-1 checkpoint. Every seed's per-iteration metrics must
equal one worker's on the same global batches (computed here, in-process)
within float summation order, the killed seed's included. Then a driver
killed with SIGKILL mid-run resumes to the straight run's numbers, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOY, cli_json, generous, start_cli, write_spec
from tunelab import build_experiment
from tunelab.layout import ExperimentLayout, read_result_lines

pytestmark = pytest.mark.slow

CONFIG = {"hidden": 8, "steps_per_iter": 20}
CRASH = {"crash_once_at": 2, "crash_seed": 1, "kill_rank": 1}
BUDGET = 4
ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}  # the dashboard: on for workers > 1


def _spec(seeds: str, kind: str = "seed_cull") -> str:
    config = {**CONFIG, **CRASH}
    if kind == "seed_cull":
        plan = "cull: {at: 0.5, keep: 1, scheduler: sync, tie_break: val/aux}\n"
        plan += "select: {metric: val/score, mode: max}"
    else:  # one trial of the same config
        plan = f"search: {{hidden: {{choice: [{config.pop('hidden')}]}}}}"
    body = ", ".join(f"{k}: {v}" for k, v in config.items())
    return f"""
kind: {kind}
name: toy-workers
family: "{TOY}"
config: {{{body}}}
seeds: {seeds}
budget: {BUDGET}
resources: {{cpu: 1, workers: 2}}
metric: {{name: val/score, mode: max}}
{plan}
"""


def _one_worker(seed: int, data_root: Path) -> list[dict[str, float]]:
    """The same seed trained in this process by one worker on the whole global batch."""
    exp = build_experiment(TOY, dict(CONFIG), seed, data_root)
    return [exp.train_iteration() for _ in range(BUDGET)]


def _rows(exp_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """seed -> its per-iteration results, the last report of each iteration (a retry repeats)."""
    layout = ExperimentLayout(exp_dir)
    out: dict[int, list[dict[str, Any]]] = {}
    for path in layout.trial_result_files():
        rows = read_result_lines(path)
        if rows:
            by_it = {int(r["iteration"]): r for r in rows}
            out[int(rows[-1]["config"]["seed"])] = [by_it[i] for i in sorted(by_it)]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("workers")
    spec = write_spec(tmp / "workers.yaml", _spec("3"))
    summary = cli_json("sweep", str(spec), "--storage", str(tmp / "res"), env=ENV)
    return summary, Path(summary["experiment_dir"])


def test_a_sync_cull_of_two_worker_trials_matches_one_worker_and_survives_a_killed_worker(
    straight: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    summary, exp_dir = straight
    status = {t["seed"]: t["status"] for t in summary["trials"]}
    assert sorted(status.values()) == ["culled", "culled", "finished"], status
    rows = _rows(exp_dir)
    assert {s: len(r) for s, r in rows.items()} == {
        s: BUDGET if status[s] == "finished" else 2 for s in status
    }
    # the killed worker: its trial failed (Tune kept the error) and was retried
    killed = next(t for t in summary["trials"] if t["seed"] == 1)
    assert (exp_dir.parent / "data" / "toy-crashed-seed1").exists()  # the kill happened
    error = (ExperimentLayout(exp_dir).trial_dir(killed["trial_id"]) / "error.txt").read_text()
    assert "worker" in error.lower() and killed["status"] == "culled"
    for seed, got in rows.items():
        ref = _one_worker(seed, tmp_path)
        for it, row in enumerate(got):
            for key in ("train/loss", "val/mse"):
                assert math.isclose(row[key], ref[it][key], rel_tol=1e-5, abs_tol=1e-7), (
                    seed,
                    it + 1,
                    key,
                    row[key],
                    ref[it][key],
                )
    # the survivor was trained by 2 workers (its manifest says so)
    manifests = list((exp_dir / "trial_artifacts").glob("*/manifest.json"))
    assert [json.loads(m.read_text())["workers"] for m in manifests] == [2]


def test_a_killed_driver_resumes_two_worker_trials_bit_exactly(
    straight: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    summary, exp_dir = straight
    seed = summary["selected"]["seed"]
    spec = write_spec(tmp_path / "one.yaml", _spec(f"[{seed}]", kind="sweep"))
    storage = tmp_path / "killed"
    proc = start_cli(
        "sweep", str(spec), "--storage", str(storage), "--json", logs=tmp_path, env=ENV
    )
    deadline = time.monotonic() + generous(120)
    while time.monotonic() < deadline and proc.poll() is None:  # past the cull's checkpoint
        if any(len(read_result_lines(p)) >= 3 for p in storage.glob("*/tune/*/result.json")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_dir = next(storage.glob("toy-workers-*"))
    assert not (killed_dir / "summary.json").exists()
    resumed = cli_json("resume", str(killed_dir), env=ENV)
    got, want = _rows(killed_dir)[seed], _rows(exp_dir)[seed]
    assert [r["val/mse"] for r in got] == [r["val/mse"] for r in want]  # bit for bit
    assert [r["train/loss"] for r in got] == [r["train/loss"] for r in want]
    assert resumed["best"]["value"] == summary["selected"]["value"]
