"""Self-contained HTML report of an experiment (``platform report NAME``), one page per kind.

:func:`render_report` dispatches on the experiment's kind (``summary.json``'s
``kind``, else the spec's): the lever A/B page is rendered here, the seed-cull
page by :mod:`tunelab.report_seed_cull` and the sweep page by
:mod:`tunelab.report_sweep`. The HTML skeleton and CSS (:func:`_page`), the
header (:func:`top_html`), the footer, tables, and the inline SVG curve panels
(:func:`lines_svg`: one line per trial, a marked iteration, NaN / inf marked
where a line breaks, never dropped) live here and are shared by every kind.
Per-iteration curves come from Tune's ``result.json``, completed from the
trial's ``progress.csv`` where Tune rewrote ``result.json`` at a restore.

The rest of this docstring describes the lever A/B page.

One HTML file that opens offline and can be attached or archived as is: inline
CSS and inline SVG charts drawn here, no script, font, stylesheet or image
fetched from anywhere. The layout follows the approved ``flow_report.py`` of the
flow-policy research (shared/seeds/action_flow_matching_pr.txt: "run cards with
verdict chips, key-metric table with best-per-column highlighting"):

1. Header: spec name, primary metric and mode, the pre-registered decision rule
   (keep bar ``min_effect``, ``alpha``, looks, correction), guardrails, seeds,
   rounds, trial counts and a summary of the verdicts.
2. One card per lever and round: verdict chip, effect, CI, p, n_pairs, dz, rho,
   seed wins, guardrail chips, sensitivity figures, crashed seeds, the confirmation
   seeds' result (``p.confirm`` with ``data-confirmed`` yes / no / pending / none;
   confirmation rows, ``stage == "confirm"``, are not pairs of the verdict), and a strip
   plot of the per-seed paired differences (signed so that positive is better,
   shared/VERDICTS.md "Why paired") with the CI, the zero line and the keep bar.
3. The key-metric table: arms x metrics, mean ± sd over the finished seeds, the
   best arm of each round marked per column; metrics only (no ``config.*`` values, no
   ``sys/*`` timings).
4. Training curves of the primary metric and the guardrails, one line per arm
   (mean over seeds) over thin per-seed lines.
5. Every trial with its status: crashed trials stay visible.

Input, an experiment folder written by the lever A/B runner:

- ``tunelab.json``: ``{"spec": {...}, "experiment_dir", "tracking_uri", ...}``.
- ``results.csv`` (or ``results.parquet``): one row per trial with ``trial_id``,
  ``run_id``, ``seed``, ``arm`` (``control`` or the lever), ``round``,
  ``status`` (``finished`` | ``error`` | ``culled``), ``iterations`` and the final
  metric columns (``val/spike_l1``, ``train/loss``, ...).
- ``verdicts.json``: a list of :func:`tunelab.verdicts.verdict_to_dict` dicts,
  each with a ``round`` key.
- ``tune/trial_<trial_id>/result.json`` (or a Tune-named trial folder under
  ``tune/`` whose rows carry that ``trial_id``): Tune's JSON-lines results, one
  object per iteration with ``iteration`` and the metrics.

Every path comes from :class:`tunelab.layout.ExperimentLayout`, and
``result.json`` is read by :func:`tunelab.layout.read_result_lines` (a line cut
short by a crash is skipped).

Any of the last three may be missing (an experiment still running): the report
says so where the section would be.

Hooks for tests and scripts: a lever card is ``section.lever-card`` with
``data-lever``, ``data-round`` and ``data-verdict``; its chip has the classes
``chip verdict-<label>``; a paired-difference dot is ``circle.pair`` with
``data-seed`` and ``data-diff``; a metric cell is ``td.metric`` with
``data-arm``, ``data-round``, ``data-metric`` (``best`` when marked); a mean
curve is ``polyline.mean`` with ``data-arm``, ``data-round``, ``data-metric``.

Example:

    .. code::

        from pathlib import Path
        from tunelab.report import find_experiment, write_report

        exp = find_experiment("flow-levers-r1", Path("tunelab_results"))
        write_report(exp, exp / "report.html")
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tunelab.checkpoint import read_json
from tunelab.errors import ReportError
from tunelab.layout import RUN_STATE_FILE, ExperimentLayout, find_experiments, read_result_lines
from tunelab.names import ARM_CONTROL, ITERATION, TrialStatus, is_number
from tunelab.outcome import outcomes_from_folder

__all__ = [
    "REPORT_FILE",
    "VERDICT_COLOURS",
    "ReportError",
    "experiment_kind",
    "find_experiment",
    "render_report",
    "write_report",
]

#: Default file name of the report inside an experiment folder.
REPORT_FILE = "report.html"

#: The experiment kinds with a report page (the spec's ``kind``).
KIND_LEVER_AB = "lever_ab"
KIND_SEED_CULL = "seed_cull"
KIND_SWEEP = "sweep"

COL_TRIAL = "trial_id"
COL_RUN = "run_id"
COL_SEED = "seed"
COL_ARM = "arm"
COL_ROUND = "round"
COL_STATUS = "status"
COL_ITERATIONS = "iterations"
_TEXT_COLS = (COL_TRIAL, COL_RUN, COL_ARM, COL_STATUS)
COL_STAGE = "stage"  # a lever A/B trial's stage: look1, look2, ... or confirm
COL_CULLED_AT = "culled_at"
#: A diverged trial's one-line health diagnosis (:class:`tunelab.outcome.TrialOutcome`).
COL_DIAGNOSIS = "diagnosis"
STAGE_CONFIRM = "confirm"
_META_COLS = frozenset(
    {
        COL_TRIAL,
        COL_RUN,
        COL_SEED,
        COL_ARM,
        COL_ROUND,
        COL_DIAGNOSIS,
        COL_STATUS,
        COL_ITERATIONS,
        COL_STAGE,
        COL_CULLED_AT,
    }
)
#: Column prefixes that are not metrics (the trial's config values, system timings).
_NOT_METRIC_PREFIXES = ("config.", "sys/")
#: Columns not named by the spec: lower is better when the name ends with one of these.
_LOWER_BETTER_SUFFIXES = ("l1", "loss", "mse", "err")

#: Chip colour per verdict label (shared/VERDICTS.md, "Labels"); a meaningful win is darker.
VERDICT_COLOURS = {
    "win": "#2e9d4f",
    "meaningful": "#11562a",
    "negative": "#c62828",
    "null": "#8a8a8a",
    "inconclusive": "#e8a000",
    "crashed": "#111111",
}
_UNKNOWN_COLOUR = "#5c6bc0"
_GUARD_COLOURS = {"pass": "#1e7a3c", "fail": "#c62828", "inconclusive": "#a06e00"}
_CONTROL_COLOUR = "#3a3a3a"
_ARM_PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#7f6d00")
_GOOD, _BAD = "#2e7d32", "#c62828"
_MAX_POINTS = 400  # per drawn curve; keeps a report of long runs small


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def find_experiment(name_or_dir: str, storage: Path) -> Path:
    """The experiment folder named by ``name_or_dir``.

    Args:
        name_or_dir: An experiment folder (holding ``tunelab.json``) or a spec
            name; for a name, the newest folder under ``storage`` whose
            ``tunelab.json`` has ``spec.name == name`` (newest by its
            ``created`` stamp, then by modification time).
        storage: The folder experiments are written under (``tunelab_results``).

    Raises:
        ReportError: Neither an experiment folder nor a spec name found under
            ``storage``; the message lists the spec names that are there.
    """
    as_dir = ExperimentLayout(Path(name_or_dir))
    if as_dir.is_experiment():
        return as_dir.root.resolve()
    found: list[tuple[str, int, Path]] = []
    names: set[str] = set()
    # find_experiments: oldest first by tunelab.json's mtime, so the index breaks ties.
    for age, layout in enumerate(find_experiments(Path(storage))):
        try:
            state = json.loads(layout.state_file.read_text())
            name = state["spec"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a folder being written, or not tunelab's
        names.add(str(name))
        if name == name_or_dir:
            found.append((str(state.get("created", "")), age, layout.root))
    if not found:
        known = ", ".join(sorted(names)) or "none"
        raise ReportError(
            f"{name_or_dir!r} is neither an experiment folder (with {RUN_STATE_FILE}) nor the spec "
            f"name of an experiment under {Path(storage).resolve()} (spec names there: {known}). "
            "Pass the folder, or --storage where the experiment was run."
        )
    return max(found, key=lambda f: (f[0], f[1]))[2].resolve()


def experiment_kind(experiment_dir: Path | str) -> str:
    """The kind of the experiment in ``experiment_dir``: ``summary.json``'s ``kind``, else the
    spec's (``tunelab.json``), else ``lever_ab``.

    Raises:
        ReportError: No ``tunelab.json`` in the folder.
    """
    layout = ExperimentLayout(Path(experiment_dir))
    state = _read_state(layout)
    summary = read_summary(layout)
    kind = (summary or {}).get("kind") or (state.get("spec") or {}).get("kind")
    return str(kind or KIND_LEVER_AB)


def render_report(experiment_dir: Path | str) -> str:
    """The HTML report of the experiment in ``experiment_dir``, as a string.

    Dispatches on the experiment's kind (:func:`experiment_kind`): a lever A/B
    page (this module), a seed-cull page (:mod:`tunelab.report_seed_cull`) or a
    sweep page (:mod:`tunelab.report_sweep`).

    Raises:
        ReportError: No ``tunelab.json`` in the folder, an unreadable
            ``verdicts.json`` / results table, or a kind without a report.
    """
    kind = experiment_kind(experiment_dir)
    if kind == KIND_LEVER_AB:
        return _render_lever(Path(experiment_dir))
    if kind == KIND_SEED_CULL:
        from tunelab.report_seed_cull import render_seed_cull

        return render_seed_cull(Path(experiment_dir))
    if kind == KIND_SWEEP:
        from tunelab.report_sweep import render_sweep

        return render_sweep(Path(experiment_dir))
    raise ReportError(
        f"{experiment_dir}: no report for experiment kind {kind!r} "
        f"(reports exist for {KIND_LEVER_AB}, {KIND_SEED_CULL} and {KIND_SWEEP})."
    )


def _render_lever(exp_dir: Path) -> str:
    """The lever A/B page."""
    data = _load(exp_dir)
    name = str(data.spec.get("name", data.exp_dir.name))
    body = "\n".join(
        [
            _header_html(data),
            _cards_html(data),
            _metric_table_html(data),
            _curves_html(data),
            health_section_html(data.exp_dir, data.results),
            _trials_html(data),
            _footer_html(data),
        ]
    )
    return _page(f"{name}: lever A/B report", body)


def write_report(experiment_dir: Path, out: Path) -> Path:
    """Write the HTML report of ``experiment_dir`` to ``out`` (atomically); returns ``out``.

    Raises:
        ReportError: See :func:`render_report`.
    """
    text = render_report(experiment_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------
# Loading the experiment folder
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Data:
    """Everything the report shows, read once from the experiment folder."""

    exp_dir: Path
    state: dict[str, Any]  # tunelab.json
    spec: dict[str, Any]
    results: pd.DataFrame  # one row per trial; empty when there is no table yet
    verdicts: list[dict[str, Any]] | None  # None: no verdicts.json yet
    curves: dict[str, list[dict[str, Any]]]  # trial_id -> result.json rows
    metric: str
    mode: str
    guardrails: list[dict[str, Any]]
    colours: dict[str, str]  # arm -> line colour

    @property
    def rounds(self) -> list[int]:
        found = set(self.results[COL_ROUND].tolist()) if not self.results.empty else set()
        found |= {int(v.get(COL_ROUND, 1)) for v in self.verdicts or []}
        return sorted(found)


def _read_state(layout: ExperimentLayout) -> dict[str, Any]:
    """``tunelab.json`` as a dict."""
    if not layout.is_experiment():
        raise ReportError(
            f"{layout.root} is not a tunelab experiment folder (no {RUN_STATE_FILE})."
        )
    try:
        state = json.loads(layout.state_file.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{layout.state_file}: unreadable ({err})") from err
    if not isinstance(state, dict):
        raise ReportError(f"{layout.state_file}: expected a JSON object.")
    return state


def read_summary(layout: ExperimentLayout) -> dict[str, Any] | None:
    """``summary.json`` (written when the experiment is finalized), or None."""
    try:
        summary = json.loads(layout.summary_file.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _load(exp_dir: Path) -> _Data:
    layout = ExperimentLayout(exp_dir)
    state = _read_state(layout)
    spec = dict(state.get("spec") or {})
    metric_spec = spec.get("metric") or {}
    results = _read_results(layout)
    verdicts = _read_verdicts(layout.verdicts_file)
    trial_ids = [t for t in results[COL_TRIAL].tolist() if t] if not results.empty else []
    return _Data(
        exp_dir=exp_dir,
        state=state,
        spec=spec,
        results=results,
        verdicts=verdicts,
        curves=_read_curves(layout, trial_ids),
        metric=str(metric_spec.get("name", "")),
        mode=str(metric_spec.get("mode", "max")),
        guardrails=[dict(g) for g in spec.get("guardrails") or []],
        colours=_arm_colours(spec, results, verdicts),
    )


def _read_results(layout: ExperimentLayout) -> pd.DataFrame:
    exp_dir, csv, parquet = layout.root, layout.results_csv, layout.results_parquet
    try:
        if csv.is_file():
            # Text columns stay text ("00001" is a trial id, "NA" could be a lever name).
            df = pd.read_csv(
                csv,
                dtype={c: str for c in _TEXT_COLS},
                keep_default_na=False,
                na_values=["", "nan", "NaN", "null", "None"],
            )
        elif parquet.is_file():
            df = pd.read_parquet(parquet)
        else:
            return pd.DataFrame(columns=[*_TEXT_COLS, COL_SEED, COL_ROUND, COL_ITERATIONS])
    except (OSError, ValueError) as err:
        raise ReportError(f"{exp_dir}: cannot read the results table: {err}") from err
    for col in _TEXT_COLS:
        df[col] = df[col].fillna("").astype(str) if col in df else ""
    if COL_SEED not in df:
        raise ReportError(f"{exp_dir}: the results table has no {COL_SEED!r} column.")
    rounds = pd.to_numeric(df[COL_ROUND], errors="coerce") if COL_ROUND in df else None
    df[COL_ROUND] = 1 if rounds is None else rounds.fillna(1).astype(int)
    return df


def _read_verdicts(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    try:
        verdicts = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read the verdicts: {err}") from err
    if not isinstance(verdicts, list) or not all(isinstance(v, dict) for v in verdicts):
        raise ReportError(f"{path}: expected a JSON list of verdict objects.")
    return verdicts


def _read_curves(
    layout: ExperimentLayout, trial_ids: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    curves = {}
    read: set[Path] = set()
    for tid in trial_ids:
        path = layout.trial_result_file(tid)
        if path.is_file():
            curves[tid] = _with_progress(read_result_lines(path), path.parent)
            read.add(path)
    missing = set(trial_ids) - curves.keys()
    if missing:  # Tune's own trial folder names: match on the trial_id key inside
        for path in layout.trial_result_files():
            if path in read:
                continue
            rows = read_result_lines(path)
            tid = next((str(r["trial_id"]) for r in rows if "trial_id" in r), "")
            if tid in missing:
                curves[tid] = _with_progress(rows, path.parent)
    return curves


_PROGRESS_CSV = "progress.csv"


def _with_progress(rows: list[dict[str, Any]], trial_dir: Path) -> list[dict[str, Any]]:
    """``rows`` completed with the iterations only Tune's ``progress.csv`` still holds.

    Tune rewrites a trial's ``result.json`` when a paused trial is restored from
    its checkpoint (a sync cull pauses every seed at the milestone), so the
    iterations before the restore survive in the appended ``progress.csv`` only.
    Their rows come first; ``result.json``'s rows win where both have an iteration.
    """
    path = trial_dir / _PROGRESS_CSV
    if not path.is_file():
        return rows
    have = {r.get(ITERATION) for r in rows}
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError):
        return rows
    if ITERATION not in table:
        return rows
    table[ITERATION] = pd.to_numeric(table[ITERATION], errors="coerce")
    extra = [
        {k: _plain(v) for k, v in rec.items()}
        for rec in table[table[ITERATION].notna() & ~table[ITERATION].isin(have)].to_dict("records")
    ]
    return [*extra, *rows] if extra else rows


def _arm_colours(
    spec: Mapping[str, Any], results: pd.DataFrame, verdicts: Sequence[Mapping[str, Any]] | None
) -> dict[str, str]:
    levers = spec.get("levers")
    arms = list(levers) if isinstance(levers, Mapping) else []
    arms += results[COL_ARM].tolist() if not results.empty else []
    arms += [str(v.get("lever")) for v in verdicts or []]
    order = [a for a in dict.fromkeys(arms) if a != ARM_CONTROL]
    colours = {a: _ARM_PALETTE[i % len(_ARM_PALETTE)] for i, a in enumerate(order)}
    return {ARM_CONTROL: _CONTROL_COLOUR, **colours}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A seed cull's or sweep's folder, read once for its page (the lever page has :class:`_Data`)."""

    exp_dir: Path
    layout: ExperimentLayout
    state: dict[str, Any]  # tunelab.json
    spec: dict[str, Any]
    summary: dict[str, Any] | None  # summary.json; None while running
    results: pd.DataFrame  # one row per trial (the results table, or the curves while running)
    curves: dict[str, list[dict[str, Any]]]  # trial_id -> result.json rows
    metric: str
    mode: str

    @property
    def name(self) -> str:
        return str(self.spec.get("name", self.exp_dir.name))

    def trial_series(self, trial_id: str, metric: str | None = None) -> list[tuple[int, float]]:
        """The trial's curve of ``metric`` (default: the spec's), NaN kept (:func:`series`)."""
        return series(self.curves.get(trial_id, []), metric or self.metric)

    def status_text(self) -> str:
        """``"4 (2 culled, 2 finished)"``: the trial count by status."""
        if self.results.empty:
            return "none yet"
        counts = self.results[COL_STATUS].replace("", "unknown").value_counts().to_dict()
        return f"{len(self.results)} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})"


