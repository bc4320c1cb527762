"""GPU check without Ray or MLflow: each family on CUDA against the CPU, side by side in one run.

Runs on a bare GPU node before the cluster stack is installed: it needs torch,
numpy, pydantic, pyyaml and soundfile (``trainables/ouroboros.py`` imports it
at module level; its wheel bundles libsndfile) plus this project installed
without its dependencies, and never imports ray or mlflow (scipy is not
needed either)::

    pip install torch numpy pydantic pyyaml soundfile
    pip install --no-deps -e .
    python bench/gpu_check.py --json gpu_check.json    # ~2-3 minutes on one GPU
    python bench/gpu_check.py --device cpu --quick --threads 1   # the tests' smoke run (~10 s)

Sections, each measured on ``--device`` (the families also on the CPU), in one run:

1. families: ``train_iteration`` per second of each family's quick config
   (the ``quick:`` blocks of ``search_spaces/*.yaml``) on CUDA and on the CPU,
   the speedup, the device and precision the model ran in, and the peak GPU
   memory (``torch.cuda.max_memory_allocated``);
2. recursive_reasoner: training batches per second of ``parallel_fixed``
   against ``serial_act`` at K = 4, B = 32 and 128, through
   ``bench/bench_rollout.py``'s timing loop (goal: ratio >= 0.7 K);
3. ouroboros: samples per second of the fused RK4 rollout against the naive
   loop, forward + backward and forward only (``bench/bench_rk4.py``'s inputs);
4. health monitor: time per optimizer step of ``HealthMonitor.step`` against
   the bare backward + clip + step, same model, batches and seed
   (``bench/bench_health.py``'s model and runners);
5. data parallel: a 2-process step through tunelab's gradient averaging
   (:mod:`tunelab.distributed`, nccl, one GPU each) against one process on
   the global batch; needs 2 GPUs and is skipped, with the reason, otherwise.
   With ``--device cpu`` it runs on 2 gloo processes.

Exit status: 0; 1 when a section failed (its error is printed and in the
JSON); 2 when ``--device cuda`` and this process sees no CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench_rollout, bench_rk4, bench_health

SEED = 1001
K = 4  # trajectories per maze in the rollout comparison
HEALTH_VARIANTS = (("bare", None), ("every1", 1), ("every10", 10))

#: family -> (spec in search_spaces/, the blocks merged, in order, into its quick config)
QUICK_SPECS: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "ouroboros": ("seed_cull.yaml", (("config",), ("quick", "config"))),
    "flow_policy": ("lever.yaml", (("control",), ("quick", "control"))),
    "recursive_reasoner": ("sigma_ramp.yaml", (("config",),)),
    "cascade_mixer": ("cascade_health.yaml", (("control",),)),
}

#: --quick: tiny sizes over the quick configs (a smoke run of every code path, not a figure)
TINY: dict[str, dict[str, Any]] = {
    "ouroboros": {
        "n_train_files": 4,
        "n_val_files": 1,
        "n_test_files": 1,
        "max_segs": 16,
        "H_min": 128,
        "H_max": 128,
        "batch_size": 4,
        "steps_per_iter": 1,
        "n_eval_windows": 1,
        "listen_s": 0.05,
    },
    "flow_policy": {
        "hidden": 32,
        "n_layers": 1,
        "steps_per_iter": 2,
        "batch_size": 16,
        "n_train": 128,
        "n_val": 64,
        "n_test": 64,
    },
    "recursive_reasoner": {
        "n_train": 32,
        "n_val": 8,
        "n_test": 8,
        "batch_size": 4,
        "steps_per_iter": 1,
        "halt_max_steps": 1,
    },
    "cascade_mixer": {"steps_per_iter": 2, "batch_size": 4, "n_train": 16, "n_val": 8},
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run (``--quick`` or full)."""

    tiny: bool  # the families at TINY sizes, small mazes and batches
    warmup_iters: int  # family iterations before timing
    timed_iters: int
    rollout_batches: tuple[int, ...]
    rollout_rounds: int
    rollout_steps: int
    rk4_horizons: tuple[int, ...]
    rk4_repeats: int
    health_sizes: int  # how many of bench_health.SIZES
    health_rounds: int
    health_steps: int
    ddp_steps: int


