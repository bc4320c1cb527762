"""Verdicts of tunelab's own lever A/B tables (private; see :mod:`tunelab.paired_table`).

A table with the columns ``round`` and ``stage`` (``look1``, ``look2``, ...,
``confirm``) and ``status`` is analysed the way its experiment decided:
round by round, a trial that did not finish as a missing pair, a lever on
the control's seeds it ran (in the order the looks took them), levers
corrected across a round, and ``confirm`` rows only saying whether a
meaningful win was ``confirmed``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from tunelab._table_io import (
    COL_ARM,
    COL_ROUND,
    COL_SEED,
    COL_STAGE,
    COL_STATUS,
    STAGE_CONFIRM,
    STATUS_FINISHED,
    check_columns,
    clean_keys,
    name_rows,
    numeric_column,
    seed_values,
    sorted_seeds,
)
from tunelab.errors import TableError
from tunelab.verdicts import (
    WIN,
    Decision,
    Guardrail,
    LeverVerdict,
    adjust_family,
    analyze_lever,
    verdict_to_dict,
)

_LOOK_STAGE = re.compile(r"look([1-9][0-9]*)")


def is_lever_ab_table(df: pd.DataFrame) -> bool:
    """A table written by a tunelab lever A/B: a ``stage`` column of ``lookN`` / ``confirm``."""
    if COL_STAGE not in df.columns or df.empty:
        return False
    stages = [v.strip() if isinstance(v, str) else v for v in df[COL_STAGE].tolist()]
    return all(
        isinstance(v, str) and (v == STAGE_CONFIRM or _LOOK_STAGE.fullmatch(v)) for v in stages
    )


def lever_ab_verdicts(
    p: Path,
    df: pd.DataFrame,
    *,
    metric: str,
    mode: str,
    decision: Decision,
    guardrails: Sequence[Guardrail],
    control: str,
    round_no: int | None,
    seed_order: Sequence[Any] | None,
    confirm_order: Sequence[Any] | None,
) -> list[dict[str, Any]]:
    """Verdicts of a tunelab lever A/B table, decided as its experiment decided them."""
    metrics = list(dict.fromkeys([metric, *(g.name for g in guardrails)]))
    check_columns(p, df, [COL_SEED, COL_ARM, COL_STAGE, *metrics])
    row_no = np.arange(1, len(df) + 1)  # 1-based data rows
    arms = clean_keys(p, df[COL_ARM], COL_ARM, row_no)
    seeds = seed_values(clean_keys(p, df[COL_SEED], COL_SEED, row_no))
    stages = [str(v).strip() for v in df[COL_STAGE].tolist()]
    rounds = _round_values(p, df, row_no)
    values = {m: numeric_column(p, df[m], m, row_no).copy() for m in metrics}
    if COL_STATUS in df.columns:  # a trial that did not finish is a missing pair
        status = df[COL_STATUS].map(lambda v: v.strip() if isinstance(v, str) else v)
        unfinished = np.array(status != STATUS_FINISHED, dtype=bool)
        for m in metrics:
            values[m][unfinished] = math.nan
    confirm = np.array([s == STAGE_CONFIRM for s in stages], dtype=bool)
    keys = [(r, s, a, c) for r, s, a, c in zip(rounds, seeds, arms, confirm, strict=True)]
    dup = pd.Series(keys).duplicated(keep=False).to_numpy()
    if dup.any():
        pairs = sorted({f"(round={r}, seed={s}, arm={a})" for r, s, a, _ in pd.Series(keys)[dup]})
        raise TableError(
            f"{p}: duplicate {', '.join(pairs)} at {name_rows(row_no, dup)} "
            "(1-based, header excluded); keep one row per round, seed and arm."
        )
    present = sorted(set(rounds))
    if round_no is not None and round_no not in present:
        raise TableError(f"{p}: no round {round_no}; the table has rounds {present}.")
    out: list[dict[str, Any]] = []
    for rnd in present if round_no is None else [round_no]:
        in_round = np.array([r == rnd for r in rounds], dtype=bool)
        look_idx = {  # (arm, seed) -> row of a look trial of this round
            (arms[i], seeds[i]): int(i) for i in np.flatnonzero(in_round & ~confirm)
        }
        confirm_idx = {(arms[i], seeds[i]): int(i) for i in np.flatnonzero(in_round & confirm)}
        order = _round_seed_order(p, rnd, control, look_idx, stages, seed_order)
        levers = list(dict.fromkeys(a for a, _ in look_idx if a != control))
        verdicts = [
            _lever_ab_lever(
                p, rnd, lever, control, order, look_idx, values, metric, mode, decision, guardrails
            )
            for lever in levers
        ]
        if decision.correction != "none" and len(verdicts) > 1:
            verdicts = adjust_family(verdicts, decision.correction)
        for v in sorted(verdicts, key=lambda v: v.lever):
            rec = verdict_to_dict(v)
            rec["round"] = rnd
            rec["look_no"], rec["n_seeds"] = _look_no(v, decision)
            if rec["verdict"] == WIN and rec["meaningful"]:
                _confirm(rec, control, confirm_idx, values[metric], mode, confirm_order)
            out.append(rec)
    return out


def _round_values(p: Path, df: pd.DataFrame, row_no: npt.NDArray[np.int64]) -> list[int]:
    if COL_ROUND not in df.columns:
        return [1] * len(df)
    raw = seed_values(clean_keys(p, df[COL_ROUND], COL_ROUND, row_no))
    bad = np.array([not isinstance(r, int) or r < 1 for r in raw], dtype=bool)
    if bad.any():
        raise TableError(
            f"{p}: column {COL_ROUND!r} holds a value that is not a round number (1, 2, ...) at "
            f"{name_rows(row_no, bad)} (1-based, header excluded)."
        )
    return [int(r) for r in raw]


def _round_seed_order(
    p: Path,
    rnd: int,
    control: str,
    look_idx: dict[tuple[Any, Any], int],
    stages: list[str],
    seed_order: Sequence[Any] | None,
) -> list[Any]:
    """The control's look seeds of a round, in the order the looks took them."""
    look_of = {s: _look_number(stages[i]) for (a, s), i in look_idx.items() if a == control}
    if not look_of:
        arms = sorted({str(a) for a, _ in look_idx})
        raise TableError(
            f"{p}: round {rnd} has no control arm {control!r} in column {COL_ARM!r} "
            f"(arms: {arms}). Pass the control's name (--control)."
        )
    spec_rank = {s: i for i, s in enumerate(seed_order or ())}
    return sorted(
        look_of,
        key=lambda s: (look_of[s], spec_rank.get(s, len(spec_rank)), isinstance(s, str), s),
    )


