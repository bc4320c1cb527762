"""A tracking outage longer than the client's retries loses no metric.

A real ``mlflow server`` on 127.0.0.1 is stopped while trials report (one of
them starts during the outage), stays down across several of the client's
retry windows (shortened through MLflow's environment variables), the
experiment ends while it is still down, and the server is restarted on the
same port and store. Every point reported is then in the server, counted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.conftest import generous
from tests.tunelab.test_mlflow_server import _free_port
from tunelab.errors import EXIT_TRACKING_UNAVAILABLE, TrackingUnavailable
from tunelab.layout import ExperimentLayout
from tunelab.names import TAG_FAMILY, TAG_MLFLOW_PARENT, TAG_NONFINITE, TAG_STATUS
from tunelab.tracking import MlflowTracker, TrackingCallback, drain_tracking, spool_backlog

pytestmark = pytest.mark.slow

# namespaced and flat names alike; tunelab's iteration counter is logged too
KEYS = ("val/score", "train/loss", "score", "iteration")


class _Server:
    """``mlflow server`` on a fixed port and store, stopped and started again at will."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1"]
        cmd += ["--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}"]
        cmd += ["--artifacts-destination", str(self.folder / "server-artifacts")]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            # no background job runner (traces, prompts): it triples the start-up time
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        _wait_for(self._healthy, 120, "mlflow server did not start")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # the CLI and its uvicorn child
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        _wait_for(self._refused, 30, "the port still answers after the server stopped")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _refused(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) != 0


