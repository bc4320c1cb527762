"""Experiment specs: YAML files validated into pydantic models.

A spec names the family, its base config, the budget, the metric and, per
kind, the seeds / search space / cull / levers. Everything is checked before
anything starts: unknown keys, wrong types, unknown families, config keys the
family does not have, impossible culls. A bad spec raises :class:`SpecError`
whose message names the file, the key path and what was expected.

Example (``search_spaces/seed_cull.yaml``)::

    kind: seed_cull
    name: ouroboros-seed-cull
    family: ouroboros
    config: {hidden: 32, lr: 3.0e-3}
    seeds: 4
    budget: 12
    metric: {name: val/autonomy, mode: max}
    cull: {at: 0.5, keep: 2, scheduler: sync, tie_break: val/bounded_frac}
    select: {metric: val/autonomy, mode: max}
    quick: {budget: 6, config: {hidden: 16}}
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab._family import Family, get_family

__all__ = [
    "AnySpec",
    "CullSpec",
    "DecisionSpec",
    "Domain",
    "GuardrailSpec",
    "LeverABSpec",
    "MetricSpec",
    "ResourcesSpec",
    "SeedCullSpec",
    "SelectSpec",
    "Spec",
    "SpecError",
    "SweepSpec",
    "apply_overrides",
    "load_spec",
    "parse_spec",
    "spec_hash",
]

Mode = Literal["max", "min"]


class SpecError(ValueError):
    """An invalid spec. ``str(err)`` is the one-paragraph message users see."""

    def __init__(self, file: str | Path, key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + message)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricSpec(_Strict):
    """The metric trials are judged on. ``name`` is a family metric (``val/autonomy``)."""

    name: str
    mode: Mode


class ResourcesSpec(_Strict):
    """Resources per trial, as Ray understands them."""

    cpu: Annotated[float, Field(gt=0)] = 1.0
    gpu: Annotated[float, Field(ge=0)] = 0.0
    memory_gb: Annotated[float, Field(ge=0)] | None = None


class CheckpointSpec(_Strict):
    """How often trials checkpoint (iterations) and how many checkpoints are kept.

    ``keep: null`` keeps all; ``keep: N`` keeps the last N by iteration number.
    """

    every: Annotated[int, Field(ge=1)] = 1
    keep: Annotated[int, Field(ge=1)] | None = None


class FailureSpec(_Strict):
    """Retries per trial (from its last checkpoint) and failed trials tolerated."""

    retries: Annotated[int, Field(ge=0)] = 2
    tolerate: Annotated[int, Field(ge=0)] = 0


class Domain(_Strict):
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


class CullSpec(_Strict):
    """When to cull and how many seeds survive.

    ``at`` is a fraction of the budget (0 < at < 1) or an iteration (an
    integer >= 1, below the budget). ``scheduler``: ``sync`` waits for every
    seed at the milestone, then keeps the top ``keep`` (ties broken by
    ``tie_break``); ``asha`` is Tune's asynchronous successive halving;
    ``optuna`` lets an Optuna pruner decide (``pruner``).
    """

    at: Annotated[float, Field(gt=0)]
    keep: Annotated[int, Field(ge=1)]
    scheduler: Literal["sync", "asha", "optuna"] = "sync"
    tie_break: str | None = None
    pruner: Literal["successive_halving", "hyperband", "wilcoxon"] = "successive_halving"

    def milestone(self, budget: int) -> int:
        """The cull iteration for a budget."""
        if self.at < 1:
            return max(1, math.ceil(self.at * budget))
        return int(self.at)


class SelectSpec(_Strict):
    """How the surviving seed is selected at the end."""

    metric: str
    mode: Mode


class SchedulerSpec(_Strict):
    """Early stopping for sweeps: ``fifo`` (none) or Tune's ASHA on ``metric``."""

    type: Literal["fifo", "asha"] = "fifo"
    grace_period: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0


