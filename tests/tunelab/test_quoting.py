"""Every command tunelab prints pastes into a shell as is (issue 10, item 8).

A storage path with a space and a quote: the printed ``mlflow ui`` line and
the resume hints parse back (``shlex.split``) into the very arguments, and
the printed store URI opens the experiment's store.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.conftest import TOY, write_spec
from tunelab.errors import DiskFullError, ExperimentInterrupted

ODD = '/data/my runs/it\'s "here"/$HOME;`x`'


def _after(line: str, marker: str) -> list[str]:
    assert "\n" not in line.strip()
    return shlex.split(line.split(marker, 1)[1])


def test_mlflow_ui_line_is_quoted(capsys: pytest.CaptureFixture[str]) -> None:
    import cli

    uri = f"sqlite:///{ODD}/mlflow.db"
    cli._print_summary(
        {
            "experiment_dir": f"{ODD}/exp",
            "trials": [],
            "tracking_uri": uri,
            "mlflow_experiment": "x",
            "parent_run_id": "r",
        }
    )
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "mlflow ui" in ln]
    assert _after(line, "open the MLflow UI: ") == ["mlflow", "ui", "--backend-store-uri", uri]


@pytest.mark.parametrize(
    "error",
    [
        ExperimentInterrupted(Path(ODD), 2),
        ExperimentInterrupted(Path(ODD), -1),
        DiskFullError("/d", ODD),
    ],
    ids=["interrupted", "interrupted-early", "disk-full"],
)
def test_resume_hints_are_quoted(error: Exception) -> None:
    assert _after(str(error), "ontinue with: ") == ["platform", "resume", ODD]


@pytest.mark.slow
def test_printed_mlflow_ui_line_opens_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    import cli
    import tunelab

    storage = tmp_path / "my runs" / "it's here"
    spec = write_spec(
        tmp_path / "q.yaml",
        f"""
kind: sweep
name: toy-quoting
family: "{TOY}"
config: {{hidden: 4, steps_per_iter: 2}}
budget: 1
metric: {{name: val/score, mode: max}}
search: {{lr: {{grid: [0.01]}}}}
""",
    )
    started = not ray.is_initialized()
    try:
        summary = tunelab.run_experiment(spec, storage=storage, progress=False)
    finally:
        if started:
            ray.shutdown()
    capsys.readouterr()
    cli._print_summary(summary)
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if "mlflow ui" in ln]
    argv = _after(line, "open the MLflow UI: ")
    assert argv[:3] == ["mlflow", "ui", "--backend-store-uri"]
    from mlflow import MlflowClient

    assert MlflowClient(argv[3]).get_experiment_by_name("toy-quoting") is not None
    (exp_line,) = [ln for ln in out.splitlines() if ln.startswith("experiment: ")]
    assert Path(exp_line.removeprefix("experiment: ")).parent == storage
