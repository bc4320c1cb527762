"""parallel_fixed vs serial_act: training batches per second at K = 4, side by side.

Both rollouts train copies of one model init on the same mazes with the same noise, in
alternating rounds so machine load hits both alike. One "step" is one training batch of
B mazes x K trajectories x halt_max_steps segments (one optimizer step per segment).
Goal (shared/FAMILIES.md, recursive_reasoner): parallel_fixed >= 0.7 * K times faster.

The first row uses the quick config's batch size and is the headline ratio. The later rows
use smaller batches: on a CPU a B*K batch is compute-bound, so stacking the K trajectories
mostly saves per-call overhead, which dominates only when B is small (on a GPU the stacked
batch also fills the device).

    python bench/bench_rollout.py                 # ~1 minute on one CPU core
    python bench/bench_rollout.py --batch-sizes 32 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from trainables.recursive_reasoner import (
    FAMILY,
    QUICK_CONFIG,
    Config,
    MazeData,
    RecursiveReasoner,
    TrajectoryNoise,
    load_or_generate_mazes,
    train_batch,
    trajectory_noise,
)
from tunelab.health import HealthMonitor

ROLLOUTS = ("parallel_fixed", "serial_act")


def bench(config: Config, data: MazeData, rounds: int, steps: int) -> dict[str, float]:
    """Steps/s of each rollout on ``steps`` fixed batches, timed over ``rounds`` rounds."""
    generator = torch.Generator().manual_seed(0)
    batches: list[tuple[torch.Tensor, torch.Tensor, TrajectoryNoise]] = []
    for i in range(steps):
        idx = torch.arange(i * config.batch_size, (i + 1) * config.batch_size) % config.n_train
        # step far past any ramp: the full noise band
        noise = trajectory_noise(config, step=10**6, batch=idx.numel(), generator=generator)
        batches.append((data.train_tokens[idx], data.train_labels[idx], noise))
    torch.manual_seed(0)
    init = RecursiveReasoner(config)
    runners = {}
    for rollout in ROLLOUTS:
        model = copy.deepcopy(init)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
        runners[rollout] = (model, HealthMonitor(model, opt, clip=config.grad_clip))

    def run(rollout: str) -> None:
        model, health = runners[rollout]
        for tok, lab, noise in batches:
            train_batch(
                model,
                health,
                tok,
                lab,
                noise,
                rollout=rollout,  # type: ignore[arg-type]
                halt_max_steps=config.halt_max_steps,
                act=config.act,
            )

    for rollout in ROLLOUTS:  # warm-up (allocator, oneDNN kernels)
        run(rollout)
    elapsed = dict.fromkeys(ROLLOUTS, 0.0)
    for r in range(rounds):
        for rollout in ROLLOUTS if r % 2 == 0 else ROLLOUTS[::-1]:
            t0 = time.perf_counter()
            run(rollout)
            elapsed[rollout] += time.perf_counter() - t0
    return {k: rounds * steps / v for k, v in elapsed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--K", type=int, default=4, help="trajectories per maze")
    parser.add_argument(
        "--batch-sizes",
        default=f"{QUICK_CONFIG['batch_size']},4",
        help="comma-separated B values; the first is the headline",
    )
    parser.add_argument("--rounds", type=int, default=6, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="training batches per round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    goal = 0.7 * args.K
    with tempfile.TemporaryDirectory() as tmp:
        for i, b in enumerate(int(s) for s in args.batch_sizes.split(",")):
            # act=True: serial_act runs its halting checks; the halting head starts at
            # bias -5, so no trajectory halts early and both rollouts do the same work.
            config = FAMILY.make_config(
                {**QUICK_CONFIG, "K": args.K, "batch_size": b, "n_train": 256, "n_test": 8}
                | {"act": True, "loss_mode": "multi_perturbed_ce"}
            )
            if i == 0:
                print(
                    f"maze {config.maze_size}x{config.maze_size}, K={args.K}, "
                    f"hidden={config.hidden}, n_layers={config.n_layers}, "
                    f"H x L = {config.H_cycles} x {config.L_cycles}, "
                    f"segments={config.halt_max_steps}, threads={args.threads}"
                )
            rate = bench(config, load_or_generate_mazes(config, Path(tmp)), args.rounds, args.steps)
            ratio = rate["parallel_fixed"] / rate["serial_act"]
            print(
                f"B={b:>3}: parallel_fixed {rate['parallel_fixed']:6.2f} steps/s, "
                f"serial_act {rate['serial_act']:6.2f} steps/s -> ratio {ratio:.2f}x "
                f"({'meets' if ratio >= goal else 'below'} goal {goal:.1f}x)"
                + ("  [headline]" if i == 0 else ""),
                flush=True,
            )


if __name__ == "__main__":
    main()