FULL = Plan(
    tiny=False,
    warmup_iters=1,
    timed_iters=3,
    rollout_batches=(32, 128),
    rollout_rounds=6,  # bench_rollout's defaults
    rollout_steps=3,
    rk4_horizons=(256, 1024),
    rk4_repeats=3,
    health_sizes=2,
    health_rounds=10,
    health_steps=10,
    ddp_steps=20,
)
QUICK = Plan(
    tiny=True,
    warmup_iters=1,
    timed_iters=1,
    rollout_batches=(4,),
    rollout_rounds=1,
    rollout_steps=1,
    rk4_horizons=(32,),
    rk4_repeats=1,
    health_sizes=1,
    health_rounds=2,
    health_steps=3,
    ddp_steps=2,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="the families' `precision` key (families without it are skipped unless fp32)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the tests' smoke run)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: --device cuda, but torch {torch.__version__} sees no CUDA device "
            f"(torch.cuda.is_available() is False; CUDA build: {torch.version.cuda or 'no'}). "
            "Run it on a GPU node with a CUDA build of torch, or pass --device cpu.",
            file=sys.stderr,
        )
        return 2

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    device = torch.device(args.device)
    out: dict[str, Any] = {"meta": _meta(args)}
    errors: dict[str, str] = {}
    _print_meta(out["meta"])
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        sections: list[tuple[str, Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]]
        sections = [
            (
                "families",
                lambda: families_section(args.device, args.precision, plan, Path(tmp)),
                _print_families,
            ),
            ("rollout", lambda: rollout_section(device, plan, Path(tmp)), _print_rollout),
            ("rk4", lambda: rk4_section(device, plan), _print_rk4),
            ("health", lambda: health_section(device, plan), _print_health),
            ("ddp", lambda: ddp_section(device, plan), _print_ddp),
        ]
        for name, run, show in sections:
            t0 = time.perf_counter()
            try:
                out[name] = run()
            except Exception as err:  # a failed section is reported, the others still run
                errors[name] = f"{type(err).__name__}: {err}"
                out[name] = {"error": errors[name]}
                print(f"\n{name}: FAILED: {errors[name]}")
                _print_traceback()
                continue
            out[name]["seconds"] = time.perf_counter() - t0
            if out[name].get("failed"):
                errors[name] = "; ".join(f"{k}: {v}" for k, v in out[name]["failed"].items())
            show(out[name])
            sys.stdout.flush()
    out["errors"] = errors
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, allow_nan=True) + "\n")
        print(f"\nfigures written to {args.json}")
    return 1 if errors else 0


# --------------------------------------------------------------------------- #
# 1. families: iterations/s on CUDA against the CPU
# --------------------------------------------------------------------------- #
def families_section(target: str, precision: str, plan: Plan, data_root: Path) -> dict[str, Any]:
    """Iterations per second of every family's quick config on the CPU and on ``target``."""
    devices = ["cpu"] if target == "cpu" else ["cpu", "cuda"]
    rows: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name in QUICK_SPECS:
        values = {**quick_config(name), **(TINY[name] if plan.tiny else {})}
        row: dict[str, Any] = {}
        for dev in ("cpu", "cuda"):
            if dev not in devices:
                row[dev] = {"skipped": f"--device {target}"}
                continue
            try:
                row[dev] = family_rate(name, values, dev, precision, plan, data_root)
            except Exception as err:  # one family failing on one device: the others still run
                row[dev] = {"error": f"{type(err).__name__}: {err}"}
                failed[f"{name} on {dev}"] = row[dev]["error"]
                _print_traceback()
        runs = [row[d] for d in devices if "it_per_s" in row[d]]
        row["device"] = runs[-1]["device"] if runs else None
        row["precision"] = runs[-1]["precision"] if runs else None
        if "it_per_s" in row["cuda"] and "it_per_s" in row["cpu"]:
            row["speedup"] = row["cuda"]["it_per_s"] / row["cpu"]["it_per_s"]
        rows[name] = row
    return {
        "warmup_iters": plan.warmup_iters,
        "timed_iters": plan.timed_iters,
        "rows": rows,
        "failed": failed,
    }


def quick_config(family: str) -> dict[str, Any]:
    """A family's quick config: the blocks of its spec named in :data:`QUICK_SPECS`, merged."""
    spec_file, blocks = QUICK_SPECS[family]
    spec = yaml.safe_load((ROOT / "search_spaces" / spec_file).read_text())
    values: dict[str, Any] = {}
    for keys in blocks:
        block = spec
        for key in keys:
            block = block.get(key) or {}
        values.update(block)
    return values


