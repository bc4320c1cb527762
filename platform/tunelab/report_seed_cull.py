"""The seed-cull page of ``platform report`` (:func:`tunelab.report.render_report` dispatches here).

A seed cull trains N seeds to a milestone, keeps the top ``keep`` by the cull
metric there and selects one survivor at the budget
(:mod:`tunelab.kinds.seed_cull`). The page shows, from the experiment folder:

1. Header: the cull rule (metric and mode, milestone iteration of the budget,
   keep k of N, scheduler, tie break), the selection rule and the selected seed
   (or why none was selected).
2. Seed curves: one line per seed of the cull metric (and of the selection
   metric when it differs), the cull point marked (``line.mark``), each seed's
   value there (``circle.at-mark``); the selected seed thick and blue, kept
   seeds green, culled seeds dashed grey; a NaN / inf is a red cross at the top
   edge where the line breaks (``path.nonfinite``), never dropped.
3. The seed table: per seed its status (selected / kept / culled / error /
   running, and diverged where a value was non-finite), the cull metric at the
   cull point, its rank there, where it stopped and its final value.
4. The selected seed's artifacts from ``selected/`` (regenerated from the
   selected checkpoint): images inline, audio as an ``<audio>`` element (both
   as data URIs when small), small text files shown, every file listed with its
   size; and ``selected_model.json``'s selection, test scores and checkpoint.

Hooks for tests and scripts: a seed's curve is ``g.curve`` with ``data-seed``,
``data-trial`` and ``data-status`` (class ``selected``, ``kept``, ``culled``,
...; ``diverged`` added); a seed row is ``tr.seed-row`` with the same
attributes and ``data-at-cull`` (the value at the cull point, ``nan`` when
non-finite); the artifacts are ``section.artifacts`` with ``data-seed``, each
file ``li.artifact`` with ``data-name``.
"""

from __future__ import annotations

import base64
import json
import math
import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunelab.report import (
    COL_ITERATIONS,
    COL_RUN,
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
    value_at,
    value_text,
)

__all__ = ["EMBED_MAX_BYTES", "render_seed_cull"]

#: Images and audio up to this size are embedded in the page as data URIs; larger ones are listed.
EMBED_MAX_BYTES = 8 * 1024 * 1024
#: Text files (JSON, CSV, TXT) up to this size are shown in the page.
TEXT_MAX_BYTES = 16 * 1024
_TEXT_SUFFIXES = (".json", ".txt", ".csv", ".yaml", ".yml", ".md")

#: Line colour per seed status.
STATUS_COLOURS = {
    "selected": "#0b61a4",
    "kept": "#2e9d4f",
    "culled": "#8a8a8a",
    "error": "#c62828",
    "running": "#a06e00",
}


def render_seed_cull(exp_dir: Path) -> str:
    """The seed-cull page of the experiment in ``exp_dir``."""
    exp = load_experiment(exp_dir)
    seeds = _seeds(exp)
    milestone = _milestone(exp)
    body = "\n".join(
        [
            _header_html(exp, seeds, milestone),
            _curves_html(exp, seeds, milestone),
            _seed_table_html(exp, seeds, milestone),
            _artifacts_html(exp),
            health_section_html(exp.exp_dir, exp.results),
            trials_section_html(exp),
            footer_html(exp.exp_dir, exp.state),
        ]
    )
    return _page(f"{exp.name}: seed cull report", body)


# ----------------------------------------------------------------------------
# The seeds
# ----------------------------------------------------------------------------


def _selected(exp: Experiment) -> dict[str, Any] | None:
    """``{"seed", "trial_id", "run_id", "value", ...}`` of the selected seed, or None."""
    if exp.summary is not None:
        sel = exp.summary.get("selected")
        return dict(sel) if isinstance(sel, Mapping) else None
    manifest = _manifest(exp)
    if manifest:
        return {
            "seed": manifest.get("selected_seed"),
            "trial_id": manifest.get("trial_id"),
            "run_id": manifest.get("run_id"),
            "value": (manifest.get("selection") or {}).get("value"),
        }
    return None


