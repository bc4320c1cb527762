"""Where a trial computes, in what precision, and its share of a data-parallel run.

Every family's config carries the same three keys (:class:`DeviceFields`,
inherited by the family's config dataclass):

- ``device: auto | cpu | cuda``: ``auto`` is CUDA when the trial was given a
  GPU (``resources.gpu > 0`` in the spec; outside Ray, when CUDA is
  available), else the CPU. ``cuda`` without a visible GPU is an error
  naming the key.
- ``precision: fp32 | bf16 | fp16``: the forward pass runs under
  ``torch.autocast`` in that dtype; parameters, optimizer state and the
  health monitor's norms stay fp32. ``fp16`` comes with a
  ``torch.amp.GradScaler`` (give it to :class:`~tunelab.health.HealthMonitor`
  as ``scaler=``; a scaler overflow is counted as ``health/amp_skipped``).
- ``deterministic: true``: ``torch.use_deterministic_algorithms(True)``,
  cuDNN benchmark off and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``. On the CPU,
  runs are bit-exact without it; on CUDA this is what torch allows (some ops
  then raise instead of running nondeterministically, and results still
  differ between GPU models and CUDA versions).

A family calls :func:`placement` once in ``build`` and uses the result::

    place = placement(config)
    model = Model(config).to(place.device)
    monitor = HealthMonitor(model, opt, scaler=place.grad_scaler())
    with place.autocast():
        loss = model(x.to(place.device))

Data-parallel trials (``resources.workers: N`` in a spec) run the same family
code on N Ray Train workers. The family draws each *global* batch exactly as
with one worker (same seed, same generator) and keeps its rank's slice with
:func:`shard`; :class:`~tunelab.health.HealthMonitor` averages the gradients
over the workers before its checks, clipping and the step, which is the
arithmetic of ``DistributedDataParallel`` (see :mod:`tunelab.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from tunelab.distributed import rank, shard, world_size

if TYPE_CHECKING:
    import torch

__all__ = [
    "Device",
    "DeviceFields",
    "DeviceUnavailable",
    "Placement",
    "Precision",
    "device_generator",
    "load_generator_state",
    "placement",
    "rank",
    "resolve_device",
    "shard",
    "world_size",
]

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(config=ConfigDict(extra="forbid", use_attribute_docstrings=True))
class DeviceFields:
    """The device keys every family config inherits (``class Config(DeviceFields)``)."""

    # Field descriptions, not attribute docstrings: pydantic does not carry those into the
    # subclasses (the families' configs).
    device: Device = Field(
        default="auto",
        description="Where the model, batches and noise live: auto (CUDA when the trial has "
        "a GPU), cpu or cuda.",
    )
    precision: Precision = Field(
        default="fp32",
        description="Autocast dtype of the forward pass: fp32, bf16, or fp16 (with a "
        "gradient scaler).",
    )
    deterministic: bool = Field(
        default=False,
        description="Deterministic kernels on CUDA (torch.use_deterministic_algorithms); CPU "
        "runs are bit-exact either way.",
    )


class DeviceUnavailable(RuntimeError):
    """``device: cuda`` in a config, and this process sees no CUDA device."""


def resolve_device(device: str) -> torch.device:
    """The torch device for a config's ``device`` key.

    ``auto`` is ``cuda`` when CUDA is available and, inside a Ray trial, the
    trial holds a GPU (``ray.get_gpu_ids()``); otherwise ``cpu``. The CUDA
    device is the current one (Ray sets ``CUDA_VISIBLE_DEVICES`` per trial,
    so that is the trial's GPU).

    Raises:
        DeviceUnavailable: ``cuda`` requested and no CUDA device is visible.
        ValueError: not one of auto, cpu, cuda.
    """
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise DeviceUnavailable(
            "config key `device: cuda`, but this process sees no CUDA device "
            "(give the trial a GPU with `resources.gpu`, or use `device: auto`)"
        )
    if device == "auto":
        cuda = cuda and _trial_has_gpu()
    if device == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _trial_has_gpu() -> bool:
    """Whether this Ray trial (or worker) was given a GPU; True outside Ray.

    Ray is only asked when this process already imported it (a plain process,
    e.g. ``bench/gpu_check.py``, never imports Ray through here).
    """
    ray = sys.modules.get("ray")
    if ray is None:
        return True
    try:
        if not ray.is_initialized():
            return True
        return bool(ray.get_gpu_ids())
    except Exception:  # no worker context: a plain process
        return True


@dataclasses.dataclass(frozen=True)
class Placement:
    """A resolved device and precision (what :func:`placement` returns).

    Attributes:
        device: The torch device of the model, the batches and the noise.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        deterministic: Whether deterministic kernels were requested.
    """

    device: torch.device
    precision: str = "fp32"
    deterministic: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (``torch.float32`` for fp32)."""
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.precision
        ]

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """``torch.autocast`` in :attr:`dtype` on :attr:`device` (nothing for fp32)."""
        import torch

        if self.precision == "fp32":
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def grad_scaler(self) -> Any:
        """A ``torch.amp.GradScaler`` for fp16, else None (bf16 and fp32 need none)."""
        import torch

        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def describe(self) -> str:
        """``cuda:0 bf16`` / ``cpu fp32 (deterministic)``: what a run records."""
        tail = " (deterministic)" if self.deterministic else ""
        return f"{self.device} {self.precision}{tail}"


def placement(config: Any) -> Placement:
    """Resolve a family config's ``device``/``precision``/``deterministic`` keys.

    Turns on deterministic kernels when asked (process-wide: a trial owns its
    process). Missing keys take :class:`DeviceFields`' defaults.

    Raises:
        DeviceUnavailable: ``device: cuda`` without a visible CUDA device.
    """
    import torch

    device = resolve_device(getattr(config, "device", "auto"))
    precision = str(getattr(config, "precision", "fp32"))
    deterministic = bool(getattr(config, "deterministic", False))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return Placement(device=device, precision=precision, deterministic=deterministic)


def device_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``; draw with ``device=gen.device``.

    On the CPU it is the usual Mersenne Twister (``torch.Generator().manual_seed(seed)``,
    so CPU runs draw what they always drew); on CUDA a Philox generator. Their
    states differ in kind (5056 bytes against 16): see :func:`load_generator_state`.
    """
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def load_generator_state(gen: torch.Generator, state: torch.Tensor, *, name: str) -> None:
    """Restore ``gen`` from a saved ``get_state()`` (any device's: a checkpoint loads anywhere).

    A state saved by a generator of another device type (CPU vs CUDA) cannot
    be set: ``gen`` is re-seeded from a hash of it instead (a warning names
    ``name``), so the noise from here on differs from the saved run's but is
    the same on every resume.
    """
    import torch

    state = state.detach().to("cpu", torch.uint8)
    if state.numel() == gen.get_state().numel():
        gen.set_state(state)
        return
    digest = hashlib.sha256(state.numpy().tobytes()).digest()
    gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    warnings.warn(
        f"{name}: the checkpoint's generator state ({state.numel()} bytes) was saved on "
        f"another kind of device than this {gen.device.type} generator; re-seeded from it, "
        "so the noise from here on differs from the saved run's",
        RuntimeWarning,
        stacklevel=2,
    )