def load_experiment(exp_dir: Path) -> Experiment:
    """Read a seed cull's or sweep's folder. Before the results table exists (a running
    or stopped experiment) the trials are those with a ``result.json``, each with the
    status ``platform status`` gives it (:func:`tunelab.outcome.outcomes_from_folder`:
    running, paused, culled, finished, interrupted after a stop...).

    Raises:
        ReportError: Not an experiment folder, or an unreadable results table.
    """
    layout = ExperimentLayout(exp_dir)
    state = _read_state(layout)
    spec = dict(state.get("spec") or {})
    metric_spec = spec.get("metric") or {}
    results = _read_results(layout)
    if results.empty:
        curves = layout.trial_results()
        budget = spec.get("budget")
        statuses = (
            {o.trial_id: o.status.value for o in outcomes_from_folder(layout, budget)}
            if isinstance(budget, int)
            else {}
        )
        rows = []
        for tid, lines in sorted(curves.items()):
            found = lines[-1].get("config")
            cfg: dict[str, Any] = found if isinstance(found, dict) else {}
            rows.append(
                {
                    COL_TRIAL: tid,
                    COL_RUN: "",
                    COL_SEED: cfg.get(COL_SEED, ""),
                    COL_STATUS: statuses.get(tid, TrialStatus.RUNNING.value),
                    COL_ITERATIONS: max((int(r.get(ITERATION, 0) or 0) for r in lines), default=0),
                }
            )
        if rows:
            results = pd.DataFrame(rows)
    else:
        trial_ids = [t for t in results[COL_TRIAL].tolist() if t]
        curves = _read_curves(layout, trial_ids)
    return Experiment(
        exp_dir=exp_dir,
        layout=layout,
        state=state,
        spec=spec,
        summary=read_summary(layout),
        results=results,
        curves=curves,
        metric=str(metric_spec.get("name", "")),
        mode=str(metric_spec.get("mode", "max")),
    )