def _manifest(exp: Experiment) -> dict[str, Any]:
    try:
        data = json.loads(exp.layout.selected_manifest.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _milestone(exp: Experiment) -> int | None:
    """The cull iteration: summary.json's ``cull.at``, else the cull state's, else the spec's."""
    cull = (exp.summary or {}).get("cull")
    if isinstance(cull, Mapping) and isinstance(cull.get("at"), (int, float)):
        return int(cull["at"])
    try:
        state = json.loads(exp.layout.cull_state_file.read_text())
        if isinstance(state.get("milestone"), (int, float)):
            return int(state["milestone"])
    except (OSError, ValueError, AttributeError):
        pass
    at, budget = (exp.spec.get("cull") or {}).get("at"), exp.spec.get("budget")
    if not isinstance(at, (int, float)) or not isinstance(budget, (int, float)):
        return None
    return max(1, math.ceil(at * budget)) if at < 1 else int(at)


def _nonfinite_record(exp: Experiment) -> dict[str, int]:
    """trial id -> first non-finite iteration, as the driver recorded it."""
    try:
        data = json.loads(exp.layout.nonfinite_file.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


class _Seed:
    """One seed's row: its trial, status, curves and the values the page shows."""

    def __init__(
        self, exp: Experiment, rec: Mapping[str, Any], selected: Mapping[str, Any] | None
    ) -> None:
        self.trial_id = str(rec.get(COL_TRIAL, ""))
        self.run_id = str(rec.get(COL_RUN, "") or "")
        self.seed = _plain(rec.get(COL_SEED, ""))
        self.iterations = _plain(rec.get(COL_ITERATIONS, ""))
        raw = str(rec.get(COL_STATUS, "") or "unknown")
        self.selected = selected is not None and str(selected.get("trial_id")) == self.trial_id
        self.status = "selected" if self.selected else ("kept" if raw == "finished" else raw)
        culled_at = rec.get("culled_at")
        self.culled_at = (
            int(culled_at)
            if isinstance(culled_at, (int, float)) and math.isfinite(culled_at)
            else None
        )
        self.points = exp.trial_series(self.trial_id)
        self.rec = rec
        self.nonfinite_at: int | None = None

    @property
    def label(self) -> str:
        extra = f", diverged at iteration {self.nonfinite_at}" if self.nonfinite_at else ""
        return f"seed {self.seed} ({self.status}{extra})"


def _seeds(exp: Experiment) -> list[_Seed]:
    selected = _selected(exp)
    recorded = _nonfinite_record(exp)
    out = []
    for rec in exp.results.to_dict("records") if not exp.results.empty else []:
        s = _Seed(exp, rec, selected)
        bad = [it for it, v in s.points if not math.isfinite(v)]
        s.nonfinite_at = recorded.get(s.trial_id, min(bad) if bad else None)
        out.append(s)
    return sorted(out, key=lambda s: (str(type(s.seed)), s.seed))


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------


def _header_html(exp: Experiment, seeds: list[_Seed], milestone: int | None) -> str:
    spec = exp.spec
    cull = spec.get("cull") or {}
    select = spec.get("select") or {}
    summary = exp.summary or {}
    kept = (summary.get("cull") or {}).get("kept")
    selected = _selected(exp)
    if selected:
        sel_html = (
            f'<span class="chip status selected">seed {_e(selected.get("seed"))}</span> '
            f"{_e(select.get('metric', exp.metric))} {_e(value_text(selected.get('value')))} "
            f'<span class="dim">(trial {_e(selected.get("trial_id"))}, run {_e(selected.get("run_id"))})</span>'
        )
    elif summary.get("no_selection"):
        sel_html = f"none: {_e(summary['no_selection'])}"
    else:
        sel_html = "none yet (the experiment is running or was interrupted)"
    n_seeds = len(spec.get("seeds") or []) or len(seeds)
    rule = [
        (
            "cull metric",
            f"<code>{_e(exp.metric)}</code> ({_e(exp.mode)}: "
            f"{'lower' if exp.mode == 'min' else 'higher'} is better)",
        ),
        (
            "cull point",
            f"iteration {_e(milestone)} of {_e(spec.get('budget', '?'))}"
            if milestone is not None
            else "–",
        ),
        (
            "keep",
            f"{_e(cull.get('keep', '?'))} of {n_seeds} seeds"
            + (f" (kept {_e(kept)})" if kept is not None else ""),
        ),
        ("scheduler", _e(cull.get("scheduler", "–"))),
        ("tie break", f"<code>{_e(cull['tie_break'])}</code>" if cull.get("tie_break") else "none"),
        (
            "selection",
            f"<code>{_e(select.get('metric', '–'))}</code> ({_e(select.get('mode', '–'))}) "
            "among the kept seeds",
        ),
        ("trials", exp.status_text()),
        ("selected", sel_html),
    ]
    return top_html(exp.name, meta_items(spec, exp.state), rule)


def _line(s: _Seed, points: list[tuple[int, float]], n_seeds: int) -> Line:
    colour = STATUS_COLOURS.get(s.status, "#5c6bc0")
    cls = s.status + (" diverged" if s.nonfinite_at is not None else "")
    return Line(
        points=points,
        colour=colour,
        label=s.label,
        cls=cls,
        attrs={"seed": s.seed, "trial": s.trial_id, "status": s.status},
        width=3.2 if s.selected else (1.8 if s.status == "kept" else 1.3),
        dashed=s.status == "culled",
        opacity=1.0 if s.selected else 0.85,
        tag=f"seed {s.seed}" if s.selected or n_seeds <= 12 else "",
    )


def _curves_html(exp: Experiment, seeds: list[_Seed], milestone: int | None) -> str:
    head = "<section><h2>Seed curves</h2>"
    select_metric = str((exp.spec.get("select") or {}).get("metric") or exp.metric)
    select_mode = str((exp.spec.get("select") or {}).get("mode") or exp.mode)
    panels: list[str] = []
    for metric, mode, what in (
        (exp.metric, exp.mode, "cull metric"),
        (select_metric, select_mode, "selection metric"),
    ):
        if panels and metric == exp.metric:
            break
        lines = [_line(s, exp.trial_series(s.trial_id, metric), len(seeds)) for s in seeds]
        lines = [ln for ln in lines if ln.points]
        if not lines:
            continue
        title = f"{metric} ({'lower' if mode == 'min' else 'higher'} is better) · {what}"
        panels.append(
            lines_svg(
                lines,
                title,
                cls="curves seed-curves",
                label=metric,
                mark_at=milestone,
                mark_label=f"cull @ {milestone}" if milestone is not None else "",
            )
        )
    if not panels:
        return (
            head
            + '<p class="note">No per-iteration results (trial_*/result.json) found.</p></section>'
        )
    legend = "".join(
        f'<span class="legend"><span class="swatch" style="background:{c}"></span>{_e(k)}</span>'
        for k, c in STATUS_COLOURS.items()
        if any(s.status == k for s in seeds)
    )
    note = (
        '<p class="note">One line per seed. Dashed vertical line: the cull point; open circles: '
        "each seed's value there; dashed lines: culled seeds; thick blue line: the selected seed. "
        "A red × at the top edge marks where a seed reported NaN / inf (its line breaks there).</p>"
    )
    return f'{head}{note}<p>{legend}</p><div class="panels">{"".join(panels)}</div></section>'


def _seed_table_html(exp: Experiment, seeds: list[_Seed], milestone: int | None) -> str:
    head = "<section><h2>Seeds</h2>"
    if not seeds:
        return head + '<p class="note">No trial has reported yet.</p></section>'
    select_metric = str((exp.spec.get("select") or {}).get("metric") or exp.metric)
    at_cull = {
        s.trial_id: value_at(s.points, milestone) if milestone is not None else None for s in seeds
    }
    finite = {t: v for t, v in at_cull.items() if v is not None and math.isfinite(v)}
    order = sorted(finite, key=lambda t: finite[t], reverse=exp.mode != "min")
    rank = {t: i + 1 for i, t in enumerate(order)}
    rows = []
    for s in seeds:
        v = at_cull[s.trial_id]
        stopped = s.culled_at if s.culled_at is not None else s.iterations
        final = s.rec.get(select_metric)
        if (final is None or (isinstance(final, float) and math.isnan(final))) and s.points:
            final = s.points[-1][1] if select_metric == exp.metric else final
        status_html = f'<span class="chip status {_e(s.status)}">{_e(s.status)}</span>'
        if s.nonfinite_at is not None:
            status_html += (
                f' <span class="chip status diverged" title="first non-finite {_e(exp.metric)} at '
                f'iteration {s.nonfinite_at}">diverged @ {s.nonfinite_at}</span>'
            )
        attrs = (
            f'class="seed-row status-{_e(s.status)}{" selected" if s.selected else ""}" '
            f'data-seed="{_e(s.seed)}" data-trial="{_e(s.trial_id)}" data-status="{_e(s.status)}" '
            f'data-at-cull="{"" if v is None else repr(v)}"'
        )
        cells = [
            f"<b>{_e(s.seed)}</b>",
            status_html,
            value_text(v) if v is not None else '<span class="dim">not reached</span>',
            _e(rank.get(s.trial_id, "–")),
            _e(stopped),
            value_text(final),
            f"<code>{_e(s.trial_id)}</code>",
            f"<code>{_e(s.run_id[:12])}</code>",
        ]
        rows.append((attrs, cells))
    cols = [
        "seed",
        "status",
        f"{exp.metric} @ cull ({milestone})",
        "rank @ cull",
        "stopped at",
        f"final {select_metric}",
        "trial",
        "run",
    ]
    note = (
        '<p class="note">Rank at the cull point by the cull metric '
        f"({'lowest' if exp.mode == 'min' else 'highest'} first; a NaN has no rank). "
        "The selected seed is the best kept seed by the selection metric at the budget.</p>"
    )
    return head + note + table_html(cols, rows, "seeds") + "</section>"


def _artifacts_html(exp: Experiment) -> str:
    head = "<h2>Selected seed: artifacts</h2>"
    selected = _selected(exp)
    folder = exp.layout.selected_dir
    if selected is None:
        return (
            f'<section class="artifacts" data-seed="">{head}<p class="note">No seed selected, '
            "so no artifacts were regenerated.</p></section>"
        )
    manifest = _manifest(exp)
    facts = [
        ("seed", _e(selected.get("seed"))),
        ("trial", f"<code>{_e(selected.get('trial_id'))}</code>"),
        ("run", f"<code>{_e(selected.get('run_id'))}</code>"),
        (
            str(
                (manifest.get("selection") or {}).get("metric") or selected.get("metric") or "value"
            ),
            _e(value_text(selected.get("value"))),
        ),
    ]
    for k, v in (manifest.get("test") or {}).items():
        facts.append((str(k), _e(value_text(v))))
    if manifest.get("checkpoint") or selected.get("checkpoint"):
        facts.append(
            (
                "checkpoint",
                f"<code>{_e(manifest.get('checkpoint') or selected.get('checkpoint'))}</code>",
            )
        )
    facts_html = (
        '<dl class="rule">'
        + "".join(f"<div><dt>{_e(k)}</dt><dd>{v}</dd></div>" for k, v in facts)
        + "</dl>"
    )
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    if not files:
        shown = '<p class="note">No files in <code>selected/</code>.</p>'
    else:
        shown = _files_html(folder, files)
    return (
        f'<section class="artifacts" data-seed="{_e(selected.get("seed"))}">{head}'
        f'<p class="note">Regenerated from the selected checkpoint into <code>{_e(folder)}</code>.</p>'
        f"{facts_html}{shown}</section>"
    )


def _files_html(folder: Path, files: list[Path]) -> str:
    media, items = [], []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        mime = mimetypes.guess_type(path.name)[0] or ""
        if path.suffix.lower() == ".wav":
            mime = "audio/wav"
        note = ""
        if mime.startswith(("image/", "audio/")):
            if size <= EMBED_MAX_BYTES:
                uri = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
                if mime.startswith("image/"):
                    media.append(
                        f'<figure class="figure"><img class="artifact-image" data-name="{_e(rel)}" '
                        f'src="{uri}" alt="{_e(rel)}"><figcaption>{_e(rel)}</figcaption></figure>'
                    )
                else:
                    media.append(
                        f'<figure class="figure"><audio class="artifact-audio" data-name="{_e(rel)}" '
                        f'controls preload="metadata" src="{uri}"></audio>'
                        f"<figcaption>{_e(rel)}</figcaption></figure>"
                    )
                note = " (shown above)"
            else:
                note = f" (too large to embed, over {EMBED_MAX_BYTES // 2**20} MiB)"
        body = ""
        if path.suffix.lower() in _TEXT_SUFFIXES and size <= TEXT_MAX_BYTES:
            body = f"<pre>{_e(path.read_text(errors='replace'))}</pre>"
        items.append(
            f'<li class="artifact" data-name="{_e(rel)}"><code>{_e(rel)}</code> '
            f'<span class="dim">{_size(size)}{note}</span>{body}</li>'
        )
    return (
        "".join(media)
        + f'<h3 class="round">Files ({len(files)})</h3><ul class="files">{"".join(items)}</ul>'
    )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"
