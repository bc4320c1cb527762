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

Registering a family. Families are found through Python entry points in the
group ``tunelab.families`` (the standard plugin mechanism): the entry point's
name is the name specs use and its value names the ``Family`` object. The
shipped families are registered this way in tunelab's own ``pyproject.toml``,
and a user's package registers its families exactly the same way::

    # pyproject.toml of the package that holds my_lab/my_family.py
    [project.entry-points."tunelab.families"]
    my_family = "my_lab.my_family:FAMILY"

then ``pip install -e .`` that package (entry points are read from installed
metadata, so a new or renamed entry needs a reinstall) and write
``family: my_family`` in a spec. An unknown family name is reported with the
registered names (read from installed metadata, without importing any family
module); a family module is imported only when its name is looked up. The entry point's name must equal ``FAMILY.name``.

Checking data before trials start. A family that reads files (a corpus folder,
a cached data set under ``data_root``) sets ``Family(data_check=...)``:
``data_check(config, data_root)`` reads what the trials would read and raises
:class:`tunelab.errors.DataError` (exit code 2) naming the file and the reason
(a garbage or truncated file, a missing or non-numeric annotation). The driver
calls :func:`check_family_data` with every config a spec would run before any
trial starts, so bad data stops the experiment with one clear message instead
of failing every trial (or, worse, silently changing the split). A family's
loader raises the same errors inside a trial.

A spec may instead name the object directly, ``family: "my_lab.my_family:FAMILY"``
(no registration needed). Either way a family name is code: looking it up
imports the module it names and runs its top-level code, so only run specs you
would run as a script.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tunelab.errors import DataError

__all__ = [
    "FAMILY_GROUP",
    "Experiment",
    "Family",
    "FamilyConflictError",
    "check_family_data",
    "family_names",
    "get_family",
]

