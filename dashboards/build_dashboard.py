"""Build dashboards/tunelab.json, the Grafana dashboard of tunelab's own metrics.

The metric names come from ``tunelab.metrics`` (defined once there); this
script lays the panels out the way Ray's own dashboards do (a ``datasource``
variable, a ``SessionName`` filter on every query, two panels per row).

    python dashboards/build_dashboard.py           # rewrite dashboards/tunelab.json
    python dashboards/build_dashboard.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tunelab import metrics as tm

OUT = Path(__file__).resolve().parent / "tunelab.json"
UID = "tunelabDashboard"
RATE = "$__rate_interval"  # Grafana's rate window: at least 4 scrape intervals
#: The filter every selector carries (the dashboard's variables).
FILTER = 'SessionName=~"$SessionName", spec=~"$spec", family=~"$family"'


# -- PromQL pieces -------------------------------------------------------------------------
def sel(series: str) -> str:
    """A selector of ``series`` with the dashboard's filter."""
    return f"{series}{{{FILTER}}}"


def prom(name: str, suffix: str = "") -> str:
    """The Prometheus series of the tunelab metric ``name`` (``suffix`` for histograms)."""
    base = tm.METRICS[name].prometheus_name
    return base + suffix


def quantile(q: float, name: str, by: str = "spec") -> str:
    return (
        f"histogram_quantile({q}, sum by (le, {by}) (rate({sel(prom(name, '_bucket'))}[{RATE}])))"
    )


def mean(name: str, by: str = "spec") -> str:
    s, c = sel(prom(name, "_sum")), sel(prom(name, "_count"))
    return f"sum by ({by}) (rate({s}[{RATE}])) / sum by ({by}) (rate({c}[{RATE}]))"


# -- panels --------------------------------------------------------------------------------
def target(expr: str, legend: str, ref: str, *, heatmap: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "range": True,
        "instant": False,
    }
    if heatmap:
        t["format"] = "heatmap"
    return t


