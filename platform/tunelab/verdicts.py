"""Verdicts on paired seeds: effect, confidence interval and label per lever.

A lever A/B runs the control and the variant on the same seeds, so seed ``i``
gives one difference ``d_i`` of the primary metric, signed so that positive
means better whatever the metric's mode (``max``: ``variant - control``,
``min``: ``control - variant``). Every figure here is computed from the
``d_i``, never from two independent means (shared/VERDICTS.md, "Why paired";
the flow-policy loop of shared/seeds/action_flow_matching_pr.txt measured
same-seed paired deltas of ~0.003 against a cross-seed sigma of 0.014).

The primary analysis is the paired t test and its two-sided ``1 - alpha``
interval. Sensitivity figures ride along: a BCa bootstrap interval, a sign-flip
permutation p-value and a Wilcoxon signed-rank p-value (a plain percentile
bootstrap is not used: at N = 5 its false-positive rate was 0.166).

Labels (shared/VERDICTS.md, "Labels"):

- ``win``: the CI lower bound is > 0 and every guardrail passes its
  non-inferiority test; ``meaningful`` when the lower bound also exceeds the
  keep bar ``min_effect``.
- ``negative``: the CI upper bound is < 0.
- ``null``: only when TOST passes, i.e. the ``1 - 2 alpha`` interval lies
  inside ``(-min_effect, +min_effect)``.
- ``inconclusive``: anything else (the normal outcome at small N).
- ``crashed``: a pair with a missing or non-finite value; the seeds are listed.

Zero variance: when every paired difference equals the same ``c`` (``sd = 0``;
e.g. a lever the code never reads gives ``c = 0`` on every seed) the t
statistic is ``0/0`` or ``c/0``, and its limit as the spread of the ``d_i``
goes to 0 is used: the interval is the point ``[c, c]``, ``p = 0`` for
``c != 0`` and ``p = 1`` for ``c = 0``, and TOST passes when
``|c| < min_effect``. The labels above then apply unchanged, at a fixed N and
at every look alike (it needs >= 2 pairs, like any paired t):

- ``c = 0`` (identical arms): the degenerate interval ``[0, 0]`` lies inside
  ``+-min_effect`` and is not significant, so the lever is ``null``
  (equivalent within the smallest effect of interest), at the last look with
  looks.
- ``c != 0``: significant, so ``win`` (``meaningful`` when ``c > min_effect``)
  or ``negative``, also when ``|c| <= min_effect``. That is the label of any
  tight noisy interval inside ``(0, min_effect)`` (significance ranks above
  equivalence), and calling the degenerate case ``null`` instead would make the
  label hinge on float rounding: ``control + 0.05`` can give bit-identical
  differences and ``control + 0.1`` differences that vary in the last bit.
- A zero-variance guardrail is known exactly (bounds ``[c, c]``): it passes
  when ``c >= -margin`` (it regressed by no more than its margin, so a
  guardrail the lever leaves untouched passes even at ``margin = 0``) and
  fails otherwise.
- Sensitivity figures: BCa interval ``[c, c]`` (every resample has mean
  ``c``), the sign-flip permutation p as usual (1 for ``c = 0``), Wilcoxon
  NaN for ``c = 0`` (no non-zero difference to rank); ``dz`` is NaN
  (undefined). Nothing warns.

Planned looks (e.g. after 5, 10 and 20 seeds) use a Lan-DeMets O'Brien-Fleming
type alpha spending function; the nominal two-sided p thresholds come from
:func:`obf_thresholds`. A family of levers is corrected with Holm (confirmatory)
or Benjamini-Hochberg (screening) in :func:`adjust_family`.

Example:

    .. code::

        import numpy as np
        from tunelab.verdicts import Decision, Guardrail, analyze_lever, verdict_to_dict

        rng = np.random.default_rng(0)
        control = rng.normal(0.35, 0.014, size=10)
        variant = control - 0.01 + rng.normal(0, 0.003, size=10)
        latency = (rng.normal(10, 1, 10), rng.normal(10, 1, 10), Guardrail("latency", "min", 1.0))
        v = analyze_lever(
            control, variant, mode="min", decision=Decision(min_effect=0.005),
            guardrails={"latency": latency}, lever="delta_off",
        )
        print(v.verdict, v.effect, v.ci_low, v.ci_high, verdict_to_dict(v)["p_value"])
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

__all__ = [
    "CORRECTIONS",
    "CRASHED",
    "INCONCLUSIVE",
    "LABELS",
    "NEGATIVE",
    "NULL",
    "WIN",
    "BatchDecision",
    "Decision",
    "Guardrail",
    "GuardrailResult",
    "LeverVerdict",
    "Sensitivity",
    "SequentialOutcome",
    "adjust_family",
    "analyze_lever",
    "obf_thresholds",
    "paired_t_decisions",
    "sequential_decision",
    "verdict_to_dict",
]

# Labels (shared/VERDICTS.md, "Labels").
WIN = "win"
NEGATIVE = "negative"
NULL = "null"
INCONCLUSIVE = "inconclusive"
CRASHED = "crashed"
LABELS = (WIN, NEGATIVE, NULL, INCONCLUSIVE, CRASHED)

# Guardrail statuses.
G_PASS = "pass"
G_FAIL = "fail"
G_INCONCLUSIVE = "inconclusive"

MODES = ("max", "min")
CORRECTIONS = ("holm", "bh", "none")
_MULTIPLETESTS_METHOD = {"holm": "holm", "bh": "fdr_bh"}

# Sensitivity resampling: fixed seed so that a verdict is reproducible.
_RESAMPLING_SEED = 0
_N_RESAMPLES = 9999  # sign-flip permutation is exact while 2**N <= this (N <= 13)

# Gauss-Legendre nodes for the group-sequential recursion (Armitage et al. 1969).
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(256)


# ----------------------------------------------------------------------------
# Inputs: the pre-registered decision rule and the guardrails
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decision:
    """The pre-registered decision rule of a lever A/B.

    Args:
        min_effect: Smallest effect of interest ``delta`` in the primary
            metric's raw units (the "keep bar"), ``> 0``. A win is
            ``meaningful`` when its CI lower bound exceeds it; ``null`` means
            equivalent within ``(-min_effect, +min_effect)`` (TOST).
        alpha: Two-sided type I error rate of the whole (possibly sequential)
            test, in ``(0, 1)``.
        looks: Planned number of pairs at each look, strictly increasing, e.g.
            ``(5, 10, 20)``; ``None`` for one analysis at a fixed N.
        correction: Multiplicity correction across the levers of one family:
            ``"holm"`` (confirmatory), ``"bh"`` (Benjamini-Hochberg, screening)
            or ``"none"``.
    """

    min_effect: float
    alpha: float = 0.05
    looks: tuple[int, ...] | None = None
    correction: str = "holm"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_effect) and self.min_effect > 0):
            raise ValueError(
                f"The value of `min_effect` is {self.min_effect}, but must be a finite "
                "`min_effect > 0` (the keep bar, in the metric's raw units)."
            )
        _check_alpha(self.alpha)
        if self.looks is not None:
            object.__setattr__(self, "looks", _check_looks(self.looks))
        if self.correction not in CORRECTIONS:
            raise ValueError(
                f"The value of `correction` is {self.correction!r}, but must be one of "
                f"{CORRECTIONS}."
            )


@dataclasses.dataclass(frozen=True)
class Guardrail:
    """A guardrail metric that must not regress by more than ``margin``.

    Args:
        name: Metric name (e.g. ``"val/bounded_frac"``).
        mode: ``"max"`` if higher is better, ``"min"`` if lower is better.
        margin: Non-inferiority margin in the metric's raw units, ``>= 0``: the
            guardrail passes when the one-sided ``1 - alpha`` lower bound of
            the (better-positive) difference is ``> -margin``.
    """

    name: str
    mode: str = "max"
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("The value of `name` is empty, but a guardrail needs a metric name.")
        _check_mode(self.mode, "mode")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(
                f"The value of `margin` is {self.margin} for guardrail {self.name!r}, but "
                "must be a finite `margin >= 0`."
            )


# ----------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuardrailResult:
    """Non-inferiority result of one guardrail (differences signed better-positive).

    ``lower`` / ``upper`` are the one-sided ``1 - alpha`` bounds of the mean
    difference: ``pass`` when ``lower > -margin``, ``fail`` when
    ``upper < -margin``, ``inconclusive`` otherwise.
    """

    status: str
    effect: float
    lower: float
    upper: float
    margin: float


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """Sensitivity figures next to the primary paired-t analysis."""

    bca_low: float
    bca_high: float
    permutation_p: float
    wilcoxon_p: float


@dataclasses.dataclass(frozen=True)
class LeverVerdict:
    """The verdict of one lever against the control.

    ``effect`` / ``ci_low`` / ``ci_high`` / ``p_value`` are the paired-t mean
    difference, its two-sided interval at level ``confidence`` and the
    two-sided p-value, on the ``n_pairs`` complete pairs used. At a fixed N
    ``confidence = 1 - alpha``; at look ``k`` of a sequential plan it is
    ``1 - threshold`` (the look's nominal p threshold). ``p_decision`` is the
    p-value on the scale of ``alpha`` that decides (``p_value`` at a fixed N,
    the look-wise repeated p-value with looks); ``p_adjusted`` is set by
    :func:`adjust_family`. ``look`` is the 1-based look number (0: before the
    first planned look), ``None`` without looks.
    """

    lever: str
    verdict: str
    meaningful: bool
    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    n_pairs: int
    dz: float
    rho: float
    wins: int
    guardrails: dict[str, GuardrailResult]
    sensitivity: Sensitivity
    tost_p: float
    equivalent: bool
    crashed_seeds: tuple[Any, ...]
    seeds: tuple[Any, ...]
    confidence: float
    alpha: float
    min_effect: float
    p_decision: float
    look: int | None = None
    threshold: float | None = None
    final_look: bool = True
    p_adjusted: float | None = None
    correction: str | None = None


@dataclasses.dataclass(frozen=True)
class BatchDecision:
    """Vectorised paired-t decisions, one row per simulated (or real) lever.

    ``outcome`` is +1 (significantly better: win side), -1 (significantly
    worse) or 0 (not decided); ``look`` is the 0-based index of the look the
    row stopped at (the last look when never decided), ``n_used`` its number
    of pairs; the other fields are the paired-t figures at that look, the
    interval at level ``1 - threshold``.
    """

    outcome: npt.NDArray[np.int8]  # (R,)
    look: npt.NDArray[np.int64]  # (R,)
    n_used: npt.NDArray[np.int64]  # (R,)
    effect: npt.NDArray[np.float64]  # (R,)
    ci_low: npt.NDArray[np.float64]  # (R,)
    ci_high: npt.NDArray[np.float64]  # (R,)
    p_value: npt.NDArray[np.float64]  # (R,)
    threshold: npt.NDArray[np.float64]  # (R,)


@dataclasses.dataclass(frozen=True)
class SequentialOutcome:
    """Result of :func:`sequential_decision` on a vector of paired differences."""

    verdict: str
    look: int  # 1-based look number (0: the first look is not reached yet)
    n_used: int
    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    threshold: float
    final_look: bool


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def obf_thresholds(looks: Sequence[int], alpha: float = 0.05) -> tuple[float, ...]:
    """Nominal two-sided p thresholds of a Lan-DeMets O'Brien-Fleming type design.

    The spending function is ``alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t))``
    (Lan & DeMets 1983) at information fractions ``t_k = n_k / n_K``. The
    boundaries ``c_k`` solve ``P(|Z_1| < c_1, ..., |Z_{k-1}| < c_{k-1},
    |Z_k| >= c_k) = alpha(t_k) - alpha(t_{k-1})`` under the null for the
    Brownian-motion z statistics (``corr(Z_i, Z_j) = sqrt(t_i / t_j)``),
    computed by the recursive numerical integration of Armitage, McPherson &
    Rowe (1969). The threshold at look ``k`` is ``2 (1 - Phi(c_k))``. Looks
    5 / 10 / 20 at alpha 0.05 give ~8.9e-5, 0.0056, 0.048
    (shared/VERDICTS.md, "Sequential looks").

    Args:
        looks: Planned number of pairs at each look, strictly increasing.
        alpha: Overall two-sided type I error rate.

    Returns:
        One nominal two-sided p threshold per look.
    """
    return _obf_thresholds_cached(_check_looks(looks), float(_check_alpha(alpha)))


def paired_t_decisions(
    d: npt.ArrayLike, *, alpha: float = 0.05, looks: Sequence[int] | None = None
) -> BatchDecision:
    """Paired-t decisions for many rows of differences at once (the fast path).

    This is the decision :func:`analyze_lever` and :func:`sequential_decision`
    use, vectorised so that simulations of thousands of A/B's run the real
    code. Each row is decided at the first look whose two-sided p-value is
    below the look's threshold (``alpha`` at a fixed N, :func:`obf_thresholds`
    with looks); a significant row is +1 when its mean is positive, -1 when
    negative. Zero variance (a row of equal differences ``c``): interval
    ``[c, c]``, p = 1 for ``c = 0`` (never decided) and p = 0 otherwise.

    Args:
        d: Differences (better-positive), shape ``(R, N)`` or ``(N,)``, all
            finite; the first ``n_k`` columns are the pairs of look ``k``.
        alpha: Overall two-sided type I error rate.
        looks: Planned pairs per look (``N >= looks[-1]``); ``None`` decides
            once on all ``N`` columns.
    """
    d2 = np.atleast_2d(np.asarray(d, dtype=float))  # (R, N)
    n = d2.shape[1]
    if looks is None:
        plan: tuple[int, ...] = (n,)
        thresholds: tuple[float, ...] = (float(_check_alpha(alpha)),)
    else:
        plan = _check_looks(looks)
        if plan[-1] > n:
            raise ValueError(
                f"The looks {plan} need {plan[-1]} pairs, but `d` has only {n} columns."
            )
        thresholds = obf_thresholds(plan, alpha)
    return _decide(d2, plan, thresholds)


def sequential_decision(
    d_by_seed: npt.ArrayLike,
    looks: Sequence[int],
    *,
    alpha: float = 0.05,
    min_effect: float,
) -> SequentialOutcome:
    """Verdict at the first decisive planned look, and the number of pairs used.

    At look ``k`` (``n_k`` pairs, in seed order) the lever is decided ``win``
    (no guardrails here) or ``negative`` when the paired-t p-value is below
    ``obf_thresholds(looks, alpha)[k]``, with the interval at the matching
    level; otherwise it continues. At the last look an undecided lever is
    ``null`` when TOST passes at ``alpha`` and ``inconclusive`` otherwise.
    When fewer pairs than the next look are available the outcome is
    ``inconclusive`` at the last look reached (``final_look`` False).

    Args:
        d_by_seed: Finite differences (better-positive), one per seed in seed
            order; at most ``looks[-1]`` of them.
        looks: Planned number of pairs at each look, e.g. ``(5, 10, 20)``.
        alpha: Overall two-sided type I error rate.
        min_effect: The keep bar ``delta`` (TOST bounds ``+-delta``).
    """
    decision = Decision(min_effect=min_effect, alpha=alpha, looks=tuple(looks))
    d = np.asarray(d_by_seed, dtype=float).ravel()  # (N,)
    if not np.all(np.isfinite(d)):
        raise ValueError("`d_by_seed` has non-finite values; use analyze_lever to label crashes.")
    stop = _sequential_stop(d, decision)
    label = _label(
        significant=stop.outcome != 0,
        sign=stop.outcome,
        guardrails_pass=True,
        equivalent=stop.final_look and _tost(d[: stop.n_used], min_effect, alpha)[1],
    )
    return SequentialOutcome(
        verdict=label,
        look=stop.look,
        n_used=stop.n_used,
        effect=stop.effect,
        ci_low=stop.ci_low,
        ci_high=stop.ci_high,
        p_value=stop.p_value,
        threshold=stop.threshold,
        final_look=stop.final_look,
    )


def analyze_lever(
    control: npt.ArrayLike,
    variant: npt.ArrayLike,
    *,
    mode: str,
    decision: Decision,
    guardrails: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike, Guardrail]] | None = None,
    look_index: int | None = None,
    lever: str = "variant",
    seeds: Sequence[Any] | None = None,
    sensitivity: bool = True,
) -> LeverVerdict:
    """Analyse one lever against the control on paired seeds.

    Args:
        control: Primary metric of the control, one value per seed (NaN for a
            missing or failed run).
        variant: Primary metric of the variant on the same seeds, same order.
        mode: ``"max"`` if higher is better, ``"min"`` if lower is better.
        decision: The pre-registered :class:`Decision`.
        guardrails: ``{name: (control_values, variant_values, Guardrail)}``,
            values aligned with ``control``.
        look_index: With ``decision.looks``: analyse exactly at this 0-based
            look (its ``n_k`` first pairs and its threshold). ``None`` with
            looks: stop at the first decisive look reached. Ignored (must be
            ``None``) without looks.
        lever: Name of the lever (reported and tagged).
        seeds: Seed ids aligned with the values (default ``0..N-1``), used to
            name crashed seeds.
        sensitivity: Compute the BCa / permutation / Wilcoxon figures (about
            20 ms); ``False`` leaves them NaN.

    Returns:
        The :class:`LeverVerdict`; a pair with any missing or non-finite value
        (primary or guardrail) makes it ``crashed`` with the seeds listed, its
        other figures computed on the complete pairs for information. Zero
        variance (every difference equal to ``c``): see the module docstring;
        identical arms are ``null``.
    """
    _check_mode(mode, "mode")
    c = np.asarray(control, dtype=float).ravel()  # (N,)
    v = np.asarray(variant, dtype=float).ravel()  # (N,)
    if c.shape != v.shape or c.size == 0:
        raise ValueError(
            f"`control` and `variant` must be non-empty and of equal length, got "
            f"{c.size} and {v.size} values."
        )
    seed_ids = tuple(range(c.size)) if seeds is None else tuple(seeds)
    if len(seed_ids) != c.size:
        raise ValueError(f"`seeds` has {len(seed_ids)} ids for {c.size} pairs.")
    guard = _signed_guardrails(guardrails or {}, c.size)
    if decision.looks is None and look_index is not None:
        raise ValueError("`look_index` is set, but `decision.looks` is None (fixed-N analysis).")
    if decision.looks is not None and c.size > decision.looks[-1]:
        raise ValueError(
            f"The looks {decision.looks} plan at most {decision.looks[-1]} pairs, but "
            f"{c.size} were given; extra seeds are not analysed silently."
        )

    d = _signed(v, mode) - _signed(c, mode)  # (N,)
    complete = np.isfinite(c) & np.isfinite(v)
    for gc, gv, _ in guard.values():
        complete &= np.isfinite(gc) & np.isfinite(gv)
    crashed = tuple(s for s, ok in zip(seed_ids, complete, strict=True) if not ok)

    if crashed or decision.looks is None:
        stop = _fixed_stop(d[complete], decision.alpha)
        look: int | None = None
        threshold: float | None = None
        used = complete
    else:
        if look_index is None:
            stop = _sequential_stop(d, decision)
        else:
            stop = _stop_at_look(d, decision, look_index)
        look, threshold = stop.look, stop.threshold
        used = np.zeros(c.size, dtype=bool)
        used[: stop.n_used] = True

    du = d[used]  # (n,)
    g_results = {
        name: _guardrail_result(gv[used] - gc[used], g, decision.alpha)
        for name, (gc, gv, g) in guard.items()
    }
    tost_p, equivalent = _tost(du, decision.min_effect, decision.alpha)
    equivalent = equivalent and stop.final_look
    if crashed:
        label = CRASHED
    else:
        label = _label(
            significant=stop.outcome != 0,
            sign=stop.outcome,
            guardrails_pass=all(r.status == G_PASS for r in g_results.values()),
            equivalent=equivalent,
        )
    return LeverVerdict(
        lever=lever,
        verdict=label,
        meaningful=label == WIN and stop.ci_low > decision.min_effect,
        effect=stop.effect,
        ci_low=stop.ci_low,
        ci_high=stop.ci_high,
        p_value=stop.p_value,
        n_pairs=int(du.size),
        dz=_dz(du),
        rho=_rho(c[used], v[used]),
        wins=int(np.sum(du > 0)),
        guardrails=g_results,
        sensitivity=_sensitivity(du, stop.confidence) if sensitivity else _NO_SENSITIVITY,
        tost_p=tost_p,
        equivalent=equivalent,
        crashed_seeds=crashed,
        seeds=tuple(s for s, u in zip(seed_ids, used, strict=True) if u),
        confidence=stop.confidence,
        alpha=decision.alpha,
        min_effect=decision.min_effect,
        p_decision=stop.p_decision,
        look=look,
        threshold=threshold,
        final_look=stop.final_look,
    )


def adjust_family(verdicts: Sequence[LeverVerdict], method: str = "holm") -> list[LeverVerdict]:
    """Correct the levers of one family for multiplicity and relabel them.

    The decision p-values (``p_decision``: the paired-t p at a fixed N, the
    repeated p-value with looks) are adjusted with
    ``statsmodels.stats.multitest.multipletests`` (``"holm"``: Holm step-down,
    ``"bh"``: Benjamini-Hochberg ``fdr_bh``); the adjusted p below ``alpha``
    then decides ``win`` / ``negative``. A crashed lever counts in the family
    size with p = 1 (conservative) and stays ``crashed``. Intervals stay the
    per-lever ones. Guardrails need no correction (intersection-union test).

    Args:
        verdicts: Verdicts from :func:`analyze_lever`, all with the same alpha.
        method: ``"holm"``, ``"bh"`` or ``"none"``.

    Returns:
        New verdicts, same order, with ``p_adjusted`` and ``correction`` set.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"The value of `method` is {method!r}, but must be one of {CORRECTIONS}.")
    if not verdicts:
        return []
    alphas = {v.alpha for v in verdicts}
    if len(alphas) != 1:
        raise ValueError(f"The verdicts of one family must share alpha, got {sorted(alphas)}.")
    alpha = alphas.pop()
    raw = np.array([1.0 if _not_testable(v) else v.p_decision for v in verdicts])
    if method == "none":
        adjusted = raw
    else:
        adjusted = multipletests(raw, alpha=alpha, method=_MULTIPLETESTS_METHOD[method])[1]
    out = []
    for v, p_adj in zip(verdicts, adjusted, strict=True):
        label = v.verdict
        if v.verdict != CRASHED and not _not_testable(v):
            label = _label(
                significant=bool(p_adj < alpha),
                sign=int(np.sign(v.effect)),
                guardrails_pass=all(r.status == G_PASS for r in v.guardrails.values()),
                equivalent=v.equivalent,
            )
        out.append(
            dataclasses.replace(
                v,
                verdict=label,
                meaningful=label == WIN and v.ci_low > v.min_effect,
                p_adjusted=float(p_adj),
                correction=method,
            )
        )
    return out


