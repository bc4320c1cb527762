"""Tests for tunelab.report: the self-contained HTML report of a lever A/B experiment.

The report is built from a synthetic experiment folder with the lever A/B
runner's layout, every path taken from :class:`tunelab.layout.ExperimentLayout`
(tunelab.json, results.csv, verdicts.json from the real verdict engine,
tune/trial_<id>/result.json learning curves), parsed with the stdlib HTML
parser and, under the ``browser`` mark, rendered by headless Debian Chromium.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tunelab.layout import ExperimentLayout
from tunelab.report import ReportError, find_experiment, render_report, write_report
from tunelab.verdicts import Decision, Guardrail, adjust_family, analyze_lever, verdict_to_dict

CHROMIUM = Path("/usr/bin/chromium")

# ----------------------------------------------------------------------------
# A synthetic experiment folder
# ----------------------------------------------------------------------------

NAME = "flow-levers-r1"
M_SPIKE = "val/spike_l1"
M_FLAT = "val/flat_l1"
M_SAMPLE = "val/sample_l1"
M_COVER = "val/coverage"
M_LOSS = "train/loss"
METRICS = (M_SPIKE, M_FLAT, M_SAMPLE, M_COVER, M_LOSS)
SEEDS = (1001, 1002, 1003, 1004, 1005, 1006)
BUDGET = 12
MIN_EFFECT = 0.010
FLAT_MARGIN = 0.005
CRASH_AT = 5  # iteration the crashed trial dies at


@dataclasses.dataclass(frozen=True)
class Lever:
    """A synthetic lever: its true effect on val/spike_l1 (raw, lower is better)."""

    shift: float
    noise: float  # per-seed sd of the paired difference
    crashed_seed: int | None = None


LEVERS = {
    "lds": Lever(-0.025, 0.003),  # a meaningful win
    "delta_off": Lever(0.020, 0.003),  # negative
    "time_uniform": Lever(0.0, 0.0005),  # null (equivalent within the keep bar)
    "wide": Lever(-0.004, 0.02),  # inconclusive
    "broken": Lever(-0.010, 0.003, crashed_seed=1003),  # crashed
}
ROUND2_LEVERS = ("wide", "time_uniform")  # round 2 stacks lds into the control


def make_experiment(
    root: Path,
    *,
    name: str = NAME,
    mode: str = "min",
    rounds: int = 1,
    created: str = "20250101-120000-000000",
    seed: int = 0,
) -> Path:
    """An experiment folder as the lever A/B runner writes it, with synthetic numbers."""
    layout = ExperimentLayout(root / f"{name}-{created}")
    exp_dir = layout.root
    exp_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    decision = Decision(min_effect=MIN_EFFECT, alpha=0.05, looks=(3, 6), correction="holm")
    spec = {
        "kind": "lever_ab",
        "name": name,
        "family": "flow_policy",
        "control": {"lds_alpha": 0.0, "chunk_delta_weight": 10},
        "levers": {lever: {"knob": lever} for lever in LEVERS},
        "seeds": list(SEEDS),
        "metric": {"name": M_SPIKE, "mode": mode},
        "guardrails": [{"name": M_FLAT, "mode": "min", "margin": FLAT_MARGIN}],
        "decision": {
            "min_effect": MIN_EFFECT,
            "alpha": 0.05,
            "looks": [3, 6],
            "correction": "holm",
        },
        "budget": BUDGET,
    }
    rows: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    for rnd in range(1, rounds + 1):
        levers = list(LEVERS) if rnd == 1 else list(ROUND2_LEVERS)
        base = rng.normal(0.34 if rnd == 1 else 0.315, 0.014, len(SEEDS))  # per-seed level: (S,)
        flat = rng.normal(0.15, 0.01, len(SEEDS))  # (S,)
        finals: dict[str, tuple[np.ndarray, np.ndarray, int | None]] = {
            "control": (base, flat, None)
        }
        for lever in levers:
            lv = LEVERS[lever]
            finals[lever] = (
                base + lv.shift + rng.normal(0.0, lv.noise, len(SEEDS)),
                flat + rng.normal(0.0, 0.001, len(SEEDS)),
                lv.crashed_seed,
            )
        for arm, (spike, flat_v, crashed) in finals.items():
            for i, s in enumerate(SEEDS):
                trial_id = f"e7c1a_{len(rows):05d}"
                failed = s == crashed
                row = {
                    "trial_id": trial_id,
                    "run_id": f"{rng.integers(2**63):016x}",
                    "seed": s,
                    "arm": arm,
                    "round": rnd,
                    "status": "error" if failed else "finished",
                    "iterations": CRASH_AT if failed else BUDGET,
                }
                final = _final_metrics(spike[i], flat_v[i])
                row.update({m: math.nan if failed else v for m, v in final.items()})
                rows.append(row)
                _write_curve(
                    layout.trial_result_file(trial_id),
                    trial_id,
                    s,
                    final,
                    CRASH_AT if failed else BUDGET,
                    rng,
                )
        table = pd.DataFrame([r for r in rows if r["round"] == rnd])
        raw = []
        for lever in levers:
            c = table[table.arm == "control"].set_index("seed").loc[list(SEEDS)]
            v = table[table.arm == lever].set_index("seed").loc[list(SEEDS)]
            guard = {
                M_FLAT: (
                    c[M_FLAT].to_numpy(),
                    v[M_FLAT].to_numpy(),
                    Guardrail(M_FLAT, "min", FLAT_MARGIN),
                )
            }
            raw.append(
                analyze_lever(
                    c[M_SPIKE].to_numpy(),
                    v[M_SPIKE].to_numpy(),
                    mode=mode,
                    decision=decision,
                    guardrails=guard,
                    lever=lever,
                    seeds=SEEDS,
                    look_index=1,  # the last look: all seeds
                )
            )
        verdicts += [{**verdict_to_dict(v), "round": rnd} for v in adjust_family(raw, "holm")]
    pd.DataFrame(rows).to_csv(layout.results_csv, index=False)
    layout.verdicts_file.write_text(json.dumps(verdicts, indent=1))
    state = {
        "spec": spec,
        "spec_file": "/specs/flow.yaml",
        "quick": False,
        "experiment_dir": str(exp_dir),
        "storage": str(root),
        "tracking_uri": "http://127.0.0.1:5000",
        "mlflow_experiment": name,
        "mlflow_experiment_id": "1",
        "parent_run_id": "abc123",
        "git_commit": "0123456789abcdef",
        "created": created,
    }
    layout.state_file.write_text(json.dumps(state))
    return exp_dir


def _final_metrics(spike: float, flat: float) -> dict[str, float]:
    return {
        M_SPIKE: float(spike),
        M_FLAT: float(flat),
        M_SAMPLE: float(1.3 * spike),
        M_COVER: float(0.6 - spike),  # higher is better
        M_LOSS: float(0.1 + spike / 3),
    }


def _write_curve(
    result_file: Path,
    trial_id: str,
    seed: int,
    final: dict[str, float],
    last: int,
    rng: np.random.Generator,
) -> None:
    """Tune's JSON-lines result.json: exponential approach to the final values."""
    result_file.parent.mkdir(parents=True)
    lines = []
    for it in range(1, last + 1):
        decay = math.exp(-it / 3) - math.exp(-BUDGET / 3)  # 0 at the last iteration
        row: dict[str, Any] = {"iteration": it, "training_iteration": it, "trial_id": trial_id}
        for m, v in final.items():
            sign = -1.0 if m == M_COVER else 1.0
            row[m] = v + sign * 0.3 * decay + (rng.normal(0, 0.002) if it < BUDGET else 0.0)
        row["config"] = {"seed": seed}
        lines.append(json.dumps(row))
    result_file.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------
