"""HealthMonitor cost per optimizer step against the bare step, side by side in one run.

The bare step is the loop families write by hand today::

    opt.zero_grad(set_to_none=True); loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip); opt.step()
    float(loss); float(norm)

The monitored step is ``HealthMonitor.step(terms, weights)`` over the same model,
optimizer (AdamW), batches, seed and clip: three named loss terms (``mse``, a
weighted ``l2`` on the weights and a weighted ``act`` penalty on the output),
a residual MLP of 8 top-level layers (input, 6 blocks, head: 8 per-layer norms)
and one activation watch, with ``end_iteration`` once per round (one round is
one "iteration" of 10 steps). Two monitor settings:

- ``every1``: parameter check and update ratio every step (``layer_norms_every=1``);
- ``every10``: sampled every 10 steps (``layer_norms_every=10``).

Per-layer gradient norms are measured every step in both. Two step sizes, widths
and batches fixed so that the bare step takes about 10 ms and 100 ms on one torch
thread (the parameter count per unit of compute decides the monitor's relative
cost; the measured bare step is printed, ``--batches`` rescales). Each size runs
in a fresh process, as a trial's training loop would. The variants run interleaved
(bare, every1, every10, then the reverse order, ...); overhead % is the median
over rounds of (monitor / bare - 1) x 100 within a round (robust to load drifting
on a shared machine); the ratio of the median step times is printed beside it.
Goals: <= 3% at ~100 ms with checks every step, <= 3% at ~10 ms with sampling;
the ~10 ms every-step figure is for information.

Minor page faults per step are printed too: on CPU, glibc malloc gives freed
heap memory back to the OS (trim) and the next step faults it in again, which
depends on when large tensors are freed. ``--keep-heap`` turns trimming off
(``mallopt``), so the difference between a default run and ``--keep-heap`` is
the allocator's share of the overhead (a GPU's caching allocator has no such cost).

Before timing, a sanity check: bare and monitored copies of one init take a few
steps on the same batches and must end with equal (allclose) parameters.

    python bench/bench_health.py              # ~2-3 minutes on one CPU core
    python bench/bench_health.py --quick      # ~30-40 s, noisier
    python bench/bench_health.py --keep-heap  # the same without allocator page faults
    python bench/bench_health.py --profile    # also: cProfile of the ~10 ms every-step monitor
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import ctypes
import gc
import io
import json
import pstats
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from tunelab.health import HealthMonitor, HealthPolicy

CLIP = 1.0
WEIGHTS = {"mse": 1.0, "l2": 1e-4, "act": 1e-3}
WATCH = "4"  # the 4th block's output
GOAL_PCT = 3.0
N_BATCHES = 4  # distinct batches, cycled


@dataclass(frozen=True)
class Size:
    name: str
    target_ms: float
    d: int  # residual width (blocks are d -> 4d -> d)
    d_in: int
    d_out: int
    batch: int  # the bare step takes about target_ms on one thread of a recent x86 core


SIZES = (
    Size("~10 ms", 10.0, d=128, d_in=64, d_out=16, batch=48),
    Size("~100 ms", 100.0, d=256, d_in=128, d_out=32, batch=256),
)


class Block(nn.Module):
    """Pre-norm residual MLP block (one top-level layer of the model)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def make_model(size: Size) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(size.d_in, size.d),
        *(Block(size.d) for _ in range(6)),
        nn.Linear(size.d, size.d_out),
    )


def make_batches(size: Size, batch: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, size.d_in, generator=g), torch.randn(batch, size.d_out, generator=g))
        for _ in range(N_BATCHES)
    ]


