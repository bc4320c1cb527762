"""An error after the MLflow parent run was created ends it FAILED (issue 10, item 4).

A run left RUNNING forever reads as "still going" in the MLflow UI; only an
interruption (``platform resume`` continues it) leaves the parent open.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from tests.conftest import TOY, write_spec
from tunelab import run_experiment
from tunelab.tracking import MlflowTracker, default_tracking_uri

SPEC = f"""
kind: seed_cull
name: toy-driver-error
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 20}}
seeds: 2
budget: 2
metric: {{name: val/score, mode: max}}
cull: {{at: 1, keep: 1, scheduler: sync}}
select: {{metric: val/score, mode: max}}
"""


def test_an_error_while_finalizing_ends_the_parent_run_failed(tmp_path: Path) -> None:
    # the selected seed's export fails: a bug, not a tracking outage (that one is resumable)
    spec = write_spec(
        tmp_path / "s.yaml",
        SPEC.replace("steps_per_iter: 20", 'steps_per_iter: 20, export_error: "no exporter"'),
    )
    storage = tmp_path / "res"
    storage.mkdir()
    uri = default_tracking_uri(storage)
    try:
        with pytest.raises(RuntimeError, match="no exporter"):
            run_experiment(spec, storage=storage, tracker=MlflowTracker(uri), progress=False)
    finally:
        ray.shutdown()
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "toy-driver-error"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    assert parents[0].info.status == "FAILED"