def verdict_to_dict(v: LeverVerdict) -> dict[str, Any]:
    """JSON-able dict of a verdict (NaN becomes ``None``).

    Keys: lever, verdict, meaningful, effect, ci_low, ci_high, p_value,
    n_pairs, dz, rho, wins, guardrails ``{name: {status, effect, lower}}``,
    sensitivity ``{bca_low, bca_high, permutation_p, wilcoxon_p}``,
    crashed_seeds, confidence, tost_p, p_decision; p_adjusted and correction
    after :func:`adjust_family`; look, threshold and final_look with looks.
    """
    out: dict[str, Any] = {
        "lever": v.lever,
        "verdict": v.verdict,
        "meaningful": bool(v.meaningful),
        "effect": _num(v.effect),
        "ci_low": _num(v.ci_low),
        "ci_high": _num(v.ci_high),
        "p_value": _num(v.p_value),
        "n_pairs": int(v.n_pairs),
        "dz": _num(v.dz),
        "rho": _num(v.rho),
        "wins": int(v.wins),
        "guardrails": {
            name: {"status": r.status, "effect": _num(r.effect), "lower": _num(r.lower)}
            for name, r in v.guardrails.items()
        },
        "sensitivity": {
            "bca_low": _num(v.sensitivity.bca_low),
            "bca_high": _num(v.sensitivity.bca_high),
            "permutation_p": _num(v.sensitivity.permutation_p),
            "wilcoxon_p": _num(v.sensitivity.wilcoxon_p),
        },
        "crashed_seeds": [_plain(s) for s in v.crashed_seeds],
        "confidence": _num(v.confidence),
        "tost_p": _num(v.tost_p),
        "p_decision": _num(v.p_decision),
    }
    if v.correction is not None:
        out["p_adjusted"] = _num(v.p_adjusted)
        out["correction"] = v.correction
    if v.look is not None:
        out["look"] = v.look
        out["threshold"] = _num(v.threshold)
        out["final_look"] = v.final_look
    return out