def table_html(
    head: Sequence[str],
    rows: Sequence[tuple[str, Sequence[str]]],
    cls: str,
    *,
    first_left: bool = True,
) -> str:
    """A ``table.<cls>``; ``rows`` are (attributes of the ``<tr>``, cell HTML) pairs."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = []
    for attrs, cells in rows:
        tds = "".join(
            f'<td class="left">{c}</td>' if i == 0 and first_left else f"<td>{c}</td>"
            for i, c in enumerate(cells)
        )
        body.append(f"<tr {attrs}>{tds}</tr>")
    return (
        f'<div class="scroll"><table class="{_e(cls)}"><thead><tr>{th}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def trials_section_html(exp: Experiment) -> str:
    """Every trial with its status and final metrics, folded (crashed trials stay visible)."""
    df = exp.results
    if df.empty:
        return ""
    cols = [
        c
        for c in (COL_TRIAL, COL_RUN, COL_SEED, COL_STATUS, COL_ITERATIONS, "culled_at")
        if c in df
    ]
    cols += [c for c in df.columns if str(c).startswith("config.")]
    metrics = [
        c
        for c in df.columns
        if c not in cols and c not in _META_COLS and not str(c).startswith(("sys/", "config."))
    ]
    cols += sorted(metrics, key=lambda c: (c != exp.metric, str(c)))
    rows = []
    for rec in df[cols].to_dict("records"):
        status = str(rec.get(COL_STATUS, ""))
        cells = [value_text(rec[c]) if c in metrics else _e(_blank_nan(rec[c])) for c in cols]
        rows.append((f'class="status-{_css(status)}"', cells))
    return (
        f"<section><details><summary><h2>Trials ({len(rows)})</h2></summary>"
        f"{table_html([str(c) for c in cols], rows, 'trials')}</details></section>"
    )


#: Layers drawn in a diverged trial's norm history (the largest at the end).
_HEALTH_LAYERS = 6


def health_section_html(exp_dir: Path, results: pd.DataFrame) -> str:
    """Every diverged trial's diagnosis and per-layer gradient-norm history (every kind's page).

    ``section.health`` holds one ``div.diagnosis`` per diverged trial
    (``data-trial``), with the monitor's one-line diagnosis and, from the
    trial's ``health.json`` artifact, the largest per-layer gradient norm per
    iteration of its most grown layers. Empty when no trial diverged.
    """
    if results.empty or COL_STATUS not in results:
        return ""
    layout = ExperimentLayout(exp_dir)
    items = []
    for rec in results.to_dict("records"):
        text = rec.get(COL_DIAGNOSIS)
        text = text if isinstance(text, str) and text else None
        if rec.get(COL_STATUS) != TrialStatus.DIVERGED.value and text is None:
            continue
        tid = str(rec.get(COL_TRIAL, ""))
        who = ", ".join(
            f"{c} {_plain(rec[c])}"
            for c in (COL_ARM, COL_SEED)
            if c in rec and _plain(rec[c]) != ""
        )
        history = read_json(layout.trial_health(tid), {}) or {}
        chart = _layer_history_svg(history.get("layer_norm_history") or [], tid)
        items.append(
            f'<div class="diagnosis" data-trial="{_e(tid)}"><h3>{_e(tid)} ({_e(who)})</h3>'
            f'<p class="line">{_e(text or "diverged (no diagnosis recorded)")}</p>{chart}</div>'
        )
    if not items:
        return ""
    return (
        f'<section class="health"><h2>Diverged trials ({len(items)})</h2>'
        "<p>Ended by the health monitor (the spec's <code>health:</code> block): the step, "
        "loss term and layer where it went wrong.</p>" + "".join(items) + "</section>"
    )


def _layer_history_svg(history: Sequence[Mapping[str, Any]], trial_id: str) -> str:
    """Per-layer max gradient norm per iteration, the layers that grew most (log-free)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        it = int(row.get("iteration", 0) or 0)
        for layer, pair in (row.get("layers") or {}).items():
            v = _float(pair[0] if isinstance(pair, (list, tuple)) and pair else None)
            curves.setdefault(str(layer), []).append((it, math.nan if v is None else v))
    if not curves:
        return ""

    def growth(points: list[tuple[int, float]]) -> float:
        finite = [v for _, v in points if math.isfinite(v) and v > 0]
        return finite[-1] / finite[0] if len(finite) >= 2 else 0.0

    top = sorted(curves, key=lambda k: -growth(curves[k]))[:_HEALTH_LAYERS]
    lines = [
        Line(curves[k], _ARM_PALETTE[i % len(_ARM_PALETTE)], k, tag=k, attrs={"data-layer": k})
        for i, k in enumerate(top)
    ]
    return lines_svg(lines, f"{trial_id}: largest gradient norm per layer", cls="layer-norms")


def _blank_nan(x: Any) -> Any:
    """A table cell's plain value; a missing one (NaN in a text column) reads as empty."""
    x = _plain(x)
    return "" if isinstance(x, float) and math.isnan(x) else x


# ----------------------------------------------------------------------------
# Figures from the data
# ----------------------------------------------------------------------------


def _finished_values(df: pd.DataFrame, metric: str) -> dict[Any, float]:
    """``{seed: value}`` of the finished trials with a finite ``metric``."""
    if metric not in df or df.empty:
        return {}
    ok = df[df[COL_STATUS].isin([TrialStatus.FINISHED.value, ""])]  # "": a table without statuses
    values = pd.to_numeric(ok[metric], errors="coerce")
    return {
        _plain(s): float(v) for s, v in zip(ok[COL_SEED], values, strict=True) if math.isfinite(v)
    }