def family_rate(
    name: str, values: dict[str, Any], device: str, precision: str, plan: Plan, data_root: Path
) -> dict[str, Any]:
    """Build ``name`` on ``device`` and time ``plan.timed_iters`` iterations after the warm-up."""
    from tunelab import get_family, seed_everything

    family = get_family(name)
    fields = getattr(family.config_cls, "__pydantic_fields__", {})
    values = dict(values)
    # Pass the device keys only to a family that has them (tunelab.devices.DeviceFields);
    # "auto" is never passed: it asks Ray whether the trial holds a GPU.
    if "device" in fields:
        values["device"] = device
    elif device != "cpu":
        return {"skipped": "its config has no `device` key (tunelab.devices.DeviceFields)"}
    if "precision" in fields:
        values["precision"] = precision
    elif precision != "fp32":
        return {"skipped": f"its config has no `precision` key, so no {precision}"}
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seed_everything(SEED)
    config = family.make_config(values)
    exp = family.build(config, SEED, data_root)
    where = _model_device(exp)
    if where is not None and where.type != device:
        raise RuntimeError(f"{name}: `device: {device}` in its config, but its model is on {where}")
    for _ in range(plan.warmup_iters):
        exp.train_iteration()
    _sync(where)
    t0 = time.perf_counter()
    for _ in range(plan.timed_iters):
        exp.train_iteration()
    _sync(where)
    seconds = time.perf_counter() - t0
    run: dict[str, Any] = {
        "device": str(where) if where is not None else device,
        "precision": str(getattr(config, "precision", "fp32")),
        "it_per_s": plan.timed_iters / seconds,
    }
    if cuda:
        run["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return run


def _model_device(exp: object) -> torch.device | None:
    """The device of the first parameter of the experiment's first module attribute."""
    for value in vars(exp).values():
        if isinstance(value, torch.nn.Module):
            for p in value.parameters():
                return p.device
    return None


# --------------------------------------------------------------------------- #
# 2. recursive_reasoner: parallel_fixed against serial_act
# --------------------------------------------------------------------------- #
def rollout_section(device: torch.device, plan: Plan, data_root: Path) -> dict[str, Any]:
    """bench_rollout's steps/s of both rollouts at K = 4, with the model and mazes on ``device``."""
    import bench_rollout

    from trainables.recursive_reasoner import (
        FAMILY,
        QUICK_CONFIG,
        MazeData,
        RecursiveReasoner,
        load_or_generate_mazes,
    )

    rows = []
    for b in plan.rollout_batches:
        # bench_rollout.main's config: act on (no trajectory halts early: the halting head
        # starts at bias -5), so both rollouts do the same work
        values = {**QUICK_CONFIG, "K": K, "batch_size": b, "n_train": max(256, b), "n_test": 8}
        values |= {"act": True, "loss_mode": "multi_perturbed_ce", "n_val": 8}
        if plan.tiny:
            values |= {"n_train": 32}
        config = FAMILY.make_config(values)
        data = load_or_generate_mazes(config, data_root)
        data = MazeData(
            **{f.name: getattr(data, f.name).to(device) for f in dataclasses.fields(data)}
        )

        def on_device(cfg: Any) -> torch.nn.Module:
            return RecursiveReasoner(cfg).to(device)

        # bench_rollout.bench builds its model on the CPU; placing it on `device` keeps its
        # timing loop and train_batch, the code path measured on the CPU (1 thread: 1.24x)
        with mock.patch.object(bench_rollout, "RecursiveReasoner", on_device):
            rate = bench_rollout.bench(config, data, plan.rollout_rounds, plan.rollout_steps)
        rows.append(
            {
                "B": b,
                "parallel_fixed": rate["parallel_fixed"],
                "serial_act": rate["serial_act"],
                "ratio": rate["parallel_fixed"] / rate["serial_act"],
            }
        )
    return {"device": str(device), "K": K, "goal_ratio": 0.7 * K, "rows": rows}


# --------------------------------------------------------------------------- #
# 3. ouroboros: fused RK4 rollout against the naive loop
# --------------------------------------------------------------------------- #
def rk4_section(device: torch.device, plan: Plan) -> dict[str, Any]:
    """Samples/s (batch x horizon / s, best of ``rk4_repeats``) of both rollouts on ``device``."""
    batch, degree = 16, 3  # bench_rk4's defaults (16 = the quick config's batch)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for horizon in plan.rk4_horizons:
        rows += _rk4_rows(batch, horizon, degree, plan.rk4_repeats, device, gen)
    return {"device": str(device), "batch": batch, "degree": degree, "rows": rows}


def _rk4_rows(
    batch: int,
    horizon: int,
    degree: int,
    repeats: int,
    device: torch.device,
    gen: torch.Generator,
) -> list[dict[str, Any]]:
    """bench_rk4.bench_horizon's drives and timing on ``device`` (drawn on the CPU, moved)."""
    from bench_rk4 import _best_seconds

    from trainables.ouroboros import (
        Config,
        PolyOuroboros,
        poly_terms,
        rk4_rollout,
        rk4_rollout_naive,
    )

    terms = poly_terms(degree, keep_const=False)
    model = PolyOuroboros(Config(sample_rate=8000, hidden=8, poly_degree=degree, osc_init=False))
    model = model.to(device)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device).requires_grad_()

    omega = leaf(0.3 + 0.3 * torch.rand(batch, horizon, generator=gen))
    gamma = leaf(-0.02 + 0.02 * torch.randn(batch, horizon, generator=gen))
    w = leaf(0.2 * torch.randn(batch, horizon, len(terms), generator=gen))
    x0 = (0.1 * torch.randn(batch, generator=gen)).to(device)
    v0 = (0.1 * torch.randn(batch, generator=gen)).to(device)

    def naive() -> torch.Tensor:
        return rk4_rollout_naive(x0, v0, omega, gamma, w, terms, 1.0, 1.0)

    def fused() -> torch.Tensor:
        return rk4_rollout(x0, v0, model.coefficients(omega, gamma, w), degree, 1.0, 1.0)

    with torch.no_grad():
        diff = float((naive() - fused()).abs().max())
    modes: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "fwd+bwd": (lambda: naive().sum().backward(), lambda: fused().sum().backward()),
        "fwd": (torch.no_grad()(naive), torch.no_grad()(fused)),
    }
    rows = []
    for mode, (slow_fn, fast_fn) in modes.items():
        t_naive = _best_seconds(_synced(slow_fn, device), repeats)
        t_fused = _best_seconds(_synced(fast_fn, device), repeats)
        n = batch * horizon
        rows.append(
            {
                "H": horizon,
                "mode": mode,
                "naive": n / t_naive,
                "fused": n / t_fused,
                "ratio": t_naive / t_fused,
                "max_abs_diff": diff,
            }
        )
    return rows


