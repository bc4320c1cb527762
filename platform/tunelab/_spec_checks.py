"""Checks of a raw spec and the messages they raise (private; see :mod:`tunelab.spec`).

:func:`validate_spec` runs the model of the spec's ``kind`` and turns pydantic's
first error into a :class:`~tunelab.errors.SpecError` naming the key path,
with a did-you-mean hint for a misspelt key or value; :func:`check_quick`
checks the keys of the ``quick`` block; :func:`_check_family_config` checks
every family config the spec would run and every metric it names against the
family. :mod:`tunelab.spec` re-exports :func:`did_you_mean` and
:func:`metric_name_problem`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import pydantic
from pydantic import BaseModel

from tunelab._spec_yaml import join_key
from tunelab.errors import SpecError
from tunelab.family import Family, get_family

if TYPE_CHECKING:
    from tunelab.spec import AnySpec


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


def check_quick(block: Any, source: str | Path) -> None:
    if not isinstance(block, dict):
        raise SpecError(source, "quick", "must be a mapping of overrides, e.g. {budget: 4}")
    unknown = sorted(str(k) for k in set(block) - _QUICK_KEYS)
    if unknown:
        hint = did_you_mean(unknown[0], _QUICK_KEYS)
        raise SpecError(
            source,
            join_key("quick", unknown[0]),
            f"cannot be overridden in quick{f' ({hint})' if hint else ''}; "
            f"allowed: {sorted(_QUICK_KEYS)}",
        )


def validate_spec(raw: dict[str, Any], source: str | Path, *, prefix: str) -> AnySpec:
    from tunelab.kinds import kind_names, spec_class

    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in kind_names():
        if kind is None:
            found = _found_instead("kind", raw, _top_level_keys(None))
            got = f"missing; {found.strip()[1:-1]}" if found else "missing"
        else:
            hint = did_you_mean(kind, kind_names()) if isinstance(kind, str) else ""
            got = f"got {_short(kind)}" + (f"; {hint}" if hint else "")
        raise SpecError(source, join_key(prefix, "kind"), f"must be one of {kind_names()} ({got})")
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
        raise SpecError(source, join_key(prefix, key), msg) from None
    _check_family_config(spec, source, prefix)
    return spec


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
    from tunelab.spec import BaseSpec  # tunelab.spec imports this module

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
                raise SpecError(source, join_key(prefix, path), _no_config_key(family, key, fields))
        _make_config(
            family, use.values, source, join_key(prefix, use.key), append_loc=use.append_loc
        )
    for name in family.metrics:
        problem = metric_name_problem(name)
        if problem:
            raise SpecError(
                source,
                join_key(prefix, "family"),
                f"family {family.name!r} reports metric {name!r}, which MLflow rejects: {problem}; "
                f"rename the metric in the family module",
            )
    metrics = set(family.metrics)
    for key, name in spec.metric_refs():
        if name not in metrics:
            hint = did_you_mean(name, metrics)
            raise SpecError(
                source,
                join_key(prefix, key),
                f"family {family.name!r} does not report {name!r}"
                f"{f' ({hint})' if hint else ''}; it reports {sorted(metrics)}",
            )


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
        raise SpecError(source, join_key(key, loc) if append_loc else key, msg) from None
    except (TypeError, ValueError) as err:
        raise SpecError(source, key, str(err)) from None
