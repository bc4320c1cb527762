"""RK4 rollout throughput: the fast path vs the naive eager loop, side by side.

Both integrate the same poly Ouroboros ODE (trainables/ouroboros.py) from the
same inputs in one run. "fwd+bwd" is a training step's rollout (forward and
backward); "fwd" is forward only under no_grad (what closed-loop generation
pays). Samples/s = batch * horizon / seconds (best of --repeats). Goal: >= 2x.

    python bench/bench_rk4.py [--batch 16] [--horizons 256 512 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from trainables.ouroboros import Config, PolyOuroboros, poly_terms, rk4_rollout, rk4_rollout_naive


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_horizon(batch: int, horizon: int, degree: int, repeats: int) -> list[str]:
    """Time naive vs fast on one set of random drives; returns printable rows."""
    terms = poly_terms(degree, keep_const=False)
    model = PolyOuroboros(Config(sample_rate=8000, hidden=8, poly_degree=degree, osc_init=False))
    omega = (0.3 + 0.3 * torch.rand(batch, horizon)).requires_grad_()
    gamma = (-0.02 + 0.02 * torch.randn(batch, horizon)).requires_grad_()
    w = (0.2 * torch.randn(batch, horizon, len(terms))).requires_grad_()
    x0, v0 = 0.1 * torch.randn(batch), 0.1 * torch.randn(batch)

    def naive() -> torch.Tensor:
        return rk4_rollout_naive(x0, v0, omega, gamma, w, terms, 1.0, 1.0)

    def fast() -> torch.Tensor:
        return rk4_rollout(x0, v0, model.coefficients(omega, gamma, w), degree, 1.0, 1.0)

    with torch.no_grad():
        diff = float((naive() - fast()).abs().max())
    runs = {
        "fwd+bwd": (lambda: naive().sum().backward(), lambda: fast().sum().backward()),
        "fwd": (torch.no_grad()(naive), torch.no_grad()(fast)),
    }
    rows = []
    for mode, (slow_fn, fast_fn) in runs.items():
        t_naive = _best_seconds(slow_fn, repeats)
        t_fast = _best_seconds(fast_fn, repeats)
        n = batch * horizon
        rows.append(
            f"{horizon:>6} {mode:>9} {n / t_naive:>13,.0f} {n / t_fast:>12,.0f} "
            f"{t_naive / t_fast:>6.1f}x  {diff:.1e}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="RK4 rollout: fast vs naive samples/s")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--horizons", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--degree", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"batch={args.batch} degree={args.degree} threads=1 (best of {args.repeats})")
    print(f"{'H':>6} {'mode':>9} {'naive samp/s':>13} {'fast samp/s':>12} {'ratio':>7}  max|dx|")
    for h in args.horizons:
        for row in bench_horizon(args.batch, h, args.degree, args.repeats):
            print(row)


if __name__ == "__main__":
    main()
