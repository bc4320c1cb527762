"""Spec validation: every malformed spec exits 2 with the file and the key path."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from tests.conftest import TOY, run_cli
from tests.tunelab import toy_family
from tunelab import SpecError, load_spec
from tunelab.spec import metric_name_problem

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


# -- limits: a bad spec never starts and never hangs --------------------------------------

BOMB = "".join(
    f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}" if i else '"lol"'] * 9) + "]\n" for i in range(10)
)


def test_alias_bomb_is_refused_in_under_a_second(tmp_path: Path) -> None:
    # billion laughs: 9**10 values once expanded; refused from the composed graph, never expanded
    spec = tmp_path / "bomb.yaml"
    spec.write_text(VALID + BOMB + "description: *b9\n")
    start = time.perf_counter()
    with pytest.raises(SpecError, match=r"expands to more than 50000 values \(MAX_YAML_NODES\)"):
        load_spec(spec)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: &a [*a]\n", "a.0: a recursive alias"),
        ("a: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than 32 levels"),
        ("a: " + "{b: " * 200 + "1" + "}" * 200 + "\n", "nested deeper than 32 levels"),
        ("budget: " + "1" * 5000 + "\n", "invalid YAML value: Exceeds the limit"),
    ],
    ids=["recursive-alias", "deep-lists", "deep-mappings", "huge-integer"],
)
def test_yaml_that_would_hang_or_crash_is_refused(tmp_path: Path, text: str, match: str) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    start = time.perf_counter()
    with pytest.raises(SpecError, match=match):
        load_spec(spec)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"kind: seed_cull\nname: \xff\xfe\n", "not UTF-8 text"),
        (b"# padding\n" * 110_000, "larger than 1000000 bytes"),
    ],
    ids=["not-utf8", "too-large"],
)
def test_unreadable_spec_content_exits_2(tmp_path: Path, content: bytes, match: str) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_bytes(content)
    result = CliRunner().invoke(app, ["sweep", str(spec)])
    assert result.exit_code == 2 and match in result.output, result.output


# (id, base, text to replace, replacement, expected "<key>: <message start>")
LIMIT_CASES = [
    ("seeds-1e9", VALID, "seeds: 4", "seeds: 1000000000", "seeds: at most 10000 seeds (MAX_SEEDS)"),
    ("seeds-1e9-float", VALID, "seeds: 4", "seeds: 1e9", "seeds: at most 10000 seeds"),
    (
        "seed-beyond-32-bit",
        VALID,
        "seeds: 4",
        "seeds: [1, 4294967296]",
        "seeds.1: Input should be less",
    ),
    (
        "budget-true",
        VALID,
        "budget: 6",
        "budget: true",
        "budget: must be an integer, not a boolean",
    ),
    (
        "budget-fraction",
        VALID,
        "budget: 6",
        "budget: 2.5",
        "budget: Input should be a valid integer",
    ),
    (
        "budget-huge",
        VALID,
        "budget: 6",
        "budget: 1e7",
        "budget: Input should be less than or equal to 1000000",
    ),
    ("keep-true", VALID, "keep: 2", "keep: true", "cull.keep: must be an integer, not a boolean"),
    (
        "seed-true",
        VALID,
        "seeds: 4",
        "seeds: [0, true]",
        "seeds.1: must be an integer, not a boolean",
    ),
    ("cull-at-nan", VALID, "at: 0.5", "at: .nan", "cull.at: Input should be a finite number"),
    (
        "cpu-1e9",
        VALID,
        "seeds: 4",
        "seeds: 4\nresources: {cpu: 1e9}",
        "resources.cpu: Input should be less than or equal to 1024",
    ),
    (
        "cpu-inf",
        VALID,
        "seeds: 4",
        "seeds: 4\nresources: {cpu: .inf}",
        "resources.cpu: Input should be a finite number",
    ),
    (
        "gpu-true",
        VALID,
        "seeds: 4",
        "seeds: 4\nresources: {gpu: true}",
        "resources.gpu: Input should be a valid number",
    ),
    (
        "retries-1e6",
        VALID,
        "seeds: 4",
        "seeds: 4\nfailure: {retries: 1e6}",
        "failure.retries: Input should be less than or equal to 100",
    ),
    (
        "num-samples-1e12",
        VALID_SWEEP,
        "num_samples: 2",
        "num_samples: 1e12",
        "num_samples: Input should be less than or equal to 10000",
    ),
    (
        "trials-over-cap",
        VALID_SWEEP,
        "num_samples: 2",
        "num_samples: 10000\nseeds: 20",
        "num_samples: the spec plans 200000 trials",
    ),
    (
        "loguniform-nan",
        VALID_SWEEP,
        "1.0e-3, 1.0e-1",
        ".nan, 1.0e-1",
        "search.lr.loguniform.0: Input should be a finite number",
    ),
    (
        "tpe-several-seeds",
        VALID_SWEEP,
        "num_samples: 2",
        "num_samples: 2\nsearch_alg: optuna_tpe\nseeds: 3",
        "search_alg: optuna_tpe runs each suggestion on one seed, but seeds lists 3",
    ),
    (
        "quick-seeds-duplicate",
        VALID,
        "quick: {budget: 4,",
        "quick: {seeds: [1, 1], budget: 4,",
        "quick.seeds: seeds must be distinct",
    ),
    (
        "quick-keep",
        VALID,
        "quick: {budget: 4,",
        "quick: {seeds: 2, budget: 4,",
        "quick.cull.keep: must be smaller than the number of seeds (2)",
    ),
    (
        "quick-non-string-key",
        VALID,
        "quick: {budget: 4,",
        "quick: {1: 2, budget: 4,",
        "quick.1: cannot be overridden in quick",
    ),
]


@pytest.mark.parametrize(
    ("base", "old", "new", "expect"), [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES]
)
def test_limits_exit_2_naming_the_key_and_the_cap(
    tmp_path: Path, base: str, old: str, new: str, expect: str
) -> None:
    assert old in base
    spec = tmp_path / "bad.yaml"
    spec.write_text(base.replace(old, new, 1))
    result = CliRunner().invoke(app, ["sweep", str(spec), "--storage", str(tmp_path / "res")])
    assert result.exit_code == 2, result.output
    assert f"{spec}: {expect}" in result.output
    assert ".: " not in result.output  # never "quick.: seeds"


def test_exponent_numbers_read_as_numbers(tmp_path: Path) -> None:
    # YAML 1.2 `1e6` (PyYAML alone reads a string): integral ones fill integer keys
    spec = tmp_path / "ok.yaml"
    spec.write_text(
        VALID_SWEEP.replace("budget: 4", "budget: 1e3")
        .replace("1.0e-3, 1.0e-1", "1e-3, 1E-1")
        .replace("hidden: 8}", "hidden: 8, lr: 2e-2}")
    )
    parsed = load_spec(spec, overrides=["num_samples=1e1"])
    assert (parsed.budget, parsed.num_samples) == (1000, 10)
    assert parsed.search["lr"].loguniform == (1e-3, 1e-1)
    assert parsed.config["lr"] == 0.02
    assert load_spec(spec, overrides=["budget=1e6"]).budget == 1_000_000


def test_caps_allow_their_own_value(tmp_path: Path) -> None:
    spec = tmp_path / "ok.yaml"
    spec.write_text(VALID.replace("seeds: 4", "seeds: 10000").replace("budget: 6", "budget: 1e6"))
    parsed = load_spec(spec)
    assert (len(parsed.seeds), parsed.budget) == (10_000, 1_000_000)


@pytest.mark.parametrize("item", ["budget.x=1", "config.hidden.width=2", "seeds.0.x=1"])
def test_set_into_a_value_that_is_not_a_mapping_exits_2(tmp_path: Path, item: str) -> None:
    spec = tmp_path / "ok.yaml"
    spec.write_text(VALID)
    result = CliRunner().invoke(app, ["sweep", str(spec), "--set", item])
    assert result.exit_code == 2, result.output
    assert f"{spec}: --set: cannot set" in result.output


# -- metric names MLflow rejects ------------------------------------------------------------

#: The toy family, reporting one metric name MLflow rejects ('@').
AT_FAMILY = dataclasses.replace(
    toy_family.FAMILY, name="toy_at", metrics=(*toy_family.FAMILY.metrics, "val/score@best")
)


def test_family_metric_name_mlflow_rejects_exits_2(tmp_path: Path) -> None:
    spec = tmp_path / "at.yaml"
    spec.write_text(VALID.replace(TOY, "tests.tunelab.test_spec:AT_FAMILY"))
    result = CliRunner().invoke(app, ["sweep", str(spec), "--storage", str(tmp_path / "res")])
    assert result.exit_code == 2, result.output
    assert f"{spec}: family: family 'toy_at' reports metric 'val/score@best'" in result.output
    assert "Names may only contain alphanumerics" in result.output  # MLflow's own rule


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("val/score", None),
        ("health/grad_norm", None),
        ("a b:c-d.e_f", None),
        ("val@x", "Names may only contain"),
        ("val/x%", "Names may only contain"),
        ("val//x", "would resolve to 'val/x'"),
        ("/val", "would resolve"),
        ("../val", "would resolve"),
        ("x" * 251, "at most 250 characters"),
        ("", "non-empty"),
    ],
)
def test_metric_name_problem_applies_mlflows_rule(name: str, problem: str | None) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric

    found = metric_name_problem(name)
    assert (found is None) if problem is None else (problem in (found or ""))
    if name:  # agrees with what MLflow's log_metric accepts
        try:
            _validate_metric(name, 1.0, 0, 0)
            accepted = True
        except MlflowException:
            accepted = False
        assert accepted == (found is None)


def test_the_spec_module_example_is_the_shipped_seed_cull_spec() -> None:
    # the example a reader copies from `help(tunelab.spec)` is the spec that ships, key for key
    import tunelab.spec

    doc = tunelab.spec.__doc__ or ""
    example = doc.split("a test keeps them equal)::", 1)[1]
    shipped = Path(__file__).parents[2] / "search_spaces" / "seed_cull.yaml"
    assert yaml.safe_load(example) == yaml.safe_load(shipped.read_text())