class _BaseSpec(_Strict):
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

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        try:
            get_family(v)
        except (KeyError, ImportError, AttributeError, TypeError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise ValueError(f"cannot load family {v!r}: {msg}") from None
        return v


def _seed_list(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1:
            raise ValueError(f"a seed count must be >= 1, got {v}")
        return list(range(v))
    return v


class SeedCullSpec(_BaseSpec):
    """Train N seeds, cull at a milestone, select the best survivor."""

    kind: Literal["seed_cull"]
    seeds: list[Annotated[int, Field(ge=0)]]
    cull: CullSpec
    select: SelectSpec

    _coerce_seeds = field_validator("seeds", mode="before")(_seed_list)

    @model_validator(mode="after")
    def _check_cull(self) -> SeedCullSpec:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: seeds must be distinct")
        if self.cull.keep >= len(self.seeds):
            raise ValueError(
                f"cull.keep: must be smaller than the number of seeds ({len(self.seeds)}), "
                f"got {self.cull.keep}; lower keep or add seeds"
            )
        if self.cull.at >= 1 and (self.cull.at != int(self.cull.at) or self.cull.at >= self.budget):
            raise ValueError(
                f"cull.at: an iteration must be an integer below the budget ({self.budget}), "
                f"got {self.cull.at}; or give a fraction 0 < at < 1"
            )
        return self


class SweepSpec(_BaseSpec):
    """Search a space of family configs (Tune search algorithms and schedulers)."""

    kind: Literal["sweep"]
    search: dict[str, Domain]
    num_samples: Annotated[int, Field(ge=1)] = 1
    search_alg: Literal["random", "optuna_tpe"] = "random"
    scheduler: SchedulerSpec = SchedulerSpec()
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0])

    _coerce_seeds = field_validator("seeds", mode="before")(_seed_list)

    @model_validator(mode="after")
    def _check_search(self) -> SweepSpec:
        if not self.search:
            raise ValueError(
                "search: needs at least one key, e.g. {lr: {loguniform: [1e-4, 1e-2]}}"
            )
        if self.scheduler.type == "asha" and self.scheduler.grace_period > self.budget:
            raise ValueError(
                f"scheduler.grace_period: must be at most the budget ({self.budget}), "
                f"got {self.scheduler.grace_period}; lower it or raise the budget"
            )
        if self.search_alg == "optuna_tpe" and any(d.kind == "grid" for d in self.search.values()):
            raise ValueError("search: grid domains cannot be used with search_alg optuna_tpe")
        return self


class GuardrailSpec(_Strict):
    """A metric that must not regress by more than ``margin`` (non-inferiority)."""

    name: str
    mode: Mode
    margin: Annotated[float, Field(ge=0)] = 0.0


class DecisionSpec(_Strict):
    """The pre-registered decision rule (shared/VERDICTS.md).

    ``min_effect``: the smallest effect of interest (the keep bar), raw units;
    ``looks``: seeds analysed at each planned look, e.g. [5, 10, 20];
    ``correction``: across the levers of a round (``holm`` confirmatory, ``bh``
    screening); ``confirm_seeds``: seeds a meaningful win must also win on
    before it is stacked into the next round's control.
    """

    min_effect: Annotated[float, Field(gt=0)]
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    looks: list[Annotated[int, Field(ge=2)]] | None = None
    correction: Literal["holm", "bh", "none"] = "holm"
    confirm_seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)

    @field_validator("looks")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(b <= a for a, b in itertools.pairwise(v))):
            raise ValueError(
                f"looks must be a non-empty, strictly increasing list of seed counts, got {v}"
            )
        return v


