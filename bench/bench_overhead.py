"""Platform overhead: the same training work bare vs inside a tunelab trial.

Measured side by side in one run (python bench/bench_overhead.py):

1. steady-state time per iteration of a family's ``train_iteration`` in a
   plain loop (bare) and inside a real tunelab trial on a local Ray (report +
   MLflow logging through the driver callback + a checkpoint every iteration);
   the ratio is the per-iteration overhead (goal: <= 2% at ~200 ms iterations);
2. one-time costs: Ray start, MLflow run creation, trial start with and
   without actor reuse (goal: <= 0.3 s with reuse).

The family's config is scaled so that one iteration takes about ``--target-ms``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)

from trainables.ouroboros import QUICK_CONFIG as OUROBOROS_QUICK  # noqa: E402
from tunelab import build_experiment  # noqa: E402

FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    # name: (family, base config, config key scaled to hit the target iteration time)
    # the quick size with a light validation, so that ~200 ms iterations are reachable
    "ouroboros": ("ouroboros", {**OUROBOROS_QUICK, "n_eval_windows": 2}, "steps_per_iter"),
    "toy": ("tests.tunelab.toy_family:FAMILY", {"hidden": 32}, "steps_per_iter"),
}


def bare_times(family: str, config: dict[str, Any], iters: int, data_root: Path) -> list[float]:
    """Per-iteration wall times of a plain loop (single torch thread, as in a 1-CPU trial)."""
    torch.set_num_threads(1)
    exp = build_experiment(family, config, 0, data_root)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        exp.train_iteration()
        out.append(time.perf_counter() - t0)
    return out


def calibrate(
    family: str, config: dict[str, Any], key: str, target_s: float, data_root: Path
) -> dict[str, Any]:
    """Scale ``config[key]`` so that one iteration takes about ``target_s``."""
    cfg = dict(config)
    from tunelab import get_family

    cfg.setdefault(key, getattr(get_family(family).make_config(cfg), key))
    for _ in range(4):
        t = statistics.median(bare_times(family, cfg, 4, data_root)[1:])
        cfg[key] = max(1, round(cfg[key] * target_s / t))
        if abs(t - target_s) / target_s < 0.15:
            break
    return cfg


def platform_run(family: str, config: dict[str, Any], iters: int, storage: Path) -> dict[str, Any]:
    """Run one trial through the real runner; per-iteration times from Tune's results."""
    spec = storage / "bench.yaml"
    spec.write_text(
        json.dumps(
            {
                "kind": "sweep",
                "name": "bench-overhead",
                "family": family,
                "config": config,
                "budget": iters,
                "metric": {"name": "train/loss", "mode": "min"},
                "search": {next(iter(config)): {"grid": [config[next(iter(config))]]}},
                "checkpoint": {"every": 1, "keep": 2},
            }
        )
    )
    from tunelab import run_experiment

    summary = run_experiment(spec, storage=storage, progress=False)
    trial = summary["trials"][0]
    exp_dir = Path(summary["experiment_dir"])
    rows = [
        json.loads(line)
        for line in (exp_dir / "tune" / f"trial_{trial['trial_id']}" / "result.json")
        .read_text()
        .splitlines()
    ]
    return {"rows": rows, "summary": summary}


def trial_start_times(reuse: bool, n: int, storage: Path) -> list[float]:
    """Gap between one trial's end and the next trial's first line of user code.

    Each trial takes every CPU, so trials run one after another and the gap is
    the whole cost of starting a trial (actor start or reuse, setup, restore).
    """
    from ray import tune

    def trainable(config: dict[str, Any]) -> None:
        t_first = time.time()
        time.sleep(0.05)
        tune.report({"iteration": 1, "t_first": t_first, "t_end": time.time()})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 2}),
        param_space={"i": tune.grid_search(list(range(n)))},
        tune_config=tune.TuneConfig(reuse_actors=reuse, max_concurrent_trials=1),
        run_config=tune.RunConfig(name=f"start-{reuse}", storage_path=str(storage), verbose=0),
    )
    grid = tuner.fit()
    rows = sorted((grid[i].metrics or {} for i in range(len(grid))), key=lambda m: m["t_first"])
    return [b["t_first"] - a["t_end"] for a, b in itertools.pairwise(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="ouroboros")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--target-ms", type=float, default=200.0)
    args = parser.parse_args()
    family, base, key = FAMILIES[args.family]
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        storage = Path(tmp)
        data_root = storage / "data"
        config = calibrate(family, base, key, args.target_ms / 1000, data_root)
        warm = 5

        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0

        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{storage / 'm.db'}")
        exp_id = client.create_experiment("bench")
        t0 = time.perf_counter()
        for _ in range(5):
            client.create_run(exp_id)
        mlflow_run = (time.perf_counter() - t0) / 5

        # bare runs in a Ray worker process too, so both sides run in the same kind of process
        bare_task = ray.remote(num_cpus=1)(bare_times)
        bare1 = ray.get(bare_task.remote(family, config, args.iters, data_root))[warm:]
        plat = platform_run(family, config, args.iters, storage)
        bare2 = ray.get(bare_task.remote(family, config, args.iters, data_root))[warm:]
        rows = plat["rows"][warm:]
        in_trial_work = [r["sys/iter_time_s"] for r in rows]
        per_iter = [r["time_this_iter_s"] for r in rows]
        ckpt = [r["sys/checkpoint_time_s"] for r in rows]
        reuse = trial_start_times(True, 6, storage)
        fresh = trial_start_times(False, 4, storage)
        ray.shutdown()

    bare = statistics.median(bare1 + bare2)
    plat_med = statistics.median(per_iter)
    work_med = statistics.median(in_trial_work)
    print(f"family {args.family}, config {config}")
    print(
        f"bare loop            : {bare * 1000:8.1f} ms/iteration (median of {len(bare1 + bare2)})"
    )
    print(
        f"in a tunelab trial   : {plat_med * 1000:8.1f} ms/iteration (report + MLflow + checkpoint every iteration)"
    )
    print(
        f"  of which training  : {work_med * 1000:8.1f} ms; checkpoint write {statistics.median(ckpt) * 1000:.1f} ms"
    )
    print(
        f"overhead per iteration: {100 * (plat_med / bare - 1):+.2f}% vs bare "
        f"({100 * (plat_med / work_med - 1):+.2f}% vs the same work measured inside the trial)"
    )
    print(
        f"one-time: ray start {ray_start:.2f} s, MLflow run creation {mlflow_run * 1000:.0f} ms, "
        f"trial start {statistics.median(reuse):.2f} s with actor reuse vs {statistics.median(fresh):.2f} s without"
    )


if __name__ == "__main__":
    main()