# ----------------------------------------------------------------------------
# Private helpers: argument checks
# ----------------------------------------------------------------------------


def _check_alpha(alpha: float) -> float:
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"The value of `alpha` is {alpha}, but must be `0 < alpha < 1`.")
    return alpha


def _check_mode(mode: str, arg: str) -> None:
    if mode not in MODES:
        raise ValueError(f"The value of `{arg}` is {mode!r}, but must be one of {MODES}.")


def _check_looks(looks: Sequence[int]) -> tuple[int, ...]:
    plan = tuple(int(n) for n in looks)
    if not plan or plan[0] < 2 or any(b <= a for a, b in itertools.pairwise(plan)):
        raise ValueError(
            f"The value of `looks` is {tuple(looks)}, but must be a non-empty, strictly "
            "increasing sequence of pair counts, each >= 2."
        )
    return plan


def _signed(x: npt.NDArray[np.float64], mode: str) -> npt.NDArray[np.float64]:
    return x if mode == "max" else -x


def _signed_guardrails(
    guardrails: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike, Guardrail]], n: int
) -> dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], Guardrail]]:
    out = {}
    for name, (gc, gv, g) in guardrails.items():
        if g.name != name:
            raise ValueError(f"Guardrail key {name!r} differs from its Guardrail.name {g.name!r}.")
        gc_a = np.asarray(gc, dtype=float).ravel()  # (N,)
        gv_a = np.asarray(gv, dtype=float).ravel()  # (N,)
        if gc_a.size != n or gv_a.size != n:
            raise ValueError(
                f"Guardrail {name!r} has {gc_a.size} control and {gv_a.size} variant values "
                f"for {n} pairs."
            )
        out[name] = (_signed(gc_a, g.mode), _signed(gv_a, g.mode), g)
    return out


