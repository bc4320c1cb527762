"""A driver killed with SIGKILL mid-sweep resumes to the same final state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TOY, cli_json, write_spec

pytestmark = pytest.mark.slow

SPEC = f"""
kind: seed_cull
name: toy-kill
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 300}}
seeds: 4
budget: 10
metric: {{name: val/score, mode: max}}
cull: {{at: 0.4, keep: 2, scheduler: sync, tie_break: val/aux}}
select: {{metric: val/score, mode: max}}
"""


def _final(summary: dict) -> dict:
    return {
        t["seed"]: (t["status"], t["iterations"], t["metrics"]["val/score"])
        for t in summary["trials"]
    }


def test_sigkill_then_resume_gives_the_same_selection(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "kill.yaml", SPEC)
    straight = cli_json("sweep", str(spec), "--storage", str(tmp_path / "straight"))

    storage = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "sweep", str(spec), "--storage", str(storage), "--json"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 300
    cull_file = None
    while time.monotonic() < deadline:  # kill once the cull has begun: some seeds paused at it
        found = list(storage.glob("*/tunelab_cull.json"))
        if found and len(json.loads(found[0].read_text())["arrived"]) >= 2:
            cull_file = found[0]
            break
        time.sleep(0.2)
    assert cull_file is not None, "the sweep never reached the cull"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    exp_dir = cull_file.parent
    assert not (exp_dir / "summary.json").exists()

    resumed = cli_json("resume", str(exp_dir))
    assert resumed["selected"]["seed"] == straight["selected"]["seed"]
    assert resumed["selected"]["value"] == straight["selected"]["value"]  # bit-exact training
    assert _final(resumed) == _final(straight)
    assert (
        resumed["parent_run_id"]
        == json.loads((exp_dir / "tunelab.json").read_text())["parent_run_id"]
    )
