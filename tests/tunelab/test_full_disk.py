"""A full disk stops the experiment for ``platform resume``; a deterministic trial error
fails fast (issue 10, items 5 and 6).

A write that finds no space left (``ENOSPC``) or the quota used up (``EDQUOT``),
in the driver or in a trial, ends the command with :class:`DiskFullError`
(exit 74): one line naming the path and the resume command. Nothing is
finalized; a checkpoint copy the full disk cut short is never used and is
cleaned up; once space is freed, ``resume`` completes. The end-to-end test
fills a real (tmpfs) disk where this process may mount one, and injects
``ENOSPC`` into a trial's checkpoint otherwise.

A trial that fails twice in a row before its first result (the family's setup
raising on a bad config, missing data) is not retried N times, and the
summary carries the root cause, not Ray's wrapper.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer

import tunelab
from tests.conftest import TOY, write_spec
from tunelab.callbacks import TrialFailures, disk_full_guard, raise_if_disk_full
from tunelab.checkpoint import RESERVE_FILE, is_complete_checkpoint, sorted_checkpoints
from tunelab.errors import (
    EXIT_DISK_FULL,
    DiskFullError,
    ExperimentInterrupted,
    error_summary,
    find_disk_full,
)

ODD_DIR = "/data/my runs/it's here/exp-1"


def _resume_argv(message: str) -> list[str]:
    """The command after "continue with:" in a one-line message, parsed like a shell would."""
    assert "\n" not in message
    return shlex.split(message.split("continue with: ", 1)[1])


# -- the error ----------------------------------------------------------------------------
def test_disk_full_error_is_one_line_naming_the_path_and_a_pasteable_resume() -> None:
    err = DiskFullError("/data/x/state.pt", ODD_DIR)
    assert err.exit_code == EXIT_DISK_FULL == 74 and err.resumable
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert "/data/x/state.pt" in str(err)
    assert _resume_argv(str(err)) == ["platform", "resume", ODD_DIR]
    quota = DiskFullError("/q", quota=True)
    assert quota.errno == errno.EDQUOT and "quota" in str(quota) and "resume" not in str(quota)
    again = pickle.loads(pickle.dumps(err))  # Ray pickles a trial's error to the driver
    assert type(again) is DiskFullError and str(again) == str(err)
    assert str(quota.in_experiment(ODD_DIR)).startswith("disk full (disk quota exceeded)")


def test_every_exit_code_is_its_own() -> None:
    from tunelab import errors

    codes = [getattr(errors, n) for n in dir(errors) if n.startswith("EXIT_")]
    assert len(codes) == len(set(codes)) and EXIT_DISK_FULL in codes


def test_a_full_disk_is_found_behind_any_wrapper() -> None:
    from ray.exceptions import RayTaskError
    from ray.tune.error import TuneError

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/s/experiment_state.json")
        except OSError as err:
            raise TuneError("The Ray Tune run failed.") from err
    except TuneError as wrapped:
        found = find_disk_full(wrapped)
    assert found is not None and found.path == "/s/experiment_state.json"
    in_trial = RayTaskError("train", "tb", DiskFullError("/s/t/checkpoint_000003"))
    assert find_disk_full(in_trial.as_instanceof_cause()).path == "/s/t/checkpoint_000003"
    sqlite = RuntimeError("(sqlite3.OperationalError) database or disk is full")
    assert find_disk_full(sqlite, "/s/mlflow.db").path == "/s/mlflow.db"
    assert find_disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert find_disk_full(ValueError("bad")) is None


def test_error_summary_is_the_root_cause_not_rays_wrapper() -> None:
    from ray.exceptions import RayTaskError

    cause = ValueError("hidden must be even\nmore detail")
    wrapped = RayTaskError("ImplicitFunc.train", "ray::ImplicitFunc.train() (pid=1)", cause)
    assert error_summary(wrapped.as_instanceof_cause()) == "ValueError: hidden must be even"
    assert error_summary(wrapped) == "ValueError: hidden must be even"
    assert error_summary(None) is None


def test_guard_turns_a_full_disk_into_the_resumable_error(tmp_path: Path) -> None:
    with pytest.raises(DiskFullError) as info, disk_full_guard(ODD_DIR):
        raise RuntimeError("wrapped") from OSError(errno.ENOSPC, "No space left", "/d/f")
    assert info.value.path == "/d/f" and info.value.experiment_dir == ODD_DIR
    with pytest.raises(ValueError, match="unrelated"), disk_full_guard(ODD_DIR):
        raise ValueError("unrelated")


def test_cli_prints_one_line_and_exits_74(capsys: pytest.CaptureFixture[str]) -> None:
    import cli

    with pytest.raises(typer.Exit) as info, cli._exit_codes():
        raise DiskFullError("/d/x", ODD_DIR)
    err = capsys.readouterr().err
    assert (
        info.value.exit_code == 74 and err.count("\n") == 1 and err.startswith("error: disk full")
    )
    assert _resume_argv(err.strip()) == ["platform", "resume", ODD_DIR]


# -- the failure policy (a Tune callback), on Tune's trial objects' fields --------------------
def _trial(
    tmp_path: Path, error: BaseException | None, failures: int, max_failures: int = 3
) -> Any:
    from ray import cloudpickle

    pickled = tmp_path / "error.pkl"
    if error is not None:
        pickled.write_bytes(cloudpickle.dumps(error))
    return SimpleNamespace(
        trial_id="t1",
        max_failures=max_failures,
        run_metadata=SimpleNamespace(num_failures=failures),
        pickled_error_file=str(pickled) if error is not None else None,
        error_file=None,
    )


def _task_error(cause: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    return RayTaskError("ImplicitFunc.train", "traceback", cause).as_instanceof_cause()


def test_a_failure_before_the_first_result_gets_one_more_attempt(tmp_path: Path) -> None:
    cb = TrialFailures()
    trial = _trial(tmp_path, _task_error(ValueError("hidden must be even")), failures=1)
    cb.on_trial_start(0, [], trial)
    cb.on_trial_recover(0, [], trial)
    assert trial.max_failures == 1  # Tune's next failure check: 2 <= 1 is false: final
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {})  # it was not deterministic after all: N is back
    assert trial.max_failures == 3


def test_a_failure_after_results_or_a_dead_worker_keeps_its_retries(tmp_path: Path) -> None:
    from ray.exceptions import RayActorError

    cb = TrialFailures()
    trial = _trial(tmp_path, _task_error(RuntimeError("nan")), failures=1)
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {})
    cb.on_trial_recover(0, [], trial)
    assert trial.max_failures == 3
    died = _trial(tmp_path, RayActorError(), failures=1)
    cb.on_trial_start(0, [], died)
    cb.on_trial_recover(0, [], died)
    assert died.max_failures == 3


def test_a_trials_full_disk_is_not_its_failure_and_stops_the_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    cb = TrialFailures(experiment_dir=exp, reserve_bytes=4096)
    cb.setup()
    assert (exp / RESERVE_FILE).stat().st_size == 4096
    trial = _trial(tmp_path, _task_error(DiskFullError(exp / "tune" / "trial_1")), failures=1)
    cb.on_trial_start(0, [], trial)
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)  # no Tune: it raises
    with pytest.raises(DiskFullError):
        cb.on_trial_recover(0, [], trial)
    assert trial.run_metadata.num_failures == 0 and trial.max_failures == 3
    assert not (exp / RESERVE_FILE).exists()  # room for Tune's last writes
    with pytest.raises(DiskFullError) as info:
        raise_if_disk_full(exp)
    assert _resume_argv(str(info.value)) == ["platform", "resume", str(exp)]
    raise_if_disk_full(exp)  # reported once


def test_low_free_space_stops_the_experiment_before_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cb = TrialFailures(experiment_dir=tmp_path, reserve_bytes=0)
    cb.setup()
    free = {"blocks": 10_000}
    monkeypatch.setattr(
        os, "statvfs", lambda p: SimpleNamespace(f_bavail=free["blocks"], f_frsize=4096)
    )
    cb.on_step_begin(0, [])
    raise_if_disk_full(tmp_path)  # 40 MB free: nothing
    free["blocks"] = 100  # 400 KB free
    cb._watched = 0.0
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)
    with pytest.raises(DiskFullError, match=str(tmp_path)):
        cb.on_step_begin(0, [])
    with pytest.raises(DiskFullError) as info:
        raise_if_disk_full(tmp_path)
    assert _resume_argv(str(info.value)) == ["platform", "resume", str(tmp_path)]


def test_an_interrupt_after_a_full_disk_is_the_full_disk(tmp_path: Path) -> None:
    cb = TrialFailures()
    trial = _trial(tmp_path, _task_error(DiskFullError("/x/trial")), failures=0, max_failures=0)
    sent: list[int] = []
    handler = signal.signal(signal.SIGUSR1, lambda sig, frame: sent.append(sig))
    try:
        cb.on_trial_error(0, [], trial)  # Tune's handler is there: its graceful stop
    finally:
        signal.signal(signal.SIGUSR1, handler)
    assert sent == [signal.SIGUSR1]
    with pytest.raises(DiskFullError, match="/x/trial"), disk_full_guard(tmp_path):
        raise ExperimentInterrupted(tmp_path, 1)


# -- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _own_ray() -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A 3 MiB tmpfs (None where this process cannot mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or sys.platform != "linux":
        yield None
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


SPEC = f"""
kind: sweep
name: toy-full-disk
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 5{{extra}}}}
budget: 8
metric: {{name: val/score, mode: max}}
search: {{lr: {{grid: [0.01]}}}}
failure: {{retries: 2, tolerate: 0}}
"""


@pytest.mark.slow
def test_full_disk_stops_for_resume_which_completes_once_space_is_freed(
    tmp_path: Path, small_disk: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if small_disk is not None:  # real: ~7 checkpoints of 420 KiB fill the disk
        storage, extra = small_disk / "my results", ", ballast_kb: 420"
        monkeypatch.setenv("TUNELAB_RESERVE_BYTES", str(256 * 1024))
        monkeypatch.setenv("TUNELAB_LOW_SPACE_BYTES", "0")  # a checkpoint copy gets cut
    else:  # injected: the 4th checkpoint's write finds no space
        storage, extra = tmp_path / "my results", ", disk_full_once_at: 4"
    spec = write_spec(tmp_path / "s.yaml", SPEC.replace("{extra}", extra))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(DiskFullError) as info:
        tunelab.run_experiment(spec, storage=storage, tracking_uri=uri, progress=False)
    (exp,) = storage.glob("toy-full-disk-*")
    err = info.value
    assert err.exit_code == 74 and err.path.startswith(str(storage))  # names the file
    assert _resume_argv(str(err)) == ["platform", "resume", str(exp)]
    assert not (exp / "summary.json").exists()  # nothing finalized
    (trial_dir,) = (exp / "tune").glob("trial_*")
    for folder in sorted_checkpoints(trial_dir):  # what resume may use is whole
        tunelab.load_state(folder, restore_rng=False)

    if small_disk is not None:  # space is freed
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    summary = tunelab.resume_experiment(exp, progress=False)
    (trial,) = summary["trials"]
    assert (trial["status"], trial["iterations"], trial["error"]) == ("finished", 8, None)
    every = sorted_checkpoints(trial_dir, complete_only=False)
    assert every and all(is_complete_checkpoint(f) for f in every)  # the cut copy is gone
    assert not (exp / RESERVE_FILE).exists()
    assert json.loads((exp / "summary.json").read_text())["trials"][0]["status"] == "finished"


@pytest.mark.slow
def test_a_deterministic_setup_error_is_not_retried_n_times(tmp_path: Path) -> None:
    extra = ', build_error: "hidden must be even"'
    spec = write_spec(
        tmp_path / "s.yaml",
        SPEC.replace("{extra}", extra).replace(
            "retries: 2, tolerate: 0", "retries: 5, tolerate: 1"
        ),
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = tunelab.run_experiment(
        spec, storage=tmp_path / "res", tracking_uri=uri, progress=False
    )
    (trial,) = summary["trials"]
    assert (trial["status"], trial["error"]) == ("error", "ValueError: hidden must be even")
    (counter,) = (tmp_path / "res").rglob("toy-builds-seed0")
    builds = counter.read_text().split()
    assert len(builds) == 2  # the first attempt and the one that confirms it; not 1 + 5
