"""The health monitor's explosion detector: its two rules, its state, its diagnoses.

Owns, per optimizer, what the detector remembers across steps and iterations
(the window of pre-clip norms, the window of per-layer norms, each
iteration's largest norm, whether the last step was exploding: the ``opts``
entries of :meth:`tunelab.health.HealthMonitor.state_dict`), and the rules:

- the step rule: a step's norm exceeds ``explosion_factor`` x the median of
  the last ``window`` norms (at least ``min_history`` of them);
- the iteration rule: the iteration's largest norm grew
  ``growth_factor ** growth_iterations``-fold over the last
  ``growth_iterations`` iterations and grew again in the last one;

and the diagnoses they give: the layer whose norm grew most against its own
level, the loss term with the largest share. The policy is passed on every
call (tunelab may replace the monitor's policy after it is built).
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tunelab.health import Diagnosis, HealthPolicy

__all__ = ["ExplosionDetector", "explosion_diagnosis", "growth_diagnosis", "median"]


class ExplosionDetector:
    """One optimizer's detector state and rules (plain floats; per-layer norms on device)."""

    def __init__(self) -> None:
        self.window: collections.deque[float] = collections.deque()
        self.layer_window: collections.deque[list[float]] = collections.deque()
        self.layer_pending: list[Tensor] = []  # this iteration's per-layer norms, on device
        self.iter_max: list[float] = []  # largest finite norm per past iteration
        self.in_explosion = False

    def level(self) -> float:
        """The robust level: the median of the window (NaN while it is empty)."""
        return median(self.window)

    def check_step(self, norm: float, policy: HealthPolicy) -> tuple[bool, float]:
        """The step rule: (exploding, level) for a step's norm; the state is not touched."""
        level = self.level()
        exploding = (
            len(self.window) >= policy.min_history
            and level > 0
            and norm > policy.explosion_factor * level
        )
        return exploding, level

    def layer_reference(self, n: int, policy: HealthPolicy) -> list[float]:
        """Each of ``n`` layers' own level: the median of its last ``window`` norms."""
        recent = torch.stack(self.layer_pending).tolist() if self.layer_pending else []
        return _layer_levels([*self.layer_window, *recent][-policy.window :], n)

    def observe(
        self, norm: float, exploding: bool, layer_norms: Tensor | None, policy: HealthPolicy
    ) -> None:
        """Take an applied step into the windows (an exploding step's layers stay out)."""
        self.in_explosion = exploding
        self.window.append(norm)
        if len(self.window) > policy.window:
            self.window.popleft()
        if not exploding and layer_norms is not None:
            self.layer_pending.append(layer_norms)  # read back at end_iteration (no sync here)

    def end_iteration(self, policy: HealthPolicy) -> None:
        """Fold the iteration's per-layer norms into the per-layer window."""
        if self.layer_pending:  # the per-layer levels the step rule compares with
            self.layer_window.extend(torch.stack(self.layer_pending).tolist())
            while len(self.layer_window) > policy.window:
                self.layer_window.popleft()
        self.layer_pending = []

    def check_growth(self, peak: float, policy: HealthPolicy) -> float | None:
        """The iteration rule on the iteration's largest norm; the level it grew from, or None.

        Over the last ``n = growth_iterations`` iterations the largest norm grew at
        least ``growth_factor ** n``-fold, and it grew again in the last one (a
        cumulative rule: one slower iteration in a steady climb does not hide it).
        """
        self.iter_max.append(peak)
        del self.iter_max[: -(policy.growth_iterations + 1) or None]
        n = policy.growth_iterations
        if n == 0 or len(self.iter_max) < n + 1:
            return None
        seq = self.iter_max[-(n + 1) :]
        if not all(math.isfinite(v) and v > 0 for v in seq):
            return None
        if seq[-1] < policy.growth_factor**n * seq[0] or seq[-1] <= seq[-2]:
            return None
        return seq[0]

    def state_dict(self) -> dict[str, Any]:
        """The state a bit-exact resume needs, as plain lists and numbers."""
        return {
            "window": list(self.window),
            "layer_window": [list(v) for v in self.layer_window],
            "iter_max": list(self.iter_max),
            "in_explosion": self.in_explosion,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.window = collections.deque(float(v) for v in state["window"])
        self.layer_window = collections.deque([float(x) for x in v] for v in state["layer_window"])
        self.iter_max = [float(v) for v in state["iter_max"]]
        self.in_explosion = bool(state["in_explosion"])


def explosion_diagnosis(
    *,
    iteration: int,
    step: int,
    optimizer: str,
    layer_names: Sequence[str],
    layer_now: Sequence[float],
    reference: Sequence[float],
    norm: float,
    level: float,
    values: Mapping[str, float],
    weights: Mapping[str, float],
) -> Diagnosis:
    """The step rule fired: the layer that grew most against its own level, the largest term."""
    layers = (layer_names, layer_now, reference)
    return _layer_diagnosis(
        "explosion", iteration, step, optimizer, layers, norm, level, values, weights
    )


def growth_diagnosis(
    *,
    iteration: int,
    step: int,
    optimizer: str,
    history: Sequence[Mapping[str, Any]],
    peak: float,
    level: float,
    values: Mapping[str, float],
    weights: Mapping[str, float],
) -> Diagnosis:
    """The iteration rule fired: the layer whose largest norm grew most over the last two
    records of ``history``, the largest term of the last applied step."""
    prev = history[-2]["layers"] if len(history) >= 2 else {}
    now = history[-1]["layers"]
    names = [k for k in now if k in prev]
    layers = (names, [now[k][0] for k in names], [prev[k][0] for k in names])
    return _layer_diagnosis(
        "growth", iteration, step, optimizer, layers, peak, level, values, weights
    )


def _layer_diagnosis(
    kind: str,
    iteration: int,
    step: int,
    optimizer: str,
    layers: tuple[Sequence[str], Sequence[float], Sequence[float]],
    norm: float,
    level: float,
    values: Mapping[str, float],
    weights: Mapping[str, float],
) -> Diagnosis:
    """A rule's diagnosis: ``layers`` is (names, norms now, reference norms); the layer that
    grew most against its reference and the loss term with the largest share."""
    layer, growth = _grew_most(*layers)
    return Diagnosis(
        kind=kind,
        iteration=iteration,
        step=step,
        optimizer=optimizer,
        term=_largest_share(values, weights),
        layer=layer,
        grad_norm=norm,
        level=level,
        layer_growth=growth,
    )


def median(values: Iterable[float]) -> float:
    """The median, NaN for no values."""
    vals = list(values)
    return statistics.median(vals) if vals else math.nan


def _layer_levels(window: Iterable[list[float]], n: int) -> list[float]:
    rows = [r for r in window if len(r) == n]
    if not rows:
        return [math.nan] * n
    return [statistics.median(col) for col in zip(*rows, strict=True)]


def _grew_most(
    names: Sequence[str], now: Sequence[float], ref: Sequence[float]
) -> tuple[str | None, float]:
    best, best_ratio = None, -math.inf
    for name, a, b in zip(names, now, ref, strict=True):
        ratio = a / b if b > 0 and math.isfinite(b) else (math.inf if a > 0 else math.nan)
        if not math.isnan(ratio) and ratio > best_ratio:
            best, best_ratio = name, ratio
    return best, best_ratio if best is not None else math.nan


def _largest_share(values: Mapping[str, float], weights: Mapping[str, float]) -> str | None:
    parts = {k: abs(weights.get(k, 1.0) * v) for k, v in values.items() if math.isfinite(v)}
    return max(parts, key=lambda k: parts[k]) if parts else None
