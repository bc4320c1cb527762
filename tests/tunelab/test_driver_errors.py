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


class _ArtifactStoreDown(MlflowTracker):
    """An MLflow tracker whose artifact uploads fail (a full or read-only artifact store)."""

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        raise OSError(f"artifact store rejected {path.name}")


def test_an_error_while_finalizing_ends_the_parent_run_failed(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", SPEC)
    storage = tmp_path / "res"
    storage.mkdir()
    uri = default_tracking_uri(storage)
    try:
        with pytest.raises(OSError, match="artifact store rejected"):
            run_experiment(spec, storage=storage, tracker=_ArtifactStoreDown(uri), progress=False)
    finally:
        ray.shutdown()
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "toy-driver-error"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    assert parents[0].info.status == "FAILED"
