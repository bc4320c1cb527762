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

The reading and checking of a table's columns is :mod:`tunelab._table_io`,
the analysis of a lever A/B table :mod:`tunelab._lever_ab_table` (both
private).

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from tunelab._lever_ab_table import is_lever_ab_table, lever_ab_verdicts
from tunelab._table_io import (
    COL_ARM,
    COL_ROUND,
    COL_SEED,
    COL_STAGE,
    COL_STATUS,
    check_columns,
    check_duplicates,
    check_pairing,
    clean_keys,
    numeric_column,
    read_table,
    seed_values,
    sorted_seeds,
)
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

_RUN_STATE_FILE = "tunelab.json"  # tunelab.layout.RUN_STATE_FILE


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
    return _paired(p, read_table(p), metric=metric, control=control, guardrails=guardrails)


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
    df = read_table(p)
    if is_lever_ab_table(df):
        return lever_ab_verdicts(
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


def _paired(
    p: Path, df: pd.DataFrame, *, metric: str, control: str, guardrails: Sequence[str]
) -> PairedTable:
    metrics = list(dict.fromkeys([metric, *guardrails]))
    check_columns(p, df, [COL_SEED, COL_ARM, *metrics])
    if df.empty:
        raise TableError(f"{p}: the table has no data rows.")
    row_no = np.arange(1, len(df) + 1)  # 1-based data rows
    arms = clean_keys(p, df[COL_ARM], COL_ARM, row_no)
    seeds = seed_values(clean_keys(p, df[COL_SEED], COL_SEED, row_no))
    values = {m: numeric_column(p, df[m], m, row_no) for m in metrics}
    check_duplicates(p, seeds, arms, row_no)

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
    control_seeds = sorted_seeds(s for s, a in zip(seeds, arms, strict=True) if a == control)
    check_pairing(p, control, control_seeds, levers, seeds, arms, row_no)

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