def loss_terms(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    out = model(x)
    return {
        "mse": torch.nn.functional.mse_loss(out, y),
        "l2": sum((p.square().sum() for p in model.parameters()), torch.zeros(())),
        "act": out.square().mean(),
    }


class Runner:
    """One variant: its own copy of the model and optimizer, and a ``run(steps)``."""

    def __init__(self, init: nn.Module, every: int | None) -> None:
        self.model = copy.deepcopy(init)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.params = list(self.model.parameters())
        self.monitor = (
            None
            if every is None
            else HealthMonitor(
                self.model,
                self.opt,
                clip=CLIP,
                policy=HealthPolicy(layer_norms_every=every, update_ratio_every=max(every, 10)),
                watch=[WATCH],
            )
        )
        self.sink = 0.0  # the synced floats, so that nothing is optimized away

    def run(self, batches: list[tuple[Tensor, Tensor]], steps: int) -> None:
        for i in range(steps):
            x, y = batches[i % len(batches)]
            terms = loss_terms(self.model, x, y)
            if self.monitor is None:
                self.opt.zero_grad(set_to_none=True)
                loss = terms["mse"] + WEIGHTS["l2"] * terms["l2"] + WEIGHTS["act"] * terms["act"]
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(self.params, CLIP)
                self.opt.step()
                self.sink += float(loss.detach()) + float(norm)
            else:
                res = self.monitor.step(terms, WEIGHTS)
                self.sink += res.total + res.grad_norm

    def end_iteration(self) -> None:
        if self.monitor is not None:
            self.monitor.end_iteration()


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_heap() -> None:
    """Stop glibc malloc from giving freed memory back to the OS (no trim, no mmap up to 32 MB).

    Freed heap memory is then reused without page faults: the difference from a
    default run is the monitor's share of allocator page faults.
    """
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_top_pad, 64 << 20)
    ok = ok and libc.mallopt(m_mmap_threshold, 32 << 20)
    if not ok:
        raise SystemExit("--keep-heap: mallopt failed (glibc only)")


def sanity(size: Size, batch: int, steps: int = 5) -> str:
    """Bare and both monitor settings from one init: same parameters after ``steps`` steps."""
    init = make_model(size)
    batches = make_batches(size, batch)
    runners = {k: Runner(init, e) for k, e in (("bare", None), ("every1", 1), ("every10", 10))}
    for r in runners.values():
        r.run(batches, steps)
    ref = runners["bare"].params
    parts = []
    for k in ("every1", "every10"):
        ps = runners[k].params
        diff = max(float((a - b).detach().abs().max()) for a, b in zip(ref, ps, strict=True))
        exact = all(torch.equal(a, b) for a, b in zip(ref, ps, strict=True))
        close = all(
            torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ref, ps, strict=True)
        )
        assert close, (
            f"{size.name}: bare vs {k} parameters differ after {steps} steps (max |diff| {diff:.3g})"
        )
        parts.append(f"{k} {'bit-identical' if exact else f'allclose (max |diff| {diff:.2g})'}")
    return f"{size.name}: after {steps} steps bare vs " + ", ".join(parts) + ": OK"


