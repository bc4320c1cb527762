"""Paired results tables: load, validate, and turn into verdicts.

A results table has one row per (seed, arm): columns ``seed``, ``arm`` and
one column per metric (the primary metric and any guardrails). The control
arm is named ``control`` unless told otherwise; every other arm is a lever.
This is what ``platform verdict RESULTS.csv --metric M ...`` reads, so a
malformed table is a :class:`TableError` whose message names the file and the
offending data rows (1-based, header excluded) or columns. A missing, NaN or
infinite metric value is not an error: that pair becomes ``crashed``
(shared/VERDICTS.md, "Labels").

tunelab's own lever A/B tables (``results.csv`` / ``results.parquet`` of an
experiment folder) are read the way the experiment decided: they have the
columns ``round`` and ``stage`` (``look1``, ``look2``, ..., ``confirm``) and
``status``. Each round is analysed on its own; ``confirm`` rows never enter
a verdict (they only say whether a meaningful win was ``confirmed``); a trial
whose status is not ``finished`` is a missing pair; a lever decided at an
early look has only that look's seeds and is analysed on them; levers are
corrected across a round as the experiment did (only when a round has more
than one lever). With the experiment's own settings (:func:`table_settings`
reads them from the ``tunelab.json`` beside the table) the records equal
``verdicts.json``.

Example:

    .. code::

        from tunelab.paired_table import verdict_table

        rows = verdict_table(
            "results.csv", metric="val/spike_l1", mode="min", min_effect=0.010,
            guardrails=["val/flat_l1:min:0.005"], looks=(5, 10, 20),
        )
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from tunelab.errors import TableError
from tunelab.verdicts import (
    MODES,
    WIN,
    Decision,
    Guardrail,
    LeverVerdict,
    adjust_family,
    analyze_lever,
    verdict_to_dict,
)

__all__ = [
    "COL_ARM",
    "COL_ROUND",
    "COL_SEED",
    "COL_STAGE",
    "COL_STATUS",
    "PairedArm",
    "PairedTable",
    "TableError",
    "TableSettings",
    "load_paired_table",
    "parse_guardrail",
    "table_settings",
    "verdict_table",
]

COL_SEED = "seed"
COL_ARM = "arm"
COL_ROUND = "round"
COL_STAGE = "stage"
COL_STATUS = "status"
STAGE_CONFIRM = "confirm"
STATUS_FINISHED = "finished"
_LOOK_STAGE = re.compile(r"look([1-9][0-9]*)")
_RUN_STATE_FILE = "tunelab.json"  # tunelab.layout.RUN_STATE_FILE
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_MAX_ROWS_NAMED = 20


@dataclasses.dataclass(frozen=True)
class PairedArm:
    """One lever aligned with the control on the same seeds.

    ``control`` / ``variant`` hold the primary metric per seed (NaN kept);
    ``guardrails`` maps a guardrail metric to its ``(control, variant)`` arrays.
    """

    lever: str
    seeds: tuple[Any, ...]
    control: npt.NDArray[np.float64]  # (N,)
    variant: npt.NDArray[np.float64]  # (N,)
    guardrails: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]


@dataclasses.dataclass(frozen=True)
class PairedTable:
    """A validated results table: every lever paired with the control by seed."""

    path: Path
    metric: str
    control: str
    seeds: tuple[Any, ...]  # sorted
    levers: dict[str, PairedArm]


@dataclasses.dataclass(frozen=True)
class TableSettings:
    """The decision settings of the lever A/B experiment a results table belongs to.

    Read by :func:`table_settings` from the experiment folder's ``tunelab.json``
    (the resolved spec); ``guardrails`` are ``"name:mode:margin"`` strings,
    ``seeds`` / ``confirm_seeds`` the spec's seed order.
    """

    source: Path
    metric: str
    mode: str
    min_effect: float
    alpha: float
    looks: tuple[int, ...] | None
    correction: str
    guardrails: tuple[str, ...]
    seeds: tuple[Any, ...]
    confirm_seeds: tuple[Any, ...]


def table_settings(path: str | Path) -> TableSettings | None:
    """The settings of the lever A/B whose experiment folder holds the table ``path``.

    Returns None when the folder has no ``tunelab.json`` or it records another kind.

    Raises:
        TableError: ``tunelab.json`` exists but cannot be read.
    """
    state = Path(path).parent / _RUN_STATE_FILE
    if not state.is_file():
        return None
    try:
        spec = json.loads(state.read_text())["spec"]
        if spec.get("kind") != "lever_ab":
            return None
        decision = spec["decision"]
        return TableSettings(
            source=state,
            metric=str(spec["metric"]["name"]),
            mode=str(spec["metric"]["mode"]),
            min_effect=float(decision["min_effect"]),
            alpha=float(decision.get("alpha", 0.05)),
            looks=tuple(int(n) for n in decision["looks"]) if decision.get("looks") else None,
            correction=str(decision.get("correction", "holm")),
            guardrails=tuple(
                f"{g['name']}:{g['mode']}:{float(g.get('margin', 0.0))!r}"
                for g in spec.get("guardrails") or []
            ),
            seeds=tuple(spec.get("seeds") or ()),
            confirm_seeds=tuple(decision.get("confirm_seeds") or ()),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise TableError(f"{state}: cannot read the experiment's spec ({err!r})") from None


def load_paired_table(
    path: str | Path,
    *,
    metric: str,
    control: str = "control",
    guardrails: Sequence[str] = (),
) -> PairedTable:
    """Read a CSV or Parquet results table and align every lever with the control.

    Args:
        path: ``.csv``, ``.parquet`` or ``.pq`` file with columns ``seed``,
            ``arm``, ``metric`` and the guardrail metrics.
        metric: The primary metric column.
        control: The control arm's name in the ``arm`` column.
        guardrails: Guardrail metric columns to carry along.

    Returns:
        The :class:`PairedTable`, seeds sorted, levers in order of appearance.

    Raises:
        TableError: Unknown file type, unreadable file, missing columns,
            missing seed / arm, non-numeric metric values, duplicate
            (seed, arm), no control arm, no lever arm, or seeds that are not
            paired between a lever and the control.
    """
    p = Path(path)
    return _paired(p, _read(p), metric=metric, control=control, guardrails=guardrails)


def _paired(
    p: Path, df: pd.DataFrame, *, metric: str, control: str, guardrails: Sequence[str]
) -> PairedTable:
    metrics = list(dict.fromkeys([metric, *guardrails]))
    _check_columns(p, df, [COL_SEED, COL_ARM, *metrics])
    if df.empty:
        raise TableError(f"{p}: the table has no data rows.")
    row_no = np.arange(1, len(df) + 1)  # 1-based data rows
    arms = _clean_keys(p, df[COL_ARM], COL_ARM, row_no)
    seeds = _seed_values(_clean_keys(p, df[COL_SEED], COL_SEED, row_no))
    values = {m: _numeric(p, df[m], m, row_no) for m in metrics}
    _check_duplicates(p, seeds, arms, row_no)

    arm_names = list(dict.fromkeys(arms))
    if control not in arm_names:
        raise TableError(
            f"{p}: no control arm {control!r} in column {COL_ARM!r}; arms present: "
            f"{arm_names}. Pass the control's name (--control)."
        )
    levers = [a for a in arm_names if a != control]
    if not levers:
        raise TableError(f"{p}: only the control arm {control!r} is present; no lever arm to test.")

    index = {(s, a): i for i, (s, a) in enumerate(zip(seeds, arms, strict=True))}
    control_seeds = _sorted_seeds(s for s, a in zip(seeds, arms, strict=True) if a == control)
    _check_pairing(p, control, control_seeds, levers, seeds, arms, row_no)

    out = {}
    for lever in levers:
        ci = np.array([index[(s, control)] for s in control_seeds])  # (N,) control row ids
        vi = np.array([index[(s, lever)] for s in control_seeds])  # (N,) lever row ids
        out[lever] = PairedArm(
            lever=lever,
            seeds=tuple(control_seeds),
            control=values[metric][ci],
            variant=values[metric][vi],
            guardrails={g: (values[g][ci], values[g][vi]) for g in guardrails},
        )
    return PairedTable(
        path=p, metric=metric, control=control, seeds=tuple(control_seeds), levers=out
    )


def parse_guardrail(spec: str) -> Guardrail:
    """Parse ``"name:mode:margin"`` (e.g. ``"val/flat_l1:min:0.005"``) into a Guardrail.

    Raises:
        TableError: Naming the string when it is not ``name:max|min:margin``
            with a finite ``margin >= 0``.
    """
    parts = spec.rsplit(":", 2)
    hint = f"Guardrail {spec!r} must be 'name:mode:margin', mode one of {MODES}, margin >= 0"
    if len(parts) != 3 or not parts[0]:
        raise TableError(f"{hint} (e.g. 'val/flat_l1:min:0.005').")
    name, mode, margin_s = parts
    try:
        margin = float(margin_s)
    except ValueError:
        raise TableError(f"{hint}; margin {margin_s!r} is not a number.") from None
    try:
        return Guardrail(name=name, mode=mode, margin=margin)
    except ValueError as exc:
        raise TableError(f"{hint}: {exc}") from None


def verdict_table(
    path: str | Path,
    *,
    metric: str,
    mode: str,
    min_effect: float,
    alpha: float = 0.05,
    guardrails: Sequence[str] = (),
    control: str = "control",
    looks: Sequence[int] | None = None,
    correction: str = "holm",
    round_no: int | None = None,
    seeds: Sequence[Any] | None = None,
    confirm_seeds: Sequence[Any] | None = None,
) -> list[dict[str, Any]]:
    """Verdicts of every lever in a results table, corrected as one family.

    Args:
        path: Results table (see :func:`load_paired_table`), or a tunelab
            lever A/B table (columns ``round`` and ``stage``; see the module
            docstring).
        metric: Primary metric column.
        mode: ``"max"`` or ``"min"`` for the primary metric.
        min_effect: Keep bar ``delta`` in the metric's raw units.
        alpha: Two-sided type I error rate.
        guardrails: ``"name:mode:margin"`` strings.
        control: Control arm name.
        looks: Planned pairs per look (group-sequential), or ``None``.
        correction: ``"holm"``, ``"bh"`` or ``"none"`` across the levers.
        round_no: A tunelab table: analyse only this round (default: every round).
        seeds: A tunelab table: the spec's seed order (looks take seeds in this
            order; default: by look, then by seed).
        confirm_seeds: A tunelab table: the spec's confirmation seeds, in order
            (default: the table's, sorted).

    Returns:
        One :func:`~tunelab.verdicts.verdict_to_dict` dict per lever; for a
        tunelab table one per (round, lever), sorted by round and lever, with
        ``round``, ``look_no``, ``n_seeds`` and, for a meaningful win with
        confirmation rows, ``confirmed`` and ``confirm_diffs`` (the records of
        ``verdicts.json``).
    """
    parsed = [parse_guardrail(s) for s in guardrails]
    decision = Decision(
        min_effect=min_effect,
        alpha=alpha,
        looks=None if looks is None else tuple(looks),
        correction=correction,
    )
    if mode not in MODES:
        raise ValueError(f"The value of `mode` is {mode!r}, but must be one of {MODES}.")
    p = Path(path)
    df = _read(p)
    if _is_lever_ab_table(df):
        return _lever_ab_verdicts(
            p,
            df,
            metric=metric,
            mode=mode,
            decision=decision,
            guardrails=parsed,
            control=control,
            round_no=round_no,
            seed_order=seeds,
            confirm_order=confirm_seeds,
        )
    if round_no is not None:
        raise TableError(f"{p}: --round needs a tunelab lever A/B table (columns round, stage).")
    table = _paired(p, df, metric=metric, control=control, guardrails=[g.name for g in parsed])
    if decision.looks is not None and len(table.seeds) > decision.looks[-1]:
        raise TableError(
            f"{table.path}: {len(table.seeds)} paired seeds, but the looks {decision.looks} "
            f"plan at most {decision.looks[-1]}; add a look or drop the extra seeds explicitly."
        )
    verdicts = [
        analyze_lever(
            arm.control,
            arm.variant,
            mode=mode,
            decision=decision,
            guardrails={g.name: (*arm.guardrails[g.name], g) for g in parsed},
            lever=arm.lever,
            seeds=arm.seeds,
        )
        for arm in table.levers.values()
    ]
    return [verdict_to_dict(v) for v in adjust_family(verdicts, decision.correction)]


# ----------------------------------------------------------------------------
# tunelab's own lever A/B tables (round, stage, status)
# ----------------------------------------------------------------------------


def _is_lever_ab_table(df: pd.DataFrame) -> bool:
    """A table written by a tunelab lever A/B: a ``stage`` column of ``lookN`` / ``confirm``."""
    if COL_STAGE not in df.columns or df.empty:
        return False
    stages = [v.strip() if isinstance(v, str) else v for v in df[COL_STAGE].tolist()]
    return all(
        isinstance(v, str) and (v == STAGE_CONFIRM or _LOOK_STAGE.fullmatch(v)) for v in stages
    )


def _lever_ab_verdicts(
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
    _check_columns(p, df, [COL_SEED, COL_ARM, COL_STAGE, *metrics])
    row_no = np.arange(1, len(df) + 1)  # 1-based data rows
    arms = _clean_keys(p, df[COL_ARM], COL_ARM, row_no)
    seeds = _seed_values(_clean_keys(p, df[COL_SEED], COL_SEED, row_no))
    stages = [str(v).strip() for v in df[COL_STAGE].tolist()]
    rounds = _round_values(p, df, row_no)
    values = {m: _numeric(p, df[m], m, row_no).copy() for m in metrics}
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
            f"{p}: duplicate {', '.join(pairs)} at {_rows(row_no, dup)} "
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
    raw = _seed_values(_clean_keys(p, df[COL_ROUND], COL_ROUND, row_no))
    bad = np.array([not isinstance(r, int) or r < 1 for r in raw], dtype=bool)
    if bad.any():
        raise TableError(
            f"{p}: column {COL_ROUND!r} holds a value that is not a round number (1, 2, ...) at "
            f"{_rows(row_no, bad)} (1-based, header excluded)."
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
    extra = _sorted_seeds(s for a, s in look_idx if a == lever and s not in known)
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


# ----------------------------------------------------------------------------
# Private helpers
# ----------------------------------------------------------------------------


def _read(p: Path) -> pd.DataFrame:
    kind = _SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise TableError(
            f"{p}: unknown file type {p.suffix!r}; use one of {sorted(_SUFFIXES)} "
            "(columns seed, arm, <metrics>)."
        )
    try:
        if kind == "csv":
            return pd.read_csv(p, dtype=str, skipinitialspace=True)
        return pd.read_parquet(p)
    except Exception as exc:  # any reader failure is reported the same way
        raise TableError(f"{p}: cannot read the {kind} file: {exc}") from None


def _check_columns(p: Path, df: pd.DataFrame, needed: Sequence[str]) -> None:
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        raise TableError(
            f"{p}: missing column(s) {missing}; the file has columns {list(df.columns)}."
        )


def _rows(row_no: npt.NDArray[np.int64], mask: npt.NDArray[np.bool_]) -> str:
    rows = [int(r) for r in row_no[mask]]
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_NAMED])
    more = f" and {len(rows) - _MAX_ROWS_NAMED} more" if len(rows) > _MAX_ROWS_NAMED else ""
    return f"data row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _clean_keys(p: Path, col: pd.Series, name: str, row_no: npt.NDArray[np.int64]) -> list[Any]:
    values = [v.strip() if isinstance(v, str) else v for v in col.tolist()]
    empty = np.array(
        [v is None or v == "" or (isinstance(v, float) and np.isnan(v)) for v in values]
    )
    if empty.any():
        raise TableError(
            f"{p}: empty {name!r} in {_rows(row_no, empty)} (1-based, header excluded)."
        )
    return values


def _seed_values(raw: list[Any]) -> list[Any]:
    """Integer seeds when every seed is an integer ("7", 7, 7.0), else strings."""
    try:
        as_float = [float(v) for v in raw]
    except (TypeError, ValueError):
        return [str(v) for v in raw]
    if all(np.isfinite(f) and f.is_integer() for f in as_float):
        return [int(f) for f in as_float]
    return [str(v) for v in raw]


def _numeric(
    p: Path, col: pd.Series, name: str, row_no: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    if pd.api.types.is_bool_dtype(col) or not (
        pd.api.types.is_numeric_dtype(col)
        or pd.api.types.is_object_dtype(col)
        or pd.api.types.is_string_dtype(col)
    ):
        raise TableError(f"{p}: column {name!r} has dtype {col.dtype}, not numbers.")
    stripped = col.map(lambda v: v.strip() if isinstance(v, str) else v)
    numbers = pd.to_numeric(stripped, errors="coerce")
    blank = stripped.isna() | (stripped == "")
    # Spelled-out NaN ("nan", "NaN") is a crashed value, not a typo.
    spelled_nan = stripped.map(lambda v: isinstance(v, str) and v.lower() == "nan")
    bad = np.array(numbers.isna() & ~blank & ~spelled_nan, dtype=bool)
    if bad.any():
        examples = ", ".join(
            f"row {int(r)}: {v!r}"
            for r, v in list(zip(row_no[bad], stripped[bad], strict=True))[:_MAX_ROWS_NAMED]
        )
        raise TableError(
            f"{p}: non-numeric values in column {name!r} at {_rows(row_no, bad)} "
            f"(1-based, header excluded): {examples}. Leave a crashed run empty or NaN."
        )
    return numbers.to_numpy(dtype=float)


def _check_duplicates(
    p: Path, seeds: list[Any], arms: list[Any], row_no: npt.NDArray[np.int64]
) -> None:
    keys = pd.Series(list(zip(seeds, arms, strict=True)))
    dup = keys.duplicated(keep=False).to_numpy()
    if dup.any():
        pairs = sorted({f"(seed={s}, arm={a})" for (s, a) in keys[dup]})
        raise TableError(
            f"{p}: duplicate (seed, arm) {', '.join(pairs)} at {_rows(row_no, dup)} "
            "(1-based, header excluded); keep one row per seed and arm."
        )


def _sorted_seeds(seeds: Iterable[Any]) -> list[Any]:
    unique = list(dict.fromkeys(seeds))
    return sorted(unique, key=lambda s: (isinstance(s, str), s))


def _check_pairing(
    p: Path,
    control: str,
    control_seeds: list[Any],
    levers: list[str],
    seeds: list[Any],
    arms: list[Any],
    row_no: npt.NDArray[np.int64],
) -> None:
    problems = []
    control_set = set(control_seeds)
    seed_arr = np.array(seeds, dtype=object)
    arm_arr = np.array(arms, dtype=object)
    for lever in levers:
        lever_set = set(seed_arr[arm_arr == lever])
        extra = (arm_arr == lever) & np.array([s not in control_set for s in seeds])
        if extra.any():
            problems.append(
                f"lever {lever!r} has seeds {_sorted_seeds(seed_arr[extra])} with no "
                f"{control!r} row ({_rows(row_no, extra)})"
            )
        lacking = (arm_arr == control) & np.array([s not in lever_set for s in seeds])
        if lacking.any():
            problems.append(
                f"control seeds {_sorted_seeds(seed_arr[lacking])} ({_rows(row_no, lacking)}) "
                f"have no {lever!r} row"
            )
    if problems:
        raise TableError(
            f"{p}: unpaired seeds: {'; '.join(problems)} (1-based, header excluded). "
            "Every lever must run on exactly the control's seeds; a failed run is a row "
            "with an empty or NaN metric."
        )