# A small DOM over the stdlib HTML parser
# ----------------------------------------------------------------------------

_VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


@dataclasses.dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = dataclasses.field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self) -> Iterator[Node]:
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag)
            and (cls is None or cls in n.classes)
            and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class _DomParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(text: str) -> Node:
    p = _DomParser()
    p.feed(text)
    p.close()
    return p.root


def card(dom: Node, lever: str, rnd: int = 1) -> Node:
    cards = dom.find_all("section", cls="lever-card", data_lever=lever, data_round=str(rnd))
    assert len(cards) == 1, f"{len(cards)} cards for lever {lever!r} round {rnd}"
    return cards[0]


def chip(node: Node) -> Node:
    chips = [
        n for n in node.find_all(cls="chip") if any(c.startswith("verdict-") for c in n.classes)
    ]
    assert len(chips) == 1
    return chips[0]


def _number(text: str) -> float:
    return float(text.replace("−", "-"))


# ----------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_experiment(tmp_path_factory.mktemp("storage"))


@pytest.fixture(scope="module")
def report(experiment: Path) -> str:
    return render_report(experiment)


@pytest.fixture(scope="module")
def dom(report: str) -> Node:
    return parse(report)


@pytest.fixture(scope="module")
def verdicts(experiment: Path) -> dict[str, dict[str, Any]]:
    return {
        v["lever"]: v for v in json.loads(ExperimentLayout(experiment).verdicts_file.read_text())
    }


