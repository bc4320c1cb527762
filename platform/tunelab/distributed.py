"""Data parallelism for families, written once: ranks, batch shards, averaged gradients.

A multi-worker trial (``resources.workers: N``) runs the family on N Ray
Train workers that share a ``torch.distributed`` process group (gloo on the
CPU, nccl on CUDA; Ray Train's ``TorchTrainer`` sets it up). Outside such a
trial every function here is the one-worker identity: ``rank() == 0``,
``world_size() == 1``, ``shard(x) is x``.

The data-parallel arithmetic is ``DistributedDataParallel``'s: every worker
takes its slice of the same global batch, computes the mean loss of its
slice and its gradients; the gradients are averaged over the workers
(:func:`average_gradients`, called by :class:`~tunelab.health.HealthMonitor`
before its checks) and every worker applies the same step, so the replicas
stay identical. With equal slices the average of the slice means is the
global batch mean, so N workers follow one worker with the same global
batch up to float summation order. tunelab averages in the health monitor
instead of wrapping the model in DDP because families call their modules
directly and their ``state_dict`` keys must not change between 1 and N
workers (checkpoints load either way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "all_gather_objects",
    "average_gradients",
    "average_metrics",
    "broadcast_flag",
    "is_distributed",
    "rank",
    "shard",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one worker is up."""
    try:
        import torch.distributed as dist
    except ImportError:  # a torch without distributed support
        return False
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def rank() -> int:
    """This worker's rank (0 outside a multi-worker trial)."""
    import torch.distributed as dist

    return int(dist.get_rank()) if is_distributed() else 0


def world_size() -> int:
    """The number of workers of this trial (1 outside a multi-worker trial)."""
    import torch.distributed as dist

    return int(dist.get_world_size()) if is_distributed() else 1


def shard(batch: Tensor) -> Tensor:
    """This worker's contiguous slice of a global batch (dimension 0).

    Draw the global batch (indices, noise) the same way on every worker,
    then keep ``shard(batch)``: worker ``r`` of ``N`` gets rows
    ``[r*B/N, (r+1)*B/N)``.

    Raises:
        ValueError: the batch size ``B`` is not a multiple of the number of
            workers (unequal slices would weight samples unequally).
    """
    n = world_size()
    if n == 1:
        return batch
    size = int(batch.shape[0])
    if size % n:
        raise ValueError(
            f"a global batch of {size} cannot be split evenly over {n} workers: "
            f"make the family's batch size a multiple of resources.workers ({n})"
        )
    per = size // n
    r = rank()
    return batch[r * per : (r + 1) * per]


def average_gradients(params: Sequence[Tensor]) -> None:
    """Average the ``.grad`` of ``params`` over the workers, in place (one flat all-reduce).

    Every worker must pass the same parameters in the same order with a
    gradient (the same model and code do). A non-finite gradient on one
    worker makes the average non-finite on all of them, so every worker
    takes the same skip decision.
    """
    if not params or not is_distributed():
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def average_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The mean of each metric over the workers (NaN stays NaN); identity with one worker.

    Every worker must pass the same keys.
    """
    if not is_distributed():
        return dict(metrics)
    import torch
    import torch.distributed as dist

    keys = sorted(metrics)
    values = torch.tensor(
        [float(metrics[k]) for k in keys], dtype=torch.float64, device=_comm_device()
    )
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


def _comm_device() -> Any:
    """The device small collectives use: CUDA under nccl (it moves no CPU tensors)."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_flag(flag: bool, src: int = 0) -> bool:
    """Rank ``src``'s ``flag`` on every worker (one decision for all of them)."""
    if not is_distributed():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    dist.broadcast(value, src=src)
    return bool(value.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every worker's ``obj`` in rank order (a list of one outside a multi-worker trial)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
