"""Tracking against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import TOY, cli_json, write_spec

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_sweep_logs_to_a_real_tracking_server(tmp_path: Path, mlflow_server: str) -> None:
    spec = write_spec(
        tmp_path / "s.yaml",
        f"""
kind: sweep
name: toy-server
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 10}}
budget: 3
metric: {{name: val/score, mode: max}}
search: {{lr: {{grid: [0.001, 0.01, 0.03, 0.1]}}}}
""",
    )
    summary = cli_json(
        "sweep", str(spec), "--storage", str(tmp_path / "res"), "--tracking-uri", mlflow_server
    )
    assert summary["tracking_uri"] == mlflow_server
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("toy-server")
    runs = client.search_runs([exp.experiment_id])
    children = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]
    ]
    assert len(children) == 4
    # params logged once per run (concurrent trials, no "changing param values"), metrics per iteration
    assert sorted(r.data.params["lr"] for r in children) == ["0.001", "0.01", "0.03", "0.1"]
    for r in children:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/score")] == [1, 2, 3]
        assert "manifest.json" in [a.path for a in client.list_artifacts(r.info.run_id)]
    assert summary["best"]["run_id"] in {r.info.run_id for r in children}
    assert not (tmp_path / "res" / "mlflow.db").exists()  # nothing went to the embedded store
