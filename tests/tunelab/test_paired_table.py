"""Tests for tunelab.paired_table: loading, alignment by seed, malformed tables
named down to the row, and the verdict table the `platform verdict` CLI prints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from tunelab.paired_table import (
    TableError,
    load_paired_table,
    parse_guardrail,
    verdict_table,
)

HEADER = "seed,arm,val/l1,val/flat\n"


def _results(n: int = 10, levers: dict[str, float] | None = None, seed: int = 0) -> pd.DataFrame:
    """Seed-matched results: the shared per-seed level makes the arms correlated."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.35, 0.014, n)
    rows = []
    for arm, shift in {"control": 0.0, **(levers or {"lever_a": -0.01})}.items():
        for s, b in enumerate(base):
            rows.append(
                {
                    "seed": 1000 + s,
                    "arm": arm,
                    "val/l1": b + shift + rng.normal(0, 0.003),
                    "val/flat": 0.2 + rng.normal(0, 0.001),
                }
            )
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed)  # rows in any order


def _write(tmp_path: Path, text: str, name: str = "results.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_load_aligns_arms_by_seed(tmp_path: Path, suffix: str) -> None:
    df = _results()
    p = tmp_path / f"r{suffix}"
    df.to_csv(p, index=False) if suffix == ".csv" else df.to_parquet(p, index=False)
    t = load_paired_table(p, metric="val/l1", guardrails=["val/flat"])
    arm = t.levers["lever_a"]
    assert arm.seeds == t.seeds == tuple(range(1000, 1010))
    by = df.set_index(["seed", "arm"])
    for i, s in enumerate(arm.seeds):
        assert arm.control[i] == pytest.approx(by.loc[(s, "control"), "val/l1"])
        assert arm.variant[i] == pytest.approx(by.loc[(s, "lever_a"), "val/l1"])
        assert arm.guardrails["val/flat"][1][i] == pytest.approx(by.loc[(s, "lever_a"), "val/flat"])


def test_custom_control_name(tmp_path: Path) -> None:
    p = _write(tmp_path, HEADER + "1,base,1,0\n1,x,2,0\n2,base,1,0\n2,x,3,0\n")
    t = load_paired_table(p, metric="val/l1", control="base")
    assert list(t.levers) == ["x"]
    assert t.levers["x"].variant.tolist() == [2.0, 3.0]


@pytest.mark.parametrize("cell", ["", "nan", "NaN", "inf", "-inf"])
def test_non_finite_values_are_crashed_not_errors(tmp_path: Path, cell: str) -> None:
    body = "".join(f"{s},control,{s},0\n{s},x,{s + 1},0\n" for s in range(1, 7))
    body = body.replace("4,x,5,0", f"4,x,{cell},0")
    rows = verdict_table(
        _write(tmp_path, HEADER + body), metric="val/l1", mode="max", min_effect=0.1
    )
    assert rows[0]["verdict"] == "crashed"
    assert rows[0]["crashed_seeds"] == [4]


# ----------------------------------------------------------------------------
# Malformed tables: each names the file and the offending rows / columns
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        # missing metric column: say which exist
        ("seed,arm,val/other\n1,control,1\n", ["missing column(s) ['val/l1'", "val/other"]),
        # non-numeric values, rows 2 and 4
        (
            HEADER + "1,control,1,0\n1,x,oops,0\n2,control,1,0\n2,x,1..2,0\n",
            ["non-numeric", "'val/l1'", "data rows 2, 4", "'oops'"],
        ),
        # duplicate (seed, arm) at rows 1 and 3
        (HEADER + "1,control,1,0\n1,x,2,0\n1,control,1,0\n", ["duplicate", "data rows 1, 3"]),
        # lever seed without a control row: row 3
        (
            HEADER + "1,control,1,0\n1,x,2,0\n2,x,2,0\n",
            ["unpaired", "'x' has seeds [2]", "data row 3"],
        ),
        # control seed without a lever row: row 2
        (
            HEADER + "1,control,1,0\n2,control,1,0\n1,x,2,0\n",
            ["unpaired", "control seeds [2]", "data row 2", "no 'x' row"],
        ),
        (HEADER + "1,base,1,0\n1,x,2,0\n", ["no control arm 'control'", "['base', 'x']"]),
        (HEADER + "1,control,1,0\n2,control,1,0\n", ["no lever arm"]),
        (HEADER + "1,control,1,0\n,x,2,0\n", ["empty 'seed'", "data row 2"]),
        (HEADER + "1,control,1,0\n1,,2,0\n", ["empty 'arm'", "data row 2"]),
        (HEADER, ["no data rows"]),
        ('seed,arm,val/l1\n1,control,"1\n', ["cannot read"]),
    ],
)
def test_malformed_csv_names_rows(tmp_path: Path, text: str, fragments: list[str]) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(TableError) as err:
        load_paired_table(p, metric="val/l1")
    msg = str(err.value)
    assert str(p) in msg
    for fragment in fragments:
        assert fragment in msg


