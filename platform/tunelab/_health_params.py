"""One optimizer's parameters as the health monitor sees them (imports torch).

Owns the naming (parameter names, the layers they group into, module order),
the per-tensor and per-layer gradient norms, the first non-finite parameter,
the update-to-weight ratio's parameter copy, and each optimizer's iteration
tally (steps, clips, skips, norms, update ratios) with the ``health/*``
metrics made from it, and its
:class:`~tunelab._health_rules.ExplosionDetector`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tunelab._health_rules import ExplosionDetector
from tunelab.names import (
    M_HEALTH_AMP_SKIPPED,
    M_HEALTH_CLIP_RATE,
    M_HEALTH_EXPLOSIONS,
    M_HEALTH_GRAD_NORM,
    M_HEALTH_GRAD_NORM_MAX,
    M_HEALTH_LAYER_NORM_MAX,
    M_HEALTH_LAYER_NORM_MEAN,
    M_HEALTH_NAN_SKIPPED,
    M_HEALTH_UPDATE_RATIO,
)

__all__ = [
    "OptimizerWatch",
    "default_layers",
    "layer_of",
    "metric_key",
    "module_path",
    "tensor_norms",
]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def default_layers(model: nn.Module) -> list[str]:
    """The module paths per-layer norms are grouped by: the model's top-level modules.

    A container child (``ModuleList``, ``Sequential``, ``ModuleDict``) is opened:
    ``stages.0``, ``stages.1``; a ``ModuleDict`` root's entries are models of
    their own (``gen.encoder``, ``disc.body``). Parameters held by no listed
    module fall in ``(root)`` (or the entry's name).
    """
    out: list[str] = []

    def walk(prefix: str, module: nn.Module, open_all: bool) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, _CONTAINERS) or open_all:
                before = len(out)
                walk(path + ".", child, open_all=False)
                if len(out) == before or _own_params(child):
                    out.append(path)
            else:
                out.append(path)

    walk("", model, open_all=isinstance(model, nn.ModuleDict))
    return out


class OptimizerWatch:
    """One optimizer's parameters, their names and layers, its tally and its detector."""

    def __init__(
        self,
        name: str,
        optimizer: torch.optim.Optimizer,
        names: dict[int, str],
        layers: Sequence[str],
    ) -> None:
        self.name, self.optimizer = name, optimizer
        self.params: list[nn.Parameter] = [
            p for g in optimizer.param_groups for p in g["params"] if p.requires_grad
        ]
        self.param_names = [names.get(id(p), f"{name}.param{i}") for i, p in enumerate(self.params)]
        # module order: the model's named_parameters order (the optimizer's may differ)
        order = {n: i for i, n in enumerate(names.values())}
        self.module_order = sorted(
            range(len(self.params)), key=lambda i: order.get(self.param_names[i], 1 << 30)
        )
        self.layer_names = sorted(
            {layer_of(n, layers) for n in self.param_names},
            key=lambda lay: min(
                order.get(n, 1 << 30) for n in self.param_names if layer_of(n, layers) == lay
            ),
        )
        index = {lay: i for i, lay in enumerate(self.layer_names)}
        self.param_layer = torch.tensor([index[layer_of(n, layers)] for n in self.param_names])
        self.layer_index: Tensor | None = None  # param_layer on the gradients' device
        self.buffer: list[Tensor] | None = None  # parameters before a check step
        self.detector = ExplosionDetector()
        self.reset_iteration()

    def reset_iteration(self) -> None:
        """Start a new iteration's tally."""
        self.norms: list[float] = []
        self.steps = self.clipped = self.skipped = self.amp_skipped = self.explosions = 0
        self.layer_sq_sum: Tensor | None = None  # sum over steps of per-layer norms
        self.layer_max: Tensor | None = None
        self.layer_steps = 0
        self.ratios: list[Tensor] = []

    def tally(self, norm: float, clipped: bool, layer_norms: Tensor | None) -> None:
        """Count an applied step: its pre-clip norm, whether it clipped, its layer norms."""
        self.steps += 1
        self.clipped += int(clipped)
        self.norms.append(norm)
        if layer_norms is not None:
            self.layer_sq_sum = (
                layer_norms if self.layer_sq_sum is None else self.layer_sq_sum + layer_norms
            )
            self.layer_max = (
                layer_norms
                if self.layer_max is None
                else torch.maximum(self.layer_max, layer_norms)
            )
            self.layer_steps += 1

    def iteration_metrics(
        self, infix: str, *, amp: bool
    ) -> tuple[dict[str, float], dict[str, list[float]], float]:
        """The iteration's ``health/<infix>*`` metrics from the tally (not reset here).

        Args:
            infix: ``""`` for the primary optimizer, else ``"<name>/"``.
            amp: Report the steps the fp16 ``GradScaler`` skipped.

        Returns:
            The metrics; per layer ``"<infix><layer>": [max, mean]`` of its norm
            (the history record); the iteration's largest finite norm (NaN if none).
        """
        out: dict[str, float] = {}
        layers: dict[str, list[float]] = {}
        finite = [n for n in self.norms if math.isfinite(n)]
        out[metric_key(M_HEALTH_GRAD_NORM, infix)] = (
            statistics.fmean(finite) if finite else math.nan
        )
        out[metric_key(M_HEALTH_GRAD_NORM_MAX, infix)] = max(finite) if finite else math.nan
        out[metric_key(M_HEALTH_CLIP_RATE, infix)] = (
            self.clipped / self.steps if self.steps else math.nan
        )
        out[metric_key(M_HEALTH_NAN_SKIPPED, infix)] = float(self.skipped)
        out[metric_key(M_HEALTH_EXPLOSIONS, infix)] = float(self.explosions)
        out[metric_key(M_HEALTH_UPDATE_RATIO, infix)] = (
            float(torch.stack(self.ratios).mean()) if self.ratios else math.nan
        )
        if amp:
            out[metric_key(M_HEALTH_AMP_SKIPPED, infix)] = float(self.amp_skipped)
        if self.layer_max is not None and self.layer_sq_sum is not None:
            maxes, sums = self.layer_max.tolist(), self.layer_sq_sum.tolist()
            for lay, mx, sm in zip(self.layer_names, maxes, sums, strict=True):
                out[f"{metric_key(M_HEALTH_LAYER_NORM_MAX, infix)}/{lay}"] = mx
                out[f"{metric_key(M_HEALTH_LAYER_NORM_MEAN, infix)}/{lay}"] = sm / self.layer_steps
                layers[f"{infix}{lay}"] = [mx, sm / self.layer_steps]
        return out, layers, max(finite) if finite else math.nan

    def layer_norms(self, with_grad: list[int], stacked: Tensor) -> Tensor:
        """(L,) per-layer 2-norms: sqrt of the sum of squared parameter norms in each layer."""
        dev = stacked.device
        sq = torch.zeros(len(self.layer_names), device=dev)
        if stacked.numel():
            if len(with_grad) == len(self.params):  # the usual case: the index is cached
                if self.layer_index is None or self.layer_index.device != dev:
                    self.layer_index = self.param_layer.to(dev)
                idx = self.layer_index
            else:
                idx = self.param_layer[with_grad].to(dev)
            sq.index_add_(0, idx, stacked.float().square())
        return sq.sqrt()

    def first_nonfinite(self, with_grad: list[int], stacked: Tensor) -> str | None:
        """The first parameter (module order) whose gradient norm is non-finite."""
        if not stacked.numel():
            return None
        finite = stacked.isfinite().tolist()
        pos = {i: k for k, i in enumerate(with_grad)}
        for i in self.module_order:
            if i in pos and not finite[pos[i]]:
                return self.param_names[i]
        return None

    def copy_params(self) -> None:
        """Copy the parameters into one kept buffer (no new allocation per check)."""
        with torch.no_grad():
            if self.buffer is None:
                self.buffer = [p.detach().clone() for p in self.params]
            else:
                torch._foreach_copy_(self.buffer, [p.detach() for p in self.params])

    def measure_update(self) -> Tensor:
        """Append the update-to-weight ratio ||delta|| / ||theta|| (after the step).

        Returns:
            The per-parameter norms after the step (on device, not read back).
        """
        assert self.buffer is not None
        with torch.no_grad():
            after = [p.detach() for p in self.params]
            torch._foreach_sub_(self.buffer, after)  # = -delta
            delta = torch.linalg.vector_norm(torch.stack(tensor_norms(self.buffer)))
            wn = torch.stack(tensor_norms(after))
            self.ratios.append(delta / torch.linalg.vector_norm(wn).clamp_min(1e-12))
        return wn


def metric_key(metric: str, infix: str) -> str:
    """``health/<infix>...``: a ``health/*`` metric name for a non-primary optimizer."""
    return metric.replace("health/", f"health/{infix}", 1)


def layer_of(name: str, layers: Sequence[str]) -> str:
    """The layer a parameter falls in: the longest listed module path holding it."""
    best = ""
    for layer in layers:
        if (name == layer or name.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    return best or "(root)"


def module_path(param_name: str) -> str:
    """The module path of a parameter's name (``(root)`` for the model's own)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else "(root)"


def tensor_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Per-tensor 2-norms, as ``clip_grad_norm_`` computes them (foreach where it can)."""
    if not tensors:
        return []
    device, dtype = tensors[0].device, tensors[0].dtype
    if all(t.device == device and t.dtype == dtype for t in tensors) and device.type in (
        "cpu",
        "cuda",
    ):
        return list(torch._foreach_norm(list(tensors), 2.0))
    return [torch.linalg.vector_norm(t, 2.0) for t in tensors]


def _own_params(module: nn.Module) -> bool:
    return any(True for _ in module.named_parameters(recurse=False))
