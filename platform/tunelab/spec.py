"""Experiment specs: YAML files validated into pydantic models.

A spec names the family, its base config, the budget, the metric and, per
kind, the seeds / search space / cull / levers. Everything is checked before
anything starts: unknown keys, wrong types, unknown families, config keys the
family does not have, impossible culls. A bad spec raises :class:`SpecError`
whose message names the file, the key path and what was expected. A misspelt
name gets the closest known one (:func:`did_you_mean`): ``budget: required key
is missing (found `buget`: did you mean `budget`?)``, ``config.hiden: family
'toy' has no config key 'hiden' (did you mean `hidden`?); ...``.

Limits (a bad spec never starts and never hangs; each is a module constant):

- the file: at most :data:`MAX_SPEC_BYTES` (1 MB) of UTF-8 YAML, at most
  :data:`MAX_YAML_NODES` (50 000) values once anchors/aliases are expanded
  (an alias bomb is refused before it is expanded), nested at most
  :data:`MAX_YAML_DEPTH` (32) levels, no recursive aliases, no duplicate keys;
- ``seeds``: at most :data:`MAX_SEEDS` (10 000) seeds, each in
  ``0..MAX_SEED`` (``2**32 - 1``, numpy's seed range);
- ``budget`` (iterations): at most :data:`MAX_BUDGET` (1 000 000);
- ``num_samples``: at most :data:`MAX_SAMPLES` (10 000); all the trials a
  spec plans (seeds x samples x grid points, or arms x seeds x rounds):
  at most :data:`MAX_TRIALS` (100 000);
- ``resources`` per trial: ``cpu`` at most :data:`MAX_CPU` (1024), ``gpu``
  at most :data:`MAX_GPU` (64), ``memory_gb`` at most :data:`MAX_MEMORY_GB`
  (16 384);
- ``failure.retries``: at most :data:`MAX_RETRIES` (100).

Integer keys are integers: ``true`` is not ``1`` and ``2.5`` is not an
integer, but ``1e6`` (YAML 1.2 notation, which PyYAML alone reads as a
string) is the number 1000000. Float keys are finite (no ``.nan`` / ``.inf``).
Metric names must be names MLflow accepts (:func:`metric_name_problem`).

The keys every kind shares are :class:`BaseSpec`; each kind's own model
(``SeedCullSpec``, ``SweepSpec``, ``LeverABSpec``) lives in its module in
:mod:`tunelab.kinds` and is found through the kind registry by the spec's
``kind``.

This module holds the models and the entry points. Reading the YAML (and
its limits) is :mod:`tunelab._spec_yaml`; checking a raw spec against its
kind's model and its family, with the did-you-mean messages, is
:mod:`tunelab._spec_checks`. Both are private; :func:`did_you_mean`,
:func:`metric_name_problem` and the YAML limits are re-exported here.

Example (``search_spaces/seed_cull.yaml`` without its comments; a test keeps them equal)::

    kind: seed_cull
    name: ouroboros-seed-cull
    family: ouroboros
    description: poly neural-ODE (degree 3) with SSM drives, spectral rollout loss, cold-start autonomy selection
    config: {hidden: 32, n_layers: 2, poly_degree: 3, lr: 2.0e-3, h_schedule: pow2, osc_init: true}
    seeds: 4
    budget: 20
    metric: {name: val/autonomy, mode: max}
    cull: {at: 0.4, keep: 2, scheduler: sync, tie_break: val/bounded_frac}
    select: {metric: val/autonomy, mode: max}
    resources: {cpu: 1}
    checkpoint: {every: 1, keep: null}
    quick:
      budget: 6
      config:
        {sample_rate: 8000, hidden: 16, n_train_files: 24, n_val_files: 4, n_test_files: 4,
         max_segs: 192, H_min: 128, H_max: 512, curriculum_epochs: 6, batch_size: 16, steps_per_iter: 8, listen_s: 0.25}
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from tunelab._spec_checks import check_quick, did_you_mean, metric_name_problem, validate_spec
from tunelab._spec_yaml import MAX_YAML_DEPTH, MAX_YAML_NODES, load_yaml
from tunelab.errors import SpecError
from tunelab.family import get_family
from tunelab.health import HealthPolicy

__all__ = [
    "MAX_BUDGET",
    "MAX_CPU",
    "MAX_GPU",
    "MAX_MEMORY_GB",
    "MAX_RETRIES",
    "MAX_SAMPLES",
    "MAX_SEED",
    "MAX_SEEDS",
    "MAX_SPEC_BYTES",
    "MAX_TRIALS",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "AnySpec",
    "BaseSpec",
    "CheckpointSpec",
    "ConfigUse",
    "Domain",
    "FailureSpec",
    "Finite",
    "MetricSpec",
    "ResourcesSpec",
    "Seed",
    "SpecError",
    "Strict",
    "WholeNumber",
    "apply_overrides",
    "did_you_mean",
    "load_spec",
    "metric_name_problem",
    "parse_spec",
    "seed_list",
    "spec_hash",
]

Mode = Literal["max", "min"]

#: Largest spec file read (bytes).
MAX_SPEC_BYTES = 1_000_000
#: Most seeds a spec may run (``seeds: N`` or a list).
MAX_SEEDS = 10_000
#: Largest seed (numpy seeds are 32-bit).
MAX_SEED = 2**32 - 1
#: Largest ``budget`` (iterations per trial).
MAX_BUDGET = 1_000_000
#: Largest ``num_samples`` of a sweep.
MAX_SAMPLES = 10_000
#: Most trials a spec may plan in all (seeds x samples x grid points, arms x seeds x rounds).
MAX_TRIALS = 100_000
#: Most CPUs per trial.
MAX_CPU = 1024
#: Most GPUs per trial.
MAX_WORKERS = 1024
"""Upper bound of ``resources.workers`` (Ray Train workers per trial)."""
MAX_GPU = 64
#: Most memory per trial (GB).
MAX_MEMORY_GB = 16_384
#: Most retries per trial.
MAX_RETRIES = 100


def _whole_number(v: Any) -> Any:
    """``1e6`` is read as the float 1000000.0: an integral finite float becomes an int."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v


