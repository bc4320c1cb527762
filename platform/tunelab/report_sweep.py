"""The sweep page of ``platform report`` (:func:`tunelab.report.render_report` dispatches here).

A sweep runs sampled family configs (each on every seed) and reports the best
trial by the spec's metric (:mod:`tunelab.kinds.sweep`). The page shows:

1. Header: metric and mode, the search space, samples, search algorithm,
   scheduler, trial counts and the best trial with its config.
2. The best configs: the top :data:`TOP_N` trials by the final metric (a
   failed trial or a non-finite value ranks last and reads ``NaN``), with the
   searched config keys, seed, status and iterations; the best row marked.
3. Their curves: one coloured line per top trial (its swatch in the table),
   the other trials thin and grey; a NaN / inf is a red cross at the top edge
   where the line breaks, never dropped.
4. Every trial, folded.

Hooks for tests and scripts: a best-config row is ``tr.config-row`` with
``data-trial``, ``data-rank`` and ``data-value`` (class ``best`` on the best);
a curve is ``g.curve`` with ``data-trial`` and ``data-rank`` (class ``top``,
``best`` or ``other``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from tunelab.report import (
    _ARM_PALETTE,
    COL_ITERATIONS,
    COL_SEED,
    COL_STATUS,
    COL_TRIAL,
    Experiment,
    Line,
    _e,
    _page,
    _plain,
    footer_html,
    health_section_html,
    lines_svg,
    load_experiment,
    meta_items,
    table_html,
    top_html,
    trials_section_html,
    value_text,
)

__all__ = ["TOP_N", "render_sweep"]

#: How many of the best trials the table and the coloured curves show.
TOP_N = 10
_OTHER_COLOUR = "#b8b8b8"


def render_sweep(exp_dir: Path) -> str:
    """The sweep page of the experiment in ``exp_dir``."""
    exp = load_experiment(exp_dir)
    ranked = _ranked(exp)
    body = "\n".join(
        [
            _header_html(exp),
            _best_html(exp, ranked),
            _curves_html(exp, ranked),
            health_section_html(exp.exp_dir, exp.results),
            trials_section_html(exp),
            footer_html(exp.exp_dir, exp.state),
        ]
    )
    return _page(f"{exp.name}: sweep report", body)


def _best_id(exp: Experiment) -> str | None:
    best = (exp.summary or {}).get("best")
    return str(best.get("trial_id")) if isinstance(best, Mapping) else None


def _config_columns(exp: Experiment) -> list[str]:
    """The searched keys first (``config.<key>``), then any other config column that varies."""
    df = exp.results
    searched = [f"config.{k}" for k in exp.spec.get("search") or {} if f"config.{k}" in df]
    varying = [
        c
        for c in df.columns
        if str(c).startswith("config.")
        and c not in searched
        and df[c].astype(str).nunique(dropna=False) > 1
    ]
    return [*searched, *varying]


def _final(exp: Experiment, rec: Mapping[str, Any]) -> float:
    """The trial's final metric: the table's value, else its curve's last (NaN kept)."""
    v = pd.to_numeric(pd.Series([rec.get(exp.metric)]), errors="coerce").iloc[0]
    if pd.isna(v):
        pts = exp.trial_series(str(rec.get(COL_TRIAL, "")))
        return pts[-1][1] if pts else math.nan
    return float(v)


def _ranked(exp: Experiment) -> list[dict[str, Any]]:
    """Every trial as a record with ``_value``, best first; failed or non-finite ones last."""
    if exp.results.empty:
        return []
    recs = []
    for rec in exp.results.to_dict("records"):
        rec = dict(rec)
        rec["_value"] = _final(exp, rec)
        recs.append(rec)
    sign = 1.0 if exp.mode == "min" else -1.0

    def key(r: dict[str, Any]) -> tuple[int, float]:
        ok = math.isfinite(r["_value"]) and r.get(COL_STATUS) != "error"
        return (0, sign * r["_value"]) if ok else (1, 0.0)

    ranked = sorted(recs, key=key)
    best = _best_id(exp)
    if best is not None:  # the runner's own choice first, should the table tie or differ
        ranked.sort(key=lambda r: str(r.get(COL_TRIAL)) != best)
    return ranked


def _config_text(config: Any) -> str:
    """A config or a search domain as compact JSON (a domain's unset fields left out)."""
    if isinstance(config, Mapping):
        return json.dumps({k: v for k, v in config.items() if v is not None}, sort_keys=True)
    return str(config)


