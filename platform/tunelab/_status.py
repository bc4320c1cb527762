"""``platform status``: an experiment's trials read from its folder (no Ray needed).

Every trial the spec plans is a row, whether or not Tune ever created it:
trials that reported are read from their ``result.json``; trials Tune created
but that never reported come from Tune's experiment snapshot; seeds (a seed
cull or a sweep) or planned (arm, seed) trials (a lever A/B's current look)
that Tune never created are ``pending`` rows with their seed and no trial id.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunelab.checkpoint import read_json
from tunelab.errors import ExperimentError
from tunelab.kinds import get_kind
from tunelab.layout import ExperimentLayout, find_experiments, read_state
from tunelab.names import ARM_CONTROL, TrialStatus, as_float
from tunelab.outcome import TrialOutcome, final_metrics, outcomes_from_folder, trial_status
from tunelab.spec import parse_spec

__all__ = ["experiment_status", "format_value", "latest_experiment"]


def latest_experiment(storage: str | Path = "tunelab_results") -> Path:
    """The most recently created experiment folder under ``storage``.

    Raises:
        ExperimentError: there is none.
    """
    found = find_experiments(Path(storage))
    if not found:
        raise ExperimentError(f"no tunelab experiment under {Path(storage).resolve()}")
    return found[-1].root


def format_value(value: Any) -> str:
    """A metric value for humans: 4 significant digits, ``nan`` / ``inf`` shown, ``-`` if none."""
    if value is None:
        return "-"
    v = as_float(value)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4g}"


def experiment_status(experiment_dir: str | Path) -> dict[str, Any]:
    """Trials, their statuses, iterations and metric, read from the folder.

    Returns:
        ``experiment_dir``, ``spec`` (name), ``kind``, ``budget``, ``metric``
        (name), ``mode``, ``placement`` (the trial keys that place a trial
        in a kind's design: ``arm``, ``round``, ``stage`` for a lever A/B),
        ``finished`` (finalized), ``planned`` (trials the spec plans; None
        for a lever A/B, whose searcher decides as it goes), ``counts`` (status -> trials),
        ``best`` (the best finite value of the metric over the trials that
        did not fail; None if none, and None where arms exist: see
        ``best_by_arm``), ``best_by_arm`` (one entry per round and arm:
        ``round``, ``arm``, ``trial_id``, ``seed``, ``value``, ``value_text``;
        empty for kinds without arms), ``selected`` (a finished seed cull's
        selected ``seed``, ``trial_id``, ``run_id``, ``metric``, ``value``,
        ``value_text``; else None), ``cull`` (a seed cull's ``at``, ``keep``,
        ``scheduler``, and ``kept`` once finalized),
        and ``trials``: each ``trial_id`` (None for a trial Tune never
        created), ``seed``, the placement keys, ``status`` (finished, culled,
        error, diverged once finalized; interrupted after the driver was
        stopped; pending, running, paused before),
        ``iterations``, ``culled_at`` (the iteration a culled trial stopped
        at, else None), ``<metric>`` (its last value; NaN kept, written as
        null in strict JSON), ``value_text`` (that value with 4 significant
        digits: ``nan``, ``inf``, ``-`` when none), ``selected`` (the seed
        cull selected it), ``best`` (it holds ``best``, or its arm's best)
        and ``run_id``. A truncated last line of a trial's ``result.json``
        (a crash mid-write) is skipped.

    Raises:
        ExperimentError: not an experiment folder.
        SpecError: the recorded spec no longer validates (e.g. its family's
            package was uninstalled).
    """
    state = read_state(experiment_dir)
    spec = parse_spec(state.spec, source=state.spec_file)
    layout: ExperimentLayout = state.layout
    runs = read_json(layout.runs_file, {})
    summary = read_json(layout.summary_file, {})
    metric, mode = spec.metric.name, spec.metric.mode
    placement = tuple(get_kind(spec.kind).placement)
    has_arms = "arm" in placement

    outcomes = outcomes_from_folder(layout, spec.budget, runs)
    outcomes += _unreported(layout, spec.budget, runs, summary, {o.trial_id for o in outcomes})
    if has_arms:
        outcomes += _lever_not_created(layout, {o.trial_id for o in outcomes})
        planned = None
    else:
        planned = spec.planned_trials()[0]
        outcomes += _seeds_not_created(list(spec.seeds), planned, outcomes)

    if has_arms:  # searcher trial ids are random: show the design's order
        outcomes.sort(key=lambda o: _design_order(o, spec))
    selected = _selected(summary)
    best_of = _best(outcomes, metric, mode, has_arms)
    trials = []
    for o in outcomes:
        value = o.metrics.get(metric)
        row: dict[str, Any] = {
            "trial_id": o.trial_id or None,
            "seed": o.seed,
            **{k: getattr(o, k) for k in placement},
            "status": o.status.value,
            "iterations": o.iterations,
            "culled_at": o.culled_at,
            metric: value,
            "value_text": format_value(value),
            "selected": bool(selected and o.trial_id and o.trial_id == selected["trial_id"]),
            "best": any(b is o for b in best_of.values()),
            "run_id": o.run_id,
        }
        trials.append(row)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    best_by_arm = [
        {
            "round": o.round,
            "arm": o.arm,
            "trial_id": o.trial_id,
            "seed": o.seed,
            "value": o.metrics.get(metric),
            "value_text": format_value(o.metrics.get(metric)),
        }
        for key, o in sorted(best_of.items(), key=lambda kv: _arm_order(kv[0], spec))
        if has_arms
    ]
    overall = None if has_arms else best_of.get(None)
    out: dict[str, Any] = {
        "experiment_dir": str(layout.root),
        "spec": spec.name,
        "kind": spec.kind,
        "budget": spec.budget,
        "metric": metric,
        "mode": mode,
        "placement": list(placement),
        "finished": layout.is_finalized(),
        "planned": planned,
        "counts": counts,
        "best": None if overall is None else overall.metrics.get(metric),
        "best_by_arm": best_by_arm,
        "selected": selected,
        "cull": _cull(summary, spec),
        "trials": trials,
    }
    return out


# -- rows Tune never reported ------------------------------------------------------------


def _unreported(
    layout: ExperimentLayout,
    budget: int,
    runs: Mapping[str, str],
    summary: Mapping[str, Any],
    known: set[str],
) -> list[TrialOutcome]:
    """Trials Tune created (or the summary recorded) that never wrote a result."""
    out: dict[str, TrialOutcome] = {}
    for tid, (tune_status, config) in layout.tune_trials().items():
        if tid in known:
            continue
        out[tid] = TrialOutcome(
            trial_id=tid,
            seed=config.get("seed"),
            status=trial_status(tune_status, 0, budget),
            iterations=0,
            run_id=runs.get(tid),
            arm=config.get("arm"),
            round=config.get("round"),
            stage=config.get("stage"),
        )
    for rec in summary.get("trials", []):  # finalized: its record is the truth
        tid = str(rec.get("trial_id"))
        if tid in known:
            continue
        out[tid] = TrialOutcome(
            trial_id=tid,
            seed=rec.get("seed"),
            status=TrialStatus(rec["status"]),
            iterations=int(rec.get("iterations") or 0),
            metrics=final_metrics(rec.get("metrics") or {}),
            run_id=rec.get("run_id") or runs.get(tid),
            arm=rec.get("arm"),
            round=rec.get("round"),
            stage=rec.get("stage"),
        )
    return [out[tid] for tid in sorted(out)]


def _seeds_not_created(
    seeds: list[int], planned: int, outcomes: list[TrialOutcome]
) -> list[TrialOutcome]:
    """``pending`` rows for the trials of each seed Tune never created (seed cull, sweep)."""
    if not seeds:
        return []
    per_seed = max(1, planned // len(seeds))
    created: dict[Any, int] = {}
    for o in outcomes:
        created[o.seed] = created.get(o.seed, 0) + 1
    return [
        TrialOutcome(trial_id="", seed=seed, status=TrialStatus.PENDING, iterations=0)
        for seed in seeds
        for _ in range(max(0, per_seed - created.get(seed, 0)))
    ]


def _lever_not_created(layout: ExperimentLayout, known: set[str]) -> list[TrialOutcome]:
    """``pending`` rows for a lever A/B's planned trials Tune has not created yet.

    The searcher's mirror (``tunelab_lever.json``) holds the current look's
    queue (not handed to Tune) and the trials handed to Tune; later looks are
    decided as the looks go, so they are not rows yet.
    """
    st = read_json(layout.lever_state_file, {})
    if not isinstance(st, dict) or st.get("finished"):
        return []
    out = []
    handed = st.get("pending") or {}
    planned = [(tid, t) for tid, t in handed.items() if tid not in known]
    planned += [("", t) for t in st.get("queue") or []]
    for tid, t in planned:
        if not isinstance(t, dict):
            continue
        out.append(
            TrialOutcome(
                trial_id=tid,
                seed=t.get("seed"),
                status=TrialStatus.PENDING,
                iterations=0,
                arm=t.get("arm"),
                round=t.get("round"),
                stage=t.get("stage"),
            )
        )
    return out


# -- decisions -------------------------------------------------------------------------------


def _best(
    outcomes: list[TrialOutcome], metric: str, mode: str, has_arms: bool
) -> dict[tuple[int | None, str | None] | None, TrialOutcome]:
    """The best trial overall (key None) or per (round, arm): finite values of trials that did not fail."""
    best: dict[tuple[int | None, str | None] | None, TrialOutcome] = {}
    for o in outcomes:
        v = o.value(metric)
        if o.status is TrialStatus.ERROR or not math.isfinite(v):
            continue
        key = (o.round, o.arm) if has_arms else None
        cur = best.get(key)
        if cur is None or _better(v, cur.value(metric), mode):
            best[key] = o
    return best


def _better(a: float, b: float, mode: str) -> bool:
    """``a`` beats ``b`` (both finite; ties keep the earlier trial)."""
    return a > b if mode == "max" else a < b


def _design_order(o: TrialOutcome, spec: Any) -> tuple[Any, ...]:
    """Round, stage (looks in order, then the confirmation), seed, arm (control first)."""
    stage = str(o.stage or "")
    step = int(stage[4:]) if stage.startswith("look") and stage[4:].isdigit() else 1 << 30
    return (int(o.round or 0), step, int(o.seed or 0), _arm_order((o.round, o.arm), spec))


def _arm_order(key: tuple[int | None, str | None] | None, spec: Any) -> tuple[int, int, str]:
    """Rounds in order; the control first, then the levers in spec order."""
    rnd, arm = key or (None, None)
    levers = list(getattr(spec, "levers", {}) or {})
    pos = 0 if arm == ARM_CONTROL else 1 + (levers.index(arm) if arm in levers else len(levers))
    return (int(rnd or 0), pos, str(arm))


def _selected(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    sel = summary.get("selected")
    if not isinstance(sel, dict) or not sel.get("trial_id"):
        return None
    keys = ("seed", "trial_id", "run_id", "metric", "value")
    return {k: sel.get(k) for k in keys} | {"value_text": format_value(sel.get("value"))}


def _cull(summary: Mapping[str, Any], spec: Any) -> dict[str, Any] | None:
    if isinstance(summary.get("cull"), dict):
        return dict(summary["cull"])
    cull = getattr(spec, "cull", None)
    if cull is None:
        return None
    return {"at": cull.milestone(spec.budget), "keep": cull.keep, "scheduler": cull.scheduler}