def _paired_diffs(data: _Data, lever: str, rnd: int) -> list[tuple[Any, float]]:
    """Per-seed differences of the primary metric, signed so that positive is better."""
    df = data.results[data.results[COL_ROUND] == rnd] if not data.results.empty else data.results
    if COL_STAGE in df:  # the confirmation seeds are not pairs of the verdict (shown apart)
        df = df[df[COL_STAGE].astype(str) != STAGE_CONFIRM]
    if df.empty:
        return []
    control = _finished_values(df[df[COL_ARM] == ARM_CONTROL], data.metric)
    variant = _finished_values(df[df[COL_ARM] == lever], data.metric)
    sign = 1.0 if data.mode == "max" else -1.0
    return [(s, sign * (variant[s] - control[s])) for s in control if s in variant]


def _column_mode(data: _Data, column: str) -> str:
    if column == data.metric:
        return data.mode
    for g in data.guardrails:
        if g.get("name") == column:
            return str(g.get("mode", "max"))
    return "min" if column.lower().endswith(_LOWER_BETTER_SUFFIXES) else "max"


def _metric_columns(data: _Data) -> list[str]:
    df = data.results
    numeric = [
        c
        for c in df.columns
        if c not in _META_COLS
        and not str(c).startswith(_NOT_METRIC_PREFIXES)
        and pd.to_numeric(df[c], errors="coerce").notna().any()
    ]
    first = [
        m for m in [data.metric, *(str(g.get("name")) for g in data.guardrails)] if m in numeric
    ]
    return list(dict.fromkeys([*first, *sorted(numeric)]))


def _arms_of_round(data: _Data, rnd: int) -> list[str]:
    df = data.results
    arms = df[df[COL_ROUND] == rnd][COL_ARM].tolist() if not df.empty else []
    arms += [str(v.get("lever")) for v in data.verdicts or [] if int(v.get(COL_ROUND, 1)) == rnd]
    arms = list(dict.fromkeys(arms))
    return [ARM_CONTROL] * (ARM_CONTROL in arms) + sorted(
        (a for a in arms if a != ARM_CONTROL), key=lambda a: list(data.colours).index(a)
    )


@dataclasses.dataclass(frozen=True)
class _ArmCurves:
    arm: str
    colour: str
    seeds: list[tuple[Any, list[tuple[int, float]]]]  # per-seed curves, finite values
    # (seed, first iteration with a NaN / inf, that value): marked, never dropped silently
    nonfinite: list[tuple[Any, int, float]] = dataclasses.field(default_factory=list)

    @property
    def mean(self) -> list[tuple[int, float]]:
        """Mean over the seeds that reached each iteration."""
        by_it: dict[int, list[float]] = {}
        for _, pts in self.seeds:
            for it, v in pts:
                by_it.setdefault(it, []).append(v)
        return [(it, float(np.mean(vs))) for it, vs in sorted(by_it.items())]


def _arm_curves(data: _Data, rnd: int, metric: str) -> list[_ArmCurves]:
    df = data.results[data.results[COL_ROUND] == rnd]
    out = []
    for arm in _arms_of_round(data, rnd):
        rows = df[df[COL_ARM] == arm]
        seeds: list[tuple[Any, list[tuple[int, float]]]] = []
        nonfinite: list[tuple[Any, int, float]] = []
        for s, t in zip(rows[COL_SEED], rows[COL_TRIAL], strict=True):
            full = series(data.curves.get(t, []), metric)
            finite = [(it, v) for it, v in full if math.isfinite(v)]
            if finite:
                seeds.append((_plain(s), finite))
            bad = first_nonfinite(full)
            if bad is not None:  # drawn apart: marked, never dropped
                nonfinite.append((_plain(s), bad, dict(full)[bad]))
        if seeds:
            colour = data.colours.get(arm, _UNKNOWN_COLOUR)
            out.append(_ArmCurves(arm, colour, seeds, nonfinite))
    return out


# ----------------------------------------------------------------------------
# HTML sections
# ----------------------------------------------------------------------------


def _header_html(data: _Data) -> str:
    spec, decision = data.spec, data.spec.get("decision") or {}
    looks = decision.get("looks")
    seeds = spec.get("seeds")
    if isinstance(seeds, list):
        seeds_text = f"{len(seeds)} ({_short_list(seeds)})"
    else:
        observed = (
            list(dict.fromkeys(data.results[COL_SEED].tolist())) if not data.results.empty else []
        )
        seeds_text = f"{len(observed)} ({_short_list(observed)})" if observed else _e(seeds)
    guards = ", ".join(
        f"{_e(g.get('name'))} ({_e(g.get('mode'))}, margin {_e(g.get('margin'))})"
        for g in data.guardrails
    )
    status_counts = (
        data.results[COL_STATUS].replace("", "unknown").value_counts().to_dict()
        if not data.results.empty
        else {}
    )
    trials = ", ".join(f"{n} {_e(s)}" for s, n in sorted(status_counts.items()))
    rule = [
        (
            "primary metric",
            f"<code>{_e(data.metric)}</code> ({_e(data.mode)}: {_direction(data.mode)})",
        ),
        ("keep bar (min_effect)", _e(decision.get("min_effect", "–"))),
        ("alpha", _e(decision.get("alpha", "–"))),
        ("looks", _e(", ".join(map(str, looks))) if looks else "fixed N"),
        ("correction", _e(decision.get("correction", "–"))),
        ("guardrails", guards or "none"),
        ("seeds", seeds_text),
        ("rounds", _e(len(data.rounds))),
        ("trials", f"{len(data.results)} ({trials})" if trials else "none yet"),
    ]
    summary = ""
    if data.verdicts:
        counts: dict[str, int] = {}
        for v in data.verdicts:
            counts[_label_key(v)] = counts.get(_label_key(v), 0) + 1
        summary = (
            '<p class="summary">'
            + " ".join(
                f'<span class="chip {_chip_classes(k)}">{n} × {_e(k.replace("-", " "))}</span>'
                for k, n in counts.items()
            )
            + "</p>"
        )
    name = str(spec.get("name", data.exp_dir.name))
    return top_html(name, meta_items(spec, data.state), rule, summary)


def _cards_html(data: _Data) -> str:
    head = "<section><h2>Levers</h2>"
    if data.verdicts is None:
        return (
            head
            + '<p class="note">No verdicts yet (no verdicts.json): the experiment is still running or failed before its first look.</p></section>'
        )
    if not data.verdicts:
        return head + '<p class="note">verdicts.json holds no verdict.</p></section>'
    min_effect = _float((data.spec.get("decision") or {}).get("min_effect"))
    intro = (
        '<p class="note">Dots: per-seed paired difference of <code>'
        f"{_e(data.metric)}</code>, signed so that right (&gt; 0) is better; bar: the verdict's "
        "confidence interval around the mean effect (diamond); solid line: zero; dashed lines and "
        "shaded band: the keep bar ±min_effect (inside: equivalence zone).</p>"
    )
    cards = []
    for rnd in sorted({int(v.get(COL_ROUND, 1)) for v in data.verdicts}):
        cards.append(f'<h3 class="round">Round {rnd}</h3><div class="cards">')
        for v in data.verdicts:
            if int(v.get(COL_ROUND, 1)) == rnd:
                cards.append(_card_html(data, v, rnd, min_effect))
        cards.append("</div>")
    return head + intro + "".join(cards) + "</section>"