def _header_html(exp: Experiment) -> str:
    spec = exp.spec
    search = spec.get("search") or {}
    space = "; ".join(f"{k}: {_config_text(d)}" for k, d in search.items())
    sched = spec.get("scheduler") or {}
    best = (exp.summary or {}).get("best")
    if isinstance(best, Mapping):
        best_html = (
            f'<span class="chip status selected">trial {_e(best.get("trial_id"))}</span> '
            f"{_e(exp.metric)} {_e(value_text(best.get('value')))}, seed {_e(best.get('seed'))} "
            f"<code>{_e(_config_text(best.get('config')))}</code>"
        )
    elif exp.summary is not None:
        best_html = "none (no trial finished with a finite value)"
    else:
        best_html = "none yet (the experiment is running or was interrupted)"
    rule = [
        (
            "metric",
            f"<code>{_e(exp.metric)}</code> ({_e(exp.mode)}: "
            f"{'lower' if exp.mode == 'min' else 'higher'} is better)",
        ),
        ("search", f"<code>{_e(space)}</code>" if space else "–"),
        ("samples", _e(spec.get("num_samples", 1))),
        ("search algorithm", _e(spec.get("search_alg", "random"))),
        ("scheduler", _e(sched.get("type", "fifo")) if isinstance(sched, Mapping) else _e(sched)),
        ("seeds", _e(", ".join(map(str, spec.get("seeds") or [])) or "–")),
        ("trials", exp.status_text()),
        ("best", best_html),
    ]
    return top_html(exp.name, meta_items(spec, exp.state), rule)


def _colour(rank: int) -> str:
    return _ARM_PALETTE[(rank - 1) % len(_ARM_PALETTE)]


def _best_html(exp: Experiment, ranked: list[dict[str, Any]]) -> str:
    head = f"<section><h2>Best configs (top {min(TOP_N, len(ranked))} of {len(ranked)})</h2>"
    if not ranked:
        return head + '<p class="note">No trial has reported yet.</p></section>'
    best = _best_id(exp)
    cfg_cols = _config_columns(exp)
    rows = []
    for rank, r in enumerate(ranked[:TOP_N], start=1):
        tid = str(r.get(COL_TRIAL))
        is_best = tid == best
        v = r["_value"]
        status = str(r.get(COL_STATUS, ""))
        chip = f'<span class="chip status {_e(status)}">{_e(status)}</span>'
        if not math.isfinite(v):
            chip += ' <span class="chip status diverged">non-finite</span>'
        swatch = f'<span class="swatch" style="background:{_colour(rank)}"></span>'
        attrs = (
            f'class="config-row{" best" if is_best else ""}" data-trial="{_e(tid)}" '
            f'data-rank="{rank}" data-value="{v!r}"'
        )
        cells = [
            f"{swatch}<b>{rank}</b>" + (' <span class="badge">best</span>' if is_best else ""),
            value_text(v),
            *(_e(_plain(r.get(c, ""))) for c in cfg_cols),
            _e(_plain(r.get(COL_SEED, ""))),
            chip,
            _e(_plain(r.get(COL_ITERATIONS, ""))),
            f"<code>{_e(tid)}</code>",
        ]
        rows.append((attrs, cells))
    cols = [
        "rank",
        exp.metric,
        *(c.removeprefix("config.") for c in cfg_cols),
        "seed",
        "status",
        "iterations",
        "trial",
    ]
    note = (
        f'<p class="note">Ranked by the final <code>{_e(exp.metric)}</code> '
        f"({'lowest' if exp.mode == 'min' else 'highest'} first); a failed trial or a non-finite "
        "value ranks last. Columns after the metric: the searched config keys.</p>"
    )
    return head + note + table_html(cols, rows, "best-configs") + "</section>"


def _curves_html(exp: Experiment, ranked: list[dict[str, Any]]) -> str:
    head = "<section><h2>Curves of the best configs</h2>"
    best = _best_id(exp)
    lines = []
    for rank, r in enumerate(ranked, start=1):
        tid = str(r.get(COL_TRIAL))
        pts = exp.trial_series(tid)
        if not pts:
            continue
        top, is_best = rank <= TOP_N, tid == best
        cls = "best top" if is_best else ("top" if top else "other")
        lines.append(
            Line(
                points=pts,
                colour=_colour(rank) if top else _OTHER_COLOUR,
                label=f"#{rank} trial {tid} (seed {_plain(r.get(COL_SEED, ''))}): "
                f"{value_text(r['_value'])}",
                cls=cls,
                attrs={"trial": tid, "rank": rank},
                width=3.0 if is_best else (1.6 if top else 1.0),
                opacity=1.0 if top else 0.6,
                tag=f"#{rank}" if top else "",
            )
        )
    if not lines:
        return (
            head
            + '<p class="note">No per-iteration results (trial_*/result.json) found.</p></section>'
        )
    title = f"{exp.metric} ({'lower' if exp.mode == 'min' else 'higher'} is better)"
    note = (
        '<p class="note">Coloured: the best configs (colours as in the table, the best thick); '
        "grey: the other trials. A red × at the top edge marks a NaN / inf.</p>"
    )
    svg = lines_svg(lines, title, cls="curves sweep-curves", label=exp.metric)
    return f'{head}{note}<div class="panels">{svg}</div></section>'