def test_unknown_file_type(tmp_path: Path) -> None:
    p = _write(tmp_path, HEADER, name="results.xlsx")
    with pytest.raises(TableError, match=r"unknown file type '\.xlsx'"):
        load_paired_table(p, metric="val/l1")


@pytest.mark.parametrize("name", ["missing.csv", "garbage.parquet"])
def test_unreadable_file(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    if name.startswith("garbage"):
        p.write_bytes(b"\x00not a parquet file")
    with pytest.raises(TableError, match="cannot read") as err:
        load_paired_table(p, metric="val/l1")
    assert str(p) in str(err.value)


def test_non_numeric_parquet_column_names_rows(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {"seed": [1, 1, 2, 2], "arm": ["control", "x"] * 2, "val/l1": ["1", "2", "1", "bad"]}
    )
    p = tmp_path / "r.parquet"
    df.to_parquet(p, index=False)
    with pytest.raises(TableError, match="data row 4"):
        load_paired_table(p, metric="val/l1")


# ----------------------------------------------------------------------------
# Guardrail strings and the verdict table
# ----------------------------------------------------------------------------


def test_parse_guardrail_keeps_colons_in_the_name() -> None:
    g = parse_guardrail("eval:val/flat:min:0.005")
    assert (g.name, g.mode, g.margin) == ("eval:val/flat", "min", 0.005)


@pytest.mark.parametrize(
    "spec",
    [
        "val/flat",
        "val/flat:min",
        "val/flat:up:0.1",
        "val/flat:min:abc",
        "val/flat:min:-1",
        ":min:0.1",
    ],
)
def test_bad_guardrail_string_is_named(tmp_path: Path, spec: str) -> None:
    p = tmp_path / "r.csv"
    _results().to_csv(p, index=False)
    with pytest.raises(TableError) as err:
        verdict_table(p, metric="val/l1", mode="min", min_effect=0.005, guardrails=[spec])
    assert repr(spec) in str(err.value)


def test_verdict_table_end_to_end(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    _results(n=10, levers={"good": -0.012, "same": 0.0, "bad": 0.015}).to_csv(p, index=False)
    rows = verdict_table(
        p, metric="val/l1", mode="min", min_effect=0.005, guardrails=["val/flat:min:0.01"]
    )
    json.dumps(rows, allow_nan=False)
    by = {r["lever"]: r for r in rows}
    assert (
        by["good"]["verdict"] == "win" and by["good"]["guardrails"]["val/flat"]["status"] == "pass"
    )
    assert by["bad"]["verdict"] == "negative"
    assert by["same"]["verdict"] in ("null", "inconclusive")
    expected = multipletests([r["p_value"] for r in rows], method="holm")[1]
    assert [r["p_adjusted"] for r in rows] == pytest.approx(list(expected))


def test_verdict_table_with_looks(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    _results(n=12, levers={"good": -0.02}).to_csv(p, index=False)
    rows = verdict_table(p, metric="val/l1", mode="min", min_effect=0.005, looks=(5, 10, 20))
    assert rows[0]["look"] in (1, 2) and rows[0]["verdict"] == "win"
    assert rows[0]["n_pairs"] == (5, 10)[rows[0]["look"] - 1]


def test_verdict_table_rejects_more_seeds_than_looks(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    _results(n=12).to_csv(p, index=False)
    with pytest.raises(TableError, match="12 paired seeds"):
        verdict_table(p, metric="val/l1", mode="min", min_effect=0.005, looks=(5, 10))
