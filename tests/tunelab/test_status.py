"""``platform status`` through the real CLI (issue 13, item 5).

A finished seed cull marks its selected seed and where each culled seed
stopped; a lever A/B shows each trial's arm, round and stage and its best per
arm; values are formatted (4 significant digits, NaN shown as ``nan``); an
interrupted seed cull lists the seeds Tune never created as ``pending``.
One small real run per experiment folder, shared by the tests of this module.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli import app
from tests.conftest import ROOT, TOY, cli_json, run_cli, write_spec
from tunelab.layout import ExperimentLayout

pytestmark = pytest.mark.slow

SEED_CULL = f"""
kind: seed_cull
name: toy-status-cull
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 20, nan_at: 1, nan_seed: 2}}
seeds: 3
budget: 3
metric: {{name: val/score, mode: max}}
cull: {{at: 2, keep: 1, scheduler: sync, tie_break: val/aux}}
select: {{metric: val/score, mode: max}}
"""

LEVER = f"""
kind: lever_ab
name: toy-status-levers
family: "{TOY}"
control: {{hidden: 8, steps_per_iter: 20, lr: 0.001}}
levers:
  fast: {{lr: 0.03}}
seeds: [1, 2]
budget: 1
metric: {{name: val/log_mse, mode: min}}
decision: {{min_effect: 0.2, alpha: 0.05, correction: none}}
"""

# seeds one at a time (max_concurrent 1): stopped at the first result, Tune has not created the rest
INTERRUPTED = f"""
kind: seed_cull
name: toy-status-stopped
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 300}}
seeds: 3
budget: 20
metric: {{name: val/score, mode: max}}
cull: {{at: 2, keep: 1, scheduler: asha}}
select: {{metric: val/score, mode: max}}
max_concurrent: 1
"""


def _status(exp_dir: Path) -> tuple[dict[str, Any], str]:
    """``platform status DIR --json`` (a fresh process) and the table ``platform status DIR`` prints.

    The table comes from the same command run in this process (typer's runner), which saves
    a process start and tunelab's imports per call.
    """
    info = json.loads(_ok(run_cli("status", str(exp_dir), "--json")).stdout)
    table = CliRunner().invoke(app, ["status", str(exp_dir)])
    assert table.exit_code == 0, table.output
    return info, table.stdout


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _row(table: str, *cells: str) -> str:
    """The one table line whose cells include ``cells`` (in that order)."""
    found = [
        line
        for line in table.splitlines()
        if line.startswith("│") and re.search(r"\s*│\s*".join(re.escape(c) for c in cells), line)
    ]
    assert len(found) == 1, (cells, table)
    return found[0]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│").split("│")]


@pytest.fixture(scope="module")
def seed_cull(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    tmp = tmp_path_factory.mktemp("cull")
    summary = cli_json(
        "sweep", str(write_spec(tmp / "s.yaml", SEED_CULL)), "--storage", str(tmp / "res")
    )
    info, table = _status(Path(summary["experiment_dir"]))
    return summary, info, table


@pytest.fixture(scope="module")
def lever(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    tmp = tmp_path_factory.mktemp("lever")
    summary = cli_json(
        "sweep", str(write_spec(tmp / "s.yaml", LEVER)), "--storage", str(tmp / "res")
    )
    info, table = _status(Path(summary["experiment_dir"]))
    return summary, info, table


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    tmp = tmp_path_factory.mktemp("stopped")
    spec, storage = write_spec(tmp / "s.yaml", INTERRUPTED), tmp / "res"
    err = tmp / "stderr"
    with (tmp / "stdout").open("w") as out_file, err.open("w") as err_file:
        proc = subprocess.Popen(  # files, not pipes: an unread pipe could block the driver
            [sys.executable, "-m", "cli", "sweep", str(spec), "--storage", str(storage)],
            cwd=ROOT,
            stdout=out_file,
            stderr=err_file,
            env=os.environ.copy(),
        )
        deadline = time.monotonic() + 300
        try:
            while not _reported(storage) and proc.poll() is None:
                assert time.monotonic() < deadline, "no trial reported"
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before it could be stopped"
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err.read_text()[-3000:]
    exp_dir = next(storage.glob("*/tunelab.json")).parent
    info, table = _status(exp_dir)
    return exp_dir, info, table


def _reported(storage: Path) -> bool:
    found = list(storage.glob("*/tunelab.json"))
    return bool(found) and bool(ExperimentLayout(found[0].parent).trial_results())


# -- seed cull ------------------------------------------------------------------------------


def test_a_finished_seed_cull_marks_the_selected_seed_and_where_culled_seeds_stopped(
    seed_cull: tuple[dict, dict, str],
) -> None:
    summary, info, table = seed_cull
    sel = summary["selected"]
    assert info["finished"] and info["kind"] == "seed_cull" and info["planned"] == 3
    assert (
        info["selected"]["seed"] == sel["seed"] and info["selected"]["trial_id"] == sel["trial_id"]
    )
    assert info["cull"]["at"] == 2 and info["cull"]["scheduler"] == "sync"
    by_seed = {t["seed"]: t for t in info["trials"]}
    assert sorted(by_seed) == [0, 1, 2]
    assert [s for s, t in by_seed.items() if t["selected"]] == [sel["seed"]]
    recorded = {t["seed"]: t for t in summary["trials"]}
    for seed, t in by_seed.items():
        assert (t["status"], t["iterations"]) == (
            recorded[seed]["status"],
            recorded[seed]["iterations"],
        )
        assert t["culled_at"] == (t["iterations"] if t["status"] == "culled" else None)
    culled = sorted(s for s, t in by_seed.items() if t["status"] == "culled")
    assert len(culled) == 2 and 2 in culled and all(by_seed[s]["culled_at"] == 2 for s in culled)
    # the table: a "culled at" and a "selected" column, and the cull line under it
    header = _cells(
        next(line for line in table.splitlines() if "┃ trial" in line).replace("┃", "│")
    )
    assert header[:6] == ["trial", "seed", "status", "iterations", "culled at", "val/score"]
    assert header[6:8] == ["best", "selected"]
    for seed, t in by_seed.items():
        cells = _cells(_row(table, t["trial_id"], str(seed)))
        assert cells[2] == t["status"] and cells[4] == ("2" if seed in culled else "-")
        assert cells[7] == ("yes" if seed == sel["seed"] else "")
    assert f"selected: seed {sel['seed']} (trial {sel['trial_id']}" in table
    assert "culled: " + ", ".join(f"seed {s} at 2" for s in culled) in table


def test_values_are_formatted_and_nan_is_shown(seed_cull: tuple[dict, dict, str]) -> None:
    _summary, info, table = seed_cull
    by_seed = {t["seed"]: t for t in info["trials"]}
    # seed 2 reports NaN (culled at the milestone): null in strict JSON, "nan" as text, a row like any other
    assert by_seed[2]["val/score"] is None and by_seed[2]["value_text"] == "nan"
    assert _cells(_row(table, by_seed[2]["trial_id"], "2"))[5] == "nan"
    for seed, t in by_seed.items():
        if seed == 2:
            continue
        value = t["val/score"]
        assert t["value_text"] == f"{value:.4g}"
        assert _cells(_row(table, t["trial_id"], str(seed)))[5] == t["value_text"]
    finite = [t["val/score"] for t in info["trials"] if t["val/score"] is not None]
    assert info["best"] == max(finite) and math.isfinite(info["best"])
    best = [t for t in info["trials"] if t["best"]]
    assert len(best) == 1 and best[0]["val/score"] == info["best"]
    assert f"best val/score (max): {info['best']:.4g} (seed {best[0]['seed']}" in table


# -- lever A/B ------------------------------------------------------------------------------


def test_a_lever_ab_shows_arms_and_the_best_per_arm(lever: tuple[dict, dict, str]) -> None:
    summary, info, table = lever
    assert info["placement"] == ["arm", "round", "stage"]
    want = {(t["arm"], t["round"], t["stage"], t["seed"]) for t in summary["trials"]}
    got = {(t["arm"], t["round"], t["stage"], t["seed"]) for t in info["trials"]}
    assert got == want and {a for a, *_ in got} == {"control", "fast"}
    assert all(t["trial_id"] and t["status"] == "finished" for t in info["trials"])
    # best per arm (min), never one best across arms
    assert info["best"] is None
    by_arm: dict[str, list[dict]] = {}
    for t in info["trials"]:
        by_arm.setdefault(t["arm"], []).append(t)
    assert [b["arm"] for b in info["best_by_arm"]] == ["control", "fast"]
    for b in info["best_by_arm"]:
        best = min(by_arm[b["arm"]], key=lambda t: t["val/log_mse"])
        assert (b["trial_id"], b["value"], b["round"]) == (best["trial_id"], best["val/log_mse"], 1)
        assert [t["trial_id"] for t in by_arm[b["arm"]] if t["best"]] == [b["trial_id"]]
        assert f"  round 1 {b['arm']}: {b['value_text']} (seed {b['seed']}" in table
    # the table carries arm, round and stage per trial
    for t in info["trials"]:
        cells = _cells(_row(table, t["trial_id"]))
        assert cells[1:6] == [t["arm"], "1", t["stage"], str(t["seed"]), "finished"]
        assert cells[7] == t["value_text"] == f"{t['val/log_mse']:.4g}"


# -- interrupted ----------------------------------------------------------------------------


def test_seeds_never_started_after_an_interruption_are_pending(
    interrupted: tuple[Path, dict, str],
) -> None:
    _exp_dir, info, table = interrupted
    assert not info["finished"] and info["selected"] is None and info["planned"] == 3
    # every seed of the spec is a row: the ones Tune created with their trial id, the others pending
    assert sorted(t["seed"] for t in info["trials"]) == [0, 1, 2]
    created = [t for t in info["trials"] if t["trial_id"]]
    waiting = [t for t in info["trials"] if t["trial_id"] is None]
    assert created and waiting, info["trials"]
    assert all(t["status"] == "pending" and t["iterations"] == 0 for t in waiting)
    assert all(t["val/score"] is None and t["value_text"] == "-" for t in waiting)
    assert all(t["run_id"] is None and not t["selected"] for t in waiting)
    assert info["counts"]["pending"] >= len(waiting)
    for t in waiting:
        cells = _cells(_row(table, "-", str(t["seed"]), "pending"))
        assert cells[3] == "0"
    seeds = ", ".join(str(t["seed"]) for t in waiting)
    assert f"not started: {len(waiting)} trial(s), seeds {seeds}" in table
    assert "selected: none yet (not finished)" in table and "finished: no" in table
    # trials Tune had started when the driver stopped are interrupted, never "running"
    assert (_exp_dir / "tunelab_stopped.json").is_file()
    started = [t for t in created if t["status"] not in ("finished", "culled")]
    assert started and all(t["status"] == "interrupted" for t in started), created


def test_a_stopped_driver_counts_what_is_left_as_status_does(
    interrupted: tuple[Path, dict, str],
) -> None:
    # Tune ends a trial stopped mid-run as TERMINATED, like a culled one: the driver's last
    # words count from the saved state instead, the way `platform status` does
    exp_dir, info, _table = interrupted
    stderr = (exp_dir.parents[1] / "stderr").read_text()
    left = {k: n for k, n in info["counts"].items() if n and k not in ("finished", "culled")}
    assert set(left) == {"interrupted", "pending"}, info["counts"]
    breakdown = ", ".join(f"{n} {k}" for k, n in left.items())
    assert f"interrupted with {sum(left.values())} trial(s) unfinished ({breakdown})" in stderr
    assert "all trials ended" not in stderr  # Tune's statuses during its stop are not shown