def _look_number(stage: str) -> int:
    found = _LOOK_STAGE.fullmatch(stage)
    return int(found.group(1)) if found else 0


def _lever_ab_lever(
    p: Path,
    rnd: int,
    lever: str,
    control: str,
    order: list[Any],
    look_idx: dict[tuple[Any, Any], int],
    values: dict[str, npt.NDArray[np.float64]],
    metric: str,
    mode: str,
    decision: Decision,
    guardrails: Sequence[Guardrail],
) -> LeverVerdict:
    """One lever of one round, on the control's seeds it ran (a prefix of ``order``)."""
    ran = [s for s in order if (lever, s) in look_idx]
    known = set(order)
    extra = sorted_seeds(s for a, s in look_idx if a == lever and s not in known)
    if extra:
        raise TableError(
            f"{p}: round {rnd}: lever {lever!r} has seeds {extra} with no {control!r} row. "
            "Every lever runs on the control's seeds; a failed trial is a row whose status "
            "is not finished or whose metric is empty."
        )
    if ran != order[: len(ran)]:
        gaps = [s for s in order[: order.index(ran[-1])] if (lever, s) not in look_idx]
        raise TableError(
            f"{p}: round {rnd}: lever {lever!r} has no rows for seeds {gaps}, which come "
            f"before seeds it ran (looks take the control's seeds in order); a failed trial "
            "is a row whose status is not finished or whose metric is empty."
        )
    if decision.looks is not None and len(ran) > decision.looks[-1]:
        raise TableError(
            f"{p}: round {rnd}: lever {lever!r} has {len(ran)} paired seeds, but the looks "
            f"{decision.looks} plan at most {decision.looks[-1]}; give the experiment's looks "
            f"(--looks)."
        )
    ci = np.array([look_idx[(control, s)] for s in ran])  # (N,) control rows
    vi = np.array([look_idx[(lever, s)] for s in ran])  # (N,) lever rows
    return analyze_lever(
        values[metric][ci],
        values[metric][vi],
        mode=mode,
        decision=decision,
        guardrails={g.name: (values[g.name][ci], values[g.name][vi], g) for g in guardrails},
        lever=lever,
        seeds=ran,
    )


def _look_no(v: LeverVerdict, decision: Decision) -> tuple[int, int]:
    """``(look_no, n_seeds)`` of a verdict as the experiment records them."""
    n = len(v.seeds) + len(v.crashed_seeds)  # the seeds analysed (crashed ones too)
    if decision.looks is None:
        return 1, n
    if v.look:  # decided (or last reached) at this 1-based look
        return v.look, decision.looks[v.look - 1]
    reached = [k for k, n_k in enumerate(decision.looks, start=1) if n_k <= n]
    return (reached[-1], decision.looks[reached[-1] - 1]) if reached else (0, n)


def _confirm(
    rec: dict[str, Any],
    control: str,
    confirm_idx: dict[tuple[Any, Any], int],
    metric: npt.NDArray[np.float64],
    mode: str,
    confirm_order: Sequence[Any] | None,
) -> None:
    """Add ``confirmed`` / ``confirm_diffs`` from the confirmation rows, as the experiment did."""
    lever = rec["lever"]
    table_seeds = {s for a, s in confirm_idx if a in (control, lever)}
    if not any(a == lever for a, _ in confirm_idx):
        return
    ordered = list(confirm_order or ()) or sorted(
        table_seeds, key=lambda s: (isinstance(s, str), s)
    )
    sign = 1.0 if mode == "max" else -1.0
    diffs = []
    for seed in ordered:
        c, v = confirm_idx.get((control, seed)), confirm_idx.get((lever, seed))
        diffs.append(
            math.nan if c is None or v is None else sign * (float(metric[v]) - float(metric[c]))
        )
    rec["confirmed"] = bool(diffs) and all(math.isfinite(d) and d > 0 for d in diffs)
    rec["confirm_diffs"] = diffs
