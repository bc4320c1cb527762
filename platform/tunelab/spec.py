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
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from tunelab.errors import SpecError
from tunelab.family import Family, get_family
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
#: Most YAML values (scalars, lists, mappings) a spec may expand to, aliases expanded.
MAX_YAML_NODES = 50_000
#: Deepest nesting of lists / mappings in a spec.
MAX_YAML_DEPTH = 32
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
    raw = _load_yaml(text, path)
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
    key = key.strip()
    try:
        value = _load_yaml(text, f"{source} (--set {key})")
    except SpecError:
        value = text
    try:
        return apply_overrides(raw, {key: value})
    except ValueError as err:
        raise SpecError(source, "--set", f"{err} (in {item!r})") from None


# -- YAML ------------------------------------------------------------------------------


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading YAML 1.2 exponent floats (``1e6``, ``1E-4``) as numbers.

    It stops composing at :data:`MAX_YAML_DEPTH` levels (PyYAML would recurse until
    Python's recursion limit) and at :data:`MAX_YAML_NODES` values.
    """

    _depth = 0
    _nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        self._nodes += 1
        try:
            problem = None
            if self._depth > MAX_YAML_DEPTH + 1:
                problem = f"nested deeper than {MAX_YAML_DEPTH} levels"
            elif self._nodes > MAX_YAML_NODES:
                problem = f"more than {MAX_YAML_NODES} values (MAX_YAML_NODES)"
            if problem:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(problem=problem, problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str, source: str | Path) -> Any:
    """Parse YAML text into Python values, refusing what would hang or mislead.

    The document is composed first and its node graph checked (no recursive
    aliases, at most :data:`MAX_YAML_NODES` values with aliases expanded, at
    most :data:`MAX_YAML_DEPTH` levels, no duplicate keys) before any value
    is built, so an alias bomb costs the size of its text.

    Raises:
        SpecError: invalid YAML, or one of the limits above.
    """
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    except SpecError:
        raise
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(source, "", f"invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise SpecError(
            source, "", f"invalid YAML: nested deeper than {MAX_YAML_DEPTH} levels"
        ) from None
    except ValueError as err:  # a scalar Python cannot hold (an int of 5000 digits)
        problem = str(err).split("; use sys.")[0]
        raise SpecError(source, "", f"invalid YAML value: {problem}") from None
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node, source: str | Path) -> None:
    """Check a composed YAML graph (see :func:`_load_yaml`); each distinct node is visited once.

    Raises:
        SpecError: a recursive alias, a duplicate key, too deep or too many values.
    """
    sizes: dict[int, int] = {}  # id(node) -> values it expands to (aliases expanded)
    open_nodes: set[int] = set()

    def size(node: yaml.Node, path: str, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise SpecError(source, path, "a recursive alias (an anchor used inside itself)")
        if depth > MAX_YAML_DEPTH:
            raise SpecError(source, path, f"nested deeper than {MAX_YAML_DEPTH} levels")
        open_nodes.add(id(node))
        n = 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                sub = _join(path, key)
                if key in seen and key != "<<":
                    line = key_node.start_mark.line + 1
                    raise SpecError(
                        source,
                        sub,
                        f"duplicate key (again at line {line}); each key may appear once",
                    )
                seen.add(key)
                n += size(key_node, sub, depth + 1) + size(value_node, sub, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                n += size(item, _join(path, str(i)), depth + 1)
        if n > MAX_YAML_NODES:
            raise SpecError(
                source,
                path,
                f"expands to more than {MAX_YAML_NODES} values (MAX_YAML_NODES); anchors and "
                f"aliases (&a / *a) repeat what they name, so nested aliases multiply",
            )
        open_nodes.discard(id(node))
        sizes[id(node)] = n
        return n

    size(root, "", 0)


def _join(prefix: str, key: str) -> str:
    """``cull`` + ``keep`` -> ``cull.keep``; either may be empty (never ``quick.`` or ``.keep``)."""
    return ".".join(p for p in (prefix.strip("."), key.strip(".")) if p)


def spec_hash(spec: AnySpec) -> str:
    """A short stable hash of the resolved spec (tag ``tunelab.spec_hash``)."""
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _check_quick(block: Any, source: str | Path) -> None:
    if not isinstance(block, dict):
        raise SpecError(source, "quick", "must be a mapping of overrides, e.g. {budget: 4}")
    unknown = sorted(str(k) for k in set(block) - _QUICK_KEYS)
    if unknown:
        hint = did_you_mean(unknown[0], _QUICK_KEYS)
        raise SpecError(
            source,
            _join("quick", unknown[0]),
            f"cannot be overridden in quick{f' ({hint})' if hint else ''}; "
            f"allowed: {sorted(_QUICK_KEYS)}",
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
    if not isinstance(kind, str) or kind not in kind_names():
        if kind is None:
            found = _found_instead("kind", raw, _top_level_keys(None))
            got = f"missing; {found.strip()[1:-1]}" if found else "missing"
        else:
            hint = did_you_mean(kind, kind_names()) if isinstance(kind, str) else ""
            got = f"got {_short(kind)}" + (f"; {hint}" if hint else "")
        raise SpecError(source, _join(prefix, "kind"), f"must be one of {kind_names()} ({got})")
    model = spec_class(kind)
    try:
        spec = model.model_validate(raw)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = first["msg"]
        loc = tuple(first["loc"])
        if first["type"] == "extra_forbidden":
            known = _keys_at(model, loc[:-1])
            hint = did_you_mean(str(loc[-1]), known) if known else ""
            if hint:
                msg = f"unknown key; {hint}"
            elif known:
                msg = f"unknown key; remove it or check its spelling (known keys: {', '.join(sorted(known))})"
            else:
                msg = "unknown key; remove it or check its spelling"
        elif first["type"] == "missing":
            known = _keys_at(model, loc[:-1]) or set()
            msg = "required key is missing" + _found_instead(
                str(loc[-1]), _raw_at(raw, loc[:-1]), known
            )
        elif first["type"] == "literal_error" and isinstance(first.get("input"), str):
            expected = re.findall(r"'([^']*)'", str((first.get("ctx") or {}).get("expected", "")))
            hint = did_you_mean(first["input"], expected)
            msg = f"{msg} (got {_short(first['input'])}{f'; {hint}' if hint else ''})"
        elif first["type"] in ("int_type", "int_from_float") and isinstance(
            first.get("input"), bool
        ):
            msg = f"must be an integer, not a boolean (got {first['input']!r})"
        elif "input" in first and first["type"] not in ("value_error",):
            msg = f"{msg} (got {_short(first['input'])})"
        msg = msg.removeprefix("Value error, ")
        # A model-level check names its key at the start of its message ("cull.keep: ...").
        named = re.match(r"([A-Za-z_][\w.\-]*): (.*)", msg, re.DOTALL)
        if named and named.group(1).startswith(key):
            key, msg = named.group(1), named.group(2)
        raise SpecError(source, _join(prefix, key), msg) from None
    _check_family_config(spec, source, prefix)
    return spec


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``did you mean `hidden`?`` for the known name closest to ``word``, or ``""`` if none is close.

    Closeness is :func:`difflib.get_close_matches` (ratio >= 0.6), e.g. ``buget`` -> ``budget``,
    ``hiden`` -> ``hidden``; a case-insensitive match, or the one known name that starts with
    ``word`` (``grace`` -> ``grace_period``), always counts.
    """
    names = sorted({str(k) for k in known})
    folded = [k for k in names if k.lower() == word.lower() and k != word]
    prefixed = [k for k in names if len(word) >= 3 and k.startswith(word) and k != word]
    matches = (
        folded
        or difflib.get_close_matches(word, names, n=1, cutoff=0.6)
        or (prefixed if len(prefixed) == 1 else [])
    )
    return f"did you mean `{matches[0]}`?" if matches else ""


def _found_instead(missing: str, mapping: Any, known: Iterable[str]) -> str:
    """`` (found `buget`: did you mean `budget`?)`` when ``mapping`` holds a key misspelling
    the missing key ``missing`` (a key that is not a known key there), else ``""``."""
    if not isinstance(mapping, dict):
        return ""
    unknown = [str(k) for k in mapping if str(k) not in set(known) and str(k) != missing]
    close = [k for k in unknown if k.lower() == missing.lower()] or difflib.get_close_matches(
        missing, unknown, n=1, cutoff=0.6
    )
    return f" (found `{close[0]}`: did you mean `{missing}`?)" if close else ""


def _top_level_keys(model: type[BaseModel] | None) -> set[str]:
    """The keys a spec's top level may hold (``quick`` is read before the model)."""
    fields = set(model.model_fields) if model is not None else set(BaseSpec.model_fields)
    return fields | {"quick"}


def _type_options(tp: Any) -> list[Any]:
    """``tp`` without ``Annotated`` metadata, a union split into its members."""
    if typing.get_origin(tp) is Annotated:
        return _type_options(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [opt for arg in typing.get_args(tp) for opt in _type_options(arg)]
    return [tp]


def _keys_at(model: type[BaseModel], loc: Sequence[Any]) -> set[str] | None:
    """The keys allowed in the mapping at ``loc`` (pydantic's error location) below ``model``.

    None when ``loc`` does not lead to a model (a free mapping such as ``config``).
    """
    options: list[Any] = [model]
    for part in loc:
        nxt: list[Any] = []
        for tp in options:
            origin = typing.get_origin(tp)
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                field = tp.model_fields.get(str(part))
                if field is not None:
                    nxt += _type_options(field.annotation)
            elif origin in (list, tuple) and isinstance(part, int):
                nxt += [o for a in typing.get_args(tp)[:1] for o in _type_options(a)]
            elif origin is dict and not isinstance(part, int):
                nxt += [o for a in typing.get_args(tp)[1:2] for o in _type_options(a)]
        options = nxt
    for tp in options:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return _top_level_keys(tp) if not loc else set(tp.model_fields)
    return None


def _raw_at(raw: Any, loc: Sequence[Any]) -> Any:
    """The raw spec value at ``loc`` (None when it is not there)."""
    for part in loc:
        if isinstance(raw, dict):
            raw = raw.get(part, raw.get(str(part)))
        elif isinstance(raw, list) and isinstance(part, int) and 0 <= part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 10 000-element list stays readable)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_family_config(spec: AnySpec, source: str | Path, prefix: str) -> None:
    family = get_family(spec.family)
    fields = _config_fields(family)
    for use in spec.family_configs():
        for path, key in use.keys:
            if key.split(".")[0] not in fields:
                raise SpecError(source, _join(prefix, path), _no_config_key(family, key, fields))
        _make_config(family, use.values, source, _join(prefix, use.key), append_loc=use.append_loc)
    for name in family.metrics:
        problem = metric_name_problem(name)
        if problem:
            raise SpecError(
                source,
                _join(prefix, "family"),
                f"family {family.name!r} reports metric {name!r}, which MLflow rejects: {problem}; "
                f"rename the metric in the family module",
            )
    metrics = set(family.metrics)
    for key, name in spec.metric_refs():
        if name not in metrics:
            hint = did_you_mean(name, metrics)
            raise SpecError(
                source,
                _join(prefix, key),
                f"family {family.name!r} does not report {name!r}"
                f"{f' ({hint})' if hint else ''}; it reports {sorted(metrics)}",
            )


def metric_name_problem(name: str) -> str | None:
    """Why MLflow would reject ``name`` as a metric key, or None if it accepts it.

    Applies MLflow's own rule (``mlflow.utils.validation``, as used by
    ``log_metric`` / ``log_batch``): only letters, digits, ``_ - . : /`` and
    spaces (no ``:`` on Windows); not a path that normalizes to another name
    (``a//b``, ``./a``, ``/a``, ``..``); at most ``MAX_ENTITY_KEY_LENGTH``
    (250) characters.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation as v

    if not isinstance(name, str) or not name:
        return "a metric name is a non-empty string"
    if not v.validate_param_and_metric_name(name):
        return str(v.bad_character_message())
    if v.path_not_unique(name):
        return str(v.bad_path_message(name))
    if len(name) > v.MAX_ENTITY_KEY_LENGTH:
        return f"a metric name has at most {v.MAX_ENTITY_KEY_LENGTH} characters, got {len(name)}"
    try:  # anything a newer MLflow adds to its rule
        v._validate_metric_name(name)
    except MlflowException as err:
        return str(err.message)
    return None


def _config_fields(family: Family) -> set[str]:
    return set(
        getattr(family.config_cls, "__dataclass_fields__", {})
        or getattr(family.config_cls, "model_fields", {})
    )


def _no_config_key(family: Family, key: str, fields: set[str]) -> str:
    """``family 'toy' has no config key 'hiden' (did you mean `hidden`?); known keys: [...]``."""
    hint = did_you_mean(key.split(".")[0], fields)
    return (
        f"family {family.name!r} has no config key {key!r}{f' ({hint})' if hint else ''}; "
        f"known keys: {sorted(fields)}"
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
            msg = _no_config_key(family, loc, _config_fields(family))
        elif "input" in first:
            msg = f"{msg} (got {_short(first['input'])})"
        raise SpecError(source, _join(key, loc) if append_loc else key, msg) from None
    except (TypeError, ValueError) as err:
        raise SpecError(source, key, str(err)) from None