class LeverABSpec(_BaseSpec):
    """Control vs levers on the same seeds; a verdict per lever."""

    kind: Literal["lever_ab"]
    control: dict[str, Any] = Field(default_factory=dict)
    levers: dict[str, dict[str, Any]]
    seeds: list[Annotated[int, Field(ge=0)]]
    guardrails: list[GuardrailSpec] = Field(default_factory=list)
    decision: DecisionSpec
    rounds: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _check_levers(self) -> LeverABSpec:
        if self.config:
            raise ValueError(
                "config: a lever_ab spec names its base config under `control:`; move it there"
            )
        if not self.seeds:
            raise ValueError(
                "seeds: needs at least one seed; paired verdicts need several (e.g. [1, 2, 3, 4, 5])"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: seeds must be distinct")
        if not self.levers:
            raise ValueError("levers: needs at least one lever, e.g. {lds: {lds_alpha: 0.5}}")
        for name, overrides in self.levers.items():
            if name == "control" or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise ValueError(
                    f"levers.{name}: a lever name is letters, digits, _ . - and not 'control'"
                )
            if not overrides:
                raise ValueError(f"levers.{name}: a lever needs at least one config override")
        looks = self.decision.looks
        if looks and looks[-1] > len(self.seeds):
            raise ValueError(
                f"decision.looks: the last look ({looks[-1]}) needs more seeds than the {len(self.seeds)} listed"
            )
        if set(self.decision.confirm_seeds) & set(self.seeds):
            raise ValueError(
                "decision.confirm_seeds: confirmation seeds must differ from the seeds"
            )
        if self.rounds > 1 and not self.decision.confirm_seeds:
            raise ValueError(
                "decision.confirm_seeds: stacking wins over rounds needs confirmation seeds "
                "(a single-seed win is never stacked)"
            )
        return self

    def lever_config(self, name: str) -> dict[str, Any]:
        """The control config with lever ``name``'s overrides applied."""
        return apply_overrides(self.control, self.levers[name])


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


AnySpec = SeedCullSpec | SweepSpec | LeverABSpec
Spec = Annotated[AnySpec, Field(discriminator="kind")]
_SPEC_ADAPTER: pydantic.TypeAdapter[SeedCullSpec | SweepSpec | LeverABSpec] = pydantic.TypeAdapter(
    Spec
)
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
_KINDS = ("seed_cull", "sweep", "lever_ab")


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
    kind = raw.get("kind")
    if kind not in _KINDS:
        got = "missing" if kind is None else f"got {kind!r}"
        raise SpecError(source, prefix + "kind", f"must be one of {list(_KINDS)} ({got})")
    try:
        spec = _SPEC_ADAPTER.validate_python(raw)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"]]
        if loc and loc[0] == kind:  # the discriminator's tag is not part of the key path
            loc = loc[1:]
        key = ".".join(loc)
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
    if isinstance(spec, LeverABSpec):
        _make_config(family, spec.control, source, prefix + "control")
        for name, overrides in spec.levers.items():
            for key in overrides:
                if key.split(".")[0] not in fields:
                    raise SpecError(
                        source,
                        f"{prefix}levers.{name}.{key}",
                        f"family {family.name!r} has no config key {key!r}; known keys: {sorted(fields)}",
                    )
            _make_config(
                family, spec.lever_config(name), source, f"{prefix}levers.{name}", append_loc=False
            )
    else:
        _make_config(family, spec.config, source, prefix + "config")
    if isinstance(spec, SweepSpec):
        for key, domain in spec.search.items():
            if key not in fields:
                raise SpecError(
                    source,
                    f"{prefix}search.{key}",
                    f"family {family.name!r} has no config key {key!r}; known keys: {sorted(fields)}",
                )
            for value in domain.sample_values():
                _make_config(
                    family,
                    {**spec.config, key: value},
                    source,
                    f"{prefix}search.{key}",
                    append_loc=False,
                )
    metrics = set(family.metrics)
    names = [("metric.name", spec.metric.name)]
    if isinstance(spec, LeverABSpec):
        names += [(f"guardrails.{i}.name", g.name) for i, g in enumerate(spec.guardrails)]
    if isinstance(spec, SeedCullSpec):
        names.append(("select.metric", spec.select.metric))
        if spec.cull.tie_break:
            names.append(("cull.tie_break", spec.cull.tie_break))
    for key, name in names:
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
