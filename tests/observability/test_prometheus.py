"""tunelab's metrics end to end: a real sweep, Ray's metrics agent, a real Prometheus.

A private Ray head (``ray start --head --metrics-export-port``, its own temp
dir and ports) serves Ray's and tunelab's metrics; Debian's ``prometheus``
scrapes it every second; the real CLI runs a small lever A/B on that head
(``--address``). Then every series a dashboard panel queries must exist with
data, every panel query must return data over the run, and the counters must
agree with the sweep's own summary. A last test checks that the local Ray the
CLI starts itself serves metrics on ``TUNELAB_METRICS_EXPORT_PORT``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_json, generous, write_spec
from tests.observability.test_dashboards import TARGETS, parse_promql, substitute_grafana
from tunelab import metrics as tm

pytestmark = pytest.mark.slow

SPEC_NAME = "obs-metrics"
FAMILY = "tests.observability.nan_family:FAMILY"
BUDGET = 6
DIVERGE_AT = 4  # the fast arm's seed 2: its loss turns NaN here; two skips end it diverged
SPEC = f"""
kind: lever_ab
name: {SPEC_NAME}
family: "{FAMILY}"
control: {{hidden: 8, steps_per_iter: 100, lr: 0.001}}
levers:
  fast: {{lr: 0.03, nan_loss_at: {DIVERGE_AT}, nan_seed: 2}}
seeds: [1, 2]
budget: {BUDGET}
metric: {{name: val/log_mse, mode: min}}
decision: {{min_effect: 0.2, alpha: 0.05}}
checkpoint: {{every: 2}}
failure: {{retries: 0, tolerate: 0}}
health: {{max_consecutive_skips: 2}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            "prometheus is not installed and cannot be installed here (needs root and apt-get)"
        )
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, capture_output=True, env=env, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600, check=True)
        subprocess.run(cmd, capture_output=True, env=env, timeout=600, check=True)
    found = shutil.which("prometheus")
    assert found, "apt-get installed prometheus but it is not on PATH"
    return found


class Prometheus:
    """A private Prometheus scraping one target every second."""

    def __init__(self, binary: str, folder: Path, target: str) -> None:
        self.port = _free_port()
        config = folder / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs:\n- job_name: ray\n  static_configs:\n  - targets: ['{target}']\n"
        )
        self.log = folder / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + generous(30)
        while not self._ready():
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "prometheus not ready after 30 s"
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only this Prometheus
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


