"""dashboards/: the Grafana dashboard of tunelab's metrics and its provisioning files.

Every panel query is parsed by a small PromQL parser (below: tokens,
precedence, selectors, aggregations, known functions with argument types) and
must name only series that ``tunelab.metrics`` defines; when Debian's
``promtool`` is installed, Prometheus' own parser checks them too.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tunelab import metrics as tm

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
DASHBOARD = DASHBOARDS / "tunelab.json"
SESSION_FILTER = 'SessionName=~"$SessionName"'
#: Grafana's interval macros, replaced as Grafana does before the query reaches Prometheus.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "30m"}


# -- a small PromQL parser ---------------------------------------------------------------
class PromQLError(ValueError):
    """An expression Prometheus would reject."""


AGGREGATIONS = {
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "group",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
}
AGG_PARAM = {"topk": "scalar", "bottomk": "scalar", "quantile": "scalar", "count_values": "string"}
_RANGE_FNS = (
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "changes",
    "resets",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "stddev_over_time",
    "stdvar_over_time",
    "present_over_time",
)
#: name -> argument types ("?" marks optional trailing ones) and result type.
FUNCTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    **{f: (("range",), "vector") for f in _RANGE_FNS},
    "quantile_over_time": (("scalar", "range"), "vector"),
    "predict_linear": (("range", "scalar"), "vector"),
    "histogram_quantile": (("scalar", "vector"), "vector"),
    **{
        f: (("vector",), "vector")
        for f in (
            "abs",
            "ceil",
            "floor",
            "exp",
            "ln",
            "log2",
            "log10",
            "sqrt",
            "sort",
            "sort_desc",
            "absent",
            "timestamp",
        )
    },
    "round": (("vector", "scalar?"), "vector"),
    "clamp": (("vector", "scalar", "scalar"), "vector"),
    "clamp_min": (("vector", "scalar"), "vector"),
    "clamp_max": (("vector", "scalar"), "vector"),
    "scalar": (("vector",), "scalar"),
    "vector": (("scalar",), "vector"),
    "time": ((), "scalar"),
    "label_replace": (("vector", "string", "string", "string", "string"), "vector"),
}
_BINARY = [  # lowest precedence first
    ("or",),
    ("and", "unless"),
    ("==", "!=", "<=", ">=", "<", ">"),
    ("+", "-"),
    ("*", "/", "%", "atan2"),
    ("^",),
]
_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![\w])
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0x[0-9a-fA-F]+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|==|!=|<=|>=|[-+*/%^<>=(){}\[\],:])
""",
    re.VERBOSE,
)


@dataclass
class Parsed:
    """What an expression is made of."""

    type: str
    metrics: list[str] = field(default_factory=list)
    selectors: list[list[tuple[str, str, str]]] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    grouping: list[str] | None = None  # the labels an outermost aggregation keeps


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"unexpected {expr[pos : pos + 12]!r} at {pos}")
        pos = m.end()
        if m.lastgroup != "ws":
            tokens.append((m.lastgroup or "", m.group()))
    return tokens