@pytest.fixture(scope="module")
def results(experiment: Path) -> pd.DataFrame:
    return pd.read_csv(ExperimentLayout(experiment).results_csv)


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


def test_synthetic_experiment_covers_every_label(verdicts: dict[str, dict[str, Any]]) -> None:
    # The generator is only useful if the report is shown every chip colour.
    labels = {lever: v["verdict"] for lever, v in verdicts.items()}
    assert labels == {
        "lds": "win",
        "delta_off": "negative",
        "time_uniform": "null",
        "wide": "inconclusive",
        "broken": "crashed",
    }
    assert verdicts["lds"]["meaningful"]


def test_report_is_self_contained(report: str) -> None:
    # No src/href/url() reaching the network, no external script or stylesheet.
    refs = re.findall(
        r"""\b(?:src|href|xlink:href)\s*=\s*["']?\s*([^"'\s>]*)""", report, flags=re.I
    )
    assert not [r for r in refs if re.match(r"(?:https?:)?//", r, flags=re.I)]
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:)?//", report, flags=re.I)
    assert not re.search(r"<script|<link|@import", report, flags=re.I)
    assert "http://127.0.0.1:5000" in report  # the tracking URI is shown as text, not linked


@pytest.mark.parametrize("lever", list(LEVERS))
def test_lever_card_has_its_verdict_chip(
    dom: Node, verdicts: dict[str, dict[str, Any]], lever: str
) -> None:
    # One card per lever; its chip is `chip verdict-<label>` and reads the label.
    label = verdicts[lever]["verdict"]
    c = chip(card(dom, lever))
    assert {"chip", f"verdict-{label}"} <= c.classes
    assert c.text() == label
    assert card(dom, lever).attrs["data-verdict"] == label


@pytest.mark.parametrize(
    ("lever", "meaningful"), [("lds", True), ("delta_off", False), ("wide", False)]
)
def test_meaningful_win_is_marked(dom: Node, lever: str, meaningful: bool) -> None:
    # A meaningful win gets the darker chip (class `meaningful`) and a badge.
    node = card(dom, lever)
    assert ("meaningful" in chip(node).classes) is meaningful
    assert bool(node.find_all("span", cls="badge")) is meaningful


@pytest.mark.parametrize("lever", list(LEVERS))
def test_guardrail_chips_show_status(
    dom: Node, verdicts: dict[str, dict[str, Any]], lever: str
) -> None:
    # Each guardrail of the verdict is a small chip `guard-<status>` on the card.
    for name, g in verdicts[lever]["guardrails"].items():
        chips = card(dom, lever).find_all("span", cls="guard", data_guardrail=name)
        assert len(chips) == 1
        assert f"guard-{g['status']}" in chips[0].classes
        assert chips[0].text() == f"{name}: {g['status']}"


@pytest.mark.parametrize("lever", list(LEVERS))
def test_card_figures_match_the_verdict(
    dom: Node, verdicts: dict[str, dict[str, Any]], lever: str
) -> None:
    # effect, CI, n_pairs and seed wins on the card are the verdict's numbers.
    v = verdicts[lever]
    stats = {
        dt.text(): dd.text()
        for div in card(dom, lever).find_all("dl", cls="stats")[0].find_all("div")
        for dt, dd in [(div.find_all("dt")[0], div.find_all("dd")[0])]
    }
    assert _number(stats["effect"]) == pytest.approx(v["effect"], rel=1e-3)
    ci = next(k for k in stats if k.endswith("CI"))
    low, high = (_number(x) for x in stats[ci].strip("[]").split(", "))
    assert (low, high) == (
        pytest.approx(v["ci_low"], rel=1e-3),
        pytest.approx(v["ci_high"], rel=1e-3),
    )
    assert stats["n_pairs"] == str(v["n_pairs"])
    assert stats["seed wins"] == f"{v['wins']}/{v['n_pairs']}"


