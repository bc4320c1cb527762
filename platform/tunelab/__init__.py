"""tunelab: seed culls, paired-seed lever A/B verdicts and sweeps on Ray Tune + MLflow."""

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

__all__ = [
    "Experiment",
    "Family",
    "atomic_write_bytes",
    "atomic_write_json",
    "capture_rng_state",
    "data_lock",
    "family_names",
    "get_family",
    "load_state",
    "restore_rng_state",
    "save_state",
    "seed_everything",
    "sorted_checkpoints",
]

from tunelab._spec import SpecError, load_spec, parse_spec

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


__all__ += [*_LAZY, "SpecError", "load_spec", "parse_spec"]
