"""Data parallelism through the health monitor: 2 gloo workers against 1 (no Ray).

Two processes share a gloo process group; each trains the same MLP on its
:func:`tunelab.distributed.shard` of the same global batches through
:class:`tunelab.health.HealthMonitor`, which averages the gradients. The
parameters must follow one process trained on the whole global batch (up to
float summation order), and a non-finite loss on one worker must make every
worker skip the step with a diagnosis naming that worker's rank.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tunelab import distributed
from tunelab.health import HealthMonitor, HealthPolicy, TrialDiverged

STEPS = 6
GLOBAL_BATCH = 16


def _train(nan_rank: int | None = None) -> dict[str, Any]:
    """Train STEPS steps on this process's shard; the final parameters and diagnoses."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = HealthPolicy(max_consecutive_skips=1)
    monitor = HealthMonitor(model, opt, clip=1.0, policy=policy)
    data = torch.Generator().manual_seed(1)
    lines: list[str] = []
    for step in range(STEPS):
        x = distributed.shard(torch.randn(GLOBAL_BATCH, 4, generator=data))
        y = distributed.shard(torch.randn(GLOBAL_BATCH, 1, generator=data))
        loss = (model(x) - y).square().mean()
        if step == STEPS - 1 and nan_rank == distributed.rank():
            loss = loss * math.nan
        try:
            monitor.step({"mse": loss})
        except TrialDiverged as stop:
            lines.append(stop.diagnosis.line())
            break
    monitor.close()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "lines": lines,
        "rank": stop_rank(lines),
    }


def stop_rank(lines: list[str]) -> int | None:
    for line in lines:
        if "rank " in line:
            return int(line.split("rank ")[1].split(";")[0])
    return None


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        assert distributed.world_size() == world and distributed.rank() == rank
        runs = {"clean": _train(), "nan_on_1": _train(nan_rank=1)}
        torch.save(runs, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Both runs on 2 gloo workers (one spawn: starting the processes is the cost)."""
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, f"tcp://127.0.0.1:{port}", str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {run: [ranks[r][run] for r in range(2)] for run in ("clean", "nan_on_1")}


def test_two_workers_follow_one_worker_on_the_same_global_batch(
    two_workers: dict[str, list[dict[str, Any]]],
) -> None:
    one = _train()
    two = two_workers["clean"]
    for a, b in zip(two[0]["params"], two[1]["params"], strict=True):
        assert torch.equal(a, b)  # the replicas stay identical
    for a, b in zip(one["params"], two[0]["params"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # summation order only
    assert not any(torch.equal(a, b) for a, b in zip(one["params"], _init_params(), strict=True))


def _init_params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return [p.detach().clone() for p in model.parameters()]


def test_a_nonfinite_loss_on_one_worker_stops_every_worker_naming_its_rank(
    two_workers: dict[str, list[dict[str, Any]]],
) -> None:
    two = two_workers["nan_on_1"]
    for r in (0, 1):
        assert len(two[r]["lines"]) == 1, two[r]["lines"]
        assert "non-finite loss" in two[r]["lines"][0]
        assert "term mse" in two[r]["lines"][0]
        assert two[r]["rank"] == 1
    for a, b in zip(two[0]["params"], two[1]["params"], strict=True):
        assert torch.equal(a, b)  # the poisoned step was skipped by both


def test_shard_is_the_identity_with_one_worker_and_refuses_an_uneven_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch = torch.arange(5)
    assert distributed.shard(batch) is batch
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with pytest.raises(ValueError, match=r"multiple of resources\.workers"):
        distributed.shard(batch)
    assert distributed.shard(torch.arange(6)).tolist() == [3, 4, 5]
