"""The contract between tunelab and an experiment family.

A family is one module in ``trainables/`` (cleanrl style: config, data, model,
training step, metrics, readable top to bottom). It exposes a module-level
``FAMILY = Family(...)``. tunelab owns the loop: it builds one
:class:`Experiment` per trial, calls :meth:`Experiment.train_iteration` once per
iteration (an epoch or an eval interval), reports the returned metrics to Ray
Tune and MLflow, checkpoints :meth:`Experiment.state_dict` (plus the global
torch / numpy / python RNG states, which tunelab saves and restores itself) and,
when a trial reaches its budget, calls :meth:`Experiment.export`.

Rules a family follows so that runs are reproducible and resume is bit-exact:

- ``seed`` fixes init, data order and noise. Before ``build`` is called tunelab
  seeds torch, numpy and ``random`` with ``seed``; a family that keeps its own
  ``torch.Generator`` / ``numpy.random.Generator`` puts their states in
  ``state_dict``.
- ``state_dict`` holds everything needed to continue exactly: model, optimizer,
  LR scheduler, step counters, curriculum position, best value, own RNGs.
  Values are tensors, numpy arrays, numbers, strings, lists and dicts
  (``torch.save``-able).
- Data that is the same for every seed (a synthetic corpus) is generated once
  under ``data_root`` (shared by all trials; use :func:`tunelab.data_lock`).
- Metric names are namespaced constants (``train/loss``, ``val/autonomy``,
  ``health/grad_norm``) defined once at the top of the family module.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["Experiment", "Family", "family_names", "get_family"]


@runtime_checkable
class Experiment(Protocol):
    """The training state of one trial."""

    def train_iteration(self) -> dict[str, float]:
        """Train one iteration (epoch / eval interval), evaluate, return metrics.

        Must return plain floats; non-finite values are allowed (tunelab's
        health checks see them).
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly (see module docstring)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...

    def export(self, out_dir: Path) -> dict[str, Any]:
        """Write the trial's artifacts (WAV, PNG, ...) into ``out_dir``.

        Returns JSON-able fields for the trial's manifest (final scores with
        their breakdown, sample rate, ...). Called when a trial reaches its
        budget, and again on a reloaded checkpoint for the selected seed.
        """
        ...


@dataclasses.dataclass(frozen=True)
class Family:
    """A registered experiment family.

    Args:
        name: The name specs use (``family: ouroboros``).
        config_cls: A pydantic dataclass with ``extra="forbid"``; its fields
            are the family's config keys, each with a default and a docstring.
        build: ``build(config, seed, data_root) -> Experiment``.
        metrics: The metric names ``train_iteration`` returns.
    """

    name: str
    config_cls: type
    build: Callable[[Any, int, Path], Experiment]
    metrics: tuple[str, ...]
    description: str = ""

    def make_config(self, values: Mapping[str, Any]) -> Any:
        """Validate ``values`` into ``config_cls`` (raises pydantic.ValidationError)."""
        return self.config_cls(**dict(values))


def family_names() -> list[str]:
    """Names of the families registered in ``trainables``."""
    import trainables

    return sorted(trainables.FAMILIES)


def get_family(name: str) -> Family:
    """Look up a family by registered name or by ``"package.module:ATTR"``.

    Raises:
        KeyError: the name is not registered (the message lists the known ones).
    """
    if ":" in name:
        module_name, attr = name.split(":", 1)
        family = getattr(importlib.import_module(module_name), attr)
    else:
        import trainables

        if name not in trainables.FAMILIES:
            known = ", ".join(sorted(trainables.FAMILIES))
            raise KeyError(f"unknown family {name!r}; known families: {known}")
        family = importlib.import_module(trainables.FAMILIES[name]).FAMILY
    if not isinstance(family, Family):
        raise TypeError(f"{name!r} does not name a tunelab.Family")
    return family
