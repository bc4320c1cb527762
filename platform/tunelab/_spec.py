"""Experiment specs: YAML files validated into pydantic models.

A spec names the family, its base config, the budget, the metric and, per
kind, the seeds / search space / cull / levers. Everything is checked before
anything starts: unknown keys, wrong types, unknown families, config keys the
family does not have, impossible culls. A bad spec raises :class:`SpecError`
whose message names the file, the key path and what was expected.

The keys every kind shares are :class:`BaseSpec`; each kind's own model
(``SeedCullSpec``, ``SweepSpec``, ``LeverABSpec``) lives in its module in
:mod:`tunelab.kinds` and is found through the kind registry by the spec's
``kind``.

Example (``search_spaces/seed_cull.yaml``)::

    kind: seed_cull
    name: ouroboros-seed-cull
    family: ouroboros
    config: {hidden: 32, lr: 3.0e-3, h_schedule: pow2}
    seeds: 4
    budget: 12
    metric: {name: val/autonomy, mode: max}
    cull: {at: 0.5, keep: 2, scheduler: sync, tie_break: val/bounded_frac}
    select: {metric: val/autonomy, mode: max}
    quick: {budget: 6, seeds: 3, config: {hidden: 16}, cull: {keep: 1}}
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab._family import Family, get_family
from tunelab.errors import SpecError

__all__ = [
    "AnySpec",
    "BaseSpec",
    "CheckpointSpec",
    "ConfigUse",
    "Domain",
    "FailureSpec",
    "MetricSpec",
    "ResourcesSpec",
    "SpecError",
    "Strict",
    "apply_overrides",
    "load_spec",
    "parse_spec",
    "seed_list",
    "spec_hash",
]

Mode = Literal["max", "min"]


class Strict(BaseModel):
    """A frozen pydantic model whose unknown keys are errors (every spec block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricSpec(Strict):
    """The metric trials are judged on. ``name`` is a family metric (``val/autonomy``)."""

    name: str
    mode: Mode


class ResourcesSpec(Strict):
    """Resources per trial, as Ray understands them."""

    cpu: Annotated[float, Field(gt=0)] = 1.0
    gpu: Annotated[float, Field(ge=0)] = 0.0
    memory_gb: Annotated[float, Field(ge=0)] | None = None


class CheckpointSpec(Strict):
    """How often trials checkpoint (iterations) and how many checkpoints are kept.

    ``keep: null`` keeps all; ``keep: N`` keeps the last N by iteration number.
    """

    every: Annotated[int, Field(ge=1)] = 1
    keep: Annotated[int, Field(ge=1)] | None = None


class FailureSpec(Strict):
    """Retries per trial (from its last checkpoint) and failed trials tolerated."""

    retries: Annotated[int, Field(ge=0)] = 2
    tolerate: Annotated[int, Field(ge=0)] = 0


class Domain(Strict):
    """A search domain: exactly one of choice, grid, uniform, loguniform, randint."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

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
    """``seeds: N`` means seeds ``0..N-1``; a list stays a list (a ``mode="before"`` validator)."""
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1:
            raise ValueError(f"a seed count must be >= 1, got {v}")
        return list(range(v))
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
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    family: str
    description: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    budget: Annotated[int, Field(ge=1)]
    metric: MetricSpec
    resources: ResourcesSpec = ResourcesSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    failure: FailureSpec = FailureSpec()
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0])

    _coerce_seeds = field_validator("seeds", mode="before")(seed_list)

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        try:
            get_family(v)
        except (KeyError, ImportError, AttributeError, TypeError) as err:
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
    """Return ``base`` with ``overrides`` applied; dotted keys reach into nested mappings."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


_QUICK_KEYS = {
    "budget",
    "seeds",
    "config",
    "control",
    "cull",
    "num_samples",
    "search",
    "max_concurrent",
    "decision",
    "levers",
    "rounds",
}


def load_spec(path: str | Path, *, quick: bool = False, overrides: Sequence[str] = ()) -> AnySpec:
    """Read, validate and (with ``quick``) shrink a spec file.

    ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML)
    applied last, e.g. ``["budget=2", "config.hidden=16"]``.

    Raises:
        SpecError: unreadable file, bad YAML, or any invalid key.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(path, "", f"cannot read the spec file ({err.strerror or err})") from None
    try:
        raw = yaml.safe_load(text)
        _reject_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(path, "", f"invalid YAML{where}: {problem}") from None
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
        _check_quick(quick_block, source)
    spec = _validate(raw, source, prefix="")
    if quick_block is not None:
        merged = _deep_merge(raw, quick_block)
        quick_spec = _validate(merged, source, prefix="quick.")
        if quick:
            spec, raw = quick_spec, merged
    if overrides:
        for item in overrides:
            raw = _apply_set(raw, item, source)
        spec = _validate(raw, source, prefix="")
    return spec


def _apply_set(raw: dict[str, Any], item: str, source: str | Path) -> dict[str, Any]:
    """Apply one ``--set dotted.key=value`` (value parsed as YAML) to a raw spec."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(
            source, "--set", f"expected KEY=VALUE (e.g. budget=2 or config.hidden=16), got {item!r}"
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return apply_overrides(raw, {key.strip(): value})


def _reject_duplicate_keys(node: yaml.Node | None, source: str | Path, prefix: str = "") -> None:
    """YAML keeps the last of two equal keys silently; a spec must not (two levers named alike)."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}{key}"
            if key in seen:
                line = key_node.start_mark.line + 1
                raise SpecError(
                    source, path, f"duplicate key (again at line {line}); each key may appear once"
                )
            seen.add(key)
            _reject_duplicate_keys(value_node, source, path + ".")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, source, f"{prefix}{i}.")


def spec_hash(spec: AnySpec) -> str:
    """A short stable hash of the resolved spec (tag ``tunelab.spec_hash``)."""
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _check_quick(block: Any, source: str | Path) -> None:
    if not isinstance(block, dict):
        raise SpecError(source, "quick", "must be a mapping of overrides, e.g. {budget: 4}")
    unknown = sorted(set(block) - _QUICK_KEYS)
    if unknown:
        raise SpecError(
            source,
            f"quick.{unknown[0]}",
            f"cannot be overridden in quick; allowed: {sorted(_QUICK_KEYS)}",
        )


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("search", "levers"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _validate(raw: dict[str, Any], source: str | Path, *, prefix: str) -> AnySpec:
    from tunelab.kinds import kind_names, spec_class

    kind = raw.get("kind")
    if kind not in kind_names():
        got = "missing" if kind is None else f"got {kind!r}"
        raise SpecError(source, prefix + "kind", f"must be one of {kind_names()} ({got})")
    try:
        spec = spec_class(kind).model_validate(raw)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif first["type"] == "missing":
            msg = "required key is missing"
        elif "input" in first and first["type"] not in ("value_error",):
            msg = f"{msg} (got {first['input']!r})"
        msg = msg.removeprefix("Value error, ")
        raise SpecError(source, prefix + key, msg) from None
    _check_family_config(spec, source, prefix)
    return spec


def _check_family_config(spec: AnySpec, source: str | Path, prefix: str) -> None:
    family = get_family(spec.family)
    fields = _config_fields(family)
    for use in spec.family_configs():
        for path, key in use.keys:
            if key.split(".")[0] not in fields:
                raise SpecError(
                    source,
                    prefix + path,
                    f"family {family.name!r} has no config key {key!r}; known keys: {sorted(fields)}",
                )
        _make_config(family, use.values, source, prefix + use.key, append_loc=use.append_loc)
    metrics = set(family.metrics)
    for key, name in spec.metric_refs():
        if name not in metrics:
            raise SpecError(
                source,
                prefix + key,
                f"family {family.name!r} does not report {name!r}; it reports {sorted(metrics)}",
            )


def _config_fields(family: Family) -> set[str]:
    return set(
        getattr(family.config_cls, "__dataclass_fields__", {})
        or getattr(family.config_cls, "model_fields", {})
    )


def _make_config(
    family: Family, values: dict[str, Any], source: str | Path, key: str, *, append_loc: bool = True
) -> Any:
    try:
        return family.make_config(values)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"]
        if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            msg = f"family {family.name!r} has no config key {loc!r}; known keys: {sorted(_config_fields(family))}"
        elif "input" in first:
            msg = f"{msg} (got {first['input']!r})"
        raise SpecError(source, f"{key}.{loc}" if loc and append_loc else key, msg) from None
    except (TypeError, ValueError) as err:
        raise SpecError(source, key, str(err)) from None