def _not_testable(v: LeverVerdict) -> bool:
    return v.verdict == CRASHED or not math.isfinite(v.p_decision)


# ----------------------------------------------------------------------------
# Private helpers: the paired-t decision (vectorised) and the look logic
# ----------------------------------------------------------------------------


def _decide(
    d: npt.NDArray[np.float64], plan: tuple[int, ...], thresholds: tuple[float, ...]
) -> BatchDecision:
    r = d.shape[0]
    outcome = np.zeros(r, dtype=np.int8)
    look = np.zeros(r, dtype=np.int64)
    fields = {k: np.full(r, np.nan) for k in ("effect", "ci_low", "ci_high", "p_value", "thr")}
    open_ = np.ones(r, dtype=bool)  # rows not decided yet
    for k, (n, thr) in enumerate(zip(plan, thresholds, strict=True)):
        if not open_.any():
            break
        rows = d[open_, :n]  # (R_open, n_k)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.ttest_1samp(rows, 0.0, axis=1)
            ci = res.confidence_interval(1.0 - thr)
        p = np.array(res.pvalue, dtype=float)  # (R_open,)
        mean = rows.mean(axis=1)  # (R_open,)
        low = np.array(ci.low, dtype=float)  # (R_open,)
        high = np.array(ci.high, dtype=float)  # (R_open,)
        flat = _zero_variance(rows)  # (R_open,)
        c = rows[flat, 0]  # the common difference of each zero-variance row
        mean[flat], low[flat], high[flat] = c, c, c
        p[flat] = np.where(c == 0, 1.0, 0.0)  # limit of the t test as sd -> 0
        for key, val in (("effect", mean), ("ci_low", low), ("ci_high", high)):
            fields[key][open_] = val
        fields["p_value"][open_] = p
        fields["thr"][open_] = thr
        look[open_] = k
        sig = p < thr  # NaN p (fewer than two pairs) is never significant
        idx = np.flatnonzero(open_)
        outcome[idx[sig]] = np.sign(mean[sig]).astype(np.int8)
        open_[idx[sig]] = False
    return BatchDecision(
        outcome=outcome,
        look=look,
        n_used=np.asarray(plan, dtype=np.int64)[look],
        effect=fields["effect"],
        ci_low=fields["ci_low"],
        ci_high=fields["ci_high"],
        p_value=fields["p_value"],
        threshold=fields["thr"],
    )