class Parser:
    """Recursive descent over PromQL's grammar; collects metrics, selectors, functions."""

    def __init__(self, expr: str) -> None:
        self.tokens = tokenize(expr)
        self.i = 0
        self.out = Parsed(type="?")

    # -- token helpers
    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i + k
        return self.tokens[j] if j < len(self.tokens) else ("eof", "")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tk, tv = self.peek()
        if (value is not None and tv != value) or (kind is not None and tk != kind):
            raise PromQLError(f"expected {value or kind}, got {tv or 'end'!r}")
        self.i += 1
        return tv

    def at(self, *values: str) -> bool:
        tk, tv = self.peek()
        return tk in ("op", "ident") and tv in values

    # -- grammar
    def parse(self) -> Parsed:
        t, grouping = self.expr(0)
        if self.peek()[0] != "eof":
            raise PromQLError(f"trailing {self.peek()[1]!r}")
        self.out.type, self.out.grouping = t, grouping
        return self.out

    def expr(self, level: int) -> tuple[str, list[str] | None]:
        if level == len(_BINARY):
            return self.unary()
        left, grouping = self.expr(level + 1)
        while self.at(*_BINARY[level]):
            op = self.take()
            if self.at("bool"):
                self.take()
            if self.at("on", "ignoring"):
                self.take()
                self.labels()
                if self.at("group_left", "group_right"):
                    self.take()
                    if self.at("("):
                        self.labels()
            right, _ = self.expr(level + (0 if op == "^" else 1))  # ^ is right-associative
            if "range" in (left, right) or "string" in (left, right):
                raise PromQLError(f"operator {op} needs scalars or instant vectors")
            left = "scalar" if left == right == "scalar" else "vector"
            grouping = None
        return left, grouping

    def unary(self) -> tuple[str, list[str] | None]:
        if self.at("-", "+"):
            self.take()
            t, g = self.unary()
            if t not in ("scalar", "vector"):
                raise PromQLError("unary minus needs a scalar or vector")
            return t, g
        return self.postfix()

    def postfix(self) -> tuple[str, list[str] | None]:
        t, grouping = self.primary()
        if self.at("["):
            self.take()
            self.take(kind="duration")
            if self.at(":"):  # subquery [range:step]
                self.take()
                if self.peek()[0] == "duration":
                    self.take()
            elif t != "vector" or not self.out.selectors:
                raise PromQLError("a range [..] applies to a selector")
            self.take("]")
            t = "range"
        if self.at("offset"):
            self.take()
            self.take(kind="duration")
        return t, grouping

    def primary(self) -> tuple[str, list[str] | None]:
        tk, tv = self.peek()
        if tk == "number" or (tk == "ident" and tv in ("Inf", "NaN")):
            self.take()
            return "scalar", None
        if tk == "string":
            self.take()
            return "string", None
        if tv == "(":
            self.take()
            t, g = self.expr(0)
            self.take(")")
            return t, g
        if tv == "{":
            self.selector(None)
            return "vector", None
        if tk != "ident":
            raise PromQLError(f"unexpected {tv or 'end'!r}")
        if tv in AGGREGATIONS and (self.peek(1)[1] in ("(", "by", "without")):
            return self.aggregation()
        if self.peek(1)[1] == "(":
            return self.call(), None
        self.selector(self.take())
        return "vector", None

    def labels(self) -> list[str]:
        self.take("(")
        names: list[str] = []
        while not self.at(")"):
            names.append(self.take(kind="ident"))
            if not self.at(")"):
                self.take(",")
        self.take(")")
        return names

    def aggregation(self) -> tuple[str, list[str] | None]:
        name = self.take()
        grouping: list[str] | None = None
        if self.at("by", "without"):
            kind, names = self.take(), self.labels()
            grouping = names if kind == "by" else None
        self.take("(")
        if name in AGG_PARAM:
            if self.expr(0)[0] != AGG_PARAM[name]:
                raise PromQLError(f"{name} needs a {AGG_PARAM[name]} parameter")
            self.take(",")
        if self.expr(0)[0] != "vector":
            raise PromQLError(f"{name}() aggregates an instant vector")
        self.take(")")
        if self.at("by", "without"):
            kind, names = self.take(), self.labels()
            grouping = names if kind == "by" else None
        self.out.functions.append(name)
        return "vector", grouping

    def call(self) -> str:
        name = self.take()
        if name not in FUNCTIONS:
            raise PromQLError(f"unknown function {name}()")
        want, result = FUNCTIONS[name]
        self.take("(")
        got: list[tuple[str, list[str] | None]] = []
        while not self.at(")"):
            got.append(self.expr(0))
            if not self.at(")"):
                self.take(",")
        self.take(")")
        required = [w for w in want if not w.endswith("?")]
        if not len(required) <= len(got) <= len(want):
            raise PromQLError(f"{name}() takes {len(want)} arguments, got {len(got)}")
        for (t, _), w in zip(got, want, strict=False):
            if t != w.rstrip("?"):
                raise PromQLError(f"{name}() wants a {w.rstrip('?')} here, got a {t}")
        if name == "histogram_quantile" and (got[1][1] is not None and "le" not in got[1][1]):
            raise PromQLError("histogram_quantile over an aggregation that drops `le`")
        self.out.functions.append(name)
        return result

    def selector(self, metric: str | None) -> None:
        matchers: list[tuple[str, str, str]] = []
        if self.at("{"):
            self.take()
            while not self.at("}"):
                label = self.take(kind="ident")
                op = self.peek()[1]
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad label matcher operator {op!r}")
                self.take()
                value = self.take(kind="string")[1:-1]
                if op in ("=~", "!~"):
                    re.compile(value.replace("$", ""))  # a Grafana variable stands for a regex
                matchers.append((label, op, value))
                if not self.at("}"):
                    self.take(",")
            self.take("}")
        if metric is None and not any(m[0] == "__name__" for m in matchers):
            raise PromQLError("a selector needs a metric name")
        if metric is not None:
            self.out.metrics.append(metric)
        self.out.selectors.append(matchers)


