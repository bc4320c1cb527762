"""The experiment folder: every path in it, its recorded state, and readers.

An experiment folder ``<storage>/<spec name>-<timestamp>/`` holds Tune's
experiment directory ``tune/`` (trial folders ``trial_<id>/`` with Tune's
``result.json`` and checkpoints, Tune's own state) and, beside it and out of
reach of Tune's driver sync (which re-uploads the copy it downloaded at restore,
so files inside Tune's folder would go stale), tunelab's own files::

    tunelab.json            the resolved spec and where its runs live (RunState)
    tunelab_runs.json       trial id -> MLflow run id
    tunelab_pending_runs.json  trials whose MLflow run could not be created yet (tracking down)
    tunelab_tracking_spool.jsonl  tracking writes not sent yet (tracking down), replayed later
    tunelab_nonfinite.json  trial id -> first iteration with a NaN / inf metric
    tunelab_cull.json       sync cull arrivals and decision
    tunelab_lever.json      the lever searcher's state
    trial_artifacts/<id>/   what a trial exported at its budget (manifest, WAV...)
    results.parquet / .csv  one row per trial (written when finalized)
    summary.json            the final summary (its presence = finalized)
    selected_model.json     seed cull: the selected seed's manifest
    seed_table.parquet/.csv seed cull: the results table again, by seed
    selected/               seed cull: artifacts regenerated from the selected checkpoint
    verdicts.json           lever A/B: one verdict per lever and round

Everything that reads or writes these goes through :class:`ExperimentLayout`;
Tune's per-trial ``result.json`` is read by :func:`read_result_lines` only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import ExperimentError

__all__ = [
    "RUN_STATE_FILE",
    "ExperimentLayout",
    "RunState",
    "find_experiments",
    "read_result_lines",
    "read_state",
    "write_table",
]

RUN_STATE_FILE = "tunelab.json"
TUNE_DIR = "tune"
TRIAL_RESULT = "result.json"


#: A trial's health artifact (:meth:`tunelab.health.HealthMonitor.report`).
HEALTH_ARTIFACT = "health.json"


@dataclasses.dataclass(frozen=True)
class ExperimentLayout:
    """All paths of one experiment folder.

    Args:
        root: The experiment folder (absolute or relative; used as given).
    """

    root: Path

    @classmethod
    def new(cls, storage: Path, spec_name: str, stamp: str | None = None) -> ExperimentLayout:
        """A fresh, not yet created folder ``<storage>/<spec_name>-<stamp>``."""
        stamp = stamp or dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        return cls(Path(storage) / f"{spec_name}-{stamp}")

    # -- tunelab's files ------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.root / RUN_STATE_FILE

    @property
    def stopped_file(self) -> Path:
        """Written when the driver was stopped (signal) before the end; removed on resume."""
        return self.root / "tunelab_stopped.json"

    @property
    def preempt_file(self) -> Path:
        """Written by the driver on SIGTERM (preemption): trials checkpoint at the end of their
        current iteration and wait. Removed when the experiment runs again."""
        return self.root / "tunelab_preempt.json"

    @property
    def runs_file(self) -> Path:
        return self.root / "tunelab_runs.json"

    @property
    def pending_runs_file(self) -> Path:
        """trial id -> the run to create for it, while tracking is unavailable."""
        return self.root / "tunelab_pending_runs.json"

    @property
    def tracking_spool_file(self) -> Path:
        """Tracking writes (metrics, tags, params, artifacts) not sent yet, as JSON lines."""
        return self.root / "tunelab_tracking_spool.jsonl"

    @property
    def nonfinite_file(self) -> Path:
        """trial id -> the first iteration it reported a non-finite metric."""
        return self.root / "tunelab_nonfinite.json"

    @property
    def cull_state_file(self) -> Path:
        return self.root / "tunelab_cull.json"

    @property
    def lever_state_file(self) -> Path:
        return self.root / "tunelab_lever.json"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "trial_artifacts"

    def trial_artifacts(self, trial_id: str) -> Path:
        return self.artifacts_dir / trial_id

    def trial_health(self, trial_id: str) -> Path:
        """The trial's health artifact: diagnosis, events, per-layer norm history."""
        return self.trial_artifacts(trial_id) / HEALTH_ARTIFACT

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @property
    def results_stem(self) -> Path:
        """``results`` (``.csv`` and ``.parquet``)."""
        return self.root / "results"

    @property
    def results_csv(self) -> Path:
        return self.results_stem.with_suffix(".csv")

    @property
    def results_parquet(self) -> Path:
        return self.results_stem.with_suffix(".parquet")

    @property
    def seed_table_stem(self) -> Path:
        return self.root / "seed_table"

    @property
    def selected_manifest(self) -> Path:
        return self.root / "selected_model.json"

    @property
    def selected_dir(self) -> Path:
        return self.root / "selected"

    @property
    def verdicts_file(self) -> Path:
        return self.root / "verdicts.json"

    # -- Tune's folder -------------------------------------------------------------------
    @property
    def tune_dir(self) -> Path:
        """Tune's experiment directory (``RunConfig(storage_path=root, name="tune")``)."""
        return self.root / TUNE_DIR

    @staticmethod
    def trial_dirname(trial_id: str) -> str:
        """Tune's trial folder name for ``trial_id`` (``trial_dirname_creator``)."""
        return f"trial_{trial_id}"

    def trial_dir(self, trial_id: str) -> Path:
        return self.tune_dir / self.trial_dirname(trial_id)

    def trial_result_file(self, trial_id: str) -> Path:
        return self.trial_dir(trial_id) / TRIAL_RESULT

    def trial_result_files(self) -> Iterator[Path]:
        """Every trial's ``result.json`` under ``tune/``, sorted by folder name."""
        if self.tune_dir.is_dir():
            yield from sorted(self.tune_dir.glob(f"*/{TRIAL_RESULT}"))

    def trial_results(self) -> dict[str, list[dict[str, Any]]]:
        """trial id -> its per-iteration results (see :func:`read_result_lines`)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for path in self.trial_result_files():
            rows = read_result_lines(path)
            if rows:
                tid = str(rows[-1].get("trial_id") or path.parent.name.removeprefix("trial_"))
                out[tid] = rows
        return out

    @property
    def tuner_state_file(self) -> Path:
        return self.tune_dir / "tuner.pkl"

    @property
    def tune_state_files(self) -> list[Path]:
        """Tune's experiment state snapshots (``tune/experiment_state-*.json``), oldest first."""
        return sorted(self.tune_dir.glob("experiment_state-*.json"))

    def tune_trials(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """trial id -> (Tune's last recorded status, its Tune config), from Tune's latest snapshot.

        Statuses are Tune's (RUNNING, PAUSED, PENDING, ...); a snapshot that
        cannot be read gives ``{}``, an entry that cannot be read is skipped.
        """
        found = self.tune_state_files
        if not found:
            return {}
        try:
            data = json.loads(found[-1].read_text())
        except (OSError, ValueError):
            return {}
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        for entry in data.get("trial_data", []) if isinstance(data, dict) else []:
            try:
                trial = json.loads(entry[0]) if isinstance(entry, list) else entry
                meta = json.loads(entry[1]) if isinstance(entry, list) else {}
                config = trial.get("config")
                out[str(trial["trial_id"])] = (
                    str(meta.get("status") or trial.get("status") or "PENDING"),
                    config if isinstance(config, dict) else {},
                )
            except (TypeError, ValueError, KeyError, AttributeError, IndexError):
                continue
        return out

    def tune_trial_states(self) -> dict[str, str]:
        """trial id -> Tune's last recorded status (RUNNING, PAUSED, ...), from its snapshot."""
        return {tid: status for tid, (status, _) in self.tune_trials().items()}

    # -- state ---------------------------------------------------------------------------
    def is_experiment(self) -> bool:
        return self.state_file.is_file()

    def is_finalized(self) -> bool:
        return self.summary_file.is_file()

    def read_state(self) -> RunState:
        """The recorded :class:`RunState` (raises FileNotFoundError or ValueError)."""
        return RunState(**json.loads(self.state_file.read_text()))


@dataclasses.dataclass
class RunState:
    """What ``tunelab.json`` records about an experiment."""

    spec: dict[str, Any]
    spec_file: str
    quick: bool
    experiment_dir: str
    storage: str
    tracking_uri: str
    mlflow_experiment: str
    mlflow_experiment_id: str
    parent_run_id: str
    git_commit: str
    created: str

    @property
    def layout(self) -> ExperimentLayout:
        return ExperimentLayout(Path(self.experiment_dir))

    @property
    def data_root(self) -> Path:
        """The storage's shared data folder (generated corpora, shared by experiments)."""
        return shared_data_root(Path(self.storage))


def shared_data_root(storage: Path) -> Path:
    """``<storage>/data``: data shared by every experiment under ``storage``."""
    return Path(storage) / "data"


def read_result_lines(path: Path) -> list[dict[str, Any]]:
    """Tune's JSON-lines ``result.json``: one dict per reported iteration.

    A line cut short by a crash (the last one, usually) or any line that is not
    a JSON object is skipped; a missing file reads as no rows.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_state(experiment_dir: str | Path) -> RunState:
    """The recorded state of an experiment folder.

    Raises:
        ExperimentError: the folder has no readable ``tunelab.json``.
    """
    layout = ExperimentLayout(Path(experiment_dir).resolve())
    if not layout.is_experiment():
        raise ExperimentError(
            f"{Path(experiment_dir)} is not a tunelab experiment folder (no {layout.state_file.name})"
        )
    try:
        return layout.read_state()
    except (OSError, ValueError, TypeError) as err:
        raise ExperimentError(f"{layout.state_file}: unreadable ({err})") from None


def write_table(table: Any, stem: Path) -> None:
    """Write a DataFrame as ``stem.csv`` and ``stem.parquet``, each atomically."""
    tmp_csv, tmp_pq = stem.with_suffix(".csv.tmp"), stem.with_suffix(".parquet.tmp")
    table.to_csv(tmp_csv, index=False)
    table.to_parquet(tmp_pq, index=False)
    os.replace(tmp_csv, stem.with_suffix(".csv"))
    os.replace(tmp_pq, stem.with_suffix(".parquet"))


def find_experiments(storage: Path) -> list[ExperimentLayout]:
    """Experiment folders directly under ``storage``, oldest first (by ``tunelab.json`` mtime)."""
    found = sorted(Path(storage).glob(f"*/{RUN_STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    return [ExperimentLayout(p.parent) for p in found]
