"""tunelab's command line: ``platform sweep | resume | status | verdict | report``.

Thin commands over the ``tunelab`` library. Exit codes: 0 success; 2 invalid
spec, table or arguments (nothing started); 1 trials failed past the spec's
failure budget; 74 the disk filled up (or the quota) and 130 interrupted
(Ctrl-C / SIGTERM), both with the state saved for ``platform resume``.
Every command printed for pasting is shell-quoted (paths with spaces).

    platform sweep search_spaces/seed_cull.yaml --quick
    platform status
    platform resume tunelab_results/ouroboros-seed-cull-20261121-120000-000000
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from tunelab.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_NO_SELECTION

app = typer.Typer(
    help="tunelab: seed culls, paired-seed lever A/B verdicts and sweeps on Ray Tune + MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


@contextlib.contextmanager
def _exit_codes() -> Iterator[None]:
    """Map tunelab's errors to exit codes, in one place: each error carries its ``exit_code``."""
    from tunelab import TunelabError

    try:
        yield
    except TunelabError as err:
        _err(str(err))
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C before the experiment's own signal handling was in place
        _err("interrupted before any trial ran; nothing was finalized")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _finish(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(_strict_json(summary))
    else:
        _print_summary(summary)
    if summary.get("failed", 0) > summary.get("failure_budget", 0):
        _err(
            f"{summary['failed']} trial(s) failed, more than the spec tolerates ({summary['failure_budget']})"
        )
        raise typer.Exit(EXIT_FAILED)
    if summary.get("no_selection"):
        _err(f"no seed selected: {summary['no_selection']}")
        raise typer.Exit(EXIT_NO_SELECTION)


def _strict_json(obj: Any) -> str:
    """JSON without bare NaN / Infinity tokens (non-finite numbers become null)."""
    from tunelab import strict_json

    return json.dumps(strict_json(obj), default=str, allow_nan=False)


def _num(x: Any, fmt: str = ".4g") -> str:
    """A number for humans; ``nan`` for a missing / non-finite one (NaN is shown, never dropped)."""
    return "nan" if x is None else format(float(x), fmt)


def _verdict_lines(summary: dict[str, Any]) -> list[str]:
    """One line per lever verdict of a lever A/B: label, effect with CI, p, n, confirm / stack."""
    records = summary.get("verdicts")
    if not records:
        return []
    stacked = {(int(r), str(lever)) for r, lever in summary.get("stacked") or []}
    lines = ["verdicts:"]
    for rec in records:
        label = rec["verdict"] + (" (meaningful)" if rec.get("meaningful") else "")
        level = rec.get("confidence")
        ci = f"{_num(level * 100, '.3g')}% CI" if level is not None else "CI"
        p = rec.get("p_adjusted", rec.get("p_value"))
        p_name = f"p ({rec['correction']})" if "p_adjusted" in rec else "p"
        text = (
            f"  {rec['lever']} (round {rec.get('round', 1)}): {label}; effect "
            f"{_num(rec.get('effect'), '+.4g')} [{_num(rec.get('ci_low'))}, {_num(rec.get('ci_high'))}] "
            f"{ci}, {p_name} {_num(p)}, n {rec.get('n_pairs', 0)}"
        )
        if rec.get("crashed_seeds"):
            text += f"; crashed seeds {', '.join(str(s) for s in rec['crashed_seeds'])}"
        if rec.get("confirmed") is not None:
            text += "; confirmed" if rec["confirmed"] else "; not confirmed"
        if (int(rec.get("round", 1)), str(rec["lever"])) in stacked:
            text += "; stacked into the control"
        lines.append(text)
    final = summary.get("final_control")
    if stacked and final is not None:
        lines.append(f"final control: {final}")
    return lines


def _print_summary(summary: dict[str, Any]) -> None:
    out = typer.echo
    out(f"experiment: {summary['experiment_dir']}")
    counts: dict[str, int] = {}
    for t in summary["trials"]:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    out("trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    cull = summary.get("cull")
    if cull:
        out(
            f"cull: {cull['scheduler']} at iteration {cull['at']} kept {cull.get('kept', '?')} "
            f"of {len(summary['trials'])} seeds (keep {cull['keep']})"
        )
    sel = summary.get("selected")
    if sel:
        out(
            f"selected: seed {sel['seed']} ({sel['metric']} = {sel['value']:.4g}), run {sel['run_id']}"
        )
        out(f"manifest: {sel['manifest']}")
    for line in _verdict_lines(summary):
        out(line)
    best = summary.get("best")
    if best:
        out(
            f"best: trial {best['trial_id']} ({summary['metric']['name']} = {best['value']:.4g}) config {best['config']}"
        )
    uri = summary["tracking_uri"]
    out(
        f"MLflow store: {uri} (experiment {summary['mlflow_experiment']!r}, parent run {summary['parent_run_id']})"
    )
    out(
        f"open the MLflow UI: {shlex.join(['mlflow', 'ui', '--backend-store-uri', uri])}"
        if uri.startswith("sqlite")
        else f"MLflow UI: {uri}"
    )


NO_DASHBOARD_HELP = (
    "Start the local Ray without its dashboard (default: on 127.0.0.1:8265 or the next free "
    "port; multi-worker trials need it to free a culled trial's workers)."
)


@app.command()
def sweep(
    spec: Annotated[
        Path, typer.Argument(help="Experiment spec (YAML), e.g. search_spaces/seed_cull.yaml.")
    ],
    quick: Annotated[
        bool, typer.Option("--quick", help="Use the spec's `quick:` overrides (minutes on 2 CPUs).")
    ] = False,
    storage: Annotated[
        Path, typer.Option(help="Folder for results, checkpoints and the embedded MLflow store.")
    ] = Path("tunelab_results"),
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow tracking URI (default: sqlite under --storage, or $MLFLOW_TRACKING_URI).",
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON summary on stdout at the end.")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a spec key (repeatable): --set budget=2 --set config.hidden=16."
        ),
    ] = None,
    no_dashboard: Annotated[bool, typer.Option("--no-dashboard", help=NO_DASHBOARD_HELP)] = False,
) -> None:
    """Validate a spec and run it: seed cull, sweep or lever A/B."""
    from tunelab import run_experiment

    with _exit_codes():
        summary = run_experiment(
            spec,
            quick=quick,
            storage=storage,
            tracking_uri=tracking_uri,
            address=address,
            overrides=set_ or (),
            dashboard=not no_dashboard,
        )
    _finish(summary, as_json)


