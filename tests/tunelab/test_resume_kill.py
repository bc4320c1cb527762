"""A driver killed with SIGKILL mid-sweep resumes to the same final state."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import TOY, cli_json, start_cli, write_spec

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


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("straight")
    spec = write_spec(tmp / "kill.yaml", SPEC)
    return spec, cli_json("sweep", str(spec), "--storage", str(tmp / "res"))


# SIGTERM / SIGINT stops and their resume are test_interrupt.py's (every moment of a cull)
@pytest.mark.parametrize("sig", [signal.SIGKILL], ids=["sigkill"])
def test_stopped_driver_resumes_to_the_same_selection(
    tmp_path: Path, straight: tuple[Path, dict], sig: signal.Signals
) -> None:
    spec, straight_summary = straight
    storage = tmp_path / "killed"
    proc = start_cli("sweep", str(spec), "--storage", str(storage), "--json", logs=tmp_path)
    deadline = time.monotonic() + 300
    cull_file = None
    while time.monotonic() < deadline:  # kill once the cull has begun: some seeds paused at it
        found = list(storage.glob("*/tunelab_cull.json"))
        if found and len(json.loads(found[0].read_text())["arrived"]) >= 2:
            cull_file = found[0]
            break
        time.sleep(0.2)
    assert cull_file is not None, "the sweep never reached the cull"
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    exp_dir = cull_file.parent
    assert not (exp_dir / "summary.json").exists()
    if sig == signal.SIGTERM:  # graceful: state saved, told how to resume, nothing finalized
        assert proc.returncode == 130, err[-2000:]
        assert f"platform resume {exp_dir}" in err and out == ""

    resumed = cli_json("resume", str(exp_dir))
    assert resumed["selected"]["seed"] == straight_summary["selected"]["seed"]
    assert resumed["selected"]["value"] == straight_summary["selected"]["value"]  # bit-exact
    assert _final(resumed) == _final(straight_summary)
    # every trial kept (or got) its MLflow run, and the cull decision file is the resumed one
    assert all(t["run_id"] for t in resumed["trials"])
    cull = json.loads(cull_file.read_text())
    assert cull["survivors"] is not None and len(cull["arrived"]) == 4
    assert (
        resumed["parent_run_id"]
        == json.loads((exp_dir / "tunelab.json").read_text())["parent_run_id"]
    )