def _card_html(data: _Data, v: Mapping[str, Any], rnd: int, min_effect: float | None) -> str:
    lever, label = str(v.get("lever", "?")), str(v.get("verdict", "?"))
    colour = _verdict_colour(v)
    conf = _float(v.get("confidence"))
    conf_text = f"{conf:.1%}".replace(".0%", "%") if conf is not None else ""
    p_extra = []
    if v.get("p_decision") is not None and v.get("p_decision") != v.get("p_value"):
        p_extra.append(f"decision p {_p(v.get('p_decision'))}")
    if v.get("correction"):
        p_extra.append(f"{_e(v['correction'])}-adjusted {_p(v.get('p_adjusted'))}")
    n_pairs = v.get("n_pairs")
    stats = [
        ("effect", f"{_num(v.get('effect'), signed=True)}"),
        (
            f"{conf_text} CI",
            f"[{_num(v.get('ci_low'), signed=True)}, {_num(v.get('ci_high'), signed=True)}]",
        ),
        (
            "p",
            _p(v.get("p_value"))
            + (f' <span class="dim">({"; ".join(p_extra)})</span>' if p_extra else ""),
        ),
        ("n_pairs", _e(n_pairs)),
        ("dz", _num(v.get("dz"), digits=3)),
        ("rho", _num(v.get("rho"), digits=3)),
        ("seed wins", f"{_e(v.get('wins', '–'))}/{_e(n_pairs)}"),
    ]
    if v.get("look") is not None:
        looks = (data.spec.get("decision") or {}).get("looks") or []
        final = "final look" if v.get("final_look") else "interim look"
        stats.append(
            (
                "look",
                f"{_e(v['look'])} of {len(looks)} ({final}, threshold {_p(v.get('threshold'))})",
            )
        )
    margins = {g.get("name"): g.get("margin") for g in data.guardrails}
    guards = "".join(
        f'<span class="chip guard guard-{_css(g.get("status"))}" data-guardrail="{_e(name)}" '
        f'title="effect {_num(g.get("effect"), signed=True)}, one-sided lower bound '
        f'{_num(g.get("lower"), signed=True)}, margin {_e(margins.get(name, "?"))}">'
        f"{_e(name)}: {_e(g.get('status'))}</span>"
        for name, g in (v.get("guardrails") or {}).items()
    )
    sens = v.get("sensitivity") or {}
    sens_text = (
        f"BCa [{_num(sens.get('bca_low'), signed=True)}, {_num(sens.get('bca_high'), signed=True)}] · "
        f"permutation p {_p(sens.get('permutation_p'))} · Wilcoxon p {_p(sens.get('wilcoxon_p'))} · "
        f"TOST p {_p(v.get('tost_p'))}"
    )
    crashed = v.get("crashed_seeds") or []
    crashed_html = (
        f'<p class="crashed">crashed seeds: {_e(", ".join(map(str, crashed)))}</p>'
        if crashed
        else ""
    )
    confirm_html = _confirm_html(data, v, lever, rnd)
    levers = data.spec.get("levers")
    override = levers.get(lever) if isinstance(levers, Mapping) else None
    override_html = (
        f'<p class="override"><code>{_e(json.dumps(override, sort_keys=True))}</code></p>'
        if override is not None
        else ""
    )
    diffs = _paired_diffs(data, lever, rnd)
    meaningful = (
        ' <span class="badge">meaningful</span>' if label == "win" and v.get("meaningful") else ""
    )
    return (
        f'<section class="card lever-card" data-lever="{_e(lever)}" data-round="{rnd}" '
        f'data-verdict="{_e(label)}" style="border-left-color:{colour}">'
        f'<header><h4>{_e(lever)}</h4><span class="{_chip_classes(_label_key(v))}" '
        f'title="{_e(_LABEL_HELP.get(label, label))}">{_e(label)}</span>{meaningful}</header>'
        f"{override_html}"
        f'<dl class="stats">{"".join(f"<div><dt>{k}</dt><dd>{val}</dd></div>" for k, val in stats)}</dl>'
        f'<div class="guards">{guards or "<span class=dim>no guardrails</span>"}</div>'
        f"{_diff_svg(diffs, v, min_effect, colour)}"
        f'<p class="dim small">{len(diffs)} finished pairs in results · sensitivity: {sens_text}</p>'
        f"{confirm_html}{crashed_html}</section>"
    )


def _confirm_html(data: _Data, v: Mapping[str, Any], lever: str, rnd: int) -> str:
    """The confirmation-seed result of a verdict (``p.confirm`` with ``data-confirmed``)."""
    seeds = list((data.spec.get("decision") or {}).get("confirm_seeds") or [])
    stacked = any(
        isinstance(x, list) and len(x) == 2 and x[0] == rnd and str(x[1]) == lever
        for x in (read_summary(ExperimentLayout(data.exp_dir)) or {}).get("stacked") or []
    )
    if "confirmed" in v and v.get("confirmed") is not None:
        ok = bool(v["confirmed"])
        diffs = v.get("confirm_diffs") or []
        per_seed = ", ".join(
            f"seed {s}: {value_text(d) if _float(d) is None else _num(d, signed=True)}"
            for s, d in zip(seeds, diffs, strict=False)
        ) or ", ".join(value_text(d) for d in diffs)
        text = f"confirmation: {'confirmed' if ok else 'not confirmed'}"
        text += f" ({per_seed})" if per_seed else ""
        text += " · stacked into the next round's control" if stacked else ""
        state = "yes" if ok else "no"
    elif not seeds:
        text, state = "confirmation: none (no decision.confirm_seeds in the spec)", "none"
    elif _label_key(v) == "meaningful-win":
        text, state = "confirmation: pending (confirmation seeds not finished)", "pending"
    else:
        text, state = "confirmation: not run (only a meaningful win is confirmed)", "none"
    return f'<p class="confirm confirm-{state} small" data-confirmed="{state}">{_e(text)}</p>'


_LABEL_HELP = {
    "win": "CI lower bound > 0 and every guardrail passes",
    "negative": "CI upper bound < 0",
    "null": "equivalent within ±min_effect (TOST passed)",
    "inconclusive": "neither win, negative nor null",
    "crashed": "a pair was lost to a failed or non-finite trial",
}


def _metric_table_html(data: _Data) -> str:
    head = "<section><h2>Key metrics</h2>"
    if data.results.empty:
        return head + '<p class="note">No results table yet.</p></section>'
    columns = _metric_columns(data)
    modes = {c: _column_mode(data, c) for c in columns}
    th = "".join(
        f'<th class="{"primary" if c == data.metric else ""}" title="{_direction(modes[c])}">'
        f"{_e(c)} {'▼' if modes[c] == 'min' else '▲'}</th>"
        for c in columns
    )
    rows_html = []
    for rnd in data.rounds:
        df = data.results[data.results[COL_ROUND] == rnd]
        arms = [a for a in _arms_of_round(data, rnd) if (df[COL_ARM] == a).any()]
        stats = {
            a: {c: _mean_sd(_finished_values(df[df[COL_ARM] == a], c)) for c in columns}
            for a in arms
        }
        best = {c: _best_arms({a: stats[a][c][0] for a in arms}, modes[c]) for c in columns}
        for a in arms:
            sub = df[df[COL_ARM] == a]
            n_ok = int(sub[COL_STATUS].isin([TrialStatus.FINISHED.value, ""]).sum())
            cells = "".join(
                f'<td class="metric{" best" if a in best[c] else ""}" data-arm="{_e(a)}" '
                f'data-round="{rnd}" data-metric="{_e(c)}" title="n = {stats[a][c][2]}">'
                f"{_mean_sd_text(stats[a][c])}</td>"
                for c in columns
            )
            swatch = f'<span class="swatch" style="background:{data.colours.get(a, _UNKNOWN_COLOUR)}"></span>'
            rows_html.append(
                f"<tr><td>{rnd}</td><th scope=row>{swatch}{_e(a)}</th>"
                f"<td>{n_ok}/{len(sub)}</td>{cells}</tr>"
            )
    return (
        head
        + '<p class="note">Mean ± sd over the finished seeds; ▼ lower is better, ▲ higher is better; '
        "<span class=best-key>bold</span>: best arm of its round.</p>"
        + '<div class="scroll"><table class="metrics"><thead><tr><th>round</th><th>arm</th>'
        + f"<th>finished</th>{th}</tr></thead><tbody>{''.join(rows_html)}</tbody></table></div></section>"
    )


def _curves_html(data: _Data) -> str:
    head = "<section><h2>Training curves</h2>"
    metrics = [data.metric, *(str(g.get("name")) for g in data.guardrails)]
    parts = []
    for rnd in data.rounds:
        panels = []
        for i, metric in enumerate(metrics):
            arms = _arm_curves(data, rnd, metric)
            if arms:
                mode = _column_mode(data, metric)
                panels.append(_curves_svg(arms, metric, mode, rnd, primary=i == 0))
        if panels:
            legend = "".join(
                f'<span class="legend"><span class="swatch" style="background:{data.colours.get(a, _UNKNOWN_COLOUR)}"></span>{_e(a)}</span>'
                for a in _arms_of_round(data, rnd)
            )
            parts.append(
                f'<h3 class="round">Round {rnd}</h3><p>{legend}</p><div class="panels">{"".join(panels)}</div>'
            )
    if not parts:
        return (
            head
            + '<p class="note">No per-iteration results (trial_*/result.json) found.</p></section>'
        )
    note = (
        '<p class="note">Thick line: mean over the seeds that reached each iteration; thin lines: '
        "one per seed; a red × at the top edge: a seed reported NaN / inf there (its line ends).</p>"
    )
    return head + note + "".join(parts) + "</section>"