# --------------------------------------------------------------------------- #
# 4. health monitor: cost per step
# --------------------------------------------------------------------------- #
def health_section(device: torch.device, plan: Plan) -> dict[str, Any]:
    """bench_health's bare and monitored runners on ``device``, interleaved, synced per round."""
    import bench_health as bh

    rows = []
    for size in bh.SIZES[: plan.health_sizes]:
        batch = 16 if plan.tiny else size.batch
        init = bh.make_model(size).to(device)
        batches = [(x.to(device), y.to(device)) for x, y in bh.make_batches(size, batch)]
        runs = {
            k: functools.partial(_one_round, bh.Runner(init, every), batches, plan.health_steps)
            for k, every in HEALTH_VARIANTS
        }
        times = _interleaved(runs, plan.health_rounds, device)
        med = {k: 1000 * statistics.median(v) / plan.health_steps for k, v in times.items()}
        row: dict[str, Any] = {"size": size.name, "batch": batch}
        row |= {f"{k}_ms": med[k] for k in runs}
        for k in ("every1", "every10"):  # median over rounds of the paired ratio
            paired = statistics.median(m / b for m, b in zip(times[k], times["bare"], strict=True))
            row[f"{k}_pct"] = 100 * (paired - 1)
        rows.append(row)
    return {
        "device": str(device),
        "rounds": plan.health_rounds,
        "steps_per_round": plan.health_steps,
        "rows": rows,
    }


