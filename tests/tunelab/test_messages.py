"""Spec messages that help: a misspelt key is named next to what it should be.

A misspelt required key (``buget``) is named beside "budget: required key is
missing"; an unknown key anywhere in a spec, an unknown family config key, an
unknown metric, kind, family or ``quick`` key suggests the closest known one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from tests.conftest import TOY
from tunelab import SpecError
from tunelab.spec import did_you_mean, parse_spec

SEED_CULL: dict[str, Any] = {
    "kind": "seed_cull",
    "name": "msg",
    "family": TOY,
    "config": {"hidden": 8},
    "seeds": 4,
    "budget": 4,
    "metric": {"name": "val/score", "mode": "max"},
    "cull": {"at": 0.5, "keep": 2},
    "select": {"metric": "val/score", "mode": "max"},
}
LEVER_AB: dict[str, Any] = {
    "kind": "lever_ab",
    "name": "msg",
    "family": TOY,
    "control": {"hidden": 8},
    "levers": {"wide": {"hidden": 16}},
    "seeds": [1, 2, 3],
    "budget": 2,
    "metric": {"name": "val/score", "mode": "max"},
    "guardrails": [{"name": "train/loss", "mode": "min", "margin": 1.0}],
    "decision": {"min_effect": 0.1},
}
SWEEP: dict[str, Any] = {
    "kind": "sweep",
    "name": "msg",
    "family": TOY,
    "config": {"hidden": 8},
    "budget": 2,
    "metric": {"name": "val/score", "mode": "max"},
    "search": {"lr": {"loguniform": [1.0e-3, 1.0e-1]}},
}


def _edit(
    base: dict[str, Any], path: str, value: Any = None, *, rename: str = ""
) -> dict[str, Any]:
    """``base`` with the key at dotted ``path`` set to ``value``, or renamed to ``rename``."""
    raw = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node: Any = raw
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if rename:
        node[rename] = node.pop(leaf)
    else:
        node[leaf] = value
    return raw


def _error(raw: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, source="spec.yaml")
    return info.value


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        (
            _edit(SEED_CULL, "budget", rename="buget"),
            "budget",
            "required key is missing (found `buget`: did you mean `budget`?)",
        ),
        (
            _edit(SEED_CULL, "cull.keep", rename="kep"),
            "cull.keep",
            "required key is missing (found `kep`: did you mean `keep`?)",
        ),
        (
            _edit(LEVER_AB, "decision.min_effect", rename="min_efect"),
            "decision.min_effect",
            "required key is missing (found `min_efect`: did you mean `min_effect`?)",
        ),
        (
            _edit(LEVER_AB, "guardrails.0.name", rename="nmae"),
            "guardrails.0.name",
            "required key is missing (found `nmae`: did you mean `name`?)",
        ),
    ],
    ids=["budget", "cull.keep", "decision.min_effect", "guardrails.0.name"],
)
def test_misspelt_required_key_is_named_next_to_the_missing_one(
    raw: dict[str, Any], key: str, message: str
) -> None:
    err = _error(raw)
    assert (err.key, err.message) == (key, message)
    assert str(err) == f"spec.yaml: {key}: {message}"


@pytest.mark.parametrize(
    ("raw", "key", "hint"),
    [
        (_edit(SEED_CULL, "budgte", 4), "budgte", "`budget`"),
        (_edit(SEED_CULL, "quik", {"budget": 2}), "quik", "`quick`"),
        (_edit(SEED_CULL, "cull.schedular", "sync"), "cull.schedular", "`scheduler`"),
        (_edit(SEED_CULL, "resources", {"cpus": 1}), "resources.cpus", "`cpu`"),
        (_edit(LEVER_AB, "decision.look", [2, 3]), "decision.look", "`looks`"),
        (_edit(LEVER_AB, "guardrails.0.margn", 1.0), "guardrails.0.margn", "`margin`"),
        (
            _edit(SWEEP, "search.lr", {"loguniformm": [1.0e-3, 1.0e-1]}),
            "search.lr.loguniformm",
            "`loguniform`",
        ),
        (_edit(SWEEP, "scheduler", {"grace": 1}), "scheduler.grace", "`grace_period`"),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v else None,
)
def test_unknown_key_suggests_the_closest_known_key(
    raw: dict[str, Any], key: str, hint: str
) -> None:
    err = _error(raw)
    assert err.key == key
    assert err.message == f"unknown key; did you mean {hint}?"


def test_unknown_key_with_nothing_close_lists_the_known_keys() -> None:
    err = _error(_edit(SEED_CULL, "cull.zzzz", 1))
    assert err.key == "cull.zzzz"
    assert "remove it or check its spelling" in err.message
    assert "known keys: at, keep, pruner, scheduler, tie_break" in err.message
    assert "did you mean" not in err.message


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (_edit(SEED_CULL, "config", {"hiden": 8}), "config.hiden"),
        (_edit(LEVER_AB, "control", {"hiden": 8}), "control.hiden"),
        (_edit(LEVER_AB, "levers", {"wide": {"hiden": 16}}), "levers.wide.hiden"),
        (_edit(SWEEP, "search", {"hiden": {"choice": [8, 16]}}), "search.hiden"),
    ],
    ids=["config", "control", "levers", "search"],
)
def test_unknown_family_config_key_suggests_the_closest(raw: dict[str, Any], key: str) -> None:
    err = _error(raw)
    assert err.key == key
    assert err.message.startswith(
        "family 'toy' has no config key 'hiden' (did you mean `hidden`?); known keys: ["
    )


@pytest.mark.parametrize(
    ("raw", "key", "needle"),
    [
        (
            _edit(SEED_CULL, "kind", "seed_cul"),
            "kind",
            "(got 'seed_cul'; did you mean `seed_cull`?)",
        ),
        (
            _edit(SEED_CULL, "kind", rename="knid"),
            "kind",
            "(missing; found `knid`: did you mean `kind`?)",
        ),
        (_edit(SEED_CULL, "metric.mode", "maxx"), "metric.mode", "did you mean `max`?"),
        (
            _edit(SEED_CULL, "metric.name", "val/scroe"),
            "metric.name",
            "does not report 'val/scroe' (did you mean `val/score`?)",
        ),
        (
            _edit(LEVER_AB, "guardrails.0.name", "train/los"),
            "guardrails.0.name",
            "(did you mean `train/loss`?)",
        ),
        (
            _edit(SEED_CULL, "quick", {"budgte": 2}),
            "quick.budgte",
            "cannot be overridden in quick (did you mean `budget`?)",
        ),
        (_edit(SEED_CULL, "family", "ouroboro"), "family", "(did you mean `ouroboros`?)"),
    ],
    ids=["kind-value", "kind-key", "literal", "metric", "guardrail", "quick", "family"],
)
def test_other_names_suggest_the_closest(raw: dict[str, Any], key: str, needle: str) -> None:
    err = _error(raw)
    assert err.key == key and needle in err.message, str(err)


def test_did_you_mean() -> None:
    assert did_you_mean("hiden", ["hidden", "lr"]) == "did you mean `hidden`?"
    assert did_you_mean("LR", ["hidden", "lr"]) == "did you mean `lr`?"
    assert did_you_mean("xyz", ["hidden", "lr"]) == ""


def test_cli_names_the_misspelt_key_and_exits_2(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_edit(SEED_CULL, "budget", rename="buget")))
    result = CliRunner().invoke(app, ["sweep", str(spec), "--storage", str(tmp_path / "res")])
    assert result.exit_code == 2, result.output
    assert (
        f"{spec}: budget: required key is missing (found `buget`: did you mean `budget`?)"
        in result.output
    )
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())
    spec.write_text(yaml.safe_dump(_edit(SEED_CULL, "config", {"hiden": 8})))
    result = CliRunner().invoke(
        app, ["sweep", str(spec), "--storage", str(tmp_path / "res"), "--set", "config.lrr=0.1"]
    )
    assert result.exit_code == 2
    assert "did you mean `hidden`?" in result.output or "did you mean `lr`?" in result.output