def _trials_html(data: _Data) -> str:
    if data.results.empty:
        return ""
    cols = [
        c
        for c in (COL_TRIAL, COL_RUN, COL_ROUND, COL_ARM, COL_SEED, COL_STATUS, COL_ITERATIONS)
        if c in data.results
    ]
    cols += [data.metric] if data.metric in data.results else []
    rows = []
    for rec in data.results[cols].to_dict("records"):
        status = str(rec.get(COL_STATUS, ""))
        cells = "".join(
            f"<td>{_num(rec[c]) if c == data.metric else _e(_plain(rec[c]))}</td>" for c in cols
        )
        rows.append(f'<tr class="status-{_css(status)}">{cells}</tr>')
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    return (
        f"<section><details><summary><h2>Trials ({len(rows)})</h2></summary>"
        f'<div class="scroll"><table class="trials"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></details></section>"
    )


def _footer_html(data: _Data) -> str:
    return footer_html(data.exp_dir, data.state)


# ----------------------------------------------------------------------------
# Inline SVG charts
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Axis:
    """Linear map from data units [lo, hi] to pixels [px_lo, px_hi]."""

    lo: float
    hi: float
    px_lo: float
    px_hi: float

    def __call__(self, v: float) -> float:
        return self.px_lo + (v - self.lo) / (self.hi - self.lo) * (self.px_hi - self.px_lo)


def _diff_svg(
    diffs: Sequence[tuple[Any, float]], v: Mapping[str, Any], min_effect: float | None, colour: str
) -> str:
    """Strip plot of the paired differences with the CI bar, zero line and keep bar."""
    w, h, pad = 560, 150, 18
    top, axis_y, ci_y = 16, 118, 98
    ci = [_float(v.get(k)) for k in ("ci_low", "effect", "ci_high")]
    values = [d for _, d in diffs] + [c for c in ci if c is not None] + [0.0]
    if min_effect:
        values += [-min_effect, min_effect]
    lo, hi = _padded(values)
    x = _Axis(lo, hi, pad, w - pad)
    out = [
        f'<svg class="diffs" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="paired differences">'
    ]
    if min_effect:
        out.append(
            f'<rect x="{x(-min_effect):.1f}" y="{top}" width="{x(min_effect) - x(-min_effect):.1f}" '
            f'height="{axis_y - top}" fill="#efefef"><title>equivalence zone ±{min_effect:g}</title></rect>'
        )
        for sign, name in ((-1, "−min_effect"), (1, "+min_effect")):
            xe = x(sign * min_effect)
            out.append(
                f'<line class="keep-bar" x1="{xe:.1f}" x2="{xe:.1f}" y1="{top}" y2="{axis_y}" '
                'stroke="#777" stroke-dasharray="4 3"/>'
                f'<text x="{xe:.1f}" y="{top - 4}" text-anchor="middle" class="lbl">{name}</text>'
            )
    out.append(
        f'<line class="zero" x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{top}" y2="{axis_y}" stroke="#222" stroke-width="1.2"/>'
    )
    offsets = (0, -12, 12, -24, 24)
    ranked = sorted(range(len(diffs)), key=lambda i: diffs[i][1])
    for rank, i in enumerate(ranked):
        seed, d = diffs[i]
        cy = 58 + offsets[rank % len(offsets)]
        fill = _GOOD if d > 0 else _BAD
        out.append(
            f'<circle class="pair" data-seed="{_e(seed)}" data-diff="{d!r}" cx="{x(d):.1f}" cy="{cy}" '
            f'r="5" fill="{fill}" fill-opacity="0.85" stroke="#fff"><title>seed {_e(seed)}: {d:+.4g}</title></circle>'
        )
    low, eff, high = ci
    if low is not None and high is not None:
        out.append(
            f'<rect class="ci" x="{x(low):.1f}" y="{ci_y - 6}" width="{max(x(high) - x(low), 1.0):.1f}" '
            f'height="12" rx="3" fill="{colour}" fill-opacity="0.3" stroke="{colour}"/>'
        )
    if eff is not None:
        xe = x(eff)
        out.append(
            f'<path class="effect" d="M{xe:.1f} {ci_y - 8}l7 8l-7 8l-7 -8z" fill="{colour}" stroke="#fff">'
            f"<title>effect {eff:+.4g}</title></path>"
        )
    out.append(_x_axis(x, lo, hi, axis_y, w - pad))
    out.append(
        f'<text x="{w - pad}" y="{h - 2}" text-anchor="end" class="lbl">paired difference, better →</text>'
    )
    out.append("</svg>")
    return "".join(out)


def _curves_svg(
    arms: Sequence[_ArmCurves], metric: str, mode: str, rnd: int, *, primary: bool
) -> str:
    """Learning curves of one metric: per-seed thin lines and the per-arm mean."""
    its = [it for a in arms for _, pts in a.seeds for it, _ in pts]
    its += [it for a in arms for _, it, _ in a.nonfinite]
    vals = [v for a in arms for _, pts in a.seeds for _, v in pts]
    title = f"{metric} ({_direction(mode)}){' · primary' if primary else ''}"
    x, y, frame = _plot_frame(its, vals, title, "curves", metric)
    out = [frame]
    for a in arms:
        for seed, pts in a.seeds:
            out.append(
                f'<polyline class="seed" data-arm="{_e(a.arm)}" data-seed="{_e(seed)}" points="{_points(pts, x, y)}" '
                f'fill="none" stroke="{a.colour}" stroke-opacity="0.3" stroke-width="1"><title>{_e(a.arm)}, seed {_e(seed)}</title></polyline>'
            )
    for a in arms:
        for seed, it, v in a.nonfinite:
            out.append(
                _nonfinite_mark(
                    x(it),
                    f"{a.arm}, seed {seed}: {value_text(v)} at iteration {it}",
                    it,
                    f' data-arm="{_e(a.arm)}" data-seed="{_e(seed)}"',
                )
            )
    for a in arms:
        mean = a.mean
        it_last, v_last = mean[-1]
        out.append(
            f'<polyline class="mean" data-arm="{_e(a.arm)}" data-round="{rnd}" data-metric="{_e(metric)}" '
            f'points="{_points(mean, x, y)}" fill="none" stroke="{a.colour}" stroke-width="2.4" '
            f'stroke-linejoin="round"><title>{_e(a.arm)}: mean of {len(a.seeds)} seeds, last {v_last:.4g}</title></polyline>'
            f'<circle cx="{x(it_last):.1f}" cy="{y(v_last):.1f}" r="3" fill="{a.colour}"/>'
        )
    out.append("</svg>")
    return "".join(out)


_PLOT_W, _PLOT_H = 560, 300
_ANCHOR_END = ' text-anchor="end"'
_PLOT_LEFT, _PLOT_RIGHT, _PLOT_TOP, _PLOT_BOTTOM = 64, 14, 28, 40


def _plot_frame(
    iterations: Sequence[float], values: Sequence[float], title: str, cls: str, label: str
) -> tuple[_Axis, _Axis, str]:
    """The axes of a curve panel (iteration on x) and the opening ``<svg>`` with grid and title.

    Only finite ``values`` set the y range. The caller closes the ``</svg>``.
    """
    w, h = _PLOT_W, _PLOT_H
    left, right, top, bottom = _PLOT_LEFT, _PLOT_RIGHT, _PLOT_TOP, _PLOT_BOTTOM
    lo_it = min(iterations) if iterations else 0
    hi_it = max(iterations) if iterations else 1
    x = _Axis(lo_it, hi_it if hi_it > lo_it else lo_it + 1, left, w - right)
    y_lo, y_hi = _padded(values)
    y = _Axis(y_lo, y_hi, h - bottom, top)
    out = [
        f'<svg class="{_e(cls)}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{_e(label)}">'
    ]
    y_ticks, y_step = _ticks(y_lo, y_hi)
    for t in y_ticks:
        out.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{y(t) + 3.5:.1f}" text-anchor="end" class="lbl">{_tick_text(t, y_step)}</text>'
        )
    x_ticks, _ = _ticks(x.lo, x.hi, integer=True)
    for t in x_ticks:
        out.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{h - bottom}" y2="{h - bottom + 4}" stroke="#444"/>'
            f'<text x="{x(t):.1f}" y="{h - bottom + 16}" text-anchor="middle" class="lbl">{t:g}</text>'
        )
    out.append(
        f'<line x1="{left}" x2="{w - right}" y1="{h - bottom}" y2="{h - bottom}" stroke="#444"/>'
    )
    out.append(f'<text x="{w - right}" y="{h - 4}" text-anchor="end" class="lbl">iteration</text>')
    out.append(f'<text x="{left}" y="16" class="ttl">{_e(title)}</text>')
    return x, y, "".join(out)