def substitute_grafana(expr: str) -> str:
    """Replace Grafana's interval macros; a ``$`` left outside a string is an error."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    if "$" in outside:
        raise PromQLError(f"unknown Grafana variable outside a label value in {expr!r}")
    return expr


def parse_promql(expr: str) -> Parsed:
    return Parser(substitute_grafana(expr)).parse()


# -- the dashboard -------------------------------------------------------------------------
def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", DASHBOARDS / "build_dashboard.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _targets() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p['title']}/{t['refId']}", t) for p in _panels() for t in p["targets"]]


KNOWN_SERIES = {s for name in tm.METRICS for s in tm.prometheus_series(name)}
SERIES_TO_METRIC = {s: name for name in tm.METRICS for s in tm.prometheus_series(name)}
TARGETS = _targets()


def test_dashboard_json_is_what_the_builder_writes() -> None:
    # edits go through dashboards/build_dashboard.py, whose names come from tunelab.metrics
    assert DASHBOARD.read_text() == _load_builder().render()


def test_dashboard_has_ray_style_datasource_and_session_variables() -> None:
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource"
        and variables["datasource"]["query"] == "prometheus"
    )
    session = variables["SessionName"]
    assert session["type"] == "query" and session["includeAll"] and session["allValue"] == ".*"
    m = re.fullmatch(r"label_values\((\w+)(\{.*\})?, SessionName\)", session["query"]["query"])
    assert m is not None and m.group(1) in KNOWN_SERIES
    for name in ("spec", "family"):
        assert parse_promql(
            variables[name]["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0]
        ).metrics


def test_every_panel_queries_the_datasource_variable() -> None:
    for p in _panels():
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(
            t["datasource"]["uid"] == "${datasource}" for t in p["targets"]
        ), p["title"]


@pytest.mark.parametrize(("where", "target"), TARGETS, ids=[w for w, _ in TARGETS])
def test_panel_query_parses_and_names_tunelab_series(where: str, target: dict[str, Any]) -> None:
    parsed = parse_promql(target["expr"])
    assert parsed.type in ("vector", "scalar")
    assert parsed.metrics and set(parsed.metrics) <= KNOWN_SERIES, parsed.metrics
    # every selector is filtered on the Ray session, like Ray's own dashboards
    for matchers in parsed.selectors:
        assert ("SessionName", "=~", "$SessionName") in matchers, where


def test_every_tunelab_metric_has_a_panel() -> None:
    used = {SERIES_TO_METRIC[m] for _, t in TARGETS for m in parse_promql(t["expr"]).metrics}
    assert used == set(tm.METRICS)


def test_counters_are_read_with_rate_or_increase_or_as_totals() -> None:
    # a reports-per-second panel exists: rate() over the reports counter
    exprs = [t["expr"] for _, t in TARGETS]
    assert any(f"rate({tm.METRICS[tm.REPORTS].prometheus_name}{{" in e for e in exprs)


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, p["title"]
        cells |= mine


# -- the parser itself ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "expr",
    [
        'sum by (le) (rate(a_bucket{x="1"}[5m]))',
        "histogram_quantile(0.9, sum(rate(a_bucket[1m])) by (le, job))",
        "-a + 2 * b ^ 2 ^ 3",
        "a / on (job) group_left (x) b",
        "topk(3, sum without (instance) (a))",
        "max_over_time(a[10m:1m]) offset 5m",
        '{__name__="a"} > bool 1',
    ],
)
def test_parser_accepts_valid_promql(expr: str) -> None:
    assert parse_promql(expr).type == "vector"


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("sum(rate(a[5m])", "expected )"),
        ("sum(a))", "trailing"),
        ('a{x="1"', "expected"),
        ("rate(a)", "wants a range"),
        ("sum(a[5m])", "instant vector"),
        ("frobnicate(a)", "unknown function"),
        ('a{x=="1"}', "operator"),
        ("a[5m] + b", "operator +"),
        ("histogram_quantile(0.5, sum by (job) (rate(a_bucket[1m])))", "drops `le`"),
        ("rate(a[$window])", "unknown Grafana variable"),
        ("a[5x]", "expected duration"),
        ("topk(a, b)", "scalar parameter"),
    ],
)
def test_parser_rejects_invalid_promql(expr: str, why: str) -> None:
    with pytest.raises(PromQLError, match=re.escape(why)):
        parse_promql(expr)


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
def test_promtool_accepts_every_panel_query(tmp_path: Path) -> None:
    # Prometheus' own parser, on the queries as Grafana sends them (variables filled in)
    rules = [
        {
            "record": f"tunelab:check_{i}",
            "expr": substitute_grafana(t["expr"])
            .replace('"$SessionName"', '".*"')
            .replace('"$spec"', '".*"')
            .replace('"$family"', '".*"'),
        }
        for i, (_, t) in enumerate(TARGETS)
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "tunelab", "rules": rules}]}))
    proc = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(rules)} rules found" in proc.stdout


# -- provisioning --------------------------------------------------------------------------
def test_tunelab_provider_serves_the_dashboard_folder() -> None:
    provider = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/tunelab.yml").read_text())[
        "providers"
    ][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "${TUNELAB_DASHBOARDS_DIR}"
    readme = (DASHBOARDS / "README.md").read_text()
    assert "TUNELAB_DASHBOARDS_DIR" in readme and DASHBOARD.name in readme


def test_ray_provider_points_at_rays_generated_dashboards() -> None:
    from ray._common.utils import get_default_ray_temp_dir
    from ray._private.ray_constants import SESSION_LATEST

    provider = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/ray.yml").read_text())[
        "providers"
    ][0]
    # MetricsHead writes <temp dir>/session_latest/metrics/grafana/dashboards
    session = Path(get_default_ray_temp_dir()) / SESSION_LATEST
    path = provider["options"]["path"].replace("${RAY_SESSION_DIR}", str(session))
    assert Path(path) == session / "metrics/grafana/dashboards"
    assert f"export RAY_SESSION_DIR={session}" in (DASHBOARDS / "README.md").read_text()


def test_readme_lists_every_metric() -> None:
    readme = (DASHBOARDS / "README.md").read_text()
    assert all(f"`{m.prometheus_name}`" in readme for m in tm.METRICS.values())


def test_datasource_is_rays_prometheus() -> None:
    ds = yaml.safe_load((DASHBOARDS / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]
    assert ds["type"] == "prometheus" and ds["url"] == "${RAY_PROMETHEUS_HOST}"