def _one_round(runner: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> None:
    """One "iteration" of bench_health: ``steps`` steps, then the monitor's end_iteration."""
    runner.run(batches, steps)
    runner.end_iteration()


def _interleaved(
    runs: Mapping[str, Callable[[], None]], rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per round of each run, after one warm-up round, the order reversed every round."""
    order = list(runs)
    for fn in runs.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(rounds):
        for k in order if i % 2 == 0 else order[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            runs[k]()
            _sync(device)
            out[k].append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------- #
# 5. data parallel: one 2-process step
# --------------------------------------------------------------------------- #
def ddp_section(device: torch.device, plan: Plan) -> dict[str, Any]:
    """Two processes (nccl on 2 GPUs, gloo on the CPU) against one on the global batch."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    world = 2
    if not dist.is_available():
        return {"skipped": "this torch has no torch.distributed"}
    if device.type == "cuda":
        n_gpus = torch.cuda.device_count()
        if n_gpus < world:
            return {"skipped": f"{n_gpus} CUDA device visible; the 2-process step needs 2 GPUs"}
        if not dist.is_nccl_available():
            return {"skipped": "this torch has no nccl backend"}
        backend = "nccl"
    else:
        backend = "gloo"
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        # a file store, not TCP: no port to pick, and no store server in rank 0 that
        # could exit while rank 1 still tears its process group down
        init = f"file://{Path(tmp) / 'store'}"
        teardown = None
        try:
            mp.spawn(_ddp_worker, args=(world, backend, init, plan.ddp_steps, queue), nprocs=world)
        except mp.ProcessExitedException as err:
            if queue.empty():
                raise
            # rank 0 reported, so every step and check ran; a rank that died after that
            # does not void them (seen: gloo on a loaded 2-core CPU, about 2 runs in 100,
            # SIGABRT "terminate called without an active exception")
            teardown = str(err)
    result: dict[str, Any] = queue.get()
    if teardown is not None:
        result["teardown"] = teardown
    return {"backend": backend, "world_size": world, **result}


def _ddp_worker(rank: int, world: int, backend: str, init: str, steps: int, queue: Any) -> None:
    """One rank: bench_health's monitored runner on its shard of every global batch.

    The HealthMonitor averages the gradients over the ranks (tunelab.distributed,
    DDP's arithmetic). Rank 0 also trains the bare runner alone on the global
    batches: the replicas must match it up to float summation order.
    """
    import bench_health as bh
    import torch.distributed as dist

    from tunelab.distributed import shard

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        size = bh.SIZES[0]
        model = bh.make_model(size).to(device)  # seeded: the same init on every rank
        batches = [(x.to(device), y.to(device)) for x, y in bh.make_batches(size, size.batch)]
        shards = [(shard(x), shard(y)) for x, y in batches]
        replica = bh.Runner(model, 1)
        reference = bh.Runner(model, None)

        def timed(runner: Any, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
            runner.run(data, 2)  # warm-up
            runner.end_iteration()
            _sync(device)
            t0 = time.perf_counter()
            runner.run(data, steps)
            runner.end_iteration()
            _sync(device)
            return (time.perf_counter() - t0) / steps

        dist.barrier()
        ddp_s = timed(replica, shards)
        flat = torch.cat([p.detach().reshape(-1) for p in replica.params])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            single_s = timed(reference, batches)
            ref = torch.cat([p.detach().reshape(-1) for p in reference.params])
            queue.put(
                {
                    "global_batch": size.batch,
                    "steps": steps + 2,
                    "ms_per_step": 1000 * ddp_s,
                    "single_ms_per_step": 1000 * single_s,
                    "max_diff_between_ranks": float((gathered[0] - gathered[1]).abs().max()),
                    "max_diff_vs_single": float((flat - ref).abs().max()),
                }
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- #
# helpers and printing
# --------------------------------------------------------------------------- #
def _print_traceback() -> None:
    """The last frames of the exception being handled, after what stdout holds so far."""
    sys.stdout.flush()
    traceback.print_exc(limit=-3)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        fn()
        _sync(device)

    return run


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "device": args.device,
        "precision": args.precision,
        "quick": bool(args.quick),
        "cpu_threads": torch.get_num_threads(),
        "cuda_devices": torch.cuda.device_count() if cuda else 0,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": sys.version.split()[0],
    }


def _print_meta(meta: dict[str, Any]) -> None:
    gpu = f"{meta['gpu']} x{meta['cuda_devices']}" if meta["gpu"] else "no CUDA device"
    size = "tiny (--quick)" if meta["quick"] else "quick configs"
    print(
        f"gpu_check: torch {meta['torch']}, python {meta['python']}, --device {meta['device']} "
        f"--precision {meta['precision']}, {gpu}, {meta['cpu_threads']} CPU threads, sizes: {size}"
    )


def _num(run: dict[str, Any], key: str, fmt: str) -> str:
    return format(run[key], fmt) if key in run else "-"


def _print_families(sec: dict[str, Any]) -> None:
    print(
        f"\nfamilies: train_iteration/s, {sec['warmup_iters']} warm-up + "
        f"{sec['timed_iters']} timed iteration(s) per device"
    )
    print(
        f"{'family':<20} {'device':<8} {'precision':<9} {'cpu it/s':>9} {'cuda it/s':>10} "
        f"{'speedup':>8} {'peak GPU MiB':>13}  note"
    )
    for name, row in sec["rows"].items():
        cpu, cuda = row["cpu"], row["cuda"]
        notes = [
            f"{d} {what}: {row[d][what]}"
            for d in ("cpu", "cuda")
            for what in ("skipped", "error")
            if what in row[d]
        ]
        speed = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
        print(
            f"{name:<20} {row['device'] or '-':<8} {row['precision'] or '-':<9} "
            f"{_num(cpu, 'it_per_s', '9.2f'):>9} {_num(cuda, 'it_per_s', '10.2f'):>10} "
            f"{speed:>8} {_num(cuda, 'peak_gpu_mib', '13.1f'):>13}  {'; '.join(notes)}"
        )


def _print_rollout(sec: dict[str, Any]) -> None:
    print(
        f"\nrecursive_reasoner on {sec['device']}: parallel_fixed vs serial_act, K={sec['K']}, "
        f"training batches/s (goal ratio >= {sec['goal_ratio']:.1f}x; CPU, 1 thread: 1.24x)"
    )
    print(f"{'B':>5} {'parallel_fixed':>15} {'serial_act':>11} {'ratio':>7}")
    for r in sec["rows"]:
        verdict = "meets" if r["ratio"] >= sec["goal_ratio"] else "below"
        print(
            f"{r['B']:>5} {r['parallel_fixed']:>15.2f} {r['serial_act']:>11.2f} "
            f"{r['ratio']:>6.2f}x  {verdict} goal"
        )


def _print_rk4(sec: dict[str, Any]) -> None:
    print(
        f"\nouroboros RK4 rollout on {sec['device']}: fused vs naive, batch {sec['batch']}, "
        f"degree {sec['degree']}, samples/s (best of the repeats)"
    )
    print(f"{'H':>6} {'mode':>8} {'naive':>12} {'fused':>12} {'ratio':>7}  max|dx|")
    for r in sec["rows"]:
        print(
            f"{r['H']:>6} {r['mode']:>8} {r['naive']:>12,.0f} {r['fused']:>12,.0f} "
            f"{r['ratio']:>6.1f}x  {r['max_abs_diff']:.1e}"
        )


def _print_health(sec: dict[str, Any]) -> None:
    print(
        f"\nhealth monitor on {sec['device']}: ms per optimizer step against the bare "
        f"backward+clip+step ({sec['rounds']} interleaved rounds x {sec['steps_per_round']} steps)"
    )
    print(
        f"{'size':>8} {'batch':>6} {'bare ms':>8} {'every1 ms':>10} {'every10 ms':>11} "
        f"{'every1':>8} {'every10':>8}"
    )
    for r in sec["rows"]:
        print(
            f"{r['size']:>8} {r['batch']:>6} {r['bare_ms']:>8.3f} {r['every1_ms']:>10.3f} "
            f"{r['every10_ms']:>11.3f} {r['every1_pct']:>+7.1f}% {r['every10_pct']:>+7.1f}%"
        )


def _print_ddp(sec: dict[str, Any]) -> None:
    if "skipped" in sec:
        print(f"\ndata parallel (2 processes): skipped: {sec['skipped']}")
        return
    print(
        f"\ndata parallel: {sec['world_size']} processes ({sec['backend']}), global batch "
        f"{sec['global_batch']}, {sec['steps']} steps through HealthMonitor's gradient averaging"
    )
    print(
        f"  {sec['ms_per_step']:.2f} ms/step ({sec['single_ms_per_step']:.2f} ms/step in one "
        f"process on the global batch); replicas differ by {sec['max_diff_between_ranks']:.1e}, "
        f"from the single process by {sec['max_diff_vs_single']:.1e} (max |param diff|)"
    )
    if "teardown" in sec:
        print(f"  after the steps, in the teardown: {sec['teardown']}")


if __name__ == "__main__":
    raise SystemExit(main())