def series(rows: Iterable[Mapping[str, Any]], metric: str) -> list[tuple[int, float]]:
    """``[(iteration, value)]`` of ``metric`` sorted by iteration, non-finite values kept.

    A repeated iteration (after a resume) keeps the last row; a row without the
    metric or with a non-numeric value is skipped; NaN and inf stay (a diverged
    trial's curve must show where it diverged, never end silently).
    """
    points: dict[int, float] = {}
    for r in rows:
        it, v = r.get(ITERATION), r.get(metric)
        if is_number(it) and is_number(v):
            points[int(it)] = float(v)
    return sorted(points.items())


def value_at(points: Sequence[tuple[int, float]], iteration: int) -> float | None:
    """The value at ``iteration`` (None: never reported there)."""
    return next((v for it, v in points if it == iteration), None)


def first_nonfinite(points: Sequence[tuple[int, float]]) -> int | None:
    """The first iteration whose value is NaN or inf (None: all finite)."""
    return next((it for it, v in points if not math.isfinite(v)), None)


@dataclasses.dataclass(frozen=True)
class Line:
    """One trial's curve in :func:`lines_svg`.

    ``points`` may hold NaN / inf: the line breaks there and the first such
    iteration is marked with a red cross at the top edge (``path.nonfinite``).
    """

    points: list[tuple[int, float]]
    colour: str
    label: str  # tooltip, e.g. "seed 3 (selected)"
    cls: str = ""  # extra classes of the line's <g class="curve ...">
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # data-* attributes
    width: float = 1.5
    dashed: bool = False
    opacity: float = 0.9
    tag: str = ""  # a short label drawn at the line's end ("" = none)


def lines_svg(
    lines: Sequence[Line],
    title: str,
    *,
    cls: str = "curves",
    label: str = "",
    mark_at: int | None = None,
    mark_label: str = "",
) -> str:
    """A curve panel of one metric, one line per trial.

    Each line is ``g.curve`` (with the line's class and ``data-*`` attributes)
    holding ``path.line`` (the finite stretches), ``circle.end`` at its last
    finite point, and, where the trial reported a non-finite value,
    ``path.nonfinite`` with ``data-iteration``. With ``mark_at``, a vertical
    ``line.mark`` (``data-iteration``) and, per line, ``circle.at-mark`` with
    ``data-value`` where it has a finite value there.
    """
    its = [it for ln in lines for it, _ in ln.points] + ([mark_at] if mark_at is not None else [])
    vals = [v for ln in lines for _, v in ln.points]
    x, y, frame = _plot_frame(its, vals, title, cls, label or title)
    top, bottom = _PLOT_TOP, _PLOT_H - _PLOT_BOTTOM
    out = [frame]
    if mark_at is not None:
        xm = x(mark_at)
        out.append(
            f'<line class="mark" data-iteration="{mark_at}" x1="{xm:.1f}" x2="{xm:.1f}" y1="{top}" '
            f'y2="{bottom}" stroke="#b35c00" stroke-width="1.4" stroke-dasharray="5 3">'
            f"<title>{_e(mark_label or f'iteration {mark_at}')}</title></line>"
            f'<text x="{xm + 4:.1f}" y="{bottom - 6}" class="lbl mark-label">{_e(mark_label)}</text>'
        )
    # Thin lines first, the thickest (highlighted) last so it is drawn on top.
    for ln in sorted(lines, key=lambda ln: ln.width):
        data = "".join(f' data-{k}="{_e(v)}"' for k, v in ln.attrs.items())
        dash = ' stroke-dasharray="5 3"' if ln.dashed else ""
        parts = [f'<g class="curve {_e(ln.cls)}"{data}><title>{_e(ln.label)}</title>']
        parts.append(
            f'<path class="line" d="{_path_d(ln.points, x, y)}" fill="none" stroke="{ln.colour}" '
            f'stroke-width="{ln.width}" stroke-opacity="{ln.opacity}" stroke-linejoin="round"{dash}/>'
        )
        finite = [(it, v) for it, v in ln.points if math.isfinite(v)]
        if finite:
            it_end, v_end = finite[-1]
            parts.append(
                f'<circle class="end" cx="{x(it_end):.1f}" cy="{y(v_end):.1f}" r="{1.5 + ln.width / 2:.1f}" '
                f'fill="{ln.colour}"/>'
            )
            if ln.tag:  # right of the end point, or above it to its left at the right edge
                xe, ye = x(it_end), y(v_end)
                at_edge = xe > _PLOT_W - _PLOT_RIGHT - 48
                parts.append(
                    f'<text class="lbl tag" x="{xe - 6 if at_edge else xe + 5:.1f}" '
                    f'y="{ye - 7 if at_edge else ye + 3:.1f}"'
                    f"{_ANCHOR_END if at_edge else ''}>{_e(ln.tag)}</text>"
                )
        if mark_at is not None:
            v = value_at(ln.points, mark_at)
            if v is not None and math.isfinite(v):
                parts.append(
                    f'<circle class="at-mark" data-value="{v!r}" cx="{x(mark_at):.1f}" cy="{y(v):.1f}" '
                    f'r="3.5" fill="#fff" stroke="{ln.colour}" stroke-width="2"/>'
                )
        bad = first_nonfinite(ln.points)
        if bad is not None:
            v_bad = value_at(ln.points, bad)
            parts.append(
                _nonfinite_mark(x(bad), f"{ln.label}: {value_text(v_bad)} at iteration {bad}", bad)
            )
        parts.append("</g>")
        out.append("".join(parts))
    out.append("</svg>")
    return "".join(out)


def _nonfinite_mark(xb: float, title: str, iteration: int, attrs: str = "") -> str:
    """A red cross at the top edge of a curve panel: a NaN / inf reported at ``iteration``."""
    yb = _PLOT_TOP + 6
    return (
        f'<path class="nonfinite" data-iteration="{iteration}"{attrs} '
        f'd="M{xb - 5:.1f} {yb - 5:.1f}l10 10m0 -10l-10 10" stroke="{_BAD}" stroke-width="2.4">'
        f"<title>{_e(title)}</title></path>"
    )


def _path_d(pts: Sequence[tuple[float, float]], x: _Axis, y: _Axis) -> str:
    """SVG path data through the finite points; a non-finite value breaks the line."""
    segments: list[list[tuple[float, float]]] = [[]]
    for it, v in pts:
        if math.isfinite(v):
            segments[-1].append((it, v))
        elif segments[-1]:
            segments.append([])
    d = []
    for seg in segments:
        if seg:
            d.append("M" + " L".join(_points(seg, x, y).split()))
    return " ".join(d)


def value_text(v: Any, digits: int = 4) -> str:
    """A metric value for a table: "–" when missing, "NaN" / "+inf" / "−inf" shown as such."""
    if v is None or isinstance(v, str):
        return "–" if v in (None, "") else str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+inf" if f > 0 else "−inf"
    return _num(f, digits=digits)


def top_html(
    name: str, meta: Sequence[str], rule: Sequence[tuple[str, str]], extra: str = ""
) -> str:
    """The page header shared by every kind: name, a meta line and a definition grid.

    ``meta`` items are plain text (escaped here); ``rule`` values are HTML.
    """
    meta_text = " · ".join(_e(m) for m in meta if m)
    return (
        f'<header class="top"><h1>{_e(name)}</h1>'
        f'<p class="meta">{meta_text}</p>'
        f'<dl class="rule">{"".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in rule)}</dl>'
        f"{extra}</header>"
    )