@dataclasses.dataclass(frozen=True)
class _Stop:
    outcome: int
    look: int  # 1-based (0: before the first look); 0 also for a fixed N
    n_used: int
    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    threshold: float
    confidence: float
    p_decision: float
    final_look: bool


def _stop_from_batch(
    b: BatchDecision, look: int, final_look: bool, p_decision: float, confidence: float
) -> _Stop:
    return _Stop(
        outcome=int(b.outcome[0]),
        look=look,
        n_used=int(b.n_used[0]),
        effect=float(b.effect[0]),
        ci_low=float(b.ci_low[0]),
        ci_high=float(b.ci_high[0]),
        p_value=float(b.p_value[0]),
        threshold=float(b.threshold[0]),
        confidence=confidence,
        p_decision=p_decision,
        final_look=final_look,
    )


def _fixed_stop(d: npt.NDArray[np.float64], alpha: float) -> _Stop:
    if d.size < 2:  # no t test on fewer than two pairs
        effect = float(np.mean(d)) if d.size else math.nan
        nan = math.nan
        return _Stop(0, 0, int(d.size), effect, nan, nan, nan, alpha, 1.0 - alpha, nan, True)
    b = _decide(d[None, :], (d.size,), (alpha,))
    return _stop_from_batch(b, 0, True, float(b.p_value[0]), 1.0 - alpha)