@app.command()
def resume(
    experiment_dir: Annotated[
        Path, typer.Argument(help="The experiment folder printed by `platform sweep`.")
    ],
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster address.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON summary on stdout at the end.")
    ] = False,
    no_dashboard: Annotated[bool, typer.Option("--no-dashboard", help=NO_DASHBOARD_HELP)] = False,
) -> None:
    """Continue an interrupted experiment (Ctrl-C, crash, SIGKILL) to the same final state."""
    from tunelab import resume_experiment

    with _exit_codes():
        summary = resume_experiment(experiment_dir, address=address, dashboard=not no_dashboard)
    _finish(summary, as_json)


@app.command()
def status(
    experiment_dir: Annotated[
        Path | None, typer.Argument(help="Experiment folder (default: the latest under --storage).")
    ] = None,
    storage: Annotated[Path, typer.Option(help="Where to look for the latest experiment.")] = Path(
        "tunelab_results"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Trials (pending ones too), their states, iterations, the selection and the best metric."""
    from tunelab import experiment_status, latest_experiment

    with _exit_codes():
        info = experiment_status(experiment_dir or latest_experiment(storage))
    if as_json:
        typer.echo(_strict_json(info))
        return
    from rich.console import Console

    # Without a terminal (a log, a pipe) print the whole table rather than cut columns to 80.
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    console.print(_status_table(info))
    for line in _status_lines(info):
        console.print(line, highlight=False, markup=False)


def _status_table(info: dict[str, Any]) -> Any:
    """The trials of ``platform status`` as a rich table (columns per kind)."""
    from rich.table import Table

    metric, placement = info["metric"], info["placement"]
    show_cull = info["cull"] is not None or any(t["culled_at"] is not None for t in info["trials"])
    show_selected = info["kind"] == "seed_cull"
    table = Table(title=f"{info['spec']} ({info['kind']}, budget {info['budget']})")
    cols = ["trial", *placement, "seed", "status", "iterations"]
    cols += ["culled at"] if show_cull else []
    cols += [metric, "best"] + (["selected"] if show_selected else []) + ["run"]
    for col in cols:
        table.add_column(col, no_wrap=col != "run")
    for t in info["trials"]:
        row = [t["trial_id"] or "-", *(_cell(t.get(k)) for k in placement), _cell(t["seed"])]
        row += [t["status"], str(t["iterations"])]
        row += [_cell(t["culled_at"])] if show_cull else []
        row += [t["value_text"], "yes" if t["best"] else ""]
        row += ["yes" if t["selected"] else ""] if show_selected else []
        row += [_cell(t["run_id"])]
        table.add_row(*row)
    return table


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _status_lines(info: dict[str, Any]) -> list[str]:
    """What ``platform status`` prints under the table: counts, cull, selection, best, pending."""
    metric = info["metric"]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(info["counts"].items()))
    planned = f" of {info['planned']} planned" if info["planned"] is not None else ""
    lines = [f"trials: {counts or 'none'}{planned}"]
    cull = info["cull"]
    if cull:
        culled = [t for t in info["trials"] if t["culled_at"] is not None]
        stops = ", ".join(f"seed {t['seed']} at {t['culled_at']}" for t in culled)
        lines.append(
            f"cull: {cull['scheduler']} at iteration {cull['at']}, keep {cull['keep']}"
            + (f"; culled: {stops}" if stops else "")
        )
    sel = info["selected"]
    if info["kind"] == "seed_cull":
        lines.append(
            f"selected: seed {sel['seed']} (trial {sel['trial_id']}, {sel['metric']} = "
            f"{sel['value_text']}), run {sel['run_id']}"
            if sel
            else "selected: none" + ("" if info["finished"] else " yet (not finished)")
        )
    if info["best_by_arm"]:
        lines.append(f"best {metric} ({info['mode']}) per arm:")
        for b in info["best_by_arm"]:
            lines.append(
                f"  round {b['round']} {b['arm']}: {b['value_text']} (seed {b['seed']}, trial {b['trial_id']})"
            )
    elif not info["placement"]:
        best = next((t for t in info["trials"] if t["best"]), None)
        lines.append(
            f"best {metric} ({info['mode']}): "
            + (
                f"{best['value_text']} (seed {best['seed']}, trial {best['trial_id']})"
                if best
                else "none"
            )
        )
    waiting = [t for t in info["trials"] if t["trial_id"] is None]
    if waiting:
        seeds = ", ".join(
            f"{t['arm']}/{t['seed']}" if t.get("arm") else str(t["seed"]) for t in waiting
        )
        lines.append(f"not started: {len(waiting)} trial(s), seeds {seeds}")
    lines.append(
        f"finished: {'yes' if info['finished'] else 'no'}  folder: {info['experiment_dir']}"
    )
    return lines


@app.command()
def verdict(
    results: Annotated[
        Path,
        typer.Argument(
            help="CSV or Parquet with columns seed, arm and metric columns; or a lever A/B's "
            "results.csv / results.parquet (its experiment's settings are the defaults)."
        ),
    ],
    metric: Annotated[
        str, typer.Option(help="Primary metric column (default: the experiment's metric).")
    ] = "",
    mode: Annotated[
        str | None,
        typer.Option(help="max or min: which direction is better (default: max or the spec's)."),
    ] = None,
    min_effect: Annotated[
        float | None,
        typer.Option("--min-effect", help="Keep bar: smallest effect of interest (raw units)."),
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Two-sided type I error rate (default: 0.05).")
    ] = None,
    guardrail: Annotated[
        list[str] | None,
        typer.Option(help="NAME:MODE:MARGIN, repeatable, e.g. val/flat_l1:min:0.005."),
    ] = None,
    control: Annotated[str, typer.Option(help="Name of the control arm.")] = "control",
    looks: Annotated[
        str | None,
        typer.Option(
            help="Planned looks, comma-separated seed counts, e.g. 5,10,20; 'none' for one analysis."
        ),
    ] = None,
    correction: Annotated[
        str | None, typer.Option(help="holm, bh or none across the levers (default: holm).")
    ] = None,
    round_no: Annotated[
        int | None,
        typer.Option("--round", help="A lever A/B table: only this round (default: every round)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (one object per lever and round).")
    ] = False,
) -> None:
    """Paired-seed verdicts on any results table (from tunelab or elsewhere).

    A lever A/B's own results table (in its experiment folder) is decided as the
    experiment decided it: per round, look by look, confirmation rows left out;
    settings not given come from the folder's tunelab.json, and the verdicts then
    equal verdicts.json.
    """
    from tunelab.paired_table import TableError, table_settings, verdict_table

    try:
        settings = table_settings(results)
        same_metric = settings is not None and metric in ("", settings.metric)
        if settings is not None:
            metric = metric or settings.metric
            if same_metric:  # the keep bar and direction are the spec's metric's
                mode = mode or settings.mode
                min_effect = settings.min_effect if min_effect is None else min_effect
            alpha = settings.alpha if alpha is None else alpha
            correction = correction or settings.correction
            if looks is None and settings.looks:
                looks = ",".join(str(n) for n in settings.looks)
            if guardrail is None:
                guardrail = list(settings.guardrails)
        if not metric:
            raise TableError(
                "--metric is required: the primary metric column, e.g. --metric val/spike_l1"
            )
        if min_effect is None or min_effect <= 0:
            raise TableError(
                "--min-effect must be > 0: the smallest effect of interest in the metric's units"
            )
        mode, alpha, correction = (
            mode or "max",
            0.05 if alpha is None else alpha,
            correction or "holm",
        )
        plan = [int(x) for x in looks.split(",")] if looks and looks != "none" else None
        rows = verdict_table(
            results,
            metric=metric,
            mode=mode,
            min_effect=min_effect,
            alpha=alpha,
            guardrails=guardrail or (),
            control=control,
            looks=plan,
            correction=correction,
            round_no=round_no,
            seeds=settings.seeds if settings else None,
            confirm_seeds=settings.confirm_seeds if settings else None,
        )
    except (TableError, ValueError) as err:
        _err(str(err))
        raise typer.Exit(TableError.exit_code) from None
    if as_json:
        typer.echo(_strict_json(rows))
        return
    from rich.console import Console
    from rich.table import Table

    title = f"{metric} ({mode}), keep bar {min_effect}, alpha {alpha}"
    if settings is not None:
        title += f" (defaults from {settings.source})"
    table = Table(title=title)
    # The CI's level is 1 - alpha, or the look's threshold with planned looks (may differ by lever).
    levels = {r["confidence"] for r in rows}
    one_level = len(levels) == 1 and None not in levels
    ci_header = f"{_pct(next(iter(levels)))} CI" if one_level else "CI (level)"
    by_round = any("round" in r for r in rows)
    corrections = {r.get("correction") for r in rows if r.get("p_adjusted") is not None}
    p_header = f"p ({corrections.pop()})" if len(corrections) == 1 else "p"  # corrected where it is
    cols = ("lever", "verdict", "effect", ci_header, p_header, "n", "dz", "rho", "guardrails")
    for col in ("round", *cols) if by_round else cols:
        table.add_column(col)
    for r in rows:
        guards = " ".join(f"{k}={g['status']}" for k, g in r["guardrails"].items())
        verdict_text = r["verdict"] + (" (meaningful)" if r["meaningful"] else "")
        ci = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        if not one_level:
            ci += f" ({_pct(r['confidence'])})"
        if r.get("confirmed") is not None:
            verdict_text += "; confirmed" if r["confirmed"] else "; not confirmed"
        table.add_row(
            *([str(r["round"])] if by_round else []),
            r["lever"],
            verdict_text,
            _fmt(r["effect"]),
            ci,
            _fmt(r["p_adjusted"] if r.get("p_adjusted") is not None else r["p_value"]),
            str(r["n_pairs"]),
            _fmt(r["dz"]),
            _fmt(r["rho"]),
            guards,
        )
    console = Console()
    if not console.is_terminal:  # a log or a pipe: the whole table, not columns cut to 80
        console = Console(width=max(console.width, 160))
    console.print(table)


@app.command()
def report(
    name_or_dir: Annotated[
        str, typer.Argument(help="An experiment folder, or a spec name (its latest run).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")] = Path(
        "report.html"
    ),
    storage: Annotated[Path, typer.Option(help="Where to look up a spec name.")] = Path(
        "tunelab_results"
    ),
) -> None:
    """Write a self-contained HTML report: a lever A/B, seed cull or sweep page by the kind."""
    from tunelab.report import find_experiment, write_report

    with _exit_codes():
        path = write_report(find_experiment(name_or_dir, storage), out)
    typer.echo(f"report: {path}")


cluster_app = typer.Typer(
    help="Helpers for Ray clusters on SLURM (see cluster.yaml).", no_args_is_help=True
)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("check")
def cluster_check(
    config: Annotated[Path, typer.Argument(help="The cluster.yaml to check.")] = Path(
        "cluster.yaml"
    ),
) -> None:
    """Check a cluster.yaml against the local SLURM: partitions, GRES, CPUs, paths."""
    from tunelab.slurm import check_cluster_file

    problems = check_cluster_file(config)
    for p in problems:
        _err(str(p))
    if problems:
        raise typer.Exit(EXIT_INVALID)
    typer.echo(f"{config}: OK for this SLURM")


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


def _pct(level: float | None) -> str:
    """A confidence level as a percentage: 0.95 -> '95%', 0.9946 -> '99.46%'."""
    return "-" if level is None else f"{100 * level:.4g}%"


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