@pytest.mark.parametrize("mode", ["min", "max"])
def test_dots_are_paired_differences_signed_better_positive(tmp_path: Path, mode: str) -> None:
    # One dot per finished pair: control - lever for "min", lever - control for "max".
    exp = make_experiment(tmp_path, mode=mode)
    dom = parse(render_report(exp))
    df = pd.read_csv(ExperimentLayout(exp).results_csv)
    df = df[df.status == "finished"]
    control = df[df.arm == "control"].set_index("seed")[M_SPIKE]
    sign = 1.0 if mode == "max" else -1.0
    for lever in LEVERS:
        variant = df[df.arm == lever].set_index("seed")[M_SPIKE]
        expected = {
            s: sign * (variant[s] - control[s]) for s in variant.index if s in control.index
        }
        dots = card(dom, lever).find_all("circle", cls="pair")
        got = {int(d.attrs["data-seed"]): float(d.attrs["data-diff"]) for d in dots}
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected)


def test_crashed_pair_has_no_dot_and_is_listed(dom: Node) -> None:
    # The crashed seed is named on the card and has no dot.
    node = card(dom, "broken")
    assert "1003" in node.find_all("p", cls="crashed")[0].text()
    assert "1003" not in {d.attrs["data-seed"] for d in node.find_all("circle", cls="pair")}


@pytest.mark.parametrize("lever", list(LEVERS))
def test_keep_bar_is_symmetric_around_zero_and_ci_drawn(dom: Node, lever: str) -> None:
    # Two dashed keep-bar lines at ±min_effect, equidistant from the zero line; the CI bar.
    svg = card(dom, lever).find_all("svg", cls="diffs")[0]
    zero = float(svg.find_all("line", cls="zero")[0].attrs["x1"])
    bars = sorted(float(n.attrs["x1"]) for n in svg.find_all("line", cls="keep-bar"))
    assert len(bars) == 2
    assert bars[0] < zero < bars[1]
    assert zero - bars[0] == pytest.approx(bars[1] - zero, abs=0.15)
    assert len(svg.find_all("rect", cls="ci")) == 1


def _expected_best(results: pd.DataFrame, column: str, mode: str) -> str:
    ok = results[(results.status == "finished") & (results["round"] == 1)]
    means = ok.groupby("arm")[column].mean()
    return str(means.idxmin() if mode == "min" else means.idxmax())


@pytest.mark.parametrize(
    ("column", "mode"),
    [(M_SPIKE, "min"), (M_FLAT, "min"), (M_SAMPLE, "min"), (M_LOSS, "min"), (M_COVER, "max")],
)
def test_metric_table_marks_best_per_column(
    dom: Node, results: pd.DataFrame, column: str, mode: str
) -> None:
    # Best arm per column: the spec mode for the primary, the guardrail's mode,
    # lower for *l1/*loss, higher otherwise.
    best = dom.find_all("td", cls="best", data_metric=column)
    assert [n.attrs["data-arm"] for n in best] == [_expected_best(results, column, mode)]


def test_primary_column_follows_the_spec_mode(tmp_path: Path) -> None:
    # A primary metric named *_l1 with mode "max" in the spec is best when highest.
    exp = make_experiment(tmp_path, mode="max")
    best = parse(render_report(exp)).find_all("td", cls="best", data_metric=M_SPIKE)
    assert [n.attrs["data-arm"] for n in best] == [
        _expected_best(pd.read_csv(ExperimentLayout(exp).results_csv), M_SPIKE, "max")
    ]


@pytest.mark.parametrize("arm", ["control", *LEVERS])
def test_metric_table_shows_mean_and_sd_over_finished_seeds(
    dom: Node, results: pd.DataFrame, arm: str
) -> None:
    cell = dom.find_all("td", cls="metric", data_metric=M_SPIKE, data_arm=arm)[0]
    mean_text, sd_text = cell.text().split("±")
    values = results[(results.arm == arm) & (results.status == "finished")][M_SPIKE]
    assert _number(mean_text) == pytest.approx(values.mean(), rel=1e-3)
    assert _number(sd_text) == pytest.approx(values.std(ddof=1), rel=2e-2)


