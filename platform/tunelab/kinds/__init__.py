"""Experiment kinds as strategies, registered by name.

A kind decides everything that differs between a seed cull, a sweep and a
lever A/B: its spec model, the milestones trials checkpoint at, the Tune
scheduler and search algorithm, the param space, per-trial tags, the
post-processing (selection, best config, verdicts), the trial count progress
expects (``total_trials``), the child runs' role and the placement keys of its
trials (``arm``, ``round``, ``stage`` for a lever A/B). The driver
(:mod:`tunelab._driver`) runs any kind the same way and never branches on it.

A new kind is one module defining an :class:`ExperimentKind` subclass and one
line in :data:`KINDS`::

    KINDS = {..., "my_kind": "my_package.my_kind:MyKind"}
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from tunelab.kinds._base import ExperimentKind, FinalizeContext

if TYPE_CHECKING:
    from tunelab.spec import BaseSpec

__all__ = ["KINDS", "ExperimentKind", "FinalizeContext", "get_kind", "kind_names", "spec_class"]

#: ``kind`` of a spec -> ``"module:Class"`` of its :class:`ExperimentKind` (imported lazily).
KINDS: dict[str, str] = {
    "seed_cull": "tunelab.kinds.seed_cull:SeedCull",
    "sweep": "tunelab.kinds.sweep:Sweep",
    "lever_ab": "tunelab.kinds.lever_ab:LeverAB",
}


def kind_names() -> list[str]:
    """The registered kinds, in registry order."""
    return list(KINDS)


@functools.cache
def get_kind(name: str) -> type[ExperimentKind]:
    """The :class:`ExperimentKind` class registered as ``name``.

    Raises:
        KeyError: ``name`` is not registered.
    """
    if name not in KINDS:
        raise KeyError(f"unknown experiment kind {name!r}; known kinds: {', '.join(KINDS)}")
    module, attr = KINDS[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, ExperimentKind)):
        raise TypeError(f"{KINDS[name]} is not an ExperimentKind")
    return cls


def spec_class(name: str) -> type[BaseSpec]:
    """The spec model of kind ``name``."""
    return get_kind(name).spec_cls
