"""`platform verdict` on tunelab's own lever A/B tables reproduces ``verdicts.json``.

A lever A/B's ``results.csv`` has ``round`` and ``stage`` columns (``look1``,
``look2``, ..., ``confirm``): confirmation rows never enter a verdict, each
round is analysed on its own, a lever decided at an early look is analysed on
that look's seeds, and the experiment's ``tunelab.json`` supplies the decision
settings not given on the command line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from tests.conftest import TOY, run_cli, write_spec
from tunelab.checkpoint import strict_json
from tunelab.kinds.lever_searcher import PairedLeverSearcher
from tunelab.names import ITERATION
from tunelab.spec import parse_spec

NUMBERS = ("verdict", "meaningful", "effect", "ci_low", "ci_high", "p_value", "n_pairs")


def _verdict(*args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(app, ["verdict", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(strict_json(obj)))


# -- one real lever A/B ------------------------------------------------------------------

REAL_SPEC = f"""
kind: lever_ab
name: toy-verdict-table
family: "{TOY}"
control: {{hidden: 8, steps_per_iter: 20, lr: 0.001}}
levers:
  fast: {{lr: 0.03}}
  wide: {{hidden: 12}}
seeds: [4, 1, 3, 2]
budget: 2
metric: {{name: val/log_mse, mode: min}}
guardrails: [{{name: train/loss, mode: min, margin: 1.0}}]
decision: {{min_effect: 0.2, alpha: 0.05, looks: [2, 4], correction: holm, confirm_seeds: [100]}}
failure: {{retries: 0, tolerate: 10}}
"""


@pytest.fixture(scope="module")
def lever_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of one small real lever A/B (looks 2, 4; a confirmation seed)."""
    tmp = tmp_path_factory.mktemp("lever")
    proc = run_cli(
        "sweep",
        str(write_spec(tmp / "lever.yaml", REAL_SPEC)),
        "--storage",
        str(tmp / "res"),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(json.loads(proc.stdout)["experiment_dir"])


@pytest.mark.slow
def test_verdict_on_a_lever_run_equals_verdicts_json(lever_run: Path) -> None:
    expected = json.loads((lever_run / "verdicts.json").read_text())
    table = pd.read_csv(lever_run / "results.csv")
    # The confirmation seed is in the table: more pairs than the looks plan (the old failure).
    assert (table["stage"] == "confirm").any()
    assert table[table.stage != "confirm"].seed.nunique() == 4
    # Through the real command line, settings from the experiment's tunelab.json.
    proc = run_cli("verdict", str(lever_run / "results.csv"), "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    final = max(r["round"] for r in expected)
    assert [(r["round"], r["lever"]) for r in got] == [(r["round"], r["lever"]) for r in expected]
    for g, e in zip(got, expected, strict=True):
        if e["round"] == final:
            assert {k: g[k] for k in NUMBERS} == {k: e[k] for k in NUMBERS}
    assert got == expected  # every figure, the look, the confirmation
    # Parquet and settings given explicitly (the spec's) give the same records.
    explicit = _verdict(
        str(lever_run / "results.parquet"),
        "--metric",
        "val/log_mse",
        "--mode",
        "min",
        "--min-effect",
        "0.2",
        "--looks",
        "2,4",
        "--guardrail",
        "train/loss:min:1.0",
        "--correction",
        "holm",
        "--round",
        str(final),
    )
    assert explicit == [e for e in expected if e["round"] == final]


@pytest.mark.slow
def test_verdict_on_a_copied_table_with_the_spec_settings(lever_run: Path, tmp_path: Path) -> None:
    """Away from its folder the table needs the settings; seeds are then taken look by look."""
    expected = json.loads((lever_run / "verdicts.json").read_text())
    copy = tmp_path / "results.csv"
    shutil.copy(lever_run / "results.csv", copy)
    result = CliRunner().invoke(app, ["verdict", str(copy), "--json"])
    assert result.exit_code == 2 and "--metric is required" in result.output
    got = _verdict(
        str(copy),
        "--metric",
        "val/log_mse",
        "--mode",
        "min",
        "--min-effect",
        "0.2",
        "--looks",
        "2,4",
        "--guardrail",
        "train/loss:min:1.0",
    )
    for g, e in zip(got, expected, strict=True):
        assert (g["lever"], g["verdict"], g["n_pairs"], g.get("confirmed")) == (
            e["lever"],
            e["verdict"],
            e["n_pairs"],
            e.get("confirmed"),
        )
        for key in ("effect", "ci_low", "ci_high", "p_value"):
            assert g[key] == pytest.approx(e[key], rel=1e-9)
    # The human table shows the round and the confirmation.
    shown = CliRunner().invoke(
        app,
        ["verdict", str(lever_run / "results.csv")],
        env={"COLUMNS": "200"},
    )
    assert shown.exit_code == 0, shown.output
    assert "round" in shown.output and "confirmed" in shown.output


# -- the searcher's decisions, offline (no Ray run) ---------------------------------------

SIM_SPEC = {
    "kind": "lever_ab",
    "name": "sim",
    "family": TOY,
    "control": {"hidden": 8},
    "levers": {"big": {"hidden": 16}, "small": {"lr": 0.02}, "broken": {"fail_at": 1}},
    "seeds": [6, 5, 4, 3, 2, 1],
    "budget": 2,
    "metric": {"name": "val/log_mse", "mode": "min"},
    "guardrails": [{"name": "train/loss", "mode": "min", "margin": 0.5}],
    "decision": {
        "min_effect": 0.1,
        "looks": [3, 6],
        "correction": "holm",
        "confirm_seeds": [100, 101],
    },
    "rounds": 2,
    "failure": {"tolerate": 100},
}


def _noise(*key: Any) -> float:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return float(np.random.default_rng(int.from_bytes(digest[:8], "little")).normal())


def _simulate(raw: dict[str, Any], folder: Path, effects: dict[str, float]) -> list[dict[str, Any]]:
    """Drive the real searcher with made-up metrics; write results.csv and tunelab.json.

    Returns the searcher's verdict records as ``verdicts.json`` holds them.
    """
    spec = parse_spec(raw)
    searcher = PairedLeverSearcher(spec, state_file=str(folder / "tunelab_lever.json"))
    rows = []
    for i in range(10_000):
        tid = f"t{i:05d}"
        planned = searcher.suggest(tid)
        if not isinstance(planned, dict):
            break
        arm, seed, rnd = planned["arm"], planned["seed"], planned["round"]
        crashed = arm == "broken" and seed == spec.seeds[1]
        value = 1.0 + 0.3 * _noise(seed) + 0.02 * _noise(rnd, arm, seed)
        value -= effects.get(arm, 0.0) * (rnd == 1 or arm != "big")
        loss = 0.5 + 0.01 * _noise("loss", rnd, arm, seed)
        result = {
            ITERATION: 1 if crashed else spec.budget,
            "val/log_mse": value,
            "train/loss": loss,
        }
        searcher.on_trial_complete(tid, result, error=crashed)
        rows.append(
            {
                "trial_id": tid,
                "run_id": f"run{i}",
                "seed": seed,
                "arm": arm,
                "round": rnd,
                "stage": planned["stage"],
                "status": "error" if crashed else "finished",
                "iterations": result[ITERATION],
                "val/log_mse": value,
                "train/loss": loss,
            }
        )
    assert searcher.state.finished
    table = pd.DataFrame(rows).sort_values(["seed", "trial_id"])  # as the driver writes it
    table.to_csv(folder / "results.csv", index=False)
    table.to_parquet(folder / "results.parquet", index=False)
    (folder / "tunelab.json").write_text(json.dumps({"spec": spec.model_dump(mode="json")}))
    records = sorted(searcher.state.verdicts.values(), key=lambda r: (r["round"], r["lever"]))
    return _plain(records)


def test_early_decisions_crashes_confirmation_and_rounds(tmp_path: Path) -> None:
    expected = _simulate(SIM_SPEC, tmp_path, {"big": 1.0, "small": 0.01})
    by_key = {(r["round"], r["lever"]): r for r in expected}
    # The cases this test is about happened: a win decided at the first look (fewer seeds),
    # a crashed lever, a confirmed win stacked into round 2.
    assert by_key[(1, "big")]["look_no"] == 1 and by_key[(1, "big")]["confirmed"]
    assert by_key[(1, "broken")]["verdict"] == "crashed"
    assert {r for r, _ in by_key} == {1, 2}
    assert _verdict(str(tmp_path / "results.csv")) == expected
    assert _verdict(str(tmp_path / "results.parquet"), "--round", "2") == [
        r for r in expected if r["round"] == 2
    ]


def test_fixed_n_single_lever_without_correction(tmp_path: Path) -> None:
    raw = {
        **SIM_SPEC,
        "levers": {"small": {"lr": 0.02}},
        "decision": {"min_effect": 0.05, "correction": "none", "confirm_seeds": [100]},
        "rounds": 1,
    }
    expected = _simulate(raw, tmp_path, {"small": 0.2})
    assert "look" not in expected[0] and "p_adjusted" not in expected[0]
    assert _verdict(str(tmp_path / "results.csv")) == expected


def test_bad_lever_tables_exit_2(tmp_path: Path) -> None:
    _simulate(SIM_SPEC, tmp_path, {"big": 1.0})
    path = tmp_path / "results.csv"
    result = CliRunner().invoke(app, ["verdict", str(path), "--round", "3"])
    assert result.exit_code == 2 and "no round 3" in result.output
    result = CliRunner().invoke(app, ["verdict", str(path), "--looks", "2,3"])
    assert result.exit_code == 2 and "plan at most 3" in result.output
    table = pd.read_csv(path)
    gap = table[~((table.arm == "small") & (table["round"] == 1) & (table.seed == 5))]
    gap.to_csv(path, index=False)
    result = CliRunner().invoke(app, ["verdict", str(path)])
    assert result.exit_code == 2 and "'small' has no rows for seeds [5]" in result.output