def test_curves_have_one_mean_line_per_arm(dom: Node) -> None:
    # One mean polyline per arm, one point per iteration (mean over the seeds reaching it).
    lines = dom.find_all("polyline", cls="mean", data_metric=M_SPIKE)
    assert sorted(n.attrs["data-arm"] for n in lines) == sorted(["control", *LEVERS])
    assert all(len(n.attrs["points"].split()) == BUDGET for n in lines)


def test_curves_draw_every_seed_thinly(dom: Node, results: pd.DataFrame) -> None:
    # A thin line per trial in the primary-metric panel, the crashed one included.
    panel = next(
        s for s in dom.find_all("svg", cls="curves") if s.find_all("polyline", data_metric=M_SPIKE)
    )
    seeds = panel.find_all("polyline", cls="seed")
    assert len(seeds) == len(results)
    crashed = [
        n for n in seeds if n.attrs["data-arm"] == "broken" and n.attrs["data-seed"] == "1003"
    ]
    assert len(crashed[0].attrs["points"].split()) == CRASH_AT


def test_curves_found_in_tune_named_trial_folders(tmp_path: Path) -> None:
    # Tune's own folder names (<trainable>_<trial_id>_<params>) are matched on trial_id.
    exp = make_experiment(tmp_path)
    tune_dir = ExperimentLayout(exp).tune_dir
    for i, d in enumerate(sorted(tune_dir.glob("trial_*"))):
        d.rename(tune_dir / f"run_trial_{d.name[len('trial_') :]}_{i}_seed=x_2025-01-01")
    lines = parse(render_report(exp)).find_all("polyline", cls="mean", data_metric=M_SPIKE)
    assert len(lines) == 1 + len(LEVERS)


def test_curve_survives_a_truncated_last_line(tmp_path: Path) -> None:
    # A trial that crashed while Tune wrote its last result line: the complete lines draw.
    exp = make_experiment(tmp_path)
    layout = ExperimentLayout(exp)
    df = pd.read_csv(layout.results_csv, dtype={"trial_id": str})
    tid = df[(df.arm == "lds") & (df.seed == SEEDS[0])].trial_id.item()
    path = layout.trial_result_file(tid)
    lines = path.read_text().splitlines()
    assert len(lines) == BUDGET
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    dom = parse(render_report(exp))
    panel = next(
        s for s in dom.find_all("svg", cls="curves") if s.find_all("polyline", data_metric=M_SPIKE)
    )
    seed = panel.find_all("polyline", cls="seed", data_arm="lds", data_seed=str(SEEDS[0]))
    assert len(seed) == 1
    assert len(seed[0].attrs["points"].split()) == BUDGET - 1
    mean = dom.find_all("polyline", cls="mean", data_arm="lds", data_metric=M_SPIKE)
    assert len(mean[0].attrs["points"].split()) == BUDGET  # the other seeds reach the budget


def test_header_shows_the_decision_rule(dom: Node) -> None:
    text = " ".join(dom.find_all("header", cls="top")[0].text().split())
    for fragment in [
        NAME,
        f"{M_SPIKE} (min: lower is better)",
        f"keep bar (min_effect){MIN_EFFECT}",
        "alpha0.05",
        "looks3, 6",
        "correctionholm",
        f"{M_FLAT} (min, margin {FLAT_MARGIN})",
        "seeds6 (1001, 1002",
        "rounds1",
        "trials36 (1 error, 35 finished)",
    ]:
        assert fragment in text


def test_two_rounds_get_their_own_cards_and_table_rows(tmp_path: Path) -> None:
    # Round 2 levers have their own cards; the table has a row per (round, arm).
    dom = parse(render_report(make_experiment(tmp_path, rounds=2)))
    assert {
        n.attrs["data-lever"] for n in dom.find_all("section", cls="lever-card", data_round="2")
    } == set(ROUND2_LEVERS)
    round2 = {n.attrs["data-arm"] for n in dom.find_all("td", data_round="2", data_metric=M_SPIKE)}
    assert round2 == {"control", *ROUND2_LEVERS}


def test_running_experiment_without_verdicts_or_curves_still_renders(tmp_path: Path) -> None:
    # Mid-run: no verdicts.json and no result.json yet; the report says so.
    exp = make_experiment(tmp_path)
    layout = ExperimentLayout(exp)
    layout.verdicts_file.unlink()
    shutil.rmtree(layout.tune_dir)
    dom = parse(render_report(exp))
    assert not dom.find_all("section", cls="lever-card")
    notes = " ".join(n.text() for n in dom.find_all("p", cls="note"))
    assert "No verdicts yet" in notes
    assert "No per-iteration results" in notes
    assert dom.find_all("td", cls="metric", data_metric=M_SPIKE)


