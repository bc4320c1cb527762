"""Spec validation: every malformed spec exits 2 with the file and the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from tests.conftest import TOY, run_cli
from tunelab import SpecError, load_spec

VALID = f"""
kind: seed_cull
name: toy-cull
family: "{TOY}"
config: {{hidden: 8}}
seeds: 4
budget: 6
metric: {{name: val/score, mode: max}}
cull: {{at: 0.5, keep: 2, scheduler: sync, tie_break: val/aux}}
select: {{metric: val/score, mode: max}}
quick: {{budget: 4, config: {{hidden: 4}}}}
"""

VALID_SWEEP = f"""
kind: sweep
name: toy-sweep
family: "{TOY}"
config: {{hidden: 8}}
budget: 4
metric: {{name: val/score, mode: max}}
search: {{lr: {{loguniform: [1.0e-3, 1.0e-1]}}, hidden: {{choice: [4, 8]}}}}
num_samples: 2
"""


def _mutate(base: str, path: str, value: object) -> str:
    data = yaml.safe_load(base)
    keys = path.split(".")
    node = data
    for k in keys[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return yaml.safe_dump(data)


_DELETE = object()

# (id, base, key path to change, new value, key path the error must name)
CASES = [
    ("kind-unknown", VALID, "kind", "seedcull", "kind"),
    ("kind-missing", VALID, "kind", _DELETE, "kind"),
    ("name-missing", VALID, "name", _DELETE, "name"),
    ("name-bad-chars", VALID, "name", "my spec!", "name"),
    ("family-unknown", VALID, "family", "ouroboros_v9", "family"),
    ("family-not-string", VALID, "family", 3, "family"),
    ("unknown-top-key", VALID, "seedz", 4, "seedz"),
    ("budget-negative", VALID, "budget", -5, "budget"),
    ("budget-zero", VALID, "budget", 0, "budget"),
    ("budget-string", VALID, "budget", "many", "budget"),
    ("metric-missing", VALID, "metric", _DELETE, "metric"),
    ("metric-name-missing", VALID, "metric.name", _DELETE, "metric.name"),
    ("metric-mode-bad", VALID, "metric.mode", "maximize", "metric.mode"),
    ("metric-not-reported", VALID, "metric.name", "val/nope", "metric.name"),
    ("metric-unknown-key", VALID, "metric.goal", 1, "metric.goal"),
    ("seeds-zero", VALID, "seeds", 0, "seeds"),
    ("seeds-negative-entry", VALID, "seeds", [1, -2, 3], "seeds.1"),
    ("seeds-duplicate", VALID, "seeds", [1, 1, 2], "seeds"),
    ("seeds-string", VALID, "seeds", "four", "seeds"),
    ("keep-equals-seeds", VALID, "cull.keep", 4, "cull.keep"),
    ("keep-above-seeds", VALID, "cull.keep", 9, "cull.keep"),
    ("keep-zero", VALID, "cull.keep", 0, "cull.keep"),
    ("cull-at-negative", VALID, "cull.at", -0.2, "cull.at"),
    ("cull-at-beyond-budget", VALID, "cull.at", 6, "cull.at"),
    ("cull-at-non-integer-iteration", VALID, "cull.at", 2.5, "cull.at"),
    ("cull-scheduler-unknown", VALID, "cull.scheduler", "median", "cull.scheduler"),
    ("cull-tie-break-not-reported", VALID, "cull.tie_break", "val/bogus", "cull.tie_break"),
    ("cull-unknown-key", VALID, "cull.patience", 3, "cull.patience"),
    ("cull-missing", VALID, "cull", _DELETE, "cull"),
    ("select-mode-bad", VALID, "select.mode", "best", "select.mode"),
    ("select-metric-not-reported", VALID, "select.metric", "val/x", "select.metric"),
    ("config-unknown-key", VALID, "config.hiddn", 8, "config.hiddn"),
    ("config-wrong-type", VALID, "config.hidden", "wide", "config.hidden"),
    ("config-not-mapping", VALID, "config", [1, 2], "config"),
    ("resources-cpu-zero", VALID, "resources", {"cpu": 0}, "resources.cpu"),
    ("resources-gpu-negative", VALID, "resources", {"gpu": -1}, "resources.gpu"),
    ("resources-unknown", VALID, "resources", {"tpu": 1}, "resources.tpu"),
    ("checkpoint-every-zero", VALID, "checkpoint", {"every": 0}, "checkpoint.every"),
    ("checkpoint-keep-zero", VALID, "checkpoint", {"keep": 0}, "checkpoint.keep"),
    ("quick-unknown-key", VALID, "quick.kind", "sweep", "quick.kind"),
    ("quick-config-unknown", VALID, "quick.config", {"hiden": 2}, "quick.config.hiden"),
    ("quick-budget-negative", VALID, "quick.budget", -1, "quick.budget"),
    ("sweep-search-empty", VALID_SWEEP, "search", {}, "search"),
    ("sweep-search-unknown-key", VALID_SWEEP, "search", {"width": {"choice": [1]}}, "search.width"),
    (
        "sweep-domain-two-kinds",
        VALID_SWEEP,
        "search",
        {"lr": {"uniform": [0.1, 0.2], "choice": [0.1]}},
        "search.lr",
    ),
    (
        "sweep-domain-low-high",
        VALID_SWEEP,
        "search",
        {"lr": {"loguniform": [0.1, 0.01]}},
        "search.lr",
    ),
    (
        "sweep-domain-bad-value",
        VALID_SWEEP,
        "search",
        {"hidden": {"choice": ["x"]}},
        "search.hidden",
    ),
    ("sweep-num-samples-zero", VALID_SWEEP, "num_samples", 0, "num_samples"),
    ("sweep-search-alg-unknown", VALID_SWEEP, "search_alg", "bayes", "search_alg"),
    (
        "sweep-asha-grace-beyond-budget",
        VALID_SWEEP,
        "scheduler",
        {"type": "asha", "grace_period": 5},
        "scheduler.grace_period",
    ),
]


@pytest.mark.parametrize(
    ("base", "path", "value", "expect_key"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_spec_exits_2_naming_the_key(
    tmp_path: Path, base: str, path: str, value: object, expect_key: str
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(_mutate(base, path, value))
    result = CliRunner().invoke(app, ["sweep", str(spec), "--storage", str(tmp_path / "res")])
    assert result.exit_code == 2, result.output
    assert f"{spec}: {expect_key}:" in result.output
    # nothing started: no experiment folder was created
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())


VALID_LEVER = f"""
kind: lever_ab
name: toy-levers
family: "{TOY}"
control: {{hidden: 8}}
levers:
  wide: {{hidden: 16}}
  fast: {{lr: 0.03}}
