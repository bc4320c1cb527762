"""Numerical health of every training step: one call per optimizer step.

A family builds one :class:`HealthMonitor` over its model and optimizers and
lets it take every step: the monitor does the backward pass of the weighted
loss terms, measures, clips, steps (or skips) and zeroes the gradients, so the
skip-NaN / clip / mean-norm loop is written once, here. Per step it:

- checks each loss term; a non-finite term is the *culprit term* (the first in
  the order given) and the step is skipped;
- computes every parameter's gradient norm once (``torch._foreach_norm``, the
  same per-tensor norms ``clip_grad_norm_`` computes), from them the global
  norm before clipping (identical to ``torch.nn.utils.clip_grad_norm_``'s);
  a non-finite gradient names the first non-finite parameter in module order;
- clips (``clip_grads_with_norm_``) and steps, through a ``GradScaler`` under
  fp16 AMP (an overflow the scaler skips is counted apart: it is dynamic loss
  scaling, not divergence; bf16 needs no scaler);
- every ``layer_norms_every`` steps, groups those norms per layer (the
  model's top-level modules, see :func:`default_layers`); every
  ``update_ratio_every`` steps, checks the parameters after the step (the
  culprit is the first non-finite parameter, by module path) and measures
  the update-to-weight ratio
  ``||delta theta|| / ||theta||`` (theta after the step; Karpathy's rule of
  thumb: about 1e-3 is healthy);
- feeds the explosion detector (below) and the loss-term balance
  (share of term k = ``|w_k v_k| / sum_j |w_j v_j|``).

The explosion detector fires when

- a step's pre-clip global norm exceeds ``explosion_factor`` x its *robust
  level*, the median of the last ``window`` finite norms (a spike never moves
  a median; at least ``min_history`` norms are needed), or
- the iteration's largest norm grew ``growth_factor ** growth_iterations``-fold
  over the last ``growth_iterations`` iterations and grew again in the last
  one (sustained growth, as in the PowerMuse cascade's 2.45 -> 6.66 -> 16.71
  -> NaN: x6.8 over two epochs).

It names the layer whose norm grew most against that layer's own level and
the loss term with the largest share at that step.

:meth:`HealthMonitor.end_iteration` returns the iteration's ``health/*``
metrics (names in :mod:`tunelab.names`): global norm mean and max, clip rate,
skipped steps, update ratio, explosions, per-layer norm max and mean over the
iteration's steps (a spike is never averaged away), term shares and the output
RMS of watched modules (mean and max). When the policy ends the trial, the
step raises :class:`TrialDiverged` (or, for an iteration-level decision,
:attr:`HealthMonitor.diagnosis` is set when ``end_iteration`` returns); tunelab's
trial loop reports the trial ``diverged`` with the one-line diagnosis.

Example (one optimizer)::

    self.health = HealthMonitor(self.model, self.opt, clip=cfg.grad_clip)
    ...
    for _ in range(cfg.steps_per_iter):
        step = self.health.step({"recon": recon, "kl": kl}, {"recon": 1.0, "kl": beta})
        if step.applied:
            losses.append(step.total)
    metrics.update(self.health.end_iteration())

Several optimizers: ``HealthMonitor(model, {"gen": opt_g, "disc": opt_d})``
and ``step(..., optimizer="disc")``. Gradients accumulated over several
backward passes: call :meth:`HealthMonitor.backward` for each, then
:meth:`HealthMonitor.apply`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

if TYPE_CHECKING:
    from tunelab._health_monitor import HealthMonitor, default_layers

__all__ = [
    "Diagnosis",
    "HealthMonitor",
    "HealthPolicy",
    "StepResult",
    "TrialDiverged",
    "default_layers",
    "monitor_of",
]


class HealthPolicy(BaseModel):
    """What the monitor does about an unhealthy step: the spec's ``health:`` block.

    Defaults: skip a non-finite optimizer step; end the trial as diverged
    after 10 consecutive skips; an explosion is counted and diagnosed, and
    ends the trial only with ``stop_on_explosion: true``.

    Args:
        skip_nonfinite: Skip an optimizer step whose loss or gradients are
            non-finite (count it in ``health/nan_skipped``). False: the first
            such step ends the trial as diverged.
        max_consecutive_skips: End the trial as diverged after this many
            skipped steps in a row (0: never).
        stop_on_explosion: End the trial as diverged when the explosion
            detector fires (default: count it and record the diagnosis only).
        explosion_factor: A step explodes when its pre-clip norm exceeds this
            many times the median of the last ``window`` norms.
        window: Steps in the robust level (median) of the norm.
        min_history: Norms needed before the step rule may fire (<= window).
        growth_factor: The iteration rule: the iteration's largest norm grew at
            least ``growth_factor ** growth_iterations``-fold over the last
            ``growth_iterations`` iterations (0: off), and grew again in the
            last one.
        growth_iterations: See ``growth_factor``.
        layer_norms_every: Group the gradient norms per layer every this many
            applied steps of an iteration, from its first (1: every step). The global norm, the loss terms and the
            explosion rule see every step; an explosion on a step in between
            still names its layer.
        update_ratio_every: Check the parameters after the step and measure
            the update-to-weight ratio every this many applied steps of an
            iteration, from its first (a copy and two
            norm passes over the parameters: the monitor's largest cost). See
            ``bench/bench_health.py`` for the figures.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    skip_nonfinite: StrictBool = True
    max_consecutive_skips: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = 10
    stop_on_explosion: StrictBool = False
    explosion_factor: Annotated[float, Field(gt=1, le=1e12, allow_inf_nan=False)] = 10.0
    window: Annotated[StrictInt, Field(ge=1, le=100_000)] = 50
    min_history: Annotated[StrictInt, Field(ge=1, le=100_000)] = 10
    growth_factor: Annotated[float, Field(gt=1, le=1e12, allow_inf_nan=False)] = 2.0
    growth_iterations: Annotated[StrictInt, Field(ge=0, le=100_000)] = 2
    layer_norms_every: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 1
    update_ratio_every: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 10

    @model_validator(mode="after")
    def _history_fits(self) -> HealthPolicy:
        if self.min_history > self.window:
            raise ValueError(
                f"min_history ({self.min_history}) must be <= window ({self.window}); "
                "lower min_history or raise window"
            )
        return self


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What went wrong, where: the one-line summary tunelab tags and shows.

    Attributes:
        kind: ``nonfinite_loss``, ``nonfinite_grad``, ``nonfinite_param``,
            ``explosion`` or ``growth``.
        iteration: 1-based iteration of the event.
        step: 1-based optimizer step within the trial (all optimizers).
        optimizer: The optimizer's name.
        term: The culprit loss term (first non-finite; for an explosion the
            term with the largest share), or None.
        layer: The layer: the first non-finite parameter's; for a non-finite
            loss, the first watched module whose output went non-finite; for
            an explosion, the one whose norm grew most. None if unknown.
        parameter: The first non-finite parameter's module path, or None.
        grad_norm: The step's global pre-clip gradient norm.
        level: The robust level (median of the window) it is compared with.
        layer_growth: The named layer's norm over its own level.
        rank: In a multi-worker trial, the worker whose loss or gradients went
            non-finite first (lowest rank); None with one worker.
    """

    kind: str
    iteration: int
    step: int
    optimizer: str
    term: str | None = None
    layer: str | None = None
    parameter: str | None = None
    grad_norm: float = math.nan
    level: float = math.nan
    layer_growth: float = math.nan
    diverged: bool = False
    rank: int | None = None

    def line(self) -> str:
        """``iteration 3 step 41 (main): explosion; term recon; layer stages.2 x31; norm 45.3 (level 3.71, x12.2)``."""
        what = {
            "nonfinite_loss": "non-finite loss",
            "nonfinite_grad": "non-finite gradient",
            "nonfinite_param": "non-finite parameter",
            "explosion": "gradient explosion",
            "growth": "sustained gradient growth",
        }.get(self.kind, self.kind)
        parts = [f"iteration {self.iteration} step {self.step} ({self.optimizer}): {what}"]
        if self.rank is not None:
            parts.append(f"rank {self.rank}")
        if self.term:
            parts.append(f"term {self.term}")
        if self.layer:
            grew = f" x{self.layer_growth:.3g}" if math.isfinite(self.layer_growth) else ""
            at = f" ({self.parameter})" if self.parameter and self.parameter != self.layer else ""
            parts.append(f"layer {self.layer}{at}{grew}")
        norm = f"norm {self.grad_norm:.4g}"
        if math.isfinite(self.level) and self.level > 0 and math.isfinite(self.grad_norm):
            norm += f" (level {self.level:.4g}, x{self.grad_norm / self.level:.3g})"
        parts.append(norm)
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields plus ``line``."""
        return {**dataclasses.asdict(self), "line": self.line()}


class TrialDiverged(Exception):
    """Raised by a step when the policy ends the trial; carries the :class:`Diagnosis`."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        super().__init__(diagnosis.line())
        self.diagnosis = diagnosis


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One optimizer step as the monitor took it.

    Attributes:
        applied: The optimizer stepped (False: skipped as non-finite).
        total: The weighted total loss (sum of ``w_k v_k``), NaN when skipped
            for a non-finite loss.
        values: Each term's unweighted value.
        grad_norm: Global gradient norm before clipping.
        clipped: The gradients were scaled down.
    """

    applied: bool
    total: float
    values: dict[str, float]
    grad_norm: float
    clipped: bool


def __getattr__(name: str) -> Any:
    """``HealthMonitor`` and ``default_layers`` load torch: imported on first use (PEP 562)."""
    if name in ("HealthMonitor", "default_layers"):
        from tunelab import _health_monitor

        return getattr(_health_monitor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def monitor_of(experiment: object) -> HealthMonitor | None:
    """The family experiment's monitor (its ``health`` attribute), or None."""
    from tunelab._health_monitor import HealthMonitor

    mon = getattr(experiment, "health", None)
    return mon if isinstance(mon, HealthMonitor) else None