def panel(
    pid: int,
    title: str,
    description: str,
    targets: list[tuple[str, str]],
    *,
    kind: str = "timeseries",
    unit: str = "short",
    stack: bool = False,
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10,
        "showPoints": "never",
    }
    if stack:
        custom.update(stacking={"mode": "normal", "group": "A"}, fillOpacity=60)
    p: dict[str, Any] = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "targets": [
            target(expr, legend, chr(ord("A") + i), heatmap=kind == "heatmap")
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = custom
        p["options"] = {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif kind == "stat":
        p["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "value_and_name",
        }
    elif kind == "bargauge":
        p["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "basic",
            "showUnfilled": True,
        }
    elif kind == "heatmap":
        p["options"] = {
            "calculate": False,
            "yAxis": {"unit": unit},
            "color": {"mode": "scheme", "scheme": "Spectral"},
            "cellValues": {"unit": "short"},
            "tooltip": {"mode": "single", "yHistogram": True},
        }
    return p


def rows() -> list[tuple[str, list[dict[str, Any]]]]:
    """(row title, panels) in dashboard order."""
    trials = f"sum by (state) ({sel(prom(tm.TRIALS))})"
    reports = f"sum by (spec) (rate({sel(prom(tm.REPORTS))}[{RATE}]))"
    iterations = f"sum by (spec) ({sel(prom(tm.ITERATION_SECONDS, '_count'))})"
    it_heat = f"sum by (le) (increase({sel(prom(tm.ITERATION_SECONDS, '_bucket'))}[{RATE}]))"
    ckpt_rate = f"60 * sum by (spec) (rate({sel(prom(tm.CHECKPOINT_SECONDS, '_count'))}[{RATE}]))"
    ckpt_size = f"max by (spec, family) ({sel(prom(tm.CHECKPOINT_BYTES))})"
    nan_now = f"sum by (spec, family) (increase({sel(prom(tm.NAN_SKIPPED))}[{RATE}]))"
    nan_total = f"sum by (spec, family) ({sel(prom(tm.NAN_SKIPPED))})"
    explosions = f"sum by (spec, family) (increase({sel(prom(tm.EXPLOSIONS))}[{RATE}]))"
    diverged = f"sum by (spec, family) ({sel(prom(tm.DIVERGED_TRIALS))})"
    verdicts = f"sum by (label) ({sel(prom(tm.VERDICTS))})"
    verdicts_spec = f"sum by (spec, label) ({sel(prom(tm.VERDICTS))})"
    return [
        (
            "Trials",
            [
                panel(
                    1,
                    "Trials now",
                    "Trials of the selected experiments per state (driver gauge "
                    f"{prom(tm.TRIALS)}; disappears when the driver exits).",
                    [(trials, "{{state}}")],
                    kind="stat",
                ),
                panel(
                    2,
                    "Trials by state",
                    "Running, paused (waiting at a sync cull), pending, culled, "
                    "finished, errored and diverged trials over time.",
                    [(trials, "{{state}}")],
                    stack=True,
                ),
            ],
        ),
        (
            "Throughput",
            [
                panel(
                    3,
                    "Reports per second",
                    f"Results reported to Tune per second (rate of {prom(tm.REPORTS)}), per spec.",
                    [(reports, "{{spec}}")],
                    unit="suffix: reports/s",
                ),
                panel(
                    4,
                    "Iteration time",
                    "Wall time of one train_iteration: median, 95th percentile and mean, per spec.",
                    [
                        (quantile(0.5, tm.ITERATION_SECONDS), "p50 {{spec}}"),
                        (quantile(0.95, tm.ITERATION_SECONDS), "p95 {{spec}}"),
                        (mean(tm.ITERATION_SECONDS), "mean {{spec}}"),
                    ],
                    unit="s",
                ),
                panel(
                    5,
                    "Iteration time distribution",
                    "Iterations per time bucket in each window.",
                    [(it_heat, "{{le}}")],
                    kind="heatmap",
                    unit="s",
                ),
                panel(
                    6,
                    "Iterations completed",
                    "Iterations completed so far (all trials), per spec.",
                    [(iterations, "{{spec}}")],
                ),
            ],
        ),
        (
            "Checkpoints",
            [
                panel(
                    7,
                    "Checkpoint write time",
                    "Time to write one checkpoint: median, 95th percentile and mean, per spec.",
                    [
                        (quantile(0.5, tm.CHECKPOINT_SECONDS), "p50 {{spec}}"),
                        (quantile(0.95, tm.CHECKPOINT_SECONDS), "p95 {{spec}}"),
                        (mean(tm.CHECKPOINT_SECONDS), "mean {{spec}}"),
                    ],
                    unit="s",
                ),
                panel(
                    8,
                    "Checkpoint size",
                    "Size of the last checkpoint, largest over running trials.",
                    [(ckpt_size, "{{spec}} ({{family}})")],
                    unit="bytes",
                ),
                panel(
                    9,
                    "Checkpoints per minute",
                    "Checkpoints written per minute, per spec.",
                    [(ckpt_rate, "{{spec}}")],
                    unit="suffix: /min",
                ),
            ],
        ),
        (
            "Health and decisions",
            [
                panel(
                    10,
                    "NaN-skipped steps",
                    "Optimizer steps the families skipped as non-finite "
                    "(health/nan_skipped) in each window. No data means none skipped.",
                    [(nan_now, "{{spec}} ({{family}})")],
                ),
                panel(
                    11,
                    "NaN-skipped steps, total",
                    "Non-finite steps skipped since the Ray session started.",
                    [(nan_total, "{{spec}} ({{family}})")],
                    kind="stat",
                ),
                panel(
                    14,
                    "Gradient explosions",
                    "Explosions the health monitor detected (health/explosions: a step's "
                    "gradient norm above 10x its robust level, or sustained growth) in each "
                    "window. No data means none.",
                    [(explosions, "{{spec}} ({{family}})")],
                ),
                panel(
                    15,
                    "Diverged trials, total",
                    "Trials the health monitor ended as diverged (tagged "
                    "tunelab.health.diagnosis in MLflow) since the Ray session started.",
                    [(diverged, "{{spec}} ({{family}})")],
                    kind="stat",
                ),
                panel(
                    12,
                    "Lever verdicts",
                    "Lever A/B verdicts reached per label (win, negative, "
                    "null, inconclusive, crashed).",
                    [(verdicts, "{{label}}")],
                    kind="bargauge",
                ),
                panel(
                    13,
                    "Lever verdicts per spec",
                    "Verdicts reached per spec and label.",
                    [(verdicts_spec, "{{spec}}: {{label}}")],
                    stack=True,
                ),
            ],
        ),
    ]


def layout(row_list: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Rows of two 12-wide, 8-high panels, like Ray's dashboards."""
    out: list[dict[str, Any]] = []
    y, row_id = 0, 100
    for title, panels in row_list:
        out.append(
            {
                "id": row_id,
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        row_id, y = row_id + 1, y + 1
        for i, p in enumerate(panels):
            p["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)}
            out.append(p)
        y += 8 * ((len(panels) + 1) // 2)
    return out


def variable(name: str, label: str, query: str, description: str, *, multi: bool) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "definition": query,
        "query": {"query": query, "refId": "StandardVariableQuery"},
        "refresh": 2,
        "hide": 0,
        "includeAll": True,
        "multi": multi,
        "allValue": ".*",
        "sort": 2,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def dashboard() -> dict[str, Any]:
    gauge = prom(tm.TRIALS)
    return {
        "title": "tunelab",
        "uid": UID,
        "description": "tunelab experiments: trial states, iteration and report rates, checkpoints, "
        "NaN-skipped steps and lever verdicts (metrics from tunelab.metrics).",
        "tags": ["tunelab", "ray"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "description": "The Prometheus that scrapes Ray's metrics.",
                    "refresh": 1,
                    "hide": 0,
                    "includeAll": False,
                    "multi": False,
                    "current": {},
                },
                variable(
                    "SessionName",
                    "Ray session",
                    f"label_values({gauge}, SessionName)",
                    "Filter queries to specific Ray sessions.",
                    multi=False,
                ),
                variable(
                    "spec",
                    "Spec",
                    f'label_values({gauge}{{SessionName=~"$SessionName"}}, spec)',
                    "Filter queries to specific experiment specs.",
                    multi=True,
                ),
                variable(
                    "family",
                    "Family",
                    f'label_values({gauge}{{SessionName=~"$SessionName", spec=~"$spec"}}, family)',
                    "Filter queries to specific families.",
                    multi=True,
                ),
            ]
        },
        "panels": layout(rows()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if tunelab.json is out of date"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(
                f"{OUT} is out of date: run python dashboards/build_dashboard.py", file=sys.stderr
            )
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