def test_culled_trial_with_a_value_is_not_a_pair(tmp_path: Path) -> None:
    # Only finished trials count: a culled trial's (partial) value is neither a dot nor in the mean.
    exp = make_experiment(tmp_path)
    csv = ExperimentLayout(exp).results_csv
    df = pd.read_csv(csv)
    df.loc[(df.arm == "lds") & (df.seed == SEEDS[0]), "status"] = "culled"
    df.to_csv(csv, index=False)
    dom = parse(render_report(exp))
    assert str(SEEDS[0]) not in {
        d.attrs["data-seed"] for d in card(dom, "lds").find_all("circle", cls="pair")
    }
    cell = dom.find_all("td", cls="metric", data_metric=M_SPIKE, data_arm="lds")[0]
    kept = df[(df.arm == "lds") & (df.status == "finished")][M_SPIKE]
    assert _number(cell.text().split("±")[0]) == pytest.approx(kept.mean(), rel=1e-3)


def test_minimal_results_table_without_round_or_status(tmp_path: Path) -> None:
    # A table of only seed, arm and metrics (one round, every trial finished) still pairs seeds.
    exp = make_experiment(tmp_path)
    csv = ExperimentLayout(exp).results_csv
    df = pd.read_csv(csv)
    df[df.status == "finished"][["seed", "arm", *METRICS]].to_csv(csv, index=False)
    dom = parse(render_report(exp))
    assert len(card(dom, "lds").find_all("circle", cls="pair")) == len(SEEDS)
    assert len(dom.find_all("td", cls="best", data_metric=M_SPIKE)) == 1


def test_write_report_creates_folders_and_returns_out(experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "report.html"
    assert write_report(experiment, out) == out
    assert out.read_text(encoding="utf-8") == render_report(experiment)


def test_not_an_experiment_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="not a tunelab experiment folder"):
        render_report(tmp_path)


def test_find_experiment_by_name_returns_the_newest(tmp_path: Path) -> None:
    make_experiment(tmp_path, created="20250101-120000-000000")
    newest = make_experiment(tmp_path, created="20250302-080000-000000")
    make_experiment(tmp_path, created="20250101-090000-000000")
    make_experiment(tmp_path, name="other", created="20260101-000000-000000")
    assert find_experiment(NAME, tmp_path) == newest.resolve()


def test_find_experiment_accepts_a_folder(experiment: Path, tmp_path: Path) -> None:
    assert find_experiment(str(experiment), tmp_path) == experiment.resolve()


def test_find_experiment_unknown_name_lists_known_names(tmp_path: Path) -> None:
    make_experiment(tmp_path, name="other")
    with pytest.raises(ReportError, match="spec names there: other"):
        find_experiment(NAME, tmp_path)


