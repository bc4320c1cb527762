"""Tests for tunelab.verdicts: figures equal scipy / statsmodels, labels follow
shared/VERDICTS.md, and the decision rule keeps its error rates in simulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from tunelab.tracking import verdict_tags
from tunelab.verdicts import (
    CRASHED,
    INCONCLUSIVE,
    NEGATIVE,
    NULL,
    WIN,
    Decision,
    Guardrail,
    LeverVerdict,
    adjust_family,
    analyze_lever,
    obf_thresholds,
    paired_t_decisions,
    sequential_decision,
    verdict_to_dict,
)

REPS = 4000  # simulated A/B's per error-rate check: SE of a 0.05 rate is 0.0034
LOOKS = (5, 10, 20)


def _arms(n: int, effect: float, seed: int, rho: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    control = rng.normal(0.0, 1.0, n)
    variant = rho * control + math.sqrt(1 - rho**2) * rng.normal(0.0, 1.0, n) + effect
    return control, variant


def _guard(
    name: str, control: np.ndarray, shift: float | np.ndarray, mode: str, margin: float
) -> dict:
    return {name: (control, control + shift, Guardrail(name, mode, margin))}


# ----------------------------------------------------------------------------
# Primary figures equal scipy / statsmodels
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 10, 20])
@pytest.mark.parametrize("mode", ["max", "min"])
def test_paired_t_equals_scipy_ttest_rel(n: int, mode: str) -> None:
    # effect, CI and p are scipy's paired t on the better-positive differences.
    control, variant = _arms(n, 0.4, seed=n)
    v = analyze_lever(control, variant, mode=mode, decision=Decision(min_effect=0.1))
    better, worse = (variant, control) if mode == "max" else (control, variant)
    ref = stats.ttest_rel(better, worse)
    ci = ref.confidence_interval(0.95)
    assert v.effect == pytest.approx(np.mean(better - worse), rel=1e-12)
    assert v.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert (v.ci_low, v.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert v.n_pairs == n


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_interval_is_t_distribution_interval(alpha: float) -> None:
    # CI = mean +- t_{1-alpha/2, n-1} sd / sqrt(n).
    control, variant = _arms(12, 0.3, seed=3)
    d = variant - control
    half = stats.t.ppf(1 - alpha / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    v = analyze_lever(control, variant, mode="max", decision=Decision(0.1, alpha=alpha))
    assert (v.ci_low, v.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-10)
    assert v.confidence == pytest.approx(1 - alpha)


@pytest.mark.parametrize(("n", "delta"), [(6, 0.5), (20, 0.5), (35, 0.3)])
def test_tost_equals_statsmodels_ttost_paired(n: int, delta: float) -> None:
    control, variant = _arms(n, 0.05, seed=n)
    v = analyze_lever(control, variant, mode="max", decision=Decision(min_effect=delta))
    assert v.tost_p == pytest.approx(ttost_paired(variant, control, -delta, delta)[0], rel=1e-10)


def test_descriptive_figures() -> None:
    # dz = mean/sd of d, rho = Pearson between arms, wins = #(d > 0).
    control, variant = _arms(15, 0.3, seed=7)
    d = variant - control
    v = analyze_lever(control, variant, mode="max", decision=Decision(0.1))
    assert v.dz == pytest.approx(d.mean() / d.std(ddof=1))
    assert v.rho == pytest.approx(stats.pearsonr(control, variant).statistic)
    assert v.wins == int(np.sum(d > 0))


def test_sensitivity_figures_equal_scipy() -> None:
    control, variant = _arms(10, 0.5, seed=11)
    d = variant - control
    v = analyze_lever(control, variant, mode="max", decision=Decision(0.1))
    assert v.sensitivity.wilcoxon_p == pytest.approx(stats.wilcoxon(d).pvalue)
    # N = 10: the sign-flip test is exact (1024 flips); its p counts flips with |mean| >= observed.
    signs = np.array(np.meshgrid(*[[-1, 1]] * 10)).reshape(10, -1).T  # (1024, 10)
    flipped = np.abs((signs * d).mean(axis=1))
    exact = np.mean(flipped >= abs(d.mean()) * (1 - 1e-12))
    assert v.sensitivity.permutation_p == pytest.approx(exact)
    assert v.sensitivity.bca_low < d.mean() < v.sensitivity.bca_high


def test_permutation_p_floor_at_five_pairs() -> None:
    # With N = 5 the smallest exact two-sided sign-flip p is 2/32 = 0.0625.
    control = np.zeros(5)
    v = analyze_lever(control, control + np.arange(1.0, 6.0), mode="max", decision=Decision(0.1))
    assert v.sensitivity.permutation_p == pytest.approx(0.0625)


# ----------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("effect", "min_effect", "label", "meaningful"),
    [
        (1.5, 0.1, WIN, True),  # lower bound above the keep bar
        (1.5, 5.0, WIN, False),  # significant but below the keep bar
        (-1.5, 0.1, NEGATIVE, False),
        (0.0, 3.0, NULL, False),  # tight interval well inside +-delta
        (0.0, 0.01, INCONCLUSIVE, False),
    ],
)
def test_labels(effect: float, min_effect: float, label: str, meaningful: bool) -> None:
    control, variant = _arms(20, effect, seed=1, rho=0.9)
    v = analyze_lever(control, variant, mode="max", decision=Decision(min_effect=min_effect))
    assert (v.verdict, v.meaningful) == (label, meaningful)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_mode_min_flips_the_sign(mode: str) -> None:
    # A lower metric is better under mode="min": the same data is a win there, negative under max.
    control, variant = _arms(20, -1.5, seed=2, rho=0.9)
    v = analyze_lever(control, variant, mode=mode, decision=Decision(0.1))
    assert v.verdict == (WIN if mode == "min" else NEGATIVE)
    assert v.effect > 0 if mode == "min" else v.effect < 0


@pytest.mark.parametrize("n", [5, 10, 20, 35])
@pytest.mark.parametrize("delta", [0.3, 0.6])
def test_null_only_when_tost_passes(n: int, delta: float) -> None:
    # Property over random draws: null <=> TOST passes (90% CI inside +-delta) and no decision.
    rng = np.random.default_rng(n * 100 + int(delta * 10))
    nulls = 0
    for _ in range(60):
        control = rng.normal(0, 1, n)
        variant = control + rng.normal(rng.uniform(-0.3, 0.3), 0.5, n)
        v = analyze_lever(
            control, variant, mode="max", decision=Decision(min_effect=delta), sensitivity=False
        )
        ci90 = stats.ttest_rel(variant, control).confidence_interval(0.90)
        tost_pass = ttost_paired(variant, control, -delta, delta)[0] < 0.05
        if v.verdict == NULL:
            nulls += 1
            assert tost_pass and -delta < ci90.low and ci90.high < delta
        else:
            assert not tost_pass or v.verdict in (WIN, NEGATIVE)
    if n >= 20:
        assert nulls > 0  # the property is exercised


def test_win_needs_every_guardrail_to_pass() -> None:
    control, variant = _arms(20, 1.5, seed=4, rho=0.9)
    guard = {
        **_guard("ok", control, 0.0, "max", 1.0),
        **_guard("bad", control, -2.0 + 0.1 * np.sin(np.arange(20)), "max", 0.5),
    }
    v = analyze_lever(control, variant, mode="max", decision=Decision(0.1), guardrails=guard)
    assert v.guardrails["ok"].status == "pass"
    assert v.guardrails["bad"].status == "fail"
    assert v.verdict == INCONCLUSIVE


@pytest.mark.parametrize(
    ("shift", "mode", "margin", "status"),
    [
        (0.0, "max", 0.5, "pass"),  # no change, inside the margin
        (-1.0, "max", 0.5, "fail"),  # regressed by twice the margin
        (1.0, "min", 0.5, "fail"),  # a higher value is a regression under min
        (-0.4, "max", 0.5, "inconclusive"),  # bounds straddle -margin
    ],
)
def test_guardrail_non_inferiority(shift: float, mode: str, margin: float, status: str) -> None:
    rng = np.random.default_rng(5)
    control, variant = _arms(10, 1.0, seed=5)
    gc = rng.normal(0, 1, 10)
    gv = gc + shift + rng.normal(0, 0.3, 10)
    g = {"g": (gc, gv, Guardrail("g", mode, margin))}
    v = analyze_lever(control, variant, mode="max", decision=Decision(0.1), guardrails=g)
    r = v.guardrails["g"]
    assert r.status == status
    dg = (gv - gc) if mode == "max" else (gc - gv)
    one_sided = stats.ttest_1samp(dg, 0, alternative="greater").confidence_interval(0.95).low
    assert r.lower == pytest.approx(one_sided)


@pytest.mark.parametrize(
    ("where", "arm", "value"),
    [(3, "control", np.nan), (0, "variant", np.inf), (7, "guardrail", -np.inf)],
)
def test_crashed_pairs_are_named(where: int, arm: str, value: float) -> None:
    control, variant = _arms(10, 1.0, seed=6)
    gc, gv = control.copy(), control.copy()
    {"control": control, "variant": variant, "guardrail": gv}[arm][where] = value
    seeds = [100 + i for i in range(10)]
    v = analyze_lever(
        control,
        variant,
        mode="max",
        decision=Decision(0.1),
        seeds=seeds,
        guardrails={"g": (gc, gv, Guardrail("g", "max", 1.0))},
    )
    assert v.verdict == CRASHED
    assert v.crashed_seeds == (100 + where,)
    assert v.n_pairs == 9
    assert verdict_tags(verdict_to_dict(v))["tunelab.outcome"] == "crashed-early"
    assert verdict_to_dict(v)["crashed_seeds"] == [100 + where]


# ----------------------------------------------------------------------------
# Simulation validity (the fast path analyze_lever itself uses)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "looks"), [(5, None), (10, None), (20, None), (20, LOOKS), (10, (5, 10))]
)
def test_aa_false_positive_rate(n: int, looks: tuple[int, ...] | None) -> None:
    # A/A (no effect): the decision rejects 5% of the time, fixed N or planned looks.
    d = np.random.default_rng(n + len(looks or ())).normal(0, 1, (REPS, n))  # (R, N)
    fpr = np.mean(paired_t_decisions(d, alpha=0.05, looks=looks).outcome != 0)
    assert abs(fpr - 0.05) <= 0.015


def test_naive_peeking_is_detected_as_inflated() -> None:
    # Control for the test above: three unadjusted looks at p < 0.05 exceed the band (~0.12).
    d = np.random.default_rng(0).normal(0, 1, (REPS, 20))  # (R, N)
    hit = np.zeros(REPS, dtype=bool)
    for n in LOOKS:
        hit |= paired_t_decisions(d[:, :n], alpha=0.05).outcome != 0
    assert hit.mean() > 0.05 + 0.015


@pytest.mark.parametrize("n", [5, 10, 20])
def test_ci_coverage(n: int) -> None:
    mu = 0.7
    d = np.random.default_rng(n).normal(mu, 2.0, (REPS, n))  # (R, N)
    b = paired_t_decisions(d, alpha=0.05)
    assert np.mean((b.ci_low < mu) & (mu < b.ci_high)) >= 0.93


@pytest.mark.parametrize("looks", [None, LOOKS])
def test_analyze_lever_agrees_with_fast_path(looks: tuple[int, ...] | None) -> None:
    # The scalar API and the batch decision give the same label and N on the same draws.
    rng = np.random.default_rng(9)
    control = rng.normal(0, 1, (40, 20))  # (R, N)
    variant = control + rng.normal(0.6, 1, (40, 20))
    b = paired_t_decisions(variant - control, looks=looks)
    for i in range(40):
        v = analyze_lever(
            control[i],
            variant[i],
            mode="max",
            decision=Decision(0.01, looks=looks),
            sensitivity=False,
        )
        assert {WIN: 1, NEGATIVE: -1}.get(v.verdict, 0) == b.outcome[i]
        assert v.n_pairs == b.n_used[i]
        assert v.ci_low == pytest.approx(b.ci_low[i])


# ----------------------------------------------------------------------------
# Group-sequential looks
# ----------------------------------------------------------------------------


def test_obf_thresholds_match_verdicts_md() -> None:
    # shared/VERDICTS.md: looks 5 / 10 / 20 at alpha 0.05 -> 9.0e-5, 0.0056, 0.048 (rounded).
    assert obf_thresholds(LOOKS, 0.05) == pytest.approx((9.0e-5, 0.0056, 0.048), rel=0.03)


@pytest.mark.parametrize("looks", [(5, 10, 20), (3, 6, 9, 12), (10, 15, 20), (4, 40)])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_obf_boundaries_spend_alpha_exactly(looks: tuple[int, ...], alpha: float) -> None:
    # Exit probability up to look k (multivariate normal, corr sqrt(t_i/t_j)) = alpha(t_k).
    t = np.asarray(looks) / looks[-1]
    c = stats.norm.isf(np.asarray(obf_thresholds(looks, alpha)) / 2)
    cov = np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))
    for k in range(1, len(looks) + 1):
        inside = stats.multivariate_normal.cdf(
            c[:k],
            mean=np.zeros(k),
            cov=cov[:k, :k],
            lower_limit=-c[:k],
            abseps=1e-8,
            releps=1e-8,
            rng=np.random.default_rng(0),
        )
        spent = 2 * stats.norm.sf(stats.norm.isf(alpha / 2) / math.sqrt(t[k - 1]))
        assert 1 - inside == pytest.approx(spent, abs=1e-6)


def test_single_look_threshold_is_alpha() -> None:
    assert obf_thresholds((20,), 0.05) == pytest.approx((0.05,))


@pytest.mark.parametrize("looks", [(), (1, 5), (10, 5), (5, 5, 10)])
def test_bad_looks_raise(looks: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="looks"):
        obf_thresholds(looks)


@pytest.mark.parametrize(("mu", "look"), [(12.0, 1), (1.5, 2)])
def test_sequential_stops_at_first_decisive_look(mu: float, look: int) -> None:
    d = np.random.default_rng(1).normal(mu, 1.0, 20)
    out = sequential_decision(d, LOOKS, min_effect=0.1)
    assert (out.verdict, out.look, out.n_used) == (WIN, look, LOOKS[look - 1])
    assert out.p_value < out.threshold == pytest.approx(obf_thresholds(LOOKS)[look - 1])
    ref = stats.ttest_1samp(d[: out.n_used], 0).confidence_interval(1 - out.threshold)
    assert (out.ci_low, out.ci_high) == pytest.approx((ref.low, ref.high))


def test_sequential_before_first_look_is_inconclusive() -> None:
    out = sequential_decision(np.full(4, 5.0) + np.arange(4), LOOKS, min_effect=0.1)
    assert (out.verdict, out.look, out.final_look) == (INCONCLUSIVE, 0, False)


def test_sequential_between_looks_reports_last_look_reached() -> None:
    d = np.random.default_rng(2).normal(0, 1, 12)
    out = sequential_decision(d, LOOKS, min_effect=0.1)
    assert (out.verdict, out.look, out.n_used, out.final_look) == (INCONCLUSIVE, 2, 10, False)


def test_null_only_at_final_look() -> None:
    # An equivalent-looking lever is null only once the plan is complete.
    d = np.random.default_rng(3).normal(0, 0.1, 20)
    assert sequential_decision(d[:10], LOOKS, min_effect=1.0).verdict == INCONCLUSIVE
    assert sequential_decision(d, LOOKS, min_effect=1.0).verdict == NULL


def test_more_seeds_than_planned_raise() -> None:
    control, variant = _arms(25, 0.0, seed=0)
    with pytest.raises(ValueError, match="plan at most 20"):
        analyze_lever(control, variant, mode="max", decision=Decision(0.1, looks=LOOKS))


@pytest.mark.parametrize("look_index", [0, 1, 2])
def test_look_index_analyses_that_look(look_index: int) -> None:
    control, variant = _arms(20, 0.2, seed=8)
    v = analyze_lever(
        control, variant, mode="max", decision=Decision(0.1, looks=LOOKS), look_index=look_index
    )
    n = LOOKS[look_index]
    assert (v.look, v.n_pairs) == (look_index + 1, n)
    assert v.threshold == pytest.approx(obf_thresholds(LOOKS)[look_index])
    assert v.p_value == pytest.approx(stats.ttest_rel(variant[:n], control[:n]).pvalue)
    assert verdict_to_dict(v)["look"] == look_index + 1


def test_repeated_p_is_consistent_with_the_look_threshold() -> None:
    # p_decision < alpha exactly when the look's nominal p is below its threshold.
    rng = np.random.default_rng(4)
    for mu in (0.0, 0.8, 1.2, 2.0):
        d = rng.normal(mu, 1, 20)
        v = analyze_lever(
            np.zeros(20), d, mode="max", decision=Decision(0.1, looks=LOOKS), sensitivity=False
        )
        assert (v.p_decision < 0.05) == (v.verdict in (WIN, NEGATIVE))


# ----------------------------------------------------------------------------
# Multiplicity
# ----------------------------------------------------------------------------


def _family(effects: list[float], n: int = 12) -> list[LeverVerdict]:
    out = []
    for i, e in enumerate(effects):
        control, variant = _arms(n, e, seed=20 + i)
        out.append(
            analyze_lever(
                control,
                variant,
                mode="max",
                decision=Decision(0.1),
                lever=f"L{i}",
                sensitivity=False,
            )
        )
    return out


@pytest.mark.parametrize(("method", "sm_method"), [("holm", "holm"), ("bh", "fdr_bh")])
def test_adjust_family_equals_statsmodels(method: str, sm_method: str) -> None:
    family = _family([0.9, 0.6, 0.45, 0.3, 0.0, -0.7])
    raw = np.array([v.p_value for v in family])
    reject, expected = multipletests(raw, alpha=0.05, method=sm_method)[:2]
    adjusted = adjust_family(family, method)
    assert [v.p_adjusted for v in adjusted] == pytest.approx(list(expected))
    decided = [v.verdict in (WIN, NEGATIVE) for v in adjusted]
    assert decided == list(reject)
    assert any(v.verdict in (WIN, NEGATIVE) for v in family) and not all(decided)


def test_adjust_family_counts_crashed_levers_conservatively() -> None:
    family = _family([0.9, 0.6])
    control, variant = _arms(12, 0.5, seed=99)
    control[0] = np.nan
    crashed = analyze_lever(control, variant, mode="max", decision=Decision(0.1), lever="C")
    adjusted = adjust_family([*family, crashed], "holm")
    expected = multipletests([family[0].p_value, family[1].p_value, 1.0], method="holm")[1]
    assert [v.p_adjusted for v in adjusted] == pytest.approx(list(expected))
    assert adjusted[2].verdict == CRASHED


# ----------------------------------------------------------------------------
# Serialisation and validation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("looks", [None, LOOKS])
def test_verdict_to_dict_is_json(looks: tuple[int, ...] | None) -> None:
    control, variant = _arms(20, 0.5, seed=12)
    g = _guard("val/bounded_frac", control, 0.0, "max", 0.5)
    v = analyze_lever(
        control, variant, mode="max", decision=Decision(0.1, looks=looks), guardrails=g
    )
    out = json.loads(json.dumps(verdict_to_dict(v), allow_nan=False))
    required = {
        "lever",
        "verdict",
        "meaningful",
        "effect",
        "ci_low",
        "ci_high",
        "p_value",
        "n_pairs",
        "dz",
        "rho",
        "wins",
        "guardrails",
        "sensitivity",
        "crashed_seeds",
    }
    assert required <= set(out)
    assert set(out["guardrails"]["val/bounded_frac"]) == {"status", "effect", "lower"}
    assert set(out["sensitivity"]) == {"bca_low", "bca_high", "permutation_p", "wilcoxon_p"}
    assert ("look" in out and "threshold" in out) == (looks is not None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_effect": 0.0}, "min_effect"),
        ({"min_effect": 0.1, "alpha": 1.0}, "alpha"),
        ({"min_effect": 0.1, "looks": (10, 5)}, "looks"),
        ({"min_effect": 0.1, "correction": "bonferroni"}, "correction"),
    ],
)
def test_decision_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Decision(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"mode": "up"}, "mode"), ({"margin": -0.1}, "margin")]
)
def test_guardrail_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Guardrail("g", **kwargs)


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError, match="equal length"):
        analyze_lever(np.zeros(5), np.zeros(6), mode="max", decision=Decision(0.1))


# ----------------------------------------------------------------------------
# Zero variance (every paired difference equal: sd = 0)
# ----------------------------------------------------------------------------


def _dyadic(n: int) -> np.ndarray:
    # Control values on a 1/8 grid: adding a dyadic shift is exact, so the differences are
    # bit-identical and the zero-variance path (not a last-bit sd) is exercised.
    return 1.0 + 0.125 * np.random.default_rng(n).integers(0, 64, n)


@pytest.mark.parametrize("n", [2, 5, 10, 35])
@pytest.mark.parametrize("mode", ["max", "min"])
def test_identical_arms_are_null(n: int, mode: str) -> None:
    # A lever the code never reads: the degenerate interval [0, 0] lies inside +-min_effect.
    control = _dyadic(n)
    v = analyze_lever(control, control.copy(), mode=mode, decision=Decision(min_effect=0.1))
    assert (v.verdict, v.meaningful, v.equivalent) == (NULL, False, True)
    assert (v.effect, v.ci_low, v.ci_high, v.p_value, v.tost_p) == (0.0, 0.0, 0.0, 1.0, 0.0)


@pytest.mark.parametrize(("n", "label"), [(5, INCONCLUSIVE), (10, INCONCLUSIVE), (20, NULL)])
@pytest.mark.parametrize("mode", ["max", "min"])
def test_identical_arms_are_null_at_the_last_look(n: int, label: str, mode: str) -> None:
    # With looks, identical arms never stop early and are null once the plan is complete.
    control = _dyadic(n)
    v = analyze_lever(control, control.copy(), mode=mode, decision=Decision(0.1, looks=LOOKS))
    assert (v.verdict, v.n_pairs, v.final_look) == (label, n, n == LOOKS[-1])
    assert (v.ci_low, v.ci_high, v.p_value) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("looks", [None, LOOKS])
def test_zero_variance_fast_path(looks: tuple[int, ...] | None) -> None:
    # paired_t_decisions: p = 1 for c = 0 (undecided), p = 0 for c != 0 (decided at the first
    # look), interval [c, c].
    c = np.array([0.0, 0.25, -0.25])
    b = paired_t_decisions(np.repeat(c[:, None], 20, axis=1), looks=looks)
    assert list(b.outcome) == [0, 1, -1]
    assert list(b.p_value) == [1.0, 0.0, 0.0]
    assert list(b.ci_low) == list(b.ci_high) == list(b.effect) == list(c)
    assert list(b.n_used) == ([20] * 3 if looks is None else [20, 5, 5])


@pytest.mark.parametrize(("c", "label"), [(0.0, NULL), (0.5, WIN), (-0.5, NEGATIVE)])
def test_zero_variance_sequential_decision(c: float, label: str) -> None:
    out = sequential_decision(np.full(20, c), LOOKS, min_effect=0.1)
    assert (out.verdict, out.ci_low, out.ci_high) == (label, c, c)
    assert out.look == (LOOKS.index(20) + 1 if c == 0 else 1)


@pytest.mark.parametrize(
    ("mode", "shift", "label"),
    [("max", 0.5, WIN), ("max", -0.5, NEGATIVE), ("min", -0.5, WIN), ("min", 0.5, NEGATIVE)],
)
@pytest.mark.parametrize("looks", [None, LOOKS])
def test_constant_shift_beyond_min_effect(
    mode: str, shift: float, label: str, looks: tuple[int, ...] | None
) -> None:
    # Every seed moves by the same c: significant (p = 0) with the point interval [c, c].
    control = _dyadic(20)
    v = analyze_lever(control, control + shift, mode=mode, decision=Decision(0.25, looks=looks))
    c = shift if mode == "max" else -shift
    assert (v.verdict, v.meaningful) == (label, label == WIN)
    assert (v.effect, v.ci_low, v.ci_high, v.p_value) == (c, c, c, 0.0)


@pytest.mark.parametrize(
    ("mode", "shift", "label"),
    [("max", 0.0625, WIN), ("max", -0.0625, NEGATIVE), ("min", -0.0625, WIN)],
)
def test_constant_shift_inside_min_effect_is_significant(
    mode: str, shift: float, label: str
) -> None:
    # [c, c] inside +-min_effect with c != 0: TOST passes, but significance ranks first, as
    # for any tight interval inside (0, min_effect): a win that is not meaningful (or negative).
    control = _dyadic(10)
    v = analyze_lever(control, control + shift, mode=mode, decision=Decision(min_effect=0.25))
    assert (v.verdict, v.meaningful, v.equivalent) == (label, False, True)


@pytest.mark.parametrize("c", [0.0, 0.0625, 0.5, -0.5])
@pytest.mark.parametrize("mode", ["max", "min"])
def test_near_zero_variance_agrees_with_zero_variance(c: float, mode: str) -> None:
    # Continuity: differences c + 1e-12 noise get the label and interval of the exact case.
    control = _dyadic(10)
    noise = 1e-12 * np.array([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0, 1.5, -1.5])
    decision = Decision(min_effect=0.25)
    exact = analyze_lever(control, control + c, mode=mode, decision=decision)
    noisy = analyze_lever(control, control + c + noise, mode=mode, decision=decision)
    assert (noisy.verdict, noisy.meaningful, noisy.equivalent) == (
        exact.verdict,
        exact.meaningful,
        exact.equivalent,
    )
    assert (noisy.ci_low, noisy.ci_high) == pytest.approx((exact.ci_low, exact.ci_high), abs=1e-9)


@pytest.mark.parametrize(
    ("shift", "margin", "status"),
    [
        (0.0, 0.0, "pass"),  # untouched guardrail, no regression allowed
        (0.0, 0.5, "pass"),
        (0.25, 0.0, "pass"),  # improved
        (-0.25, 0.5, "pass"),  # regressed, but by less than the margin
        (-0.5, 0.25, "fail"),  # regressed by more than the margin
    ],
)
@pytest.mark.parametrize("mode", ["max", "min"])
def test_zero_variance_guardrail(shift: float, margin: float, status: str, mode: str) -> None:
    # A guardrail known exactly passes when it regressed by no more than its margin.
    control, variant = _arms(10, 1.5, seed=4, rho=0.9)
    gc = _dyadic(10)
    gv = gc + (shift if mode == "max" else -shift)
    g = {"g": (gc, gv, Guardrail("g", mode, margin))}
    v = analyze_lever(control, variant, mode="max", decision=Decision(0.1), guardrails=g)
    r = v.guardrails["g"]
    assert (r.status, r.effect, r.lower, r.upper) == (status, shift, shift, shift)


def test_identical_guardrail_lets_a_win_through() -> None:
    # A default (margin 0) guardrail the lever leaves untouched does not block the win.
    control, variant = _arms(20, 1.5, seed=4, rho=0.9)
    g = _guard("val/bounded_frac", control, 0.0, "max", 0.0)
    v = analyze_lever(control, variant, mode="max", decision=Decision(0.1), guardrails=g)
    assert (v.verdict, v.guardrails["val/bounded_frac"].status) == (WIN, "pass")


def test_identical_arms_with_a_lost_pair_are_crashed() -> None:
    control = _dyadic(10)
    variant = control.copy()
    variant[3] = np.nan
    v = analyze_lever(control, variant, mode="max", decision=Decision(0.1))
    assert (v.verdict, v.crashed_seeds, v.n_pairs) == (CRASHED, (3,), 9)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("n", [3, 10, 20])
@pytest.mark.parametrize("c", [0.0, 0.5])
def test_zero_variance_sensitivity_does_not_warn(n: int, c: float) -> None:
    # BCa [c, c]; sign-flip p 1 for identical arms; Wilcoxon NaN where nothing is non-zero.
    control = _dyadic(n)
    s = analyze_lever(control, control + c, mode="max", decision=Decision(0.1)).sensitivity
    assert (s.bca_low, s.bca_high) == (c, c)
    if c == 0:
        assert s.permutation_p == 1.0
    else:
        assert s.permutation_p <= 2 / 2**3  # every seed on one side
    assert math.isnan(s.wilcoxon_p) == (c == 0)


def test_adjust_family_keeps_identical_arms_null() -> None:
    # p = 1 is testable: the lever counts in the family and stays null (not inconclusive).
    control = _dyadic(12)
    same = analyze_lever(control, control.copy(), mode="max", decision=Decision(0.1), lever="S")
    adjusted = adjust_family([*_family([0.9]), same], "holm")
    assert (adjusted[1].verdict, adjusted[1].p_adjusted) == (NULL, 1.0)


def test_zero_variance_verdict_is_json() -> None:
    control = _dyadic(10)
    v = analyze_lever(control, control.copy(), mode="max", decision=Decision(0.1))
    out = json.loads(json.dumps(verdict_to_dict(v), allow_nan=False))
    assert (out["verdict"], out["ci_low"], out["ci_high"], out["dz"]) == (NULL, 0.0, 0.0, None)