def _sequential_stop(d: npt.NDArray[np.float64], decision: Decision) -> _Stop:
    plan = decision.looks
    assert plan is not None  # checked by the callers
    if d.size > plan[-1]:
        raise ValueError(f"The looks {plan} plan at most {plan[-1]} pairs, got {d.size}.")
    thresholds = obf_thresholds(plan, decision.alpha)
    reached = tuple(n for n in plan if n <= d.size)
    if not reached:  # before the first look: report, never decide
        if d.size < 2:
            return dataclasses.replace(_fixed_stop(d, decision.alpha), final_look=False)
        b = _decide(d[None, :], (d.size,), (thresholds[0],))
        stop = _stop_from_batch(b, 0, False, 1.0, 1.0 - thresholds[0])
        return dataclasses.replace(stop, outcome=0)
    b = _decide(d[None, :], reached, thresholds[: len(reached)])
    k = int(b.look[0])
    final = k == len(plan) - 1
    p_rep = _repeated_p(float(b.p_value[0]), plan, k)
    return _stop_from_batch(b, k + 1, final, p_rep, 1.0 - thresholds[k])


def _stop_at_look(d: npt.NDArray[np.float64], decision: Decision, look_index: int) -> _Stop:
    plan = decision.looks
    assert plan is not None  # checked by the callers
    if not 0 <= look_index < len(plan):
        raise ValueError(
            f"The value of `look_index` is {look_index}, but must be in [0, {len(plan) - 1}]."
        )
    n = plan[look_index]
    if d.size < n:
        raise ValueError(f"Look {look_index} needs {n} pairs, but only {d.size} were given.")
    thr = obf_thresholds(plan, decision.alpha)[look_index]
    b = _decide(d[None, :n], (n,), (thr,))
    p_rep = _repeated_p(float(b.p_value[0]), plan, look_index)
    return _stop_from_batch(b, look_index + 1, look_index == len(plan) - 1, p_rep, 1.0 - thr)


