"""What each experiment kind plans, read offline (no Ray): the trial count progress shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TOY
from tunelab import parse_spec
from tunelab.kinds import get_kind
from tunelab.layout import ExperimentLayout

BASE = {"name": "plan", "family": TOY, "budget": 2, "metric": {"name": "val/score", "mode": "max"}}


def _total(raw: dict, tmp_path: Path) -> int | None:
    spec = parse_spec({**BASE, **raw}, source="spec.yaml")
    return get_kind(spec.kind)(spec, ExperimentLayout(tmp_path)).total_trials()


@pytest.mark.parametrize(
    ("raw", "total"),
    [
        # a seed cull runs one trial per seed
        (
            {
                "kind": "seed_cull",
                "seeds": 3,
                "cull": {"at": 1, "keep": 1},
                "select": {"metric": "val/score", "mode": "max"},
            },
            3,
        ),
        # a sweep runs seeds x samples x grid points (a 2-point grid is 2 trials per sample)
        (
            {"kind": "sweep", "seeds": 2, "num_samples": 3, "search": {"lr": {"grid": [0.1, 0.2]}}},
            12,
        ),
        ({"kind": "sweep", "seeds": 1, "search": {"lr": {"uniform": [0.1, 0.2]}}}, 1),
    ],
)
def test_total_trials_counts_grid_points_and_samples(raw: dict, total: int, tmp_path: Path) -> None:
    assert _total(raw, tmp_path) == total


def test_a_lever_ab_decides_its_trials_as_the_looks_go(tmp_path: Path) -> None:
    raw = {
        "kind": "lever_ab",
        "seeds": 4,
        "control": {},
        "levers": {"big": {"lr": 0.2}},
        "decision": {"min_effect": 0.01},
    }
    assert _total(raw, tmp_path) is None