#: An integer key: ints, and integral floats (``1e6``); not booleans, strings or ``2.5``.
WholeNumber = Annotated[int, BeforeValidator(_whole_number), Field(strict=True)]
#: A float key: a finite number (ints allowed); not booleans, strings, ``.nan`` or ``.inf``.
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Seed = Annotated[WholeNumber, Field(ge=0, le=MAX_SEED)]


class Strict(BaseModel):
    """A frozen pydantic model whose unknown keys are errors (every spec block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricSpec(Strict):
    """The metric trials are judged on. ``name`` is a family metric (``val/autonomy``)."""

    name: str
    mode: Mode


class ResourcesSpec(Strict):
    """Resources per trial, as Ray understands them (``cpu`` <= 1024, ``gpu`` <= 64, GB <= 16384).

    ``workers: N`` (default 1) makes each trial a Ray Train data-parallel run
    of N workers (``TorchTrainer``; gloo on CPUs, nccl on GPUs); ``cpu`` and
    ``gpu`` are then per worker, so a trial holds ``N * cpu`` CPUs.
    """

    cpu: Annotated[Finite, Field(gt=0, le=MAX_CPU)] = 1.0
    gpu: Annotated[Finite, Field(ge=0, le=MAX_GPU)] = 0.0
    memory_gb: Annotated[Finite, Field(ge=0, le=MAX_MEMORY_GB)] | None = None
    workers: Annotated[WholeNumber, Field(ge=1, le=MAX_WORKERS)] = 1


class CheckpointSpec(Strict):
    """How often trials checkpoint (iterations) and how many checkpoints are kept.

    ``keep: null`` keeps all; ``keep: N`` keeps the last N by iteration number.
    """

    every: Annotated[WholeNumber, Field(ge=1, le=MAX_BUDGET)] = 1
    keep: Annotated[WholeNumber, Field(ge=1, le=MAX_BUDGET)] | None = None


class FailureSpec(Strict):
    """Retries per trial (from its last checkpoint, at most 100) and failed trials tolerated."""

    retries: Annotated[WholeNumber, Field(ge=0, le=MAX_RETRIES)] = 2
    tolerate: Annotated[WholeNumber, Field(ge=0, le=MAX_TRIALS)] = 0


class Domain(Strict):
    """A search domain: exactly one of choice, grid, uniform, loguniform, randint.

    ``choice`` / ``grid`` hold at most :data:`MAX_SAMPLES` values; bounds are finite.
    """

    choice: Annotated[list[Any], Field(max_length=MAX_SAMPLES)] | None = None
    grid: Annotated[list[Any], Field(max_length=MAX_SAMPLES)] | None = None
    uniform: tuple[Finite, Finite] | None = None
    loguniform: tuple[Finite, Finite] | None = None
    randint: tuple[WholeNumber, WholeNumber] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Domain:
        set_kinds = [k for k, v in self.__dict__.items() if v is not None]
        if len(set_kinds) != 1:
            raise ValueError(
                "a search domain needs exactly one of choice, grid, uniform, loguniform, "
                f"randint (got {set_kinds or 'none'}); e.g. {{loguniform: [1.0e-4, 1.0e-2]}}"
            )
        kind = set_kinds[0]
        if kind in ("choice", "grid") and not getattr(self, kind):
            raise ValueError(f"{kind} needs a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind} needs [low, high] with low < high, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs low > 0, got {lo}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self.__dict__.items() if v is not None)

    def sample_values(self) -> list[Any]:
        """Values that must all be valid config values (for validation)."""
        v = getattr(self, self.kind)
        return list(v)

    def to_tune(self) -> Any:
        from ray import tune

        v = getattr(self, self.kind)
        if self.kind == "choice":
            return tune.choice(v)
        if self.kind == "grid":
            return tune.grid_search(v)
        if self.kind == "uniform":
            return tune.uniform(*v)
        if self.kind == "loguniform":
            return tune.loguniform(*v)
        return tune.randint(v[0], v[1])


def seed_list(v: Any) -> Any:
    """``seeds: N`` means seeds ``0..N-1``; a list stays a list (a ``mode="before"`` validator).

    ``N`` is 1..:data:`MAX_SEEDS` (10 000); ``1e3`` counts as 1000.

    Raises:
        ValueError: ``N`` is below 1 or above :data:`MAX_SEEDS`, or a list is longer.
    """
    v = _whole_number(v)
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1:
            raise ValueError(f"a seed count must be >= 1, got {v}")
        if v > MAX_SEEDS:
            raise ValueError(
                f"at most {MAX_SEEDS} seeds (MAX_SEEDS), got {v}; run fewer seeds, e.g. seeds: 10"
            )
        return list(range(v))
    if isinstance(v, list) and len(v) > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS} seeds (MAX_SEEDS), got a list of {len(v)}")
    return v


@dataclasses.dataclass(frozen=True)
class ConfigUse:
    """A family config a spec would run, for validation.

    Args:
        key: The spec key path errors name (``control``, ``levers.lds``).
        values: The config mapping.
        keys: ``(key path, config key)`` pairs that must be family config keys.
        append_loc: Append the failing config field to ``key`` in errors.
    """

    key: str
    values: dict[str, Any]
    keys: tuple[tuple[str, str], ...] = ()
    append_loc: bool = True


class BaseSpec(Strict):
    """Keys every kind shares (see README, "Specs")."""

    kind: str
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
    family: str
    description: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    budget: Annotated[WholeNumber, Field(ge=1, le=MAX_BUDGET)]
    metric: MetricSpec
    resources: ResourcesSpec = ResourcesSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    failure: FailureSpec = FailureSpec()
    health: HealthPolicy = HealthPolicy()
    max_concurrent: Annotated[WholeNumber, Field(ge=1, le=MAX_TRIALS)] | None = None
    seeds: list[Seed] = Field(default_factory=lambda: [0])

    _coerce_seeds = field_validator("seeds", mode="before")(seed_list)

    @model_validator(mode="after")
    def _check_trial_count(self) -> BaseSpec:
        n, key, how = self.planned_trials()
        if n > MAX_TRIALS:
            raise ValueError(
                f"{key}: the spec plans {n} trials ({how}); at most {MAX_TRIALS} (MAX_TRIALS); "
                f"lower {key}"
            )
        return self

    def planned_trials(self) -> tuple[int, str, str]:
        """``(most trials the spec can run, key to lower, how they are counted)``.

        Checked against :data:`MAX_TRIALS`; kinds that run more than one
        trial per seed override it.
        """
        return len(self.seeds), "seeds", "one per seed"

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        try:
            get_family(v)
        except (KeyError, ImportError, AttributeError, TypeError, ValueError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise ValueError(f"cannot load family {v!r}: {msg}") from None
        return v

    def family_configs(self) -> Iterator[ConfigUse]:
        """Every family config this spec would run (validated against the family)."""
        yield ConfigUse("config", dict(self.config))

    def metric_refs(self) -> list[tuple[str, str]]:
        """``(key path, metric name)`` of every metric the spec names (the family must report them)."""
        return [("metric.name", self.metric.name)]


#: Any kind's spec (each kind's model subclasses :class:`BaseSpec`).
AnySpec = BaseSpec


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``overrides`` applied; dotted keys reach into nested mappings.

    Raises:
        ValueError: a dotted key reaches into a value that is not a mapping.
    """
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: i + 1])
                raise ValueError(
                    f"cannot set {key!r}: {where!r} is a {type(node).__name__}, not a mapping"
                )
        node[leaf] = value
    return out


