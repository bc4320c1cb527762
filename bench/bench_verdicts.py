"""Benchmark of the verdict engine's design choices, measured side by side in one run.

    python bench/bench_verdicts.py            # about 30 s on one core

(1) Paired design vs unpaired analysis: seeds needed for 80% power at a 0.5-SD
    effect (SD of the per-arm metric across seeds), with the paired t of
    tunelab.verdicts against Welch's t on the same seed-matched runs and
    against Welch on an unpaired design (independent seeds per arm), at
    rho = 0.5, 0.8, 0.9. Goal: >= 3x fewer seeds at rho >= 0.8
    (shared/VERDICTS.md, "Why paired": 64 / 34 / 15 / 9).
(2) Group-sequential looks (5, 10, 20) vs a fixed N = 20: average seeds used
    when dz = 1.2 (goal >= 25% fewer), power at dz = 0.5 and the A/A false
    positive rate (goal <= 0.05, VERDICTS.md measured 0.051).

``paired_vs_unpaired_on_results(table)`` runs the same comparison on a real
results table (seed, arm, metric); it is demonstrated here on a synthetic one.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.power import TTestIndPower, TTestPower

from tunelab.paired_table import PairedTable, load_paired_table
from tunelab.verdicts import paired_t_decisions

REPS = 20_000
AA_REPS = 400_000
ALPHA = 0.05
POWER = 0.8
EFFECT_SD = 0.5
RHOS = (0.5, 0.8, 0.9)
LOOKS = (5, 10, 20)
N_MAX = 120


# ----------------------------------------------------------------------------
# (1) paired vs unpaired
# ----------------------------------------------------------------------------


def _seeds_for_power(power_at: Any, n_max: int = N_MAX) -> int:
    """Smallest N whose simulated power reaches POWER (scan upwards)."""
    for n in range(2, n_max + 1):
        if power_at(n) >= POWER:
            return n
    return n_max + 1


def _welch_power(a: np.ndarray, b: np.ndarray, n: int) -> float:
    res = stats.ttest_ind(a[:, :n], b[:, :n], equal_var=False, axis=1)
    return float(np.mean((res.pvalue < ALPHA) & (res.statistic > 0)))


def bench_paired_vs_unpaired(rng: np.random.Generator) -> list[dict[str, float]]:
    out = []
    # Unpaired design: independent seeds per arm, so rho plays no role.
    c_ind = rng.normal(0.0, 1.0, (REPS, N_MAX))  # (R, N)
    v_ind = rng.normal(EFFECT_SD, 1.0, (REPS, N_MAX))  # (R, N)
    n_design = _seeds_for_power(lambda n: _welch_power(v_ind, c_ind, n))
    for rho in RHOS:
        control = rng.normal(0.0, 1.0, (REPS, N_MAX))  # (R, N)
        noise = rng.normal(0.0, 1.0, (REPS, N_MAX))  # (R, N)
        variant = rho * control + math.sqrt(1 - rho**2) * noise + EFFECT_SD  # (R, N)
        d = variant - control  # (R, N)
        n_paired = _seeds_for_power(
            lambda n, d=d: float(np.mean(paired_t_decisions(d[:, :n], alpha=ALPHA).outcome == 1))
        )
        n_welch = _seeds_for_power(lambda n, v=variant, c=control: _welch_power(v, c, n))
        out.append(
            {"rho": rho, "paired": n_paired, "welch_same_runs": n_welch, "welch_design": n_design}
        )
    return out


# ----------------------------------------------------------------------------
# (2) sequential looks vs fixed N
# ----------------------------------------------------------------------------


def bench_sequential(rng: np.random.Generator) -> dict[str, float]:
    n = LOOKS[-1]
    res: dict[str, float] = {}
    for name, dz in (("aa", 0.0), ("dz05", 0.5), ("dz12", 1.2)):
        # A/A gets AA_REPS so that a 0.001 excess over 0.05 is visible (MC SE 0.0003).
        d = rng.normal(dz, 1.0, (AA_REPS if dz == 0 else REPS, n))  # (R, N)
        seq = paired_t_decisions(d, alpha=ALPHA, looks=LOOKS)
        fix = paired_t_decisions(d, alpha=ALPHA)
        res[f"{name}_seq_reject"] = float(np.mean(seq.outcome != 0))
        res[f"{name}_fix_reject"] = float(np.mean(fix.outcome != 0))
        res[f"{name}_seq_n"] = float(np.mean(seq.n_used))
        res[f"{name}_fix_n"] = float(np.mean(fix.n_used))
    return res


# ----------------------------------------------------------------------------
# Hook: the same comparison on a real results table
# ----------------------------------------------------------------------------


def paired_vs_unpaired_on_results(
    table: PairedTable | str | Path,
    *,
    metric: str | None = None,
    control: str = "control",
    mode: str = "max",
    effect_sd: float = EFFECT_SD,
) -> list[dict[str, Any]]:
    """Paired vs unpaired analysis of a real results table (seed, arm, metric).

    For each lever: rho between arms, cross-seed SD vs SD of the paired
    differences, paired-t vs Welch p-value and CI width on the same runs, and
    the seeds needed for 80% power at ``effect_sd`` x the cross-seed SD,
    paired (statsmodels ``TTestPower`` with the observed SD of the
    differences) vs an unpaired design (``TTestIndPower``). Crashed pairs are
    left out here (the verdict engine labels them; this is a design figure).

    Args:
        table: A loaded :class:`PairedTable`, or a CSV / Parquet path (then
            ``metric`` is required).
        metric: Primary metric column when ``table`` is a path.
        control: Control arm name when ``table`` is a path.
        mode: ``"max"`` or ``"min"`` (sign of the differences).
        effect_sd: Effect size of interest in units of the cross-seed SD.
    """
    if not isinstance(table, PairedTable):
        if metric is None:
            raise ValueError("`metric` is required when `table` is a path.")
        table = load_paired_table(table, metric=metric, control=control)
    out = []
    for arm in table.levers.values():
        ok = np.isfinite(arm.control) & np.isfinite(arm.variant)
        sign = 1.0 if mode == "max" else -1.0
        c, v = sign * arm.control[ok], sign * arm.variant[ok]  # (N,)
        d = v - c  # (N,)
        sd_seed = float(np.sqrt((np.var(c, ddof=1) + np.var(v, ddof=1)) / 2))
        sd_d = float(np.std(d, ddof=1))
        paired = stats.ttest_rel(v, c)
        welch = stats.ttest_ind(v, c, equal_var=False)
        ci_p, ci_w = paired.confidence_interval(), welch.confidence_interval()
        effect = effect_sd * sd_seed
        n_pair = TTestPower().solve_power(effect / sd_d, alpha=ALPHA, power=POWER)
        n_unpair = TTestIndPower().solve_power(effect / sd_seed, alpha=ALPHA, power=POWER)
        out.append(
            {
                "lever": arm.lever,
                "n_pairs": int(d.size),
                "rho": float(np.corrcoef(c, v)[0, 1]),
                "sd_seed": sd_seed,
                "sd_diff": sd_d,
                "p_paired": float(paired.pvalue),
                "p_welch": float(welch.pvalue),
                "ci_width_ratio_welch_over_paired": float(
                    (ci_w.high - ci_w.low) / (ci_p.high - ci_p.low)
                ),
                "seeds_paired": math.ceil(n_pair),
                "seeds_unpaired_per_arm": math.ceil(n_unpair),
            }
        )
    return out


def _demo_table(path: Path, rng: np.random.Generator) -> None:
    """Flow-policy-like numbers: cross-seed sigma 0.014, paired noise 0.003."""
    base = rng.normal(0.34, 0.014, 10)
    rows = [{"seed": s, "arm": "control", "spike": b} for s, b in enumerate(base)]
    rows += [
        {"seed": s, "arm": "delta_off", "spike": b - 0.01 + rng.normal(0, 0.003)}
        for s, b in enumerate(base)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def main() -> int:
    rng = np.random.default_rng(20240601)
    t0 = time.perf_counter()
    print(f"(1) seeds for {POWER:.0%} power at a {EFFECT_SD}-SD effect ({REPS} reps per N)")
    print("  rho  paired  welch(same runs)  welch(unpaired design)  ratio same  ratio design")
    ok1 = True
    for r in bench_paired_vs_unpaired(rng):
        same, design = r["welch_same_runs"] / r["paired"], r["welch_design"] / r["paired"]
        print(
            f"  {r['rho']:.1f}  {r['paired']:6d}  {r['welch_same_runs']:16d}  "
            f"{r['welch_design']:22d}  {same:9.2f}x  {design:11.2f}x"
        )
        if r["rho"] >= 0.8:
            ok1 &= design >= 3.0
    print(
        f"  goal >= 3x fewer seeds at rho >= 0.8 (vs unpaired design): {'MET' if ok1 else 'NOT MET'}"
    )

    s = bench_sequential(rng)
    saving = 1 - s["dz12_seq_n"] / s["dz12_fix_n"]
    print(f"\n(2) looks {LOOKS} vs fixed N = {LOOKS[-1]} ({REPS} reps)")
    print(
        f"  dz=1.2 mean seeds used: seq {s['dz12_seq_n']:.2f} vs fixed {s['dz12_fix_n']:.0f}"
        f" -> {saving:.1%} fewer (goal >= 25%); power seq {s['dz12_seq_reject']:.3f}"
        f" vs fixed {s['dz12_fix_reject']:.3f}"
    )
    print(
        f"  dz=0.5 power: seq {s['dz05_seq_reject']:.3f} vs fixed {s['dz05_fix_reject']:.3f}"
        f" (mean seeds {s['dz05_seq_n']:.2f})"
    )
    se = math.sqrt(0.05 * 0.95 / AA_REPS)
    print(
        f"  A/A false-positive rate: seq {s['aa_seq_reject']:.4f} vs fixed "
        f"{s['aa_fix_reject']:.4f} (goal <= 0.05; {AA_REPS} reps, MC SE {se:.4f})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.csv"
        _demo_table(path, rng)
        print("\n(hook) paired_vs_unpaired_on_results on a synthetic flow-policy-like table:")
        for row in paired_vs_unpaired_on_results(path, metric="spike", mode="min"):
            print(
                "  "
                + ", ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    return 0


def main_results(path: str, metric: str, mode: str) -> int:
    """``python bench/bench_verdicts.py RESULTS.csv METRIC MODE``: the same figures on real runs."""
    for r in paired_vs_unpaired_on_results(path, metric=metric, mode=mode):
        print(
            f"{r['lever']:>12}: n={r['n_pairs']} rho={r['rho']:.2f} sd_seed={r['sd_seed']:.4f} "
            f"sd_diff={r['sd_diff']:.4f} p paired={r['p_paired']:.2g} welch={r['p_welch']:.2g} "
            f"CI width welch/paired={r['ci_width_ratio_welch_over_paired']:.2f} "
            f"seeds for 80% power: paired {r['seeds_paired']} vs unpaired {r['seeds_unpaired_per_arm']} per arm "
            f"({r['seeds_unpaired_per_arm'] / r['seeds_paired']:.1f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main_results(*sys.argv[1:4]) if len(sys.argv) == 4 else main())