def _label(*, significant: bool, sign: int, guardrails_pass: bool, equivalent: bool) -> str:
    if significant and sign > 0 and guardrails_pass:
        return WIN
    if significant and sign < 0:
        return NEGATIVE
    if equivalent and not significant:
        return NULL
    return INCONCLUSIVE


# ----------------------------------------------------------------------------
# Private helpers: group-sequential boundaries (Lan-DeMets O'Brien-Fleming)
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _obf_thresholds_cached(plan: tuple[int, ...], alpha: float) -> tuple[float, ...]:
    t = np.asarray(plan, dtype=float) / plan[-1]  # information fractions
    spent = 2.0 * stats.norm.sf(stats.norm.isf(alpha / 2.0) / np.sqrt(t))  # alpha(t_k)
    increments = np.diff(spent, prepend=0.0)
    c = [float(stats.norm.isf(increments[0] / 2.0))]
    # Sub-density of Z_1 on the continuation region (-c_1, c_1), on Gauss-Legendre nodes.
    u = _GL_NODES * c[0]  # (G,)
    f_w = stats.norm.pdf(u) * _GL_WEIGHTS * c[0]  # density x quadrature weight, (G,)
    for k in range(1, len(plan)):
        s0, s1 = math.sqrt(t[k - 1]), math.sqrt(t[k])
        sd = math.sqrt(t[k] - t[k - 1])
        c_k = _solve_boundary(u * s0, f_w, s1, sd, float(increments[k]))
        c.append(c_k)
        if not math.isfinite(c_k):
            break
        z = _GL_NODES * c_k  # (G,) nodes of the next continuation region
        kernel = stats.norm.pdf((z[:, None] * s1 - u[None, :] * s0) / sd) * (s1 / sd)  # (G, G)
        f_w = (kernel @ f_w) * _GL_WEIGHTS * c_k
        u = z
    c += [math.inf] * (len(plan) - len(c))
    return tuple(float(2.0 * stats.norm.sf(ck)) for ck in c)


def _solve_boundary(
    b_prev: npt.NDArray[np.float64], f_w: npt.NDArray[np.float64], s1: float, sd: float, a: float
) -> float:
    """Boundary c with P(continue to k-1, |Z_k| >= c) = a (``b_prev`` = Z_{k-1} sqrt(t_{k-1}))."""

    def exit_prob(cb: float) -> float:
        up = stats.norm.sf((cb * s1 - b_prev) / sd)
        down = stats.norm.cdf((-cb * s1 - b_prev) / sd)
        return float(np.sum(f_w * (up + down))) - a

    if a <= 1e-300 or exit_prob(40.0) > 0:
        return math.inf
    return float(optimize.brentq(exit_prob, 0.0, 40.0, xtol=1e-12))


_TINY = 1e-300


