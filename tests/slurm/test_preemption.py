"""A sweep whose driver runs in a SLURM job survives the job's end-of-job warning.

The head job (tunelab.slurm.render_head_job: Ray head and driver in one
allocation) gets SIGTERM in its batch shell, as `#SBATCH --signal=B:TERM@<grace>`
sends it; the shell forwards it to the driver, whose running trials checkpoint,
and the driver exits 130. `platform resume` then reaches the final state of an
uninterrupted run of the same spec. (A worker job's warning, with a Ray cluster
of `ray up`: test_ray_up.py, test_preempted_worker_trial_is_retried_*.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TOY, cli_json, generous, wait_for, write_spec
from tests.slurm.conftest import CLUSTER_YAML, ci_site
from tunelab.layout import ExperimentLayout
from tunelab.slurm import (
    SlurmNodeProvider,
    load_cluster_config,
    render_head_job,
    stop_cluster_processes,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
WORKER = "a100x1"
# Long enough for every running trial to end its iteration and checkpoint on a busy
# machine; the driver stops as soon as they have, so it costs nothing when all goes well.
GRACE_S = 60
# Iterations of 0.2-1 s. Trials checkpoint only at the cull's milestone (6) and at the
# end (checkpoint.every = budget): a checkpoint between is the one the warning asked for.
BUDGET = 8
SPEC = f"""
kind: seed_cull
name: toy-preempt
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 400}}
seeds: 2
budget: {BUDGET}
metric: {{name: val/score, mode: max}}
cull: {{at: 0.75, keep: 1, scheduler: sync, tie_break: val/aux}}
select: {{metric: val/score, mode: max}}
checkpoint: {{every: {BUDGET}}}
"""


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return write_spec(tmp_path / "preempt.yaml", SPEC)


@pytest.fixture
def straight_run(spec: Path, tmp_path: Path) -> Iterator[Callable[[], dict[str, Any]]]:
    """An uninterrupted `platform sweep` of the spec, started at once in the background
    (beside the SLURM job); call the result for its summary."""
    folder = tmp_path / "straight"
    folder.mkdir()
    with (folder / "stdout").open("w") as out, (folder / "stderr").open("w") as err:
        argv = ["sweep", str(spec), "--storage", str(folder / "res"), "--json"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *argv],
            cwd=ROOT,
            stdout=out,
            stderr=err,
            env=os.environ.copy(),
        )

    def summary() -> dict[str, Any]:
        proc.wait(timeout=generous(120))
        out, err = (folder / "stdout").read_text(), (folder / "stderr").read_text()
        assert proc.returncode == 0, f"exit {proc.returncode}\nSTDERR:\n{err[-4000:]}"
        return json.loads(out)

    yield summary
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_warned_driver_job_checkpoints_exits_130_and_resumes_to_the_straight_run(
    slurm: Path, spec: Path, straight_run: Callable[[], dict[str, Any]], tmp_path: Path
) -> None:
    # SIGTERM to the head job's batch shell (scancel --batch: what --signal=B:TERM@<grace>
    # sends) while trials run: the driver saves them, exits 130; resume = straight run
    # the cluster of one allocation: 2 CPUs (both seeds at once), no MLflow server (the
    # sweep's own store in its storage, which the resume outside the job reads)
    site = {**ci_site(tmp_path), "a100x1_cpus": 2, "mlflow_port": None, "preempt_grace_s": GRACE_S}
    config = SlurmNodeProvider.bootstrap_config(load_cluster_config(CLUSTER_YAML, site=site))
    storage = tmp_path / "job_results"
    script = render_head_job(
        config,
        node_type=WORKER,
        nodes=1,
        command=f"platform sweep {spec} --storage {storage} --json",
    )
    assert f"#SBATCH --signal=B:TERM@{GRACE_S}" in script
    assert f"export TUNELAB_PREEMPT_GRACE_S={GRACE_S}" in script
    (tmp_path / "head.sbatch").write_text(script)
    job = subprocess.run(
        ["sbatch", "--parsable", str(tmp_path / "head.sbatch")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    provider = config["provider"]
    try:
        # both seeds run (2 CPUs) and have reported (before the cull, most of the time)
        wait_for(lambda: _both_running(storage), 180, f"trials to run (job {job})")
        signalled = time.monotonic()
        subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True)
        wait_for(lambda: job not in _squeue(), 120, f"the job to end (job {job})")
        job_s = time.monotonic() - signalled
    finally:
        subprocess.run(["scancel", job], check=False)
        stop_cluster_processes(provider["ray_temp_dir"], provider["gcs_port"])
        shutil.rmtree(provider["ray_temp_dir"], ignore_errors=True)
    log = _job_log(provider["state_dir"], job)
    assert _exit_code(job) == "130:0", log[-4000:]
    exp_dir = next(storage.glob("*/tunelab.json")).parent
    assert f"platform resume {exp_dir}" in log, log[-4000:]
    stopped = json.loads(ExperimentLayout(exp_dir).stopped_file.read_text())
    preemption = stopped["preemption"]
    assert preemption["grace_s"] == GRACE_S
    assert preemption["trials_checkpointed"] >= 1
    took = preemption["all_checkpointed_s"]
    assert took is not None and took < GRACE_S, log[-4000:]
    assert re.search(r"preemption: \d+ running trial\(s\) checkpointed in [\d.]+ s", log)
    print(
        f"\npreemption: signal -> all running trials checkpointed {took:.2f} s "
        f"({preemption['trials_checkpointed']} trial(s)); signal -> job ended {job_s:.1f} s"
    )

    resumed = cli_json("resume", str(exp_dir))
    straight_summary = straight_run()
    assert resumed["selected"]["seed"] == straight_summary["selected"]["seed"]
    assert resumed["selected"]["value"] == straight_summary["selected"]["value"]  # bit-exact
    assert _final(resumed) == _final(straight_summary)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _both_running(storage: Path) -> bool:
    """Both trials of the (only) experiment under `storage` reported, neither its last result."""
    found = list(storage.glob("*/tunelab.json"))
    if not found:
        return False
    counts = [len(r) for r in ExperimentLayout(found[0].parent).trial_results().values()]
    return len(counts) == 2 and min(counts) >= 1 and max(counts) < BUDGET


def _squeue() -> list[str]:
    return subprocess.run(
        ["squeue", "-h", "-o", "%i"], check=True, capture_output=True, text=True
    ).stdout.split()


def _exit_code(job: str) -> str:
    """`ExitCode=<status>:<signal>` of an ended job (slurmctld keeps it MinJobAge seconds)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job], check=True, capture_output=True, text=True
    ).stdout
    found = re.search(r"\bExitCode=(\S+)", out)
    return found.group(1) if found else out


def _job_log(state_dir: str, job: str) -> str:
    logs = list(Path(state_dir, "logs").glob(f"*-{job}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no job log)"


def _final(summary: dict[str, Any]) -> dict[int, tuple[str, int, float]]:
    return {
        t["seed"]: (t["status"], t["iterations"], t["metrics"]["val/score"])
        for t in summary["trials"]
    }
