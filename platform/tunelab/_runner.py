"""Spec -> Ray Tune experiment -> MLflow runs -> results, selection, summary.

:func:`run_experiment` starts a new experiment from a spec file and
:func:`resume_experiment` continues one from its folder (after Ctrl-C, a
crash or a SIGKILL of the driver); both end in the same post-processing, so a
resumed experiment reaches the same final state as an uninterrupted one.

An experiment folder (``<storage>/<spec name>-<timestamp>/``) holds Tune's
experiment directory ``tune/`` (trial folders, checkpoints, Tune's state) and,
beside it and out of reach of Tune's driver sync (which re-uploads the copy it
downloaded at restore, so files inside Tune's folder would go stale),
tunelab's own files: ``tunelab.json`` (the resolved
spec and where its runs live), ``tunelab_runs.json`` (trial -> MLflow run),
``tunelab_cull.json`` (sync cull decisions), ``trial_artifacts/<trial>/``,
and at the end ``results.parquet`` / ``results.csv``, ``summary.json`` and,
for a seed cull, ``selected_model.json``, ``seed_table.parquet`` /
``seed_table.csv`` and ``selected/`` (artifacts regenerated from the selected
checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tunelab._checkpoint import atomic_write_json, read_json, sorted_checkpoints
from tunelab._names import (
    ARTIFACTS_DIR,
    CULL_STATE_FILE,
    ITERATION,
    RUN_STATE_FILE,
    RUNS_FILE,
    TAG_CULLED_AT,
    TAG_EXPERIMENT_DIR,
    TAG_FAMILY,
    TAG_GIT_COMMIT,
    TAG_KIND,
    TAG_ROLE,
    TAG_SELECTED,
    TAG_SELECTED_RUN,
    TAG_SELECTED_SEED,
    TAG_SELECTED_VALUE,
    TAG_SPEC,
    TAG_SPEC_HASH,
    as_float,
)
from tunelab._schedulers import OptunaPrunerScheduler, SyncCullScheduler, rank_key
from tunelab._spec import (
    AnySpec,
    LeverABSpec,
    SeedCullSpec,
    SweepSpec,
    load_spec,
    parse_spec,
    spec_hash,
)
from tunelab._tracking import (
    MlflowTrialCallback,
    default_tracking_uri,
    end_runs,
    ensure_experiment,
    git_commit,
    set_tags,
    start_parent_run,
)
from tunelab._trial import TrialSetup, restore_experiment, run_trial

__all__ = [
    "ExperimentError",
    "ExperimentInterrupted",
    "experiment_status",
    "latest_experiment",
    "resume_experiment",
    "run_experiment",
]

LEVER_STATE_FILE = "tunelab_lever.json"
TUNE_DIR = "tune"


class ExperimentError(RuntimeError):
    """An experiment folder that cannot be resumed or read."""


@dataclasses.dataclass
class _State:
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
    def exp_dir(self) -> Path:
        return Path(self.experiment_dir)

    @property
    def tune_dir(self) -> Path:
        """Tune's experiment directory (trial folders, checkpoints, Tune state)."""
        return Path(self.experiment_dir) / TUNE_DIR

    def parsed_spec(self) -> AnySpec:
        return parse_spec(self.spec, source=self.spec_file)