class RayHead:
    """A private Ray head; stopped by its own process group and temp dir, never by `ray stop`."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tl-obs-", dir="/tmp"))  # short: socket paths
        self.gcs_port, self.metrics_port = _free_port(), _free_port()
        ports = {
            "--port": self.gcs_port, "--metrics-export-port": self.metrics_port,
            "--ray-client-server-port": _free_port(), "--dashboard-agent-listen-port": _free_port(),
            "--dashboard-agent-grpc-port": _free_port(), "--runtime-env-agent-port": _free_port(),
        }  # fmt: skip
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--num-cpus=2",
               f"--temp-dir={self.temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
               *(f"{k}={v}" for k, v in ports.items())]  # fmt: skip
        self.log = folder / "ray-start.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )
            rc = self.proc.wait(timeout=120)
        assert rc == 0, f"ray start failed:\n{self.log.read_text()[-3000:]}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def stop(self) -> None:
        # ray start's daemons stay in its process group; workers carry the temp dir in their command line
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5  # gcs_server and the monitor ignore SIGTERM for long
        while time.monotonic() < deadline and self._pids():
            time.sleep(0.5)
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _pids(self) -> list[int]:
        mine = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # exited, waiting to be reaped
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                pgid = os.getpgid(int(proc.name))
            except (OSError, ProcessLookupError):
                continue
            if (pgid == self.proc.pid or str(self.temp_dir) in cmdline) and int(
                proc.name
            ) != os.getpid():
                mine.append(int(proc.name))
        return mine


#: Export every second (Ray's default is 10 s) so a short sweep is seen in full.
FAST_EXPORT = {"RAY_metrics_report_interval_ms": "1000"}


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Prometheus, dict[str, Any], float, float]]:
    """One sweep on a private head scraped by Prometheus: (prometheus, CLI summary, start, end)."""
    binary = _prometheus_binary()
    tmp = tmp_path_factory.mktemp("observability")
    head = RayHead(tmp, FAST_EXPORT)
    prom: Prometheus | None = None
    try:
        prom = Prometheus(binary, tmp, f"127.0.0.1:{head.metrics_port}")
        start = time.time()
        summary = cli_json(
            "sweep", str(write_spec(tmp / "spec.yaml", SPEC)), "--storage", str(tmp / "res"),
            "--address", head.address, env=FAST_EXPORT, timeout=300,
        )  # fmt: skip
        time.sleep(3)  # the driver's last export (at exit) and the next scrape
        yield prom, summary, start, time.time()
    finally:
        if prom is not None:
            prom.stop()
        head.stop()


def _range(prom: Prometheus, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    data = prom.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1s")
    return list(data["result"])


def _max_over_run(prom: Prometheus, expr: str, start: float, end: float) -> float:
    values = [float(v) for series in _range(prom, expr, start, end) for _, v in series["values"]]
    return max(values) if values else math.nan


DASHBOARD_SERIES = sorted({m for _, t in TARGETS for m in parse_promql(t["expr"]).metrics})
SPEC_FILTER = f'spec="{SPEC_NAME}", family="nan_toy"'


@pytest.mark.parametrize("series", DASHBOARD_SERIES)
def test_every_dashboard_series_has_data_in_prometheus(
    run: tuple[Prometheus, dict[str, Any], float, float], series: str
) -> None:
    prom, _, start, end = run
    names = prom.api("label/__name__/values", start=f"{start:.3f}", end=f"{end:.3f}")
    assert series in names
    # recorded for this spec and family (tags from the experiment name and the family's registered name)
    found = prom.api(
        "series",
        **{"match[]": f"{series}{{{SPEC_FILTER}}}"},
        start=f"{start:.3f}",
        end=f"{end:.3f}",
    )
    assert found, f"no {series} series for {SPEC_FILTER}"


@pytest.mark.parametrize(("where", "target"), TARGETS, ids=[w for w, _ in TARGETS])
def test_every_panel_query_returns_data(
    run: tuple[Prometheus, dict[str, Any], float, float], where: str, target: dict[str, Any]
) -> None:
    prom, _, start, end = run
    expr = target["expr"].replace("$__rate_interval", "10s")
    expr = (
        substitute_grafana(expr)
        .replace('"$SessionName"', '".*"')
        .replace('"$spec"', f'"{SPEC_NAME}"')
    )
    expr = expr.replace('"$family"', '".*"')
    values = [
        v for series in _range(prom, expr, start, end) for _, v in series["values"] if v != "NaN"
    ]
    assert values, f"{where}: {expr} returned no data over the run"


def test_counters_agree_with_the_sweep(
    run: tuple[Prometheus, dict[str, Any], float, float],
) -> None:
    prom, summary, start, end = run
    trials = summary["trials"]
    iterations = sum(t["iterations"] for t in trials)
    assert len(trials) == 4 and iterations == 3 * BUDGET + DIVERGE_AT
    assert [t["status"] for t in trials].count("diverged") == 1
    reports = tm.METRICS[tm.REPORTS].prometheus_name
    assert _max_over_run(prom, f"sum({reports}{{{SPEC_FILTER}}})", start, end) == iterations
    count = f"{tm.prometheus_series(tm.ITERATION_SECONDS)[2]}{{{SPEC_FILTER}}}"
    assert _max_over_run(prom, f"sum({count})", start, end) == iterations
    # nan_family reports one skipped step on every odd iteration; the diverged trial's last
    # iteration is the monitor's own: two real skips
    nan = tm.METRICS[tm.NAN_SKIPPED].prometheus_name
    expected = 3 * math.ceil(BUDGET / 2) + math.ceil((DIVERGE_AT - 1) / 2) + 2
    assert _max_over_run(prom, f"sum({nan}{{{SPEC_FILTER}}})", start, end) == expected
    # one explosion per trial (iteration 2), one diverged trial
    explosions = tm.METRICS[tm.EXPLOSIONS].prometheus_name
    assert _max_over_run(prom, f"sum({explosions}{{{SPEC_FILTER}}})", start, end) == 4
    diverged = tm.METRICS[tm.DIVERGED_TRIALS].prometheus_name
    assert _max_over_run(prom, f"sum({diverged}{{{SPEC_FILTER}}})", start, end) == 1
    # checkpoints at iterations 2, 4, 6 of every trial (the diverged one: only 2)
    ckpts = f"{tm.prometheus_series(tm.CHECKPOINT_SECONDS)[2]}{{{SPEC_FILTER}}}"
    assert _max_over_run(prom, f"sum({ckpts})", start, end) == 3 * (BUDGET // 2) + 1
    size = tm.METRICS[tm.CHECKPOINT_BYTES].prometheus_name
    assert _max_over_run(prom, f"max({size}{{{SPEC_FILTER}}})", start, end) > 1000


def test_verdict_counter_matches_the_verdict(
    run: tuple[Prometheus, dict[str, Any], float, float],
) -> None:
    prom, summary, start, end = run
    (verdict,) = summary["verdicts"]
    name = tm.METRICS[tm.VERDICTS].prometheus_name
    by_label = _range(prom, f"sum by (label) ({name}{{{SPEC_FILTER}}})", start, end)
    assert {s["metric"]["label"]: float(s["values"][-1][1]) for s in by_label} == {
        verdict["verdict"]: 1.0
    }


def test_trial_state_gauge_saw_running_and_finished(
    run: tuple[Prometheus, dict[str, Any], float, float],
) -> None:
    prom, _, start, end = run
    gauge = tm.METRICS[tm.TRIALS].prometheus_name
    assert _max_over_run(prom, f'sum({gauge}{{{SPEC_FILTER}, state="running"}})', start, end) >= 1
    assert _max_over_run(prom, f'sum({gauge}{{{SPEC_FILTER}, state="finished"}})', start, end) == 3
    assert _max_over_run(prom, f'sum({gauge}{{{SPEC_FILTER}, state="diverged"}})', start, end) == 1


def test_local_ray_serves_metrics_on_the_env_port(tmp_path: Path) -> None:
    # TUNELAB_METRICS_EXPORT_PORT reaches ray.init of the CLI's local Ray (tunelab.init_ray)
    port = _free_port()
    script = (
        "import sys, time, urllib.request\n"
        "from tunelab import init_ray\n"
        "from tunelab.metrics import TrialRecorder\n"
        "init_ray(None)\n"
        "TrialRecorder('probe', 'toy').iteration(0.5, {})\n"
        "deadline = time.monotonic() + 60\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        f"        text = urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode()\n"
        "    except OSError:\n"
        "        text = ''\n"
        "    if 'ray_tunelab_reports_total{' in text:\n"
        "        sys.exit(0)\n"
        "    time.sleep(0.5)\n"
        "sys.exit(3)\n"
    )
    env = {**os.environ, **FAST_EXPORT, "TUNELAB_METRICS_EXPORT_PORT": str(port), "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
