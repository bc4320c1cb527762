"""Every shipped spec runs through the real CLI and Ray at a tiny budget (family smoke tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_json

pytestmark = pytest.mark.slow

SPECS = ROOT / "search_spaces"

# tiny budgets on top of each spec's quick block
TINY = {
    "sigma_ramp.yaml": ["--set", "num_samples=2", "--set", "budget=2"],
    "sigma_ramp_ab.yaml": ["--set", "budget=2", "--set", "seeds=[1, 2]"],
    "lever.yaml": [
        "--set",
        "budget=2",
        "--set",
        "seeds=[1, 2]",
        "--set",
        "decision.looks=null",
        "--set",
        "control.steps_per_iter=10",
    ],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_shipped_spec_smoke(tmp_path: Path, name: str) -> None:
    summary = cli_json(
        "sweep", str(SPECS / name), "--quick", *TINY[name], "--storage", str(tmp_path / "res")
    )
    assert summary["trials"] and all(t["status"] != "error" for t in summary["trials"])
    if summary["kind"] == "lever_ab":
        assert {v["lever"] for v in summary["verdicts"]} == set(
            t["arm"] for t in summary["trials"] if t["arm"] != "control"
        )
    else:
        assert summary["best"]["run_id"]