# -- public -----------------------------------------------------------------------------
def run_experiment(
    spec_file: str | Path,
    *,
    quick: bool = False,
    storage: str | Path = "tunelab_results",
    tracking_uri: str | None = None,
    address: str | None = None,
    progress: bool | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Validate ``spec_file`` and run it to the end; returns the summary dict.

    ``overrides`` are ``dotted.key=value`` changes applied after ``quick``.

    Raises:
        SpecError: the spec is invalid (nothing has started).
    """
    spec = load_spec(spec_file, quick=quick, overrides=overrides)
    storage = Path(storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    tracking_uri = (
        tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(storage)
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    exp_dir = storage / f"{spec.name}-{stamp}"
    exp_dir.mkdir(parents=True)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    artifact_root = storage / "mlartifacts" if tracking_uri.startswith("sqlite") else None
    exp_id = ensure_experiment(client, spec.name, artifact_root)
    commit = git_commit(Path(spec_file).resolve().parent)
    parent = start_parent_run(
        client,
        exp_id,
        exp_dir.name,
        {**_base_tags(spec, commit), TAG_EXPERIMENT_DIR: str(exp_dir)},
    )
    client.log_dict(parent, spec.model_dump(mode="json"), "spec.json")
    state = _State(
        spec=spec.model_dump(mode="json"),
        spec_file=str(Path(spec_file).resolve()),
        quick=quick,
        experiment_dir=str(exp_dir),
        storage=str(storage),
        tracking_uri=tracking_uri,
        mlflow_experiment=spec.name,
        mlflow_experiment_id=exp_id,
        parent_run_id=parent,
        git_commit=commit,
        created=stamp,
    )
    atomic_write_json(exp_dir / RUN_STATE_FILE, dataclasses.asdict(state))
    return _run(state, spec, address=address, progress=progress, restore=False)


def resume_experiment(
    experiment_dir: str | Path, *, address: str | None = None, progress: bool | None = None
) -> dict[str, Any]:
    """Continue an interrupted experiment from its folder to the same final state."""
    state = _read_state(experiment_dir)
    return _run(state, state.parsed_spec(), address=address, progress=progress, restore=True)


def latest_experiment(storage: str | Path = "tunelab_results") -> Path:
    """The most recently created experiment folder under ``storage``."""
    found = sorted(Path(storage).glob(f"*/{RUN_STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ExperimentError(f"no tunelab experiment under {Path(storage).resolve()}")
    return found[-1].parent


def experiment_status(experiment_dir: str | Path) -> dict[str, Any]:
    """Trials, their states, iterations and metric, read from the folder (no Ray needed)."""
    state = _read_state(experiment_dir)
    spec = state.parsed_spec()
    runs = read_json(state.exp_dir / RUNS_FILE, {})
    trials = []
    summary = read_json(state.exp_dir / "summary.json", None)
    if summary is not None:  # finished: tunelab's own verdict per trial (finished / culled / error)
        tune_state = {t["trial_id"]: t["status"] for t in summary["trials"]}
    else:  # running or interrupted: Tune's last snapshot (RUNNING, PAUSED, PENDING, ...)
        tune_state = _tune_trial_states(state.tune_dir)
    trial_dirs = state.tune_dir.iterdir() if state.tune_dir.is_dir() else iter(())
    for trial_dir in sorted(p for p in trial_dirs if (p / "result.json").exists()):
        rows = [
            json.loads(line)
            for line in (trial_dir / "result.json").read_text().splitlines()
            if line.strip()
        ]
        if not rows:
            continue
        last = rows[-1]
        tid = last.get("trial_id", trial_dir.name)
        trials.append(
            {
                "trial_id": tid,
                "seed": last.get("config", {}).get("seed"),
                "status": tune_state.get(tid, "UNKNOWN"),
                "iterations": last.get(ITERATION, 0),
                spec.metric.name: last.get(spec.metric.name),
                "run_id": runs.get(tid),
            }
        )
    values = [t[spec.metric.name] for t in trials if isinstance(t[spec.metric.name], (int, float))]
    best = None
    if values:
        best = max(values) if spec.metric.mode == "max" else min(values)
    return {
        "experiment_dir": str(state.exp_dir),
        "spec": spec.name,
        "kind": spec.kind,
        "budget": spec.budget,
        "metric": spec.metric.name,
        "best": best,
        "finished": summary is not None,
        "trials": trials,
    }


# -- running ----------------------------------------------------------------------------
def _run(
    state: _State, spec: AnySpec, *, address: str | None, progress: bool | None, restore: bool
) -> dict[str, Any]:
    _init_ray(address)
    tuner = _tuner(state, spec, progress=progress, restore=restore)
    with _stdout_to_stderr(), _sigterm_stops_gracefully():  # stdout stays for --json
        grid = tuner.fit()
        unfinished = _unfinished_trials(grid)
        if unfinished:
            raise ExperimentInterrupted(state.exp_dir, unfinished)
        return _finalize(state, spec, grid)


class ExperimentInterrupted(RuntimeError):
    """The driver was stopped (Ctrl-C, SIGTERM, SLURM preemption) with trials unfinished.

    Trials' latest checkpoints and the experiment state are saved; nothing was
    finalized. ``platform resume`` continues it.
    """

    def __init__(self, experiment_dir: Path, unfinished: int) -> None:
        self.experiment_dir = experiment_dir
        super().__init__(
            f"interrupted with {unfinished} trial(s) unfinished; state saved. "
            f"Continue with: platform resume {experiment_dir}"
        )


@contextlib.contextmanager
def _sigterm_stops_gracefully() -> Iterator[None]:
    """Turn SIGTERM (SLURM preemption, ``scancel``) into Tune's graceful stop (SIGUSR1).

    Tune then checkpoints the experiment state one last time and returns; trials
    resume from their latest checkpoints with ``platform resume``.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(
        signal.SIGTERM, lambda sig, frame: os.kill(os.getpid(), signal.SIGUSR1)
    )
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unfinished_trials(grid: Any) -> int:
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return sum(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _init_ray(address: str | None) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # TUNELAB_METRICS_EXPORT_PORT: serve Ray's and tunelab's metrics to Prometheus (dashboards/README.md)
        port = os.environ.get("TUNELAB_METRICS_EXPORT_PORT")
        extra: dict[str, Any] = {"_metrics_export_port": int(port)} if port else {}
        ray.init(
            num_cpus=os.cpu_count() or 1, log_to_driver=False, include_dashboard=False, **extra
        )


def _trial_setup(state: _State, spec: AnySpec) -> TrialSetup:
    milestones: tuple[int, ...] = ()
    if isinstance(spec, SeedCullSpec):
        milestones = (spec.cull.milestone(spec.budget),)
    return TrialSetup(
        family=spec.family,
        spec=spec.name,
        budget=spec.budget,
        checkpoint_every=spec.checkpoint.every,
        milestones=milestones,
        data_root=str(Path(state.storage) / "data"),
        artifacts_root=str(state.exp_dir / ARTIFACTS_DIR),
        threads=max(1, int(spec.resources.cpu)),
    )


def _trainable(state: _State, spec: AnySpec) -> Any:
    from ray import tune

    resources: dict[str, float] = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    if spec.resources.memory_gb:
        resources["memory"] = spec.resources.memory_gb * 1024**3
    return tune.with_resources(
        tune.with_parameters(run_trial, setup=_trial_setup(state, spec)), resources
    )


def _scheduler(state: _State, spec: AnySpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    metric, mode = spec.metric.name, spec.metric.mode
    if isinstance(spec, SeedCullSpec):
        cull, milestone = spec.cull, spec.cull.milestone(spec.budget)
        if cull.scheduler == "sync":
            return SyncCullScheduler(
                metric=metric,
                mode=mode,
                milestone=milestone,
                keep=cull.keep,
                expected=len(spec.seeds),
                tie_break=cull.tie_break,
                state_path=str(state.exp_dir / CULL_STATE_FILE),
            )
        eta = max(2, round(len(spec.seeds) / cull.keep))
        if cull.scheduler == "asha":
            return ASHAScheduler(
                time_attr=ITERATION,
                metric=metric,
                mode=mode,
                max_t=spec.budget,
                grace_period=milestone,
                reduction_factor=eta,
                brackets=1,
            )
        return OptunaPrunerScheduler(
            metric=metric,
            mode=mode,
            pruner=cull.pruner,
            max_t=spec.budget,
            min_t=milestone,
            reduction_factor=eta,
        )
    if isinstance(spec, SweepSpec) and spec.scheduler.type == "asha":
        return ASHAScheduler(
            time_attr=ITERATION,
            metric=metric,
            mode=mode,
            max_t=spec.budget,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    return FIFOScheduler()


def _param_space(spec: AnySpec) -> dict[str, Any]:
    from ray import tune

    config: dict[str, Any] = dict(spec.config)
    if isinstance(spec, SweepSpec):
        config.update({k: d.to_tune() for k, d in spec.search.items()})
    seeds = spec.seeds
    seed: Any = seeds[0] if len(seeds) == 1 else tune.grid_search(list(seeds))
    return {"seed": seed, "config": config}


def _tuner(state: _State, spec: AnySpec, *, progress: bool | None, restore: bool) -> Any:
    from ray import tune

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    trainable = _trainable(state, spec)
    if restore:
        if not (state.tune_dir / "tuner.pkl").exists():
            raise ExperimentError(
                f"{state.exp_dir} has no Tune state yet (it never started); run it again"
            )
        return tune.Tuner.restore(
            str(state.tune_dir),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
        )
    search_alg: Any = None
    num_samples = 1
    trial_tags = None
    param_space: dict[str, Any] | None = None
    if isinstance(spec, LeverABSpec):
        from tunelab._lever import PairedLeverSearcher, lever_trial_tags

        search_alg = PairedLeverSearcher(spec, state_file=str(state.exp_dir / LEVER_STATE_FILE))
        num_samples, trial_tags = -1, lever_trial_tags
    else:
        param_space = _param_space(spec)
    if isinstance(spec, SweepSpec):
        num_samples = spec.num_samples
        if spec.search_alg == "optuna_tpe":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(
                metric=spec.metric.name, mode=spec.metric.mode, seed=spec.seeds[0]
            )
    scheduler = _scheduler(state, spec)
    total = None if num_samples < 0 else len(spec.seeds) * num_samples
    from tunelab.metrics import TrialStateMetrics  # Prometheus gauges of trial states

    callbacks = [
        MlflowTrialCallback(
            tracking_uri=state.tracking_uri,
            experiment_id=state.mlflow_experiment_id,
            parent_run_id=state.parent_run_id,
            runs_file=str(state.exp_dir / RUNS_FILE),
            base_tags=_child_tags(spec, state.git_commit),
            trial_tags=trial_tags,
            artifacts_root=str(state.exp_dir / ARTIFACTS_DIR),
        ),
        _progress_callback(spec, total, progress),
        TrialStateMetrics(spec=spec.name, family=spec.family, budget=spec.budget),
    ]
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            reuse_actors=True,
            max_concurrent_trials=spec.max_concurrent,
            trial_dirname_creator=_trial_dirname,
            trial_name_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(state.exp_dir),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            failure_config=tune.FailureConfig(max_failures=spec.failure.retries),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def _child_tags(spec: AnySpec, commit: str) -> dict[str, str]:
    tags = _base_tags(spec, commit)
    if isinstance(spec, SeedCullSpec):
        tags[TAG_ROLE] = "seed"
    elif isinstance(spec, SweepSpec):
        tags[TAG_ROLE] = "variant"
    return tags


def _progress_callback(spec: AnySpec, total: int | None, enabled: bool | None) -> Any:
    from tunelab._progress import ProgressCallback

    return ProgressCallback(
        metric=spec.metric.name,
        mode=spec.metric.mode,
        budget=spec.budget,
        total=total,
        enabled=enabled,
    )


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# -- post-processing --------------------------------------------------------------------
def _finalize(state: _State, spec: AnySpec, grid: Any) -> dict[str, Any]:
    import pandas as pd
    from mlflow import MlflowClient

    client = MlflowClient(state.tracking_uri)
    runs = read_json(state.exp_dir / RUNS_FILE, {})
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        tid = m.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        iterations = int(m.get(ITERATION, 0) or 0)
        if result.error is not None:
            status = "error"
        elif iterations >= spec.budget:
            status = "finished"
        else:
            status = "culled"
        rows.append(
            {
                "trial_id": tid,
                "run_id": runs.get(tid),
                "seed": result.config.get("seed"),
                "arm": result.config.get("arm"),
                "round": result.config.get("round"),
                "stage": result.config.get("stage"),
                "config": result.config.get("config", {}),
                "iterations": iterations,
                "status": status,
                "checkpoint": _last_checkpoint(result),
                "metrics": {k: v for k, v in m.items() if "/" in k and isinstance(v, (int, float))},
                "error": None if result.error is None else str(result.error).splitlines()[0][:500],
            }
        )
    rows.sort(key=lambda r: (r["seed"] if isinstance(r["seed"], int) else 0, r["trial_id"]))
    for r in rows:
        if r["run_id"] is None:
            continue
        if r["status"] == "culled" and spec.kind != "lever_ab":
            set_tags(client, r["run_id"], {TAG_CULLED_AT: r["iterations"]})
        end_runs(client, [r["run_id"]], "FAILED" if r["status"] == "error" else "FINISHED")
    table = pd.DataFrame(
        [
            {
                "trial_id": r["trial_id"],
                "run_id": r["run_id"],
                "seed": r["seed"],
                **(
                    {"arm": r["arm"], "round": r["round"], "stage": r["stage"]}
                    if spec.kind == "lever_ab"
                    else {}
                ),
                "status": r["status"],
                "iterations": r["iterations"],
                "culled_at": r["iterations"] if r["status"] == "culled" else None,
                **{
                    f"config.{k}": v
                    for k, v in r["config"].items()
                    if isinstance(v, (int, float, str, bool))
                },
                **r["metrics"],
            }
            for r in rows
        ]
    )
    _write_table(table, state.exp_dir / "results")
    summary: dict[str, Any] = {
        "experiment_dir": str(state.exp_dir),
        "tracking_uri": state.tracking_uri,
        "mlflow_experiment": state.mlflow_experiment,
        "mlflow_experiment_id": state.mlflow_experiment_id,
        "parent_run_id": state.parent_run_id,
        "spec": spec.name,
        "kind": spec.kind,
        "metric": spec.metric.model_dump(),
        "trials": [
            {
                k: r[k]
                for k in (
                    "trial_id",
                    "run_id",
                    "seed",
                    "arm",
                    "round",
                    "iterations",
                    "status",
                    "metrics",
                    "error",
                )
                if spec.kind == "lever_ab" or k not in ("arm", "round")
            }
            for r in rows
        ],
        "failed": sum(r["status"] == "error" for r in rows),
        "failure_budget": spec.failure.tolerate,
    }
    if isinstance(spec, SeedCullSpec):
        _write_table(table, state.exp_dir / "seed_table")
        summary["cull"] = {
            "at": spec.cull.milestone(spec.budget),
            "keep": spec.cull.keep,
            "scheduler": spec.cull.scheduler,
        }
        summary["selected"] = _select(state, spec, rows, client)
    elif isinstance(spec, LeverABSpec):
        from tunelab._lever import finalize_levers

        summary.update(
            finalize_levers(
                state.exp_dir / LEVER_STATE_FILE, spec, rows, client, state.parent_run_id
            )
        )
    else:
        summary["best"] = _best(spec, rows)
    parent_tags = {"tunelab.n_trials": len(rows), "tunelab.n_failed": summary["failed"]}
    set_tags(client, state.parent_run_id, parent_tags)
    atomic_write_json(state.exp_dir / "summary.json", summary)
    client.log_artifact(state.parent_run_id, str(state.exp_dir / "results.csv"))
    client.log_artifact(state.parent_run_id, str(state.exp_dir / "summary.json"))
    end_runs(
        client,
        [state.parent_run_id],
        "FAILED" if summary["failed"] > spec.failure.tolerate else "FINISHED",
    )
    return summary


def _select(
    state: _State, spec: SeedCullSpec, rows: list[dict[str, Any]], client: Any
) -> dict[str, Any] | None:
    finished = [r for r in rows if r["status"] == "finished"]
    if not finished:
        return None
    tie = spec.cull.tie_break

    def score(r: dict[str, Any]) -> list[float]:
        return [
            as_float(r["metrics"].get(spec.select.metric)),
            as_float(r["metrics"].get(tie)) if tie else 0.0,
        ]

    best = min(finished, key=lambda r: (rank_key(score(r), spec.select.mode), r["seed"]))
    value = best["metrics"].get(spec.select.metric)
    # Reload the selected checkpoint and regenerate its artifacts: proves the checkpoint is usable.
    selected_dir = state.exp_dir / "selected"
    exported: dict[str, Any] = {}
    if best["checkpoint"]:
        exp, _ = restore_experiment(
            spec.family,
            best["config"],
            int(best["seed"]),
            Path(state.storage) / "data",
            Path(best["checkpoint"]),
        )
        exported = exp.export(selected_dir)
    from tunelab._family import get_family

    hyper = dataclasses.asdict(get_family(spec.family).make_config(best["config"]))
    trial_manifest = read_json(
        state.exp_dir / ARTIFACTS_DIR / best["trial_id"] / "manifest.json", {}
    )
    manifest = {
        "spec": spec.name,
        "family": spec.family,
        "selected_seed": best["seed"],
        "trial_id": best["trial_id"],
        "run_id": best["run_id"],
        "selection": {
            "metric": spec.select.metric,
            "mode": spec.select.mode,
            "value": value,
            "tie_break": tie,
        },
        "cull": {
            "at": spec.cull.milestone(spec.budget),
            "keep": spec.cull.keep,
            "scheduler": spec.cull.scheduler,
        },
        "val": {k: v for k, v in best["metrics"].items() if k.startswith("val/")},
        "test": _scores(exported, "test") or _scores(trial_manifest, "test"),
        "export": exported,
        "sample_rate": exported.get("sample_rate", trial_manifest.get("sample_rate")),
        "hyperparameters": hyper,
        "budget": spec.budget,
        "checkpoint": best["checkpoint"],
        "seeds": [r["seed"] for r in rows],
    }
    path = state.exp_dir / "selected_model.json"
    atomic_write_json(path, manifest)
    if best["run_id"]:
        set_tags(client, best["run_id"], {TAG_SELECTED: "true"})
    for r in rows:
        if r["run_id"] and r is not best:
            set_tags(client, r["run_id"], {TAG_SELECTED: "false"})
    set_tags(
        client,
        state.parent_run_id,
        {
            TAG_SELECTED_SEED: best["seed"],
            TAG_SELECTED_RUN: best["run_id"],
            TAG_SELECTED_VALUE: value,
        },
    )
    client.log_artifact(state.parent_run_id, str(path))
    client.log_artifact(state.parent_run_id, str(state.exp_dir / "seed_table.csv"))
    if selected_dir.is_dir():
        client.log_artifacts(state.parent_run_id, str(selected_dir), "selected")
    return {
        "seed": best["seed"],
        "trial_id": best["trial_id"],
        "run_id": best["run_id"],
        "metric": spec.select.metric,
        "value": value,
        "manifest": str(path),
        "checkpoint": best["checkpoint"],
    }


def _best(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [
        r
        for r in rows
        if r["status"] != "error" and not math.isnan(as_float(r["metrics"].get(spec.metric.name)))
    ]
    if not ok:
        return None
    best = min(
        ok, key=lambda r: rank_key([as_float(r["metrics"].get(spec.metric.name))], spec.metric.mode)
    )
    return {
        "trial_id": best["trial_id"],
        "run_id": best["run_id"],
        "seed": best["seed"],
        "config": best["config"],
        "value": best["metrics"].get(spec.metric.name),
    }


# -- helpers ----------------------------------------------------------------------------
def _base_tags(spec: AnySpec, commit: str) -> dict[str, str]:
    return {
        TAG_KIND: spec.kind,
        TAG_SPEC: spec.name,
        TAG_SPEC_HASH: spec_hash(spec),
        TAG_FAMILY: spec.family,
        TAG_GIT_COMMIT: commit,
    }


def _scores(manifest: dict[str, Any], split: str) -> dict[str, Any]:
    """A family manifest's scores of ``split``: a ``{split: {...}}`` block or ``split/...`` keys."""
    block = manifest.get(split)
    if isinstance(block, dict):
        return block
    return {k: v for k, v in manifest.items() if k.startswith(f"{split}/")}


def _last_checkpoint(result: Any) -> str | None:
    if result.checkpoint is not None:
        return str(result.checkpoint.path)
    found = (
        sorted_checkpoints(Path(result.path)) if result.path and Path(result.path).is_dir() else []
    )
    return str(found[-1]) if found else None


def _write_table(table: Any, stem: Path) -> None:
    tmp_csv, tmp_pq = stem.with_suffix(".csv.tmp"), stem.with_suffix(".parquet.tmp")
    table.to_csv(tmp_csv, index=False)
    table.to_parquet(tmp_pq, index=False)
    os.replace(tmp_csv, stem.with_suffix(".csv"))
    os.replace(tmp_pq, stem.with_suffix(".parquet"))


def _read_state(experiment_dir: str | Path) -> _State:
    path = Path(experiment_dir).resolve() / RUN_STATE_FILE
    if not path.exists():
        raise ExperimentError(
            f"{Path(experiment_dir)} is not a tunelab experiment folder (no {RUN_STATE_FILE})"
        )
    return _State(**json.loads(path.read_text()))


def _tune_trial_states(exp_dir: Path) -> dict[str, str]:
    states: dict[str, str] = {}
    found = sorted(exp_dir.glob("experiment_state-*.json"))
    if not found:
        return states
    data = json.loads(found[-1].read_text())
    for entry in data.get("trial_data", []):
        try:
            meta = json.loads(entry[1]) if isinstance(entry, list) else {}
            trial = json.loads(entry[0]) if isinstance(entry, list) else entry
            states[trial.get("trial_id", "")] = meta.get("status") or trial.get("status", "UNKNOWN")
        except (TypeError, ValueError, AttributeError):
            continue
    return states


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Keep stdout clean for ``--json``: anything Ray/Tune prints goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
