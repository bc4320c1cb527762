"""bench/gpu_check.py: its CPU smoke run, in a process tree where ray and mlflow cannot be imported.

The check must run on a bare GPU node (torch, numpy, scipy, pydantic, pyyaml,
soundfile and the project, no Ray or MLflow). A ``sitecustomize`` on
``PYTHONPATH`` puts an import hook in every process of the run (the DDP
workers too) that refuses ``ray`` and ``mlflow`` and logs each attempt with
its stack, so an import that a ``try``/``except`` would swallow still fails
the test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import generous

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ("families", "rollout", "rk4", "health", "ddp")
FAMILIES = ("ouroboros", "flow_policy", "recursive_reasoner", "cascade_mixer")
#: The quick run takes ~11 s on a quiet 2-core machine (45 s beside a load of 14).
QUICK_SECONDS = 20.0

BLOCKER = """
import os
import sys
import traceback


class _RefuseRayAndMlflow:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in ("ray", "mlflow"):
            return None
        with open(os.environ["GPU_CHECK_BLOCKED_LOG"], "a") as log:
            log.write(f"import {name} in pid {os.getpid()}:\\n")
            log.write("".join(traceback.format_stack()[:-1]) + "\\n")
        raise ImportError(f"{name} is refused: bench/gpu_check.py must run without it")


sys.meta_path.insert(0, _RefuseRayAndMlflow())
"""


@dataclass(frozen=True)
class Run:
    proc: subprocess.CompletedProcess[str]
    seconds: float
    blocked: str  # the hook's log: every attempt to import ray or mlflow, with its stack
    figures: dict[str, Any]  # the --json output ({} when none was written)


def _run(tmp: Path, *args: str) -> Run:
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(BLOCKER)
    log = tmp / "blocked.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p),
        "GPU_CHECK_BLOCKED_LOG": str(log),
    }
    out = tmp / "figures.json"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(out)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - t0
    blocked = log.read_text() if log.exists() else ""
    figures = json.loads(out.read_text()) if out.exists() else {}
    return Run(proc, seconds, blocked, figures)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Run:
    # one torch thread: two would spin against each other and any other load on 2 cores
    return _run(
        tmp_path_factory.mktemp("gpu_check"), "--device", "cpu", "--quick", "--threads", "1"
    )


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


def test_quick_cpu_run_exits_0(quick: Run) -> None:
    # every section ran and none failed
    assert quick.proc.returncode == 0, quick.proc.stdout[-3000:] + quick.proc.stderr[-5000:]
    assert quick.figures["errors"] == {}


def test_quick_cpu_run_never_imports_ray_or_mlflow(quick: Run) -> None:
    # not even an attempt that an except clause swallowed (the log holds each one's stack)
    assert quick.blocked == "", quick.blocked


def test_quick_cpu_run_is_fast(quick: Run) -> None:
    # the smoke run stays a smoke run: CI's budget is tight
    assert quick.seconds < generous(QUICK_SECONDS), f"{quick.seconds:.1f} s"


@pytest.mark.parametrize("section", SECTIONS)
def test_every_section_has_finite_figures(quick: Run, section: str) -> None:
    # each section reports numbers, all finite (no section is skipped on the CPU)
    figures = quick.figures[section]
    assert "skipped" not in figures and "error" not in figures, figures
    numbers = _numbers(figures)
    assert numbers and all(math.isfinite(x) for x in numbers), figures


@pytest.mark.parametrize("family", FAMILIES)
def test_family_row_measures_the_cpu_and_says_why_not_cuda(quick: Run, family: str) -> None:
    # the CPU rate is measured; the CUDA-only figures carry the reason they are missing
    row = quick.figures["families"]["rows"][family]
    assert row["device"] == "cpu" and row["precision"] == "fp32"
    assert row["cpu"]["it_per_s"] > 0
    assert row["cuda"] == {"skipped": "--device cpu"}
    assert "speedup" not in row


def test_rows_cover_the_asked_comparisons(quick: Run) -> None:
    # rollout at K = 4 with its goal, RK4 both modes, monitor against bare, DDP replicas equal
    fig = quick.figures
    assert fig["rollout"]["K"] == 4 and fig["rollout"]["goal_ratio"] == pytest.approx(2.8)
    assert {r["mode"] for r in fig["rk4"]["rows"]} == {"fwd+bwd", "fwd"}
    assert all(r["max_abs_diff"] < 1e-4 for r in fig["rk4"]["rows"])
    assert {"bare_ms", "every1_ms", "every10_pct"} <= set(fig["health"]["rows"][0])
    ddp = fig["ddp"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 2
    assert ddp["max_diff_between_ranks"] == 0.0
    assert ddp["max_diff_vs_single"] < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_gpu_exits_2_with_the_way_out(tmp_path: Path) -> None:
    # --device cuda (the default) on a machine without CUDA: a clear message, exit 2, no figures
    run = _run(tmp_path)
    assert run.proc.returncode == 2, run.proc.stdout + run.proc.stderr
    assert "sees no CUDA device" in run.proc.stderr and "--device cpu" in run.proc.stderr
    assert run.figures == {} and run.blocked == ""
