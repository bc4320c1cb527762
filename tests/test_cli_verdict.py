"""`platform verdict` on any paired results table, through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from cli import _fmt, app


def _table(tmp: Path, suffix: str = ".csv") -> tuple[Path, pd.DataFrame]:
    rng = np.random.default_rng(7)
    seeds = np.arange(10)
    base = rng.normal(0.35, 0.014, 10)
    rows = []
    for s, b in zip(seeds, base, strict=True):
        rows.append({"seed": s, "arm": "control", "val/spike_l1": b, "val/flat_l1": 0.1 + b / 10})
        rows.append(
            {
                "seed": s,
                "arm": "lds",
                "val/spike_l1": b - 0.02 + rng.normal(0, 0.003),
                "val/flat_l1": 0.1 + b / 10,
            }
        )
        rows.append(
            {
                "seed": s,
                "arm": "noop",
                "val/spike_l1": b + rng.normal(0, 0.003),
                "val/flat_l1": 0.1 + b / 10,
            }
        )
    df = pd.DataFrame(rows)
    path = tmp / f"results{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path, index=False)
    return path, df


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_verdict_json_matches_scipy(tmp_path: Path, suffix: str) -> None:
    path, df = _table(tmp_path, suffix)
    args = [
        "verdict",
        str(path),
        "--metric",
        "val/spike_l1",
        "--mode",
        "min",
        "--min-effect",
        "0.01",
        "--guardrail",
        "val/flat_l1:min:0.005",
        "--correction",
        "none",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = {v["lever"]: v for v in json.loads(result.output)}
    keys = {
        "lever",
        "verdict",
        "meaningful",
        "effect",
        "ci_low",
        "ci_high",
        "p_value",
        "n_pairs",
        "dz",
        "rho",
        "guardrails",
    }
    assert keys <= set(out["lds"])
    c = df[df.arm == "control"].sort_values("seed")["val/spike_l1"].to_numpy()
    v = df[df.arm == "lds"].sort_values("seed")["val/spike_l1"].to_numpy()
    d = c - v  # min mode: positive = better
    assert out["lds"]["p_value"] == pytest.approx(stats.ttest_rel(c, v).pvalue, rel=1e-9)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert (out["lds"]["ci_low"], out["lds"]["ci_high"]) == pytest.approx((lo, hi), rel=1e-9)
    assert out["lds"]["verdict"] == "win" and out["lds"]["meaningful"]
    assert out["lds"]["guardrails"]["val/flat_l1"]["status"] == "pass"
    assert out["noop"]["verdict"] in ("null", "inconclusive")


def test_malformed_table_exits_2_naming_rows(tmp_path: Path) -> None:
    path, df = _table(tmp_path)
    df["val/spike_l1"] = df["val/spike_l1"].astype(object)
    df.loc[4, "val/spike_l1"] = "oops"
    df.to_csv(path, index=False)
    result = CliRunner().invoke(
        app, ["verdict", str(path), "--metric", "val/spike_l1", "--min-effect", "0.01"]
    )
    assert result.exit_code == 2
    assert str(path) in result.output and "5" in result.output  # 1-based data row


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--metric", "val/nope", "--min-effect", "0.01"], "val/nope"),
        (["--metric", "val/spike_l1", "--min-effect", "0"], "--min-effect"),
        (
            ["--metric", "val/spike_l1", "--min-effect", "0.01", "--guardrail", "val/flat_l1:up:1"],
            "val/flat_l1",
        ),
    ],
    ids=["missing-column", "min-effect-zero", "bad-guardrail"],
)
def test_bad_arguments_exit_2(tmp_path: Path, extra: list[str], needle: str) -> None:
    path, _ = _table(tmp_path)
    result = CliRunner().invoke(app, ["verdict", str(path), *extra])
    assert result.exit_code == 2 and needle in result.output


def test_the_table_shows_the_corrected_p_where_it_is(tmp_path: Path) -> None:
    path, _ = _table(tmp_path)
    base = ["verdict", str(path), "--metric", "val/spike_l1", "--mode", "min"]
    base += ["--min-effect", "0.01"]
    data = json.loads(CliRunner().invoke(app, [*base, "--correction", "holm", "--json"]).output)
    result = CliRunner().invoke(app, [*base, "--correction", "holm"])
    assert result.exit_code == 0, result.output
    assert "p (holm)" in result.output
    lds = next(v for v in data if v["lever"] == "lds")  # the smallest p: Holm multiplies it
    assert lds["p_adjusted"] == pytest.approx(2 * lds["p_value"])
    row = next(line for line in result.output.splitlines() if "lds" in line)
    assert _fmt(lds["p_adjusted"]) in row and _fmt(lds["p_value"]) not in row
