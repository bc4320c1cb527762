"""tunelab: seed culls, paired-seed lever A/B verdicts and sweeps on Ray Tune + MLflow.

The public surface: the family contract (:class:`Family`, :class:`Experiment`),
the checkpoint helpers families use, specs (:func:`load_spec`) and the
experiment entry points (:func:`run_experiment`, :func:`resume_experiment`,
:func:`experiment_status`), which import Ray lazily on first use.
"""

from typing import TYPE_CHECKING

from tunelab._checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    capture_rng_state,
    data_lock,
    load_state,
    restore_rng_state,
    save_state,
    seed_everything,
    sorted_checkpoints,
)
from tunelab._family import Experiment, Family, family_names, get_family
from tunelab._spec import SpecError, load_spec, parse_spec

if TYPE_CHECKING:
    from tunelab._runner import (
        ExperimentError,
        experiment_status,
        latest_experiment,
        resume_experiment,
        run_experiment,
    )

__all__ = [
    "Experiment",
    "ExperimentError",
    "Family",
    "SpecError",
    "atomic_write_bytes",
    "atomic_write_json",
    "capture_rng_state",
    "data_lock",
    "experiment_status",
    "family_names",
    "get_family",
    "latest_experiment",
    "load_spec",
    "load_state",
    "parse_spec",
    "restore_rng_state",
    "resume_experiment",
    "run_experiment",
    "save_state",
    "seed_everything",
    "sorted_checkpoints",
]

_LAZY = {  # heavy (Ray) imports, loaded on first use
    "ExperimentError": "tunelab._runner",
    "experiment_status": "tunelab._runner",
    "latest_experiment": "tunelab._runner",
    "resume_experiment": "tunelab._runner",
    "run_experiment": "tunelab._runner",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
