"""The health monitor's activation watches: output RMS of chosen modules (imports torch).

Owns the forward hooks on the watched modules (training mode with gradients
only), the RMS values they collect (kept on device; read back once per
iteration as ``health/act_rms`` mean and max per module), and the lookup of
the first watched module whose output went non-finite in a step's forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tunelab.names import M_HEALTH_ACT_RMS, M_HEALTH_ACT_RMS_MAX

__all__ = ["ActivationWatch", "first_nonfinite_output"]


class ActivationWatch:
    """Forward hooks measuring the output RMS of ``paths`` in ``model``.

    Raises:
        ValueError: a watched module path does not exist.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.rms: dict[str, list[Tensor]] = {}
        self.step_acts: list[tuple[str, Tensor]] = []  # (watched module, output RMS), this step
        self.hooks = [self._watch(model, path) for path in paths]

    def take_step(self) -> list[tuple[str, Tensor]]:
        """This step's (module, output RMS) in forward order; the next step starts empty."""
        step_acts, self.step_acts = self.step_acts, []
        return step_acts

    def end_iteration(self) -> dict[str, float]:
        """The iteration's RMS mean and max per watched module; the next iteration starts empty."""
        out: dict[str, float] = {}
        for path, values in self.rms.items():
            if values:
                rms = torch.stack(values)
                out[f"{M_HEALTH_ACT_RMS}/{path}"] = float(rms.mean())
                out[f"{M_HEALTH_ACT_RMS_MAX}/{path}"] = float(rms.max())
            self.rms[path] = []
        return out

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def _watch(self, model: nn.Module, path: str) -> Any:
        try:
            module = model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"health watch: no module {path!r} in {type(model).__name__}") from err
        self.rms[path] = []

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if not (mod.training and torch.is_grad_enabled()):
                return
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, Tensor):
                rms = t.detach().float().square().mean().sqrt()
                self.rms[path].append(rms)
                self.step_acts.append((path, rms))  # read only if this step goes non-finite

        return module.register_forward_hook(hook)


def first_nonfinite_output(acts: Sequence[tuple[str, Tensor]]) -> str | None:
    """The first watched module (forward order) whose output RMS was non-finite."""
    if not acts:
        return None
    finite = torch.stack([r for _, r in acts]).isfinite().tolist()
    return next((path for (path, _), ok in zip(acts, finite, strict=True) if not ok), None)
