"""Every kind with ``max_concurrent: 1`` ends, or is refused up front (issue 9, item 6).

A sync cull pauses every seed at the milestone and paused trials keep their
slots, so with fewer slots than seeds it would wait forever: it is refused
with exit 2. Every other kind runs to the end with one trial at a time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TOY, cli_json, run_cli, write_spec

pytestmark = pytest.mark.slow

SPECS = {
    "seed_cull_asha": f"""
kind: seed_cull
name: mc-asha
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 20}}
seeds: 3
budget: 4
metric: {{name: val/score, mode: max}}
cull: {{at: 2, keep: 1, scheduler: asha}}
select: {{metric: val/score, mode: max}}
max_concurrent: 1
""",
    "seed_cull_optuna": f"""
kind: seed_cull
name: mc-optuna
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 20}}
seeds: 3
budget: 4
metric: {{name: val/score, mode: max}}
cull: {{at: 2, keep: 1, scheduler: optuna}}
select: {{metric: val/score, mode: max}}
max_concurrent: 1
""",
    "sweep": f"""
kind: sweep
name: mc-sweep
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 20}}
budget: 3
metric: {{name: val/score, mode: max}}
search: {{lr: {{grid: [0.001, 0.01]}}}}
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
max_concurrent: 1
""",
    "lever_ab": f"""
kind: lever_ab
name: mc-lever
family: "{TOY}"
control: {{hidden: 8, steps_per_iter: 20, lr: 0.001}}
levers: {{fast: {{lr: 0.03}}}}
seeds: [1, 2, 3]
budget: 2
metric: {{name: val/log_mse, mode: min}}
decision: {{min_effect: 0.2}}
max_concurrent: 1
""",
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_kind_runs_to_the_end_one_trial_at_a_time(tmp_path: Path, name: str) -> None:
    spec = write_spec(tmp_path / f"{name}.yaml", SPECS[name])
    summary = cli_json("sweep", str(spec), "--storage", str(tmp_path / "res"), timeout=600)
    assert summary["trials"] and all(t["status"] != "error" for t in summary["trials"])
    assert not any(t["status"] in ("running", "paused", "pending") for t in summary["trials"])


def test_a_sync_cull_with_fewer_slots_than_seeds_is_refused(tmp_path: Path) -> None:
    text = SPECS["seed_cull_asha"].replace("scheduler: asha", "scheduler: sync")
    proc = run_cli("sweep", str(write_spec(tmp_path / "s.yaml", text)), "--storage", str(tmp_path))
    assert proc.returncode == 2
    assert "max_concurrent" in proc.stderr and "seeds" in proc.stderr
    assert not list(tmp_path.glob("*/tunelab.json"))  # nothing started