def meta_items(spec: Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    """Family, kind, budget, created and git commit of an experiment (the header's meta line)."""
    return [
        f"family {spec['family']}" if spec.get("family") else "",
        f"kind {spec.get('kind', '?')}",
        f"budget {spec['budget']}" if spec.get("budget") is not None else "",
        f"created {state['created']}" if state.get("created") else "",
        f"git {str(state['git_commit'])[:10]}" if state.get("git_commit") else "",
    ]


def footer_html(exp_dir: Path, state: Mapping[str, Any]) -> str:
    """Where the experiment and its runs live."""
    bits = [f"experiment folder {state.get('experiment_dir', exp_dir)}"]
    if state.get("tracking_uri"):
        bits.append(f"MLflow {state['tracking_uri']}")
    if state.get("parent_run_id"):
        bits.append(f"parent run {state['parent_run_id']}")
    return f'<footer class="dim small">{_e(" · ".join(str(b) for b in bits))}</footer>'


def _x_axis(x: _Axis, lo: float, hi: float, y0: float, right: float) -> str:
    ticks, step = _ticks(lo, hi)
    parts = [f'<line x1="{x.px_lo}" x2="{right}" y1="{y0}" y2="{y0}" stroke="#444"/>']
    for t in ticks:
        parts.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{y0}" y2="{y0 + 4}" stroke="#444"/>'
            f'<text x="{x(t):.1f}" y="{y0 + 15}" text-anchor="middle" class="lbl">{_tick_text(t, step)}</text>'
        )
    return "".join(parts)


def _points(pts: Sequence[tuple[float, float]], x: _Axis, y: _Axis) -> str:
    if len(pts) > _MAX_POINTS:  # long runs: evenly spaced points, the last one kept
        keep = np.unique(np.linspace(0, len(pts) - 1, _MAX_POINTS).round().astype(int))
        pts = [pts[i] for i in keep]
    return " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in pts)


def _padded(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = (hi - lo) * 0.08 if hi > lo else (abs(lo) * 0.1 or 1.0)
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> tuple[list[float], float]:
    """About ``n`` round tick values in ``[lo, hi]`` (steps 1, 2, 2.5, 5 x 10^k) and the step."""
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0)), key=lambda s: abs((hi - lo) / s - n))
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    return ticks, step


def _tick_text(t: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (
        1 if f"{step:g}".rstrip("0").endswith("25") else 0
    )
    return f"{t:.{decimals}f}".replace("-", "−")


# ----------------------------------------------------------------------------
# Small helpers: formatting, classes
# ----------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _css(x: Any) -> str:
    """A CSS class fragment from a label (letters, digits, ``-`` and ``_`` only)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in str(x)) or "unknown"


def _label_key(v: Mapping[str, Any]) -> str:
    label = str(v.get("verdict", "unknown"))
    return "meaningful-win" if label == "win" and v.get("meaningful") else label


def _chip_classes(key: str) -> str:
    if key == "meaningful-win":
        return "chip verdict-win meaningful"
    return f"chip verdict-{_css(key)}"


def _verdict_colour(v: Mapping[str, Any]) -> str:
    key = _label_key(v)
    return (
        VERDICT_COLOURS["meaningful"]
        if key == "meaningful-win"
        else VERDICT_COLOURS.get(key, _UNKNOWN_COLOUR)
    )


def _direction(mode: str) -> str:
    return "lower is better" if mode == "min" else "higher is better"


def _float(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _num(x: Any, *, signed: bool = False, digits: int = 4) -> str:
    f = _float(x)
    if f is None:
        return "–"
    return f"{f:{'+' if signed else ''}.{digits}g}".replace("-", "−")


def _p(x: Any) -> str:
    f = _float(x)
    if f is None:
        return "–"
    return f"{f:.1e}" if f < 1e-4 else f"{f:.3g}"


def _mean_sd(values: Mapping[Any, float]) -> tuple[float | None, float | None, int]:
    vs = list(values.values())
    if not vs:
        return None, None, 0
    return float(np.mean(vs)), float(np.std(vs, ddof=1)) if len(vs) > 1 else None, len(vs)


def _mean_sd_text(stat: tuple[float | None, float | None, int]) -> str:
    mean, sd, _ = stat
    if mean is None:
        return "–"
    return _num(mean) + (
        f' <span class="dim">± {_num(sd, digits=2)}</span>' if sd is not None else ""
    )


def _best_arms(means: Mapping[str, float | None], mode: str) -> set[str]:
    finite = {a: m for a, m in means.items() if m is not None}
    if len(finite) < 2:
        return set()
    target = min(finite.values()) if mode == "min" else max(finite.values())
    return {a for a, m in finite.items() if m == target}


def _short_list(items: Sequence[Any], limit: int = 12) -> str:
    shown = ", ".join(_e(_plain(i)) for i in items[:limit])
    return shown + (f", … +{len(items) - limit}" if len(items) > limit else "")


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def _page(title: str, body: str) -> str:
    chips = "".join(
        f".verdict-{k}{{background:{c}}}" for k, c in VERDICT_COLOURS.items() if k != "meaningful"
    )
    guards = "".join(f".guard-{k}{{color:{c};border-color:{c}}}" for k, c in _GUARD_COLOURS.items())
    css = (
        _CSS
        + chips
        + f".verdict-win.meaningful{{background:{VERDICT_COLOURS['meaningful']}}}"
        + ".verdict-inconclusive{color:#2b2100}"
        + guards
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{css}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d1d1f;
 margin:0 auto;padding:24px 28px 48px;max-width:1240px;background:#fafafa}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;display:inline-block}
h3.round{font-size:15px;margin:16px 0 8px;color:#444}h4{font-size:16px;margin:0}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f0f0f0;padding:1px 4px;border-radius:3px}
.top{background:#fff;border:1px solid #e3e3e3;border-radius:10px;padding:16px 20px}
.meta,.dim{color:#6b6b6b}.small{font-size:12px}.note{color:#555;margin:4px 0 10px;max-width:900px}
dl{margin:0}dl div{display:flex;gap:8px}dt{color:#6b6b6b;min-width:88px}dd{margin:0}
.rule{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:2px 24px;margin-top:10px}
.rule dt{min-width:150px}
.summary{margin:12px 0 0}.summary .chip{margin-right:6px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(580px,1fr));gap:16px}
.card{background:#fff;border:1px solid #e3e3e3;border-left:6px solid #999;border-radius:10px;padding:12px 14px}
.card header{display:flex;align-items:center;gap:10px;margin-bottom:6px}
.stats{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:1px 18px;margin:6px 0}
.override{margin:0 0 4px}
.chip{display:inline-block;padding:2px 10px;border-radius:999px;font-size:12px;font-weight:600;
 color:#fff;letter-spacing:.02em;white-space:nowrap}
.badge{font-size:11px;font-weight:600;color:#11562a;border:1px solid #11562a;border-radius:4px;padding:0 5px}
.guards{margin:6px 0}.guard{background:#fff;border:1px solid;font-weight:500;font-size:11px;padding:1px 8px;margin:0 4px 4px 0}
.confirm{margin:4px 0 0}.confirm-yes{color:#11562a;font-weight:600}.confirm-no{color:#c62828;font-weight:600}
.crashed{color:#fff;background:#111;padding:2px 8px;border-radius:4px;display:inline-block;margin:4px 0 0}
svg{display:block;max-width:100%;height:auto}svg .lbl{font-size:10px;fill:#555}svg .ttl{font-size:12px;font-weight:600;fill:#222}
.panels{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
.panels svg{background:#fff;border:1px solid #e3e3e3;border-radius:8px}
.legend{margin-right:14px;white-space:nowrap}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:6px;vertical-align:-1px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border-bottom:1px solid #e6e6e6;padding:5px 10px;text-align:right;white-space:nowrap}
thead th{background:#f3f3f3;font-weight:600}th[scope=row]{text-align:left;font-weight:500}
th.primary{background:#e6eefc}td.best{font-weight:700;background:#e8f5e9}.best-key{font-weight:700}
tr.status-error td,tr.status-crashed td{color:#c62828}tr.status-culled td{color:#8a8a8a}
details summary{cursor:pointer}details summary h2{margin-top:20px}
footer{margin-top:32px}
td.left{text-align:left}dd code{word-break:break-all}
.status{color:#fff;background:#8a8a8a}.status.selected{background:#0b61a4}.status.kept,.status.finished{background:#2e7d32}
.status.culled{background:#8a8a8a}.status.error,.status.diverged{background:#c62828}.status.running,.status.pending,.status.interrupted{background:#a06e00}
tr.selected td,tr.best td{background:#e7f0fb;font-weight:600}
.artifacts{margin-top:28px;background:#fff;border:1px solid #e3e3e3;border-radius:10px;padding:12px 16px}
.artifacts img{max-width:100%;height:auto;border:1px solid #e3e3e3;border-radius:6px;margin:6px 0}
.artifacts audio{display:block;margin:6px 0}.artifacts pre{max-height:240px;overflow:auto;background:#f6f6f6;padding:8px;font-size:12px}
.figure{margin:10px 0}.figure figcaption{color:#555;font-size:12px}
"""