#: The entry point group families are registered in.
FAMILY_GROUP = "tunelab.families"


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
        data_check: Optional ``data_check(config, data_root) -> None``: check the
            files the family would read for ``config`` and raise
            :class:`tunelab.errors.DataError` (file and reason) on bad data. None:
            the family reads no files (or has nothing to check).
    """

    name: str
    config_cls: type
    build: Callable[[Any, int, Path], Experiment]
    metrics: tuple[str, ...]
    description: str = ""
    data_check: Callable[[Any, Path], None] | None = None

    def make_config(self, values: Mapping[str, Any]) -> Any:
        """Validate ``values`` into ``config_cls`` (raises pydantic.ValidationError).

        Booleans are not numbers: ``true`` for an ``int`` or ``float`` field is refused
        (pydantic's lax mode would read it as 1), naming the field like any other error.
        """
        _refuse_bools_for_numbers(self.config_cls, values)
        return self.config_cls(**dict(values))

    def check_data(self, data_root: Path, config: Any) -> None:
        """Check the data ``config`` (a config object or a mapping) would train on.

        Raises:
            tunelab.errors.DataError: a bad file (the message names it and says why).
            pydantic.ValidationError: ``config`` is a mapping that is not a valid config.
        """
        if self.data_check is None:
            return
        cfg = self.make_config(config) if isinstance(config, Mapping) else config
        try:
            self.data_check(cfg, Path(data_root))
        except OSError as err:  # unreadable file or folder: name it like any other bad data
            where = err.filename if err.filename is not None else data_root
            raise DataError(where, f"cannot read: {err.strerror or err}") from err


def _refuse_bools_for_numbers(config_cls: type, values: Mapping[str, Any]) -> None:
    """Raise pydantic.ValidationError for a bool given to an int or float field."""
    fields = getattr(config_cls, "__pydantic_fields__", None) or {}
    errors: list[Any] = []
    for key, value in values.items():
        info = fields.get(key)
        if not isinstance(value, bool) or info is None:
            continue
        types = set(typing.get_args(info.annotation)) - {type(None)} or {info.annotation}
        if types <= {int, float}:
            kind = "int_type" if int in types else "float_type"
            errors.append({"type": kind, "loc": (key,), "input": value})
    if errors:
        import pydantic_core

        raise pydantic_core.ValidationError.from_exception_data(config_cls.__name__, errors)


class FamilyConflictError(ImportError):
    """Two installed distributions register the same family name with different values.

    An :class:`ImportError` because the family cannot be loaded until one of the
    registrations is removed (spec validation reports it like any other family
    that fails to load).
    """


def _entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """The ``tunelab.families`` entry points by name (read fresh from installed metadata).

    Equal registrations (same name and value, e.g. one distribution seen twice)
    count once; nothing is imported.
    """
    by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=FAMILY_GROUP):
        seen = by_name.setdefault(ep.name, [])
        if all(ep.value != other.value for other in seen):
            seen.append(ep)
    return by_name


def _origin(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{ep.value!r} (distribution {dist.name!r})" if dist is not None else repr(ep.value)


def family_names() -> list[str]:
    """Names of the families registered under the ``tunelab.families`` entry point group.

    Reads installed metadata only; no family module is imported.
    """
    return sorted(_entry_points())


def get_family(name: str) -> Family:
    """Look up a family by registered name or by ``"package.module:ATTR"``.

    A registered name loads that one entry point (importing only its module);
    ``"package.module:ATTR"`` imports ``package.module`` and takes ``ATTR``. Both
    import and run code: a family name in a spec is code, not data.

    Raises:
        KeyError: the name is not registered (the message lists the known ones).
        FamilyConflictError: two installed distributions register ``name`` with
            different values (the message names both).
        TypeError: the object named is not a :class:`Family`, or a registered
            family's ``Family.name`` differs from its entry point name.
        ImportError, AttributeError: the module or attribute named does not exist.
    """
    if ":" in name:
        module_name, attr = name.split(":", 1)
        family = getattr(importlib.import_module(module_name), attr)
        if not isinstance(family, Family):
            raise TypeError(f"{name!r} does not name a tunelab.Family")
        return family
    registered = _entry_points()
    eps = registered.get(name)
    if not eps:
        known = ", ".join(sorted(registered)) or (
            f"none (no installed distribution registers entry points in group "
            f"{FAMILY_GROUP!r}; pip install -e the package that does)"
        )
        close = difflib.get_close_matches(name, sorted(registered), n=1, cutoff=0.6)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise KeyError(f"unknown family {name!r}{hint}; known families: {known}")
    if len(eps) > 1:
        where = " and ".join(_origin(ep) for ep in eps)
        raise FamilyConflictError(
            f"family {name!r} is registered more than once in entry point group "
            f"{FAMILY_GROUP!r}: {where}; uninstall one, or name the family as "
            f"'package.module:ATTR' in the spec"
        )
    family = eps[0].load()
    if not isinstance(family, Family):
        raise TypeError(
            f"{name!r} does not name a tunelab.Family "
            f"(entry point {eps[0].value!r} in group {FAMILY_GROUP!r})"
        )
    if family.name != name:
        raise TypeError(
            f"entry point {name!r} = {eps[0].value!r} in group {FAMILY_GROUP!r} loads a "
            f"Family named {family.name!r}; register it under {family.name!r}"
        )
    return family


def check_family_data(family: str | Family, data_root: Path, configs: Iterable[Any]) -> None:
    """Check a family's data for every config an experiment would run, before trials start.

    Args:
        family: A registered name or ``"package.module:ATTR"`` (as in a spec), or a
            :class:`Family`.
        data_root: The experiment's data root (the ``data_root`` trials get).
        configs: Family configs, as config objects or mappings (e.g. the ``values``
            of ``spec.family_configs()``); equal configs are checked once.

    Raises:
        tunelab.errors.DataError: the first bad file found (exit code 2).
    """
    fam = get_family(family) if isinstance(family, str) else family
    if fam.data_check is None:
        return
    seen: set[str] = set()
    for config in configs:
        cfg = fam.make_config(config) if isinstance(config, Mapping) else config
        key = repr(cfg)
        if key not in seen:
            seen.add(key)
            fam.check_data(data_root, cfg)
