"""Paired results tables: load, validate, and turn into verdicts.

A results table has one row per (seed, arm): columns ``seed``, ``arm`` and
one column per metric (the primary metric and any guardrails). The control
arm is named ``control`` unless told otherwise; every other arm is a lever.
This is what ``platform verdict RESULTS.csv --metric M ...`` reads, so a
malformed table is a :class:`TableError` whose message names the file and the
offending data rows (1-based, header excluded) or columns. A missing, NaN or
infinite metric value is not an error: that pair becomes ``crashed``
(shared/VERDICTS.md, "Labels").

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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from tunelab.errors import TableError
from tunelab.verdicts import (
    MODES,
    Decision,
    Guardrail,
    adjust_family,
    analyze_lever,
    verdict_to_dict,
)

__all__ = [
    "COL_ARM",
    "COL_SEED",
    "PairedArm",
    "PairedTable",
    "TableError",
    "load_paired_table",
    "parse_guardrail",
    "verdict_table",
]

COL_SEED = "seed"
COL_ARM = "arm"
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
    df = _read(p)
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
) -> list[dict[str, Any]]:
    """Verdicts of every lever in a results table, corrected as one family.

    Args:
        path: Results table (see :func:`load_paired_table`).
        metric: Primary metric column.
        mode: ``"max"`` or ``"min"`` for the primary metric.
        min_effect: Keep bar ``delta`` in the metric's raw units.
        alpha: Two-sided type I error rate.
        guardrails: ``"name:mode:margin"`` strings.
        control: Control arm name.
        looks: Planned pairs per look (group-sequential), or ``None``.
        correction: ``"holm"``, ``"bh"`` or ``"none"`` across the levers.

    Returns:
        One :func:`~tunelab.verdicts.verdict_to_dict` dict per lever.
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
    table = load_paired_table(
        path, metric=metric, control=control, guardrails=[g.name for g in parsed]
    )
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