def bench(
    size: Size, batch: int, rounds: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-round seconds and minor page faults per step of each variant, interleaved
    (the order is reversed every round)."""
    init = make_model(size)
    batches = make_batches(size, batch)
    runners = {k: Runner(init, e) for k, e in (("bare", None), ("every1", 1), ("every10", 10))}
    order = list(runners)
    for r in runners.values():  # warm-up (allocator, kernels), one full iteration
        r.run(batches, steps)
        r.end_iteration()
    out: dict[str, list[float]] = {k: [] for k in runners}
    faults: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(rounds):
        for k in order if i % 2 == 0 else order[::-1]:
            r = runners[k]
            gc.collect()

            def one(r: Runner = r) -> None:
                r.run(batches, steps)
                r.end_iteration()

            f0 = minor_faults()
            out[k].append(timed(one) / steps)
            faults[k].append((minor_faults() - f0) / steps)
    return out, faults


def profile(size: Size, batch: int, steps: int) -> None:
    """cProfile of the every-step monitor at this size: where the monitor's time goes."""
    init = make_model(size)
    batches = make_batches(size, batch)
    r = Runner(init, 1)
    r.run(batches, steps)
    prof = cProfile.Profile()
    prof.enable()
    r.run(batches, steps)
    r.end_iteration()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(f"\ncProfile, {size.name} every-step monitor, {steps} steps (sorted by own time):")
    print(s.getvalue())


def worker(size: Size, batch: int, rounds: int, steps: int, keep: bool, threads: int) -> None:
    """One size in a fresh process (the heap as a trial's training loop finds it): JSON out."""
    torch.set_num_threads(threads)
    if keep:
        keep_heap()
    times, faults = bench(size, batch, rounds, steps)
    check = sanity(size, batch)  # after the timing: it would change the heap the timing sees
    print(json.dumps({"times": times, "faults": faults, "sanity": check}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (~30-40 s)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument(
        "--batches",
        default=",".join(str(s.batch) for s in SIZES),
        help="batch sizes of the ~10 ms and ~100 ms steps (to rescale on another CPU)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--keep-heap",
        action="store_true",
        help="glibc malloc keeps freed memory (no trim): the overhead without allocator page faults",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile the ~10 ms every-step monitor"
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    # (rounds, steps per round) per size; 10 steps a round so that every round samples alike
    plan = [(12, 10), (3, 10)] if args.quick else [(60, 10), (18, 10)]
    if args.rounds:
        plan = [(args.rounds, steps) for _, steps in plan]
    if args.worker is not None:
        i = args.worker
        rounds, steps = plan[i]
        worker(SIZES[i], batches[i], rounds, steps, args.keep_heap, args.threads)
        return

    print(
        f"torch {torch.__version__}, {args.threads} thread(s), AdamW, clip {CLIP}, "
        f"terms {WEIGHTS}, watch {WATCH!r}, malloc {'keep-heap' if args.keep_heap else 'default'}"
    )
    results = []
    for i, size in enumerate(SIZES):
        cmd = [sys.executable, __file__, "--worker", str(i), "--batches", args.batches]
        cmd += ["--threads", str(args.threads), "--rounds", str(plan[i][0])]
        cmd += ["--keep-heap"] if args.keep_heap else []
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"{size.name} worker failed:\n{proc.stderr}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        n_params = sum(p.numel() for p in make_model(size).parameters())
        print(
            f"{size.name}: width {size.d}, {n_params / 1e6:.2f} M params, batch {batches[i]}; "
            f"sanity {res['sanity']}",
            flush=True,
        )
        results.append((size.name, res["times"], res["faults"], *plan[i]))

    print()
    print(
        f"{'step':>8} {'rounds':>7} {'bare ms':>8} {'every1 ms':>10} {'every10 ms':>11} "
        f"{'every1':>8} {'every10':>8} {'medrat1':>8} {'medrat10':>9} {'faults/step b/1/10':>19}"
    )
    pct: dict[tuple[str, str], float] = {}
    for name, times, faults, rounds, steps in results:
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        paired = {
            k: 100
            * (statistics.median(m / b for m, b in zip(times[k], times["bare"], strict=True)) - 1)
            for k in ("every1", "every10")
        }
        flt = "/".join(f"{statistics.median(faults[k]):.0f}" for k in ("bare", "every1", "every10"))
        ratio = {k: 100 * (med[k] / med["bare"] - 1) for k in ("every1", "every10")}
        for k in ("every1", "every10"):
            pct[name, k] = paired[k]
        print(
            f"{name:>8} {f'{rounds}x{steps}':>7} {med['bare']:8.2f} {med['every1']:10.2f} "
            f"{med['every10']:11.2f} {paired['every1']:+7.2f}% {paired['every10']:+7.2f}% "
            f"{ratio['every1']:+7.2f}% {ratio['every10']:+8.2f}% {flt:>19}"
        )
    print(
        "(ms: median over rounds of the time per step; every1/every10: overhead, the median over"
        " rounds of (monitor / bare - 1) x 100\n within a round; medrat: the same from the ms"
        " medians; faults/step: median minor page faults per step, bare/every1/every10)"
    )
    print()
    for label, key, goal in (
        ("~100 ms, checks every step", ("~100 ms", "every1"), True),
        ("~10 ms, checks every 10   ", ("~10 ms", "every10"), True),
        ("~10 ms, checks every step ", ("~10 ms", "every1"), False),
    ):
        v = pct[key]
        verdict = (
            ("PASS" if v <= GOAL_PCT else "FAIL") + f" (goal <= {GOAL_PCT:g}%)"
            if goal
            else "(information)"
        )
        print(f"{label}: overhead {v:+6.2f}%  {verdict}")

    if args.profile:
        torch.set_num_threads(args.threads)
        profile(SIZES[0], batches[0], 100)


if __name__ == "__main__":
    main()
