"""Reading and checking a paired results table (private; see :mod:`tunelab.paired_table`).

:func:`read_table` reads a CSV or Parquet file; the checks raise a
:class:`~tunelab.errors.TableError` naming the file and the offending data
rows (1-based, header excluded) or columns: missing columns, empty keys,
non-numeric metric values, duplicate (seed, arm) rows, unpaired seeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from tunelab.errors import TableError

COL_SEED = "seed"
COL_ARM = "arm"
COL_ROUND = "round"
COL_STAGE = "stage"
COL_STATUS = "status"
STAGE_CONFIRM = "confirm"
STATUS_FINISHED = "finished"
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_MAX_ROWS_NAMED = 20


def read_table(p: Path) -> pd.DataFrame:
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


def check_columns(p: Path, df: pd.DataFrame, needed: Sequence[str]) -> None:
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        raise TableError(
            f"{p}: missing column(s) {missing}; the file has columns {list(df.columns)}."
        )


def name_rows(row_no: npt.NDArray[np.int64], mask: npt.NDArray[np.bool_]) -> str:
    rows = [int(r) for r in row_no[mask]]
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_NAMED])
    more = f" and {len(rows) - _MAX_ROWS_NAMED} more" if len(rows) > _MAX_ROWS_NAMED else ""
    return f"data row{'s' if len(rows) > 1 else ''} {shown}{more}"


def clean_keys(p: Path, col: pd.Series, name: str, row_no: npt.NDArray[np.int64]) -> list[Any]:
    values = [v.strip() if isinstance(v, str) else v for v in col.tolist()]
    empty = np.array(
        [v is None or v == "" or (isinstance(v, float) and np.isnan(v)) for v in values]
    )
    if empty.any():
        raise TableError(
            f"{p}: empty {name!r} in {name_rows(row_no, empty)} (1-based, header excluded)."
        )
    return values


def seed_values(raw: list[Any]) -> list[Any]:
    """Integer seeds when every seed is an integer ("7", 7, 7.0), else strings."""
    try:
        as_float = [float(v) for v in raw]
    except (TypeError, ValueError):
        return [str(v) for v in raw]
    if all(np.isfinite(f) and f.is_integer() for f in as_float):
        return [int(f) for f in as_float]
    return [str(v) for v in raw]


def numeric_column(
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
            f"{p}: non-numeric values in column {name!r} at {name_rows(row_no, bad)} "
            f"(1-based, header excluded): {examples}. Leave a crashed run empty or NaN."
        )
    return numbers.to_numpy(dtype=float)


def check_duplicates(
    p: Path, seeds: list[Any], arms: list[Any], row_no: npt.NDArray[np.int64]
) -> None:
    keys = pd.Series(list(zip(seeds, arms, strict=True)))
    dup = keys.duplicated(keep=False).to_numpy()
    if dup.any():
        pairs = sorted({f"(seed={s}, arm={a})" for (s, a) in keys[dup]})
        raise TableError(
            f"{p}: duplicate (seed, arm) {', '.join(pairs)} at {name_rows(row_no, dup)} "
            "(1-based, header excluded); keep one row per seed and arm."
        )


def sorted_seeds(seeds: Iterable[Any]) -> list[Any]:
    unique = list(dict.fromkeys(seeds))
    return sorted(unique, key=lambda s: (isinstance(s, str), s))


def check_pairing(
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
                f"lever {lever!r} has seeds {sorted_seeds(seed_arr[extra])} with no "
                f"{control!r} row ({name_rows(row_no, extra)})"
            )
        lacking = (arm_arr == control) & np.array([s not in lever_set for s in seeds])
        if lacking.any():
            problems.append(
                f"control seeds {sorted_seeds(seed_arr[lacking])} ({name_rows(row_no, lacking)}) "
                f"have no {lever!r} row"
            )
    if problems:
        raise TableError(
            f"{p}: unpaired seeds: {'; '.join(problems)} (1-based, header excluded). "
            "Every lever must run on exactly the control's seeds; a failed run is a row "
            "with an empty or NaN metric."
        )
