"""tunelab: seed culls, paired-seed lever A/B verdicts and sweeps on Ray Tune + MLflow.

The public surface:

- running: :func:`run_experiment`, :func:`resume_experiment`,
  :func:`experiment_status`, :func:`latest_experiment`, :func:`init_ray`
  (Ray is imported lazily, on first use);
- specs: :func:`load_spec`, :func:`parse_spec`;
- families: the contract (:class:`Family`, :class:`Experiment`),
  :func:`get_family`, :func:`family_names`, :func:`build_experiment`,
  :func:`restore_experiment`, and the checkpoint helpers families use;
- errors: :class:`TunelabError` and its subclasses, each with the
  ``exit_code`` the command line ends with.

Modules with their own public API: :mod:`tunelab.spec` (spec models,
limits), :mod:`tunelab.family` (the family contract), :mod:`tunelab.checkpoint`,
:mod:`tunelab.errors` (every error and exit code), :mod:`tunelab.names`
(tags, statuses), :mod:`tunelab.layout` (the experiment folder),
:mod:`tunelab.outcome` (trial outcomes), :mod:`tunelab.kinds` (experiment
kinds; :mod:`tunelab.kinds.lever_searcher`), :mod:`tunelab.schedulers` (cull
schedulers), :mod:`tunelab.callbacks` (the driver's Tune callbacks),
:mod:`tunelab.tracking` (the tracking seam), :mod:`tunelab.health`,
:mod:`tunelab.devices`, :mod:`tunelab.distributed`, :mod:`tunelab.verdicts`,
:mod:`tunelab.paired_table`, :mod:`tunelab.report`, :mod:`tunelab.metrics`,
:mod:`tunelab.slurm`. Modules named ``_*`` are private.
"""

from typing import TYPE_CHECKING

from tunelab.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    capture_rng_state,
    data_lock,
    load_state,
    restore_rng_state,
    save_state,
    seed_everything,
    sorted_checkpoints,
    strict_json,
)
from tunelab.errors import (
    DataError,
    DiskFullError,
    ExperimentError,
    ExperimentInterrupted,
    ReportError,
    SpecError,
    TableError,
    TrackingUnavailable,
    TunelabError,
)
from tunelab.family import (
    FAMILY_GROUP,
    Experiment,
    Family,
    FamilyConflictError,
    family_names,
    get_family,
)
from tunelab.spec import load_spec, parse_spec

if TYPE_CHECKING:
    from tunelab._driver import resume_experiment, run_experiment
    from tunelab._ray_start import init_ray
    from tunelab._status import experiment_status, latest_experiment
    from tunelab._trial import build_experiment, restore_experiment

__all__ = [
    "FAMILY_GROUP",
    "DataError",
    "DiskFullError",
    "Experiment",
    "ExperimentError",
    "ExperimentInterrupted",
    "Family",
    "FamilyConflictError",
    "ReportError",
    "SpecError",
    "TableError",
    "TrackingUnavailable",
    "TunelabError",
    "atomic_write_bytes",
    "atomic_write_json",
    "build_experiment",
    "capture_rng_state",
    "data_lock",
    "experiment_status",
    "family_names",
    "get_family",
    "init_ray",
    "latest_experiment",
    "load_spec",
    "load_state",
    "parse_spec",
    "restore_experiment",
    "restore_rng_state",
    "resume_experiment",
    "run_experiment",
    "save_state",
    "seed_everything",
    "sorted_checkpoints",
    "strict_json",
]

_LAZY = {  # heavy (Ray, torch) imports, loaded on first use
    "build_experiment": "tunelab._trial",
    "restore_experiment": "tunelab._trial",
    "experiment_status": "tunelab._status",
    "latest_experiment": "tunelab._status",
    "init_ray": "tunelab._ray_start",
    "resume_experiment": "tunelab._driver",
    "run_experiment": "tunelab._driver",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
