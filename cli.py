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
) -> None:
    """Continue an interrupted experiment (Ctrl-C, crash, SIGKILL) to the same final state."""
    from tunelab import resume_experiment

    with _exit_codes():
        summary = resume_experiment(experiment_dir, address=address)
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
    """Trials, their states, iterations and the best metric."""
    from tunelab import experiment_status, latest_experiment

    with _exit_codes():
        info = experiment_status(experiment_dir or latest_experiment(storage))
    if as_json:
        typer.echo(_strict_json(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{info['spec']} ({info['kind']}, budget {info['budget']})")
    for col in ("trial", "seed", "status", "iterations", info["metric"], "run"):
        table.add_column(col)
    for t in info["trials"]:
        value = t[info["metric"]]
        table.add_row(
            t["trial_id"],
            str(t["seed"]),
            t["status"],
            str(t["iterations"]),
            "-" if value is None else f"{value:.4g}",
            str(t["run_id"]),
        )
    console = Console()
    console.print(table)
    console.print(
        f"best {info['metric']}: {info['best']}  finished: {info['finished']}  folder: {info['experiment_dir']}"
    )


@app.command()
def verdict(
    results: Annotated[
        Path, typer.Argument(help="CSV or Parquet with columns seed, arm and metric columns.")
    ],
    metric: Annotated[str, typer.Option(help="Primary metric column.")] = "",
    mode: Annotated[str, typer.Option(help="max or min: which direction is better.")] = "max",
    min_effect: Annotated[
        float,
        typer.Option("--min-effect", help="Keep bar: smallest effect of interest (raw units)."),
    ] = 0.0,
    alpha: Annotated[float, typer.Option(help="Two-sided type I error rate.")] = 0.05,
    guardrail: Annotated[
        list[str] | None,
        typer.Option(help="NAME:MODE:MARGIN, repeatable, e.g. val/flat_l1:min:0.005."),
    ] = None,
    control: Annotated[str, typer.Option(help="Name of the control arm.")] = "control",
    looks: Annotated[
        str | None, typer.Option(help="Planned looks, comma-separated seed counts, e.g. 5,10,20.")
    ] = None,
    correction: Annotated[str, typer.Option(help="holm, bh or none across the levers.")] = "holm",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (one object per lever).")
    ] = False,
) -> None:
    """Paired-seed verdicts on any results table (from tunelab or elsewhere)."""
    from tunelab.paired_table import TableError, verdict_table

    try:
        if not metric:
            raise TableError(
                "--metric is required: the primary metric column, e.g. --metric val/spike_l1"
            )
        if min_effect <= 0:
            raise TableError(
                "--min-effect must be > 0: the smallest effect of interest in the metric's units"
            )
        plan = [int(x) for x in looks.split(",")] if looks else None
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
        )
    except (TableError, ValueError) as err:
        _err(str(err))
        raise typer.Exit(TableError.exit_code) from None
    if as_json:
        typer.echo(_strict_json(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metric} ({mode}), keep bar {min_effect}, alpha {alpha}")
    # The CI's level is 1 - alpha, or the look's threshold with planned looks (may differ by lever).
    levels = {r["confidence"] for r in rows}
    one_level = len(levels) == 1 and None not in levels
    ci_header = f"{_pct(next(iter(levels)))} CI" if one_level else "CI (level)"
    for col in ("lever", "verdict", "effect", ci_header, "p", "n", "dz", "rho", "guardrails"):
        table.add_column(col)
    for r in rows:
        guards = " ".join(f"{k}={g['status']}" for k, g in r["guardrails"].items())
        verdict_text = r["verdict"] + (" (meaningful)" if r["meaningful"] else "")
        ci = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        if not one_level:
            ci += f" ({_pct(r['confidence'])})"
        table.add_row(
            r["lever"],
            verdict_text,
            _fmt(r["effect"]),
            ci,
            _fmt(r["p_value"]),
            str(r["n_pairs"]),
            _fmt(r["dz"]),
            _fmt(r["rho"]),
            guards,
        )
    Console().print(table)


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
    """Write a self-contained HTML report of a lever A/B experiment."""
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