def _wait_for(cond: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + generous(timeout)
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(message)
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The client gives up after one quick retry (default: 7 retries, about 4 minutes).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    srv = _Server(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def _trial(tid: str, seed: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config={"seed": seed, "config": {"lr": 0.01 * seed}})


def _report(cb: TrackingCallback, trial: SimpleNamespace, it: int, sent: Counter) -> None:
    """One Tune result: the metrics (a NaN and an inf among them) plus Tune's bookkeeping."""
    values = {
        "val/score": math.nan if it == 13 else math.sin(it),
        "train/loss": math.inf if it == 17 else 1.0 / it,
        "score": float(it * trial.config["seed"]),
        "iteration": it,
    }
    result = {
        **values,
        "training_iteration": it,
        "time_total_s": 0.1 * it,
        "done": False,
        "config": trial.config,
    }
    cb.on_trial_result(0, [], trial, result)
    for key, value in values.items():
        sent[(trial.trial_id, key, it, _v(value))] += 1


def _v(value: float) -> float | str:
    """A value as MLflow gives it back: NaN kept, +-inf stored as the largest float."""
    if math.isnan(value):
        return "nan"
    return math.copysign(sys.float_info.max, value) if math.isinf(value) else value


def _received(client: MlflowClient, runs: dict[str, str]) -> Counter:
    got: Counter = Counter()
    for tid, run_id in runs.items():
        for key in KEYS:
            for m in client.get_metric_history(run_id, key):
                got[(tid, key, m.step, _v(m.value))] += 1
    return got


def test_outage_longer_than_retries_loses_no_metric(tmp_path: Path, server: _Server) -> None:
    tracker = MlflowTracker(server.url)
    exp = tracker.ensure_experiment("outage", None)
    parent = tracker.start_run(exp, "parent", {})
    layout = ExperimentLayout(tmp_path / "exp")
    layout.root.mkdir()
    (layout.trial_artifacts("t1")).mkdir(parents=True)
    (layout.trial_artifacts("t1") / "manifest.json").write_text("{}")
    cb = TrackingCallback(
        tracker=tracker,
        experiment_id=exp,
        parent_run_id=parent,
        runs_file=str(layout.runs_file),
        base_tags={TAG_FAMILY: "toy"},
        artifacts_root=str(layout.artifacts_dir),
        nonfinite_file=str(layout.nonfinite_file),
        retry_s=0.2,
    )
    cb.setup()
    sent: Counter = Counter()
    t1, t2 = _trial("t1", 1), _trial("t2", 2)

    # tracking up: sent as they come
    cb.on_trial_start(0, [], t1)
    for it in range(1, 11):
        _report(cb, t1, it, sent)
    cb.flush()
    assert cb.backlog.empty and cb.failures == 0

    # tracking down: t1 goes on, t2 starts (its run cannot be created), t1 completes
    server.stop()
    for it in range(11, 21):
        _report(cb, t1, it, sent)
    cb.on_trial_start(0, [], t2)
    for it in range(1, 16):
        _report(cb, t2, it, sent)
    cb.on_trial_complete(0, [], t1)
    cb.flush()  # spooled, never raised into the driver
    _wait_for(lambda: cb.failures >= 4, 60, "the sender did not keep retrying")
    down_points = len(KEYS) * (10 + 15)
    backlog = cb.backlog
    assert (backlog.points, backlog.runs) == (down_points, 1)
    assert backlog.records >= 3  # the nonfinite tags, t1's status tag, t1's artifact upload

    # the spool is strict JSON lines; NaN and inf survive as strings
    lines = layout.tracking_spool_file.read_text().splitlines()
    records = [json.loads(line, parse_constant=_no_constant) for line in lines]
    values = [p[1] for r in records if r["op"] == "metrics" for p in r["points"]]
    assert "nan" in values and "inf" in values

    # the experiment ends while tracking is still down: a clear error, nothing finalized
    cb.on_experiment_end([])
    with pytest.raises(TrackingUnavailable) as info:
        drain_tracking(layout, tracker)
    err = info.value
    assert err.exit_code == EXIT_TRACKING_UNAVAILABLE == 75
    assert (err.points, err.runs) == (down_points, 1)
    assert f"{down_points} metric point(s)" in str(err)
    assert f"platform resume {layout.root}" in str(err)

    # tracking back on the same port and store; the driver resumes (Tune unpickles its
    # callbacks): the spool is replayed first, then t2 goes on and completes
    server.start()
    resumed = pickle.loads(pickle.dumps(cb))
    resumed.setup()
    _wait_for(lambda: resumed.backlog.empty, 60, "the spool was not replayed")
    for it in range(16, 21):
        _report(resumed, t2, it, sent)
    resumed.on_trial_complete(0, [], t2)
    resumed.on_experiment_end([])
    drain_tracking(layout, tracker)  # nothing left: finalization may go on
    assert spool_backlog(layout).empty and not layout.tracking_spool_file.exists()

    client = MlflowClient(server.url)
    runs = json.loads(layout.runs_file.read_text())
    assert sorted(runs) == ["t1", "t2"]
    got = _received(client, runs)
    lost = sum((sent - got).values())
    extra = sum((got - sent).values())
    total = sum(sent.values())
    print(f"tracking outage: {lost} of {total} points lost ({down_points} spooled), {extra} extra")
    assert total == len(KEYS) * (20 + 20)
    assert (lost, extra) == (0, 0)
    for tid, run_id in runs.items():
        run = client.get_run(run_id)
        assert run.data.tags[TAG_STATUS] == "completed"
        assert run.data.tags[TAG_MLFLOW_PARENT] == parent
        assert run.data.params["seed"] == tid[1]
        assert run.data.tags[TAG_NONFINITE] == "13"
        assert "time_total_s" not in run.data.metrics and "done" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(runs["t1"])] == ["manifest.json"]


def _no_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def test_tracking_down_at_the_start_exits_75_and_starts_nothing(tmp_path: Path) -> None:
    from tests.conftest import TOY, run_cli, write_spec

    spec = write_spec(
        tmp_path / "s.yaml",
        f'kind: seed_cull\nname: toy-down\nfamily: "{TOY}"\nconfig: {{hidden: 8}}\n'
        "seeds: 2\nbudget: 2\nmetric: {name: val/score, mode: max}\n"
        "cull: {at: 1, keep: 1, scheduler: sync}\nselect: {metric: val/score, mode: max}\n",
    )
    storage = tmp_path / "res"
    proc = run_cli(
        "sweep",
        str(spec),
        "--storage",
        str(storage),
        "--tracking-uri",
        f"http://127.0.0.1:{_free_port()}",  # nothing listens there
        env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"},
    )
    assert proc.returncode == EXIT_TRACKING_UNAVAILABLE == 75, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "nothing started" in proc.stderr
    assert not any(storage.glob("toy-down-*"))  # no experiment folder