seeds: [1, 2, 3, 4]
budget: 3
metric: {{name: val/mse, mode: min}}
guardrails: [{{name: train/loss, mode: min, margin: 0.1}}]
decision: {{min_effect: 0.01, alpha: 0.05, looks: [2, 4], correction: holm}}
"""

LEVER_CASES = [
    ("lever-unknown-override", "levers", {"wide": {"hiddn": 16}}, "levers.wide.hiddn"),
    ("lever-bad-override-type", "levers", {"wide": {"hidden": "big"}}, "levers.wide"),
    ("lever-empty-overrides", "levers", {"wide": {}}, "levers.wide"),
    ("lever-named-control", "levers", {"control": {"hidden": 4}}, "levers.control"),
    ("levers-empty", "levers", {}, "levers"),
    ("seeds-empty", "seeds", [], "seeds"),
    ("seeds-duplicate", "seeds", [1, 1, 2], "seeds"),
    ("min-effect-zero", "decision.min_effect", 0, "decision.min_effect"),
    ("min-effect-negative", "decision.min_effect", -0.1, "decision.min_effect"),
    ("alpha-above-one", "decision.alpha", 1.5, "decision.alpha"),
    ("looks-not-increasing", "decision.looks", [4, 2], "decision.looks"),
    ("looks-beyond-seeds", "decision.looks", [2, 8], "decision.looks"),
    ("correction-unknown", "decision.correction", "bonferroni", "decision.correction"),
    (
        "guardrail-not-reported",
        "guardrails",
        [{"name": "val/x", "mode": "min"}],
        "guardrails.0.name",
    ),
    (
        "guardrail-negative-margin",
        "guardrails",
        [{"name": "train/loss", "mode": "min", "margin": -1}],
        "guardrails.0.margin",
    ),
    ("confirm-seed-overlaps", "decision.confirm_seeds", [1], "decision.confirm_seeds"),
    ("rounds-without-confirmation", "rounds", 2, "decision.confirm_seeds"),
    ("config-instead-of-control", "config", {"hidden": 4}, "config"),
    ("control-unknown-key", "control", {"widthh": 3}, "control.widthh"),
]


@pytest.mark.parametrize(
    ("path", "value", "expect_key"), [c[1:] for c in LEVER_CASES], ids=[c[0] for c in LEVER_CASES]
)
def test_malformed_lever_spec_exits_2_naming_the_key(
    tmp_path: Path, path: str, value: object, expect_key: str
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(_mutate(VALID_LEVER, path, value))
    result = CliRunner().invoke(app, ["sweep", str(spec), "--storage", str(tmp_path / "res")])
    assert result.exit_code == 2, result.output
    assert f"{spec}: {expect_key}:" in result.output


def test_duplicate_lever_names_are_rejected(tmp_path: Path) -> None:
    # YAML would silently keep the second `wide`; a spec must say so
    spec = tmp_path / "dup.yaml"
    spec.write_text(VALID_LEVER.replace("  fast: {lr: 0.03}", "  wide: {lr: 0.03}"))
    result = CliRunner().invoke(app, ["sweep", str(spec)])
    assert result.exit_code == 2
    assert f"{spec}: levers.wide: duplicate key" in result.output


def test_bad_yaml_syntax_names_the_line(tmp_path: Path) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("kind: seed_cull\nname: [unclosed\nbudget: 3\n")
    result = CliRunner().invoke(app, ["sweep", str(spec)])
    assert result.exit_code == 2
    assert str(spec) in result.output and "invalid YAML at line" in result.output


@pytest.mark.parametrize("target", ["missing.yaml", "."], ids=["missing", "a-directory"])
def test_unreadable_file_exits_2(tmp_path: Path, target: str) -> None:
    path = tmp_path / target
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2
    assert "cannot read the spec file" in result.output


def test_spec_that_is_not_a_mapping(tmp_path: Path) -> None:
    spec = tmp_path / "list.yaml"
    spec.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(spec)


def test_real_process_exit_code_is_2(tmp_path: Path) -> None:
    # the console entry point, not only the in-process runner, returns 2
    spec = tmp_path / "bad.yaml"
    spec.write_text(_mutate(VALID, "cull.keep", 4))
    proc = run_cli("sweep", str(spec), "--storage", str(tmp_path / "res"), timeout=120)
    assert proc.returncode == 2
    assert "cull.keep" in proc.stderr


def test_quick_overrides_are_applied(tmp_path: Path) -> None:
    spec_file = tmp_path / "ok.yaml"
    spec_file.write_text(VALID)
    full, quick = load_spec(spec_file), load_spec(spec_file, quick=True)
    assert (full.budget, full.config["hidden"]) == (6, 8)
    assert (quick.budget, quick.config["hidden"]) == (4, 4)
    assert quick.seeds == full.seeds == [0, 1, 2, 3]


def test_cull_fraction_becomes_an_iteration(tmp_path: Path) -> None:
    spec_file = tmp_path / "ok.yaml"
    spec_file.write_text(VALID)
    spec = load_spec(spec_file)
    assert spec.cull.milestone(spec.budget) == 3


@pytest.mark.parametrize(
    "shipped",
    sorted((Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_specs_are_valid(shipped: Path) -> None:
    load_spec(shipped)
    load_spec(shipped, quick=True)


def test_set_overrides_apply_after_quick(tmp_path: Path) -> None:
    spec_file = tmp_path / "ok.yaml"
    spec_file.write_text(VALID)
    spec = load_spec(
        spec_file, quick=True, overrides=["budget=3", "config.hidden=2", "seeds=[5, 6, 7]"]
    )
    assert (spec.budget, spec.config["hidden"], spec.seeds) == (3, 2, [5, 6, 7])


@pytest.mark.parametrize(
    ("item", "key"),
    [("budget=-1", "budget"), ("config.hiddn=3", "config.hiddn"), ("nokey", "--set")],
)
def test_bad_set_override_names_the_key(tmp_path: Path, item: str, key: str) -> None:
    spec_file = tmp_path / "ok.yaml"
    spec_file.write_text(VALID)
    result = CliRunner().invoke(app, ["sweep", str(spec_file), "--set", item])
    assert result.exit_code == 2
    assert f"{spec_file}: {key}:" in result.output
