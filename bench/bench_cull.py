"""Cull efficiency: does the cull keep the seed that full training would pick, and at what cost?

On recorded learning curves of many seeds (``--record`` trains them once with
the family's own code and writes ``bench/data/<family>_curves.json``), this
replays random draws of ``--seeds`` seeds through tunelab's real schedulers
(SyncCullScheduler, Tune's ASHAScheduler, OptunaPrunerScheduler), driven with
the recorded results in a 2-worker event loop, and prints for each:

- P(pick is the full-budget best or within 1% of it), and
- compute used (iterations trained) as a fraction of training every seed fully.

Goal: P >= 0.9 at <= 45% of train-all compute.

    python bench/bench_cull.py --record --family ouroboros   # ~10 min on 2 cores
    python bench/bench_cull.py --family ouroboros
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES: dict[str, dict[str, Any]] = {
    "ouroboros": {
        "family": "ouroboros",
        "spec": ROOT / "search_spaces" / "seed_cull.yaml",
        "metric": "val/autonomy",
        "tie": "val/bounded_frac",
    },
    "toy": {
        "family": "tests.tunelab.toy_family:FAMILY",
        "config": {"hidden": 8, "steps_per_iter": 20},
        "metric": "val/score",
        "tie": "val/aux",
    },
}


# -- recording ----------------------------------------------------------------------------
def _record_one(args: tuple[str, dict[str, Any], int, int, str]) -> list[dict[str, float]]:
    family, config, seed, budget, data_root = args
    import torch

    torch.set_num_threads(1)
    from tunelab import build_experiment

    exp = build_experiment(family, config, seed, Path(data_root))
    return [exp.train_iteration() for _ in range(budget)]


def record(name: str, n_seeds: int, budget: int | None, out: Path) -> None:
    info = FAMILIES[name]
    config = dict(info.get("config", {}))
    if "spec" in info:
        from tunelab import load_spec

        spec = load_spec(info["spec"], quick=True)
        config, budget = dict(spec.config), budget or spec.budget
    budget = budget or 12
    data_root = str(ROOT / "tunelab_results" / "data")
    jobs = [(info["family"], config, s, budget, data_root) for s in range(n_seeds)]
    _record_one((*jobs[0][:2], 0, 1, data_root))  # generate shared data once before forking
    with mp.get_context("spawn").Pool(2) as pool:
        curves = pool.map(_record_one, jobs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"family": info["family"], "config": config, "budget": budget, "curves": curves})
    )
    print(f"recorded {n_seeds} seeds x {budget} iterations -> {out}")


def make_scheduler(
    kind: str, metric: str, tie: str, n: int, keep: int, milestone: int, budget: int
) -> Any:
    """The cull scheduler ``kind`` exactly as a seed cull spec builds it (tunelab's registry)."""
    from tunelab.schedulers import CullPlan, make_cull_scheduler

    plan = CullPlan(
        metric=metric,
        mode="max",
        milestone=milestone,
        keep=keep,
        n_trials=n,
        budget=budget,
        tie_break=tie,
    )
    return make_cull_scheduler(kind, plan)


from tunelab.schedulers import CULL_SCHEDULERS, replay_curves  # noqa: E402


def evaluate(
    data: dict[str, Any], metric: str, tie: str, n: int, keep: int, at: float, reps: int
) -> None:
    curves, budget = data["curves"], data["budget"]
    milestone = max(1, math.ceil(at * budget))
    rng = random.Random(0)
    draws = [rng.sample(range(len(curves)), n) for _ in range(reps)]
    print(
        f"{len(curves)} recorded seeds x {budget} iterations; draws of {n} seeds, keep {keep}, cull at {milestone}"
    )
    from scipy.stats import spearmanr

    at_cull = [c[milestone - 1][metric] for c in curves]
    final = [c[-1][metric] for c in curves]
    rho = spearmanr(at_cull, final)[0]
    print(f"rank correlation of {metric} at the cull ({milestone}) with the final value: {rho:.2f}")
    print(f"{'scheduler':>9} | P(pick within 1% of full-budget best) | compute vs train-all")
    for kind in sorted(CULL_SCHEDULERS):
        hits, used = 0, 0.0
        for draw in draws:
            sub = [curves[i] for i in draw]
            out = replay_curves(
                make_scheduler(kind, metric, tie, n, keep, milestone, budget), sub, budget
            )
            trained = sum(out.iterations)
            finished = [i for i, it in enumerate(out.iterations) if it >= budget]
            pick = max(finished, key=lambda i: sub[i][-1][metric]) if finished else -1
            best = max(c[-1][metric] for c in sub)
            value = sub[pick][-1][metric] if pick >= 0 else -math.inf
            hits += value >= best - 0.01 * abs(best)
            used += trained / (n * budget)
        print(f"{kind:>9} | {hits / reps:37.3f} | {used / reps:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="ouroboros")
    parser.add_argument("--record", action="store_true", help="train and record the curves first")
    parser.add_argument("--record-seeds", type=int, default=16)
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=8, help="seeds per simulated cull")
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--at", type=float, default=0.4)
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    path = ROOT / "bench" / "data" / f"{args.family}_curves.json"
    if args.record or not path.exists():
        record(args.family, args.record_seeds, args.budget, path)
    info = FAMILIES[args.family]
    evaluate(
        json.loads(path.read_text()),
        info["metric"],
        info["tie"],
        args.seeds,
        args.keep,
        args.at,
        args.reps,
    )


if __name__ == "__main__":
    main()