def _repeated_p(p: float, plan: tuple[int, ...], k: int) -> float:
    """Smallest alpha at which look k's threshold exceeds p (Jennison & Turnbull, ch. 9)."""
    if not math.isfinite(p):
        return math.nan
    if len(plan) == 1:
        return p
    lo, hi = 1e-15, 1.0 - 1e-9

    log_p = math.log(max(p, _TINY))

    def gap(log_a: float) -> float:  # log threshold_k(alpha) - log p, increasing in alpha
        return math.log(max(_obf_thresholds_cached(plan, math.exp(log_a))[k], _TINY)) - log_p

    if gap(math.log(hi)) <= 0:
        return 1.0
    if gap(math.log(lo)) >= 0:
        return lo
    return float(math.exp(optimize.brentq(gap, math.log(lo), math.log(hi), xtol=1e-6)))


# ----------------------------------------------------------------------------
# Private helpers: equivalence, guardrails, descriptive and sensitivity figures
# ----------------------------------------------------------------------------


def _tost(d: npt.NDArray[np.float64], delta: float, alpha: float) -> tuple[float, bool]:
    """TOST on paired differences (statsmodels ttost_paired), bounds ``+-delta``.

    Zero variance: the interval is the point ``[c, c]``, equivalent (p = 0)
    when ``|c| < delta``, else p = 1.
    """
    if d.size < 2:
        return math.nan, False
    if _flat(d):
        p = 0.0 if abs(float(d[0])) < delta else 1.0
        return p, bool(p < alpha)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(ttost_paired(d, np.zeros_like(d), -delta, delta)[0])
    return p, bool(p < alpha)


def _guardrail_result(dg: npt.NDArray[np.float64], g: Guardrail, alpha: float) -> GuardrailResult:
    effect = float(np.mean(dg)) if dg.size else math.nan
    if dg.size < 2:
        return GuardrailResult(G_INCONCLUSIVE, effect, math.nan, math.nan, g.margin)
    if _flat(dg):  # known exactly: regressed by no more than the margin?
        c = float(dg[0])
        return GuardrailResult(G_PASS if c >= -g.margin else G_FAIL, c, c, c, g.margin)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        lower = float(
            stats.ttest_1samp(dg, -g.margin, alternative="greater")
            .confidence_interval(1 - alpha)
            .low
        )
        upper = float(
            stats.ttest_1samp(dg, -g.margin, alternative="less").confidence_interval(1 - alpha).high
        )
    if lower > -g.margin:
        status = G_PASS
    elif upper < -g.margin:
        status = G_FAIL
    else:
        status = G_INCONCLUSIVE
    return GuardrailResult(status, effect, lower, upper, g.margin)


def _zero_variance(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Rows of ``>= 2`` differences that are all equal, shape ``(R, n)`` -> ``(R,)``.

    Tested on the values, not on ``std``: the mean of equal floats can be off in
    the last bit and leave a spurious ``sd ~ 1e-18``. A row with NaN is not flat.
    """
    if rows.shape[1] < 2:
        return np.zeros(rows.shape[0], dtype=bool)
    return np.all(rows == rows[:, :1], axis=1)


def _flat(d: npt.NDArray[np.float64]) -> bool:
    """Zero variance of one vector of differences (see :func:`_zero_variance`)."""
    return bool(_zero_variance(d[None, :])[0])


def _dz(d: npt.NDArray[np.float64]) -> float:
    if d.size < 2 or _flat(d):  # mean / 0: undefined
        return math.nan
    sd = float(np.std(d, ddof=1))
    return float(np.mean(d)) / sd if sd > 0 else math.nan


def _rho(c: npt.NDArray[np.float64], v: npt.NDArray[np.float64]) -> float:
    if c.size < 2 or not (np.ptp(c) > 0 and np.ptp(v) > 0):
        return math.nan
    return float(np.corrcoef(c, v)[0, 1])


_NO_SENSITIVITY = Sensitivity(math.nan, math.nan, math.nan, math.nan)


def _sensitivity(d: npt.NDArray[np.float64], level: float) -> Sensitivity:
    if d.size < 3:
        return _NO_SENSITIVITY
    flat = _flat(d)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if flat:  # every resample has mean c; BCa's acceleration would be 0/0
            bca_low = bca_high = float(d[0])
        else:
            ci = stats.bootstrap(
                (d,),
                np.mean,
                method="BCa",
                confidence_level=level,
                n_resamples=_N_RESAMPLES,
                rng=np.random.default_rng(_RESAMPLING_SEED),
            ).confidence_interval
            bca_low, bca_high = float(ci.low), float(ci.high)
        perm = stats.permutation_test(
            (d,),
            _mean_stat,
            permutation_type="samples",
            vectorized=True,
            n_resamples=_N_RESAMPLES,
            rng=np.random.default_rng(_RESAMPLING_SEED),
        )
        if flat and d[0] == 0:  # no non-zero difference to rank
            wilcoxon_p = math.nan
        else:
            try:
                wilcoxon_p = float(stats.wilcoxon(d).pvalue)
            except ValueError:
                wilcoxon_p = math.nan
    return Sensitivity(bca_low, bca_high, float(perm.pvalue), wilcoxon_p)


def _mean_stat(x: npt.NDArray[np.float64], axis: int) -> npt.NDArray[np.float64]:
    return np.mean(x, axis=axis)


# ----------------------------------------------------------------------------
# Private helpers: serialisation
# ----------------------------------------------------------------------------


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _plain(s: Any) -> Any:
    return s.item() if isinstance(s, np.generic) else s