def load_spec(path: str | Path, *, quick: bool = False, overrides: Sequence[str] = ()) -> AnySpec:
    """Read, validate and (with ``quick``) shrink a spec file.

    ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML)
    applied last, e.g. ``["budget=2", "config.hidden=16"]``.

    Raises:
        SpecError: unreadable file, bad YAML, or any invalid key.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(path, "", f"cannot read the spec file ({err.strerror or err})") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(
            path, "", f"the spec file is larger than {MAX_SPEC_BYTES} bytes (MAX_SPEC_BYTES)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SpecError(
            path,
            "",
            f"the spec file is not UTF-8 text (line {line}, byte {err.start}: {err.reason}); "
            f"save it as UTF-8",
        ) from None
    raw = load_yaml(text, path)
    return parse_spec(raw, source=path, quick=quick, overrides=overrides)


def parse_spec(
    raw: Any, *, source: str | Path = "<spec>", quick: bool = False, overrides: Sequence[str] = ()
) -> AnySpec:
    """Validate an already-parsed spec mapping (see :func:`load_spec`)."""
    if not isinstance(raw, dict):
        raise SpecError(source, "", f"a spec must be a YAML mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    quick_block = raw.pop("quick", None)
    if quick_block is not None:
        check_quick(quick_block, source)
    spec = validate_spec(raw, source, prefix="")
    if quick_block is not None:
        merged = _deep_merge(raw, quick_block)
        quick_spec = validate_spec(merged, source, prefix="quick.")
        if quick:
            spec, raw = quick_spec, merged
    if overrides:
        for item in overrides:
            raw = _apply_set(raw, item, source)
        spec = validate_spec(raw, source, prefix="")
    return spec


def spec_hash(spec: AnySpec) -> str:
    """A short stable hash of the resolved spec (tag ``tunelab.spec_hash``)."""
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _apply_set(raw: dict[str, Any], item: str, source: str | Path) -> dict[str, Any]:
    """Apply one ``--set dotted.key=value`` (value parsed as YAML) to a raw spec."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(
            source, "--set", f"expected KEY=VALUE (e.g. budget=2 or config.hidden=16), got {item!r}"
        )
    key = key.strip()
    try:
        value = load_yaml(text, f"{source} (--set {key})")
    except SpecError:
        value = text
    try:
        return apply_overrides(raw, {key: value})
    except ValueError as err:
        raise SpecError(source, "--set", f"{err} (in {item!r})") from None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("search", "levers"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