def chromium_dom(html: Path, tmp: Path) -> str:
    """The DOM headless Debian Chromium builds from ``html`` (no network, fresh profile)."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    proc = subprocess.run(
        [str(CHROMIUM), *flags, f"--user-data-dir={tmp / 'profile'}", "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium")
def test_chromium_renders_every_lever_card(
    experiment: Path, verdicts: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    # The DOM Chromium builds (no network) holds every card, its chip and its plot.
    out = write_report(experiment, tmp_path / "report.html")
    dom = parse(chromium_dom(out, tmp_path))
    assert {n.attrs["data-lever"] for n in dom.find_all("section", cls="lever-card")} == set(LEVERS)
    for lever, v in verdicts.items():
        c = chip(card(dom, lever))
        assert f"verdict-{v['verdict']}" in c.classes
        assert c.text() == v["verdict"]
        assert len(card(dom, lever).find_all("circle", cls="pair")) == v["n_pairs"]


def test_a_nan_in_a_curve_is_marked_not_dropped(tmp_path: Path) -> None:
    # A seed whose metric turns NaN: its thin line ends there and a red cross marks the iteration.
    exp = make_experiment(tmp_path)
    layout = ExperimentLayout(exp)
    df = pd.read_csv(layout.results_csv, dtype={"trial_id": str})
    tid = df[(df.arm == "wide") & (df.seed == SEEDS[1])].trial_id.item()
    path = layout.trial_result_file(tid)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows[6:]:
        row[M_SPIKE] = math.nan
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dom = parse(render_report(exp))
    panel = next(
        s for s in dom.find_all("svg", cls="curves") if s.find_all("polyline", data_metric=M_SPIKE)
    )
    marks = panel.find_all("path", cls="nonfinite")
    assert [
        (m.attrs["data-arm"], m.attrs["data-seed"], m.attrs["data-iteration"]) for m in marks
    ] == [("wide", str(SEEDS[1]), "7")]
    seed = panel.find_all("polyline", cls="seed", data_arm="wide", data_seed=str(SEEDS[1]))[0]
    assert len(seed.attrs["points"].split()) == 6


def test_key_metrics_are_metrics_only_and_confirmation_is_on_the_card(tmp_path: Path) -> None:
    # A runner's table also has config.* values, sys/* timings, culled_at and stage columns:
    # the key-metric table shows metrics only; confirmation rows are not pairs; each card says
    # what its confirmation seeds found.
    exp = make_experiment(tmp_path)
    layout = ExperimentLayout(exp)
    df = pd.read_csv(layout.results_csv)
    df["config.hidden"] = 16
    df["sys/iter_time_s"] = 0.01
    df["culled_at"] = math.nan
    df["stage"] = "look2"
    confirm = df[df.seed == SEEDS[0]].copy()
    confirm["seed"], confirm["stage"] = 4242, "confirm"
    confirm["trial_id"] = [f"c{i:05d}" for i in range(len(confirm))]
    pd.concat([df, confirm]).to_csv(layout.results_csv, index=False)
    verdicts = json.loads(layout.verdicts_file.read_text())
    for v in verdicts:
        if v["lever"] == "lds":
            v["confirmed"], v["confirm_diffs"] = True, [0.021]
    layout.verdicts_file.write_text(json.dumps(verdicts))
    spec_state = json.loads(layout.state_file.read_text())
    spec_state["spec"]["decision"]["confirm_seeds"] = [4242]
    layout.state_file.write_text(json.dumps(spec_state))
    dom = parse(render_report(exp))
    shown = {n.attrs["data-metric"] for n in dom.find_all("td", cls="metric")}
    assert shown == set(METRICS)
    header = " ".join(th.text() for th in dom.find_all("table", cls="metrics")[0].find_all("th"))
    assert "config." not in header and "sys/" not in header and "culled_at" not in header
    assert "4242" not in {
        d.attrs["data-seed"] for d in card(dom, "lds").find_all("circle", cls="pair")
    }
    (lds,) = card(dom, "lds").find_all("p", cls="confirm")
    assert lds.attrs["data-confirmed"] == "yes" and "seed 4242: +0.021" in lds.text()
    (wide,) = card(dom, "wide").find_all("p", cls="confirm")
    assert wide.attrs["data-confirmed"] == "none" and "only a meaningful win" in wide.text()


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium")
def test_key_metric_table_fits_1400_px_in_chromium(tmp_path: Path) -> None:
    # In a 1400 px wide window the key-metric table (of a runner's table, config and sys
    # columns included) needs no horizontal scroll: no column is cut.
    exp = make_experiment(tmp_path)
    layout = ExperimentLayout(exp)
    df = pd.read_csv(layout.results_csv)
    for k in ("hidden", "lr", "steps_per_iter", "lds_alpha", "chunk_delta_weight"):
        df[f"config.{k}"] = 1.0
    for k in ("iter_time_s", "checkpoint_time_s", "checkpoint_bytes"):
        df[f"sys/{k}"] = 0.5
    df.to_csv(layout.results_csv, index=False)
    page = write_report(exp, tmp_path / "report.html").read_text()
    probe = (
        "<script>for (const t of document.querySelectorAll('table.metrics')) {"
        "const s = t.parentElement; t.setAttribute('data-fits', "
        "String(s.scrollWidth <= s.clientWidth && t.getBoundingClientRect().right <= innerWidth));}"
        "</script>"
    )
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"]
    proc = subprocess.run(
        [
            str(CHROMIUM),
            *flags,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    tables = parse(proc.stdout).find_all("table", cls="metrics")
    assert [t.attrs.get("data-fits") for t in tables] == ["true"]
