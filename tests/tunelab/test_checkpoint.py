"""Checkpoint helpers: atomic writes, numeric ordering, RNG capture, completion markers."""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tunelab import (
    atomic_write_json,
    capture_rng_state,
    load_state,
    restore_rng_state,
    save_state,
    sorted_checkpoints,
)
from tunelab.checkpoint import (
    COMPLETE_FILE,
    RESERVE_FILE,
    IncompleteCheckpointError,
    is_complete_checkpoint,
    release_space,
    remove_incomplete_checkpoints,
    reserve_space,
    write_complete_marker,
)
from tunelab.errors import EXIT_DISK_FULL, DiskFullError


def _complete(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.pt").write_bytes(b"x" * 10)
    write_complete_marker(folder, iteration=1)
    return folder


def test_checkpoints_sort_by_number_not_name(tmp_path: Path) -> None:
    # the original bug: checkpoint_9 sorted after checkpoint_15 by name
    for n in (15, 9, 100, 2):
        _complete(tmp_path / f"checkpoint_{n}")
    (tmp_path / "checkpoint_notes.txt").write_text("not a checkpoint")
    assert [p.name for p in sorted_checkpoints(tmp_path)] == [
        "checkpoint_2",
        "checkpoint_9",
        "checkpoint_15",
        "checkpoint_100",
    ]


def test_rng_roundtrip_reproduces_every_generator() -> None:
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_save_and_load_state_restores_rng_and_payload(tmp_path: Path) -> None:
    torch.manual_seed(3)
    save_state(tmp_path, {"w": torch.arange(4.0)}, iteration=7, best=0.5)
    expected = torch.rand(2)
    torch.manual_seed(99)
    payload = load_state(tmp_path)
    assert payload["iteration"] == 7 and payload["best"] == 0.5
    assert torch.equal(payload["family"]["w"], torch.arange(4.0))
    assert torch.equal(torch.rand(2), expected)


def test_failed_write_leaves_previous_state_intact(tmp_path: Path) -> None:
    save_state(tmp_path, {"v": 1}, iteration=1)

    class Unpicklable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_state(tmp_path, {"v": Unpicklable()}, iteration=2)
    assert load_state(tmp_path)["family"] == {"v": 1}
    assert not list(tmp_path.glob("*.tmp"))  # no half-written temp file left behind


def test_atomic_json_leaves_no_temp_files(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("code ran",))


def test_load_state_runs_no_code_from_a_tampered_checkpoint(tmp_path: Path) -> None:
    # a writable checkpoint folder must not be a way to run code (weights_only=True)
    torch.save({"family": {"x": _Evil()}, "rng": {}, "iteration": 1}, tmp_path / "state.pt")
    write_complete_marker(tmp_path, iteration=1)  # a tamperer can write a marker too
    with pytest.raises(pickle.UnpicklingError):
        load_state(tmp_path)


def test_load_state_accepts_numpy_arrays_and_the_rng_state(tmp_path: Path) -> None:
    # numpy arrays in a family state and numpy's RNG state are allow-listed
    save_state(tmp_path, {"a": np.arange(3, dtype=np.float32)}, iteration=2)
    payload = load_state(tmp_path, restore_rng=True)
    assert payload["family"]["a"].tolist() == [0.0, 1.0, 2.0] and payload["iteration"] == 2


def test_the_completion_marker_is_written_last_and_lists_sizes(tmp_path: Path) -> None:
    save_state(tmp_path, {"w": torch.zeros(8)}, iteration=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["state.pt", "meta.json", COMPLETE_FILE])
    marker = (tmp_path / COMPLETE_FILE).stat().st_mtime_ns
    assert all(marker >= p.stat().st_mtime_ns for p in tmp_path.iterdir())
    assert is_complete_checkpoint(tmp_path)


def test_an_incomplete_folder_is_never_listed_loaded_and_is_cleaned_up(tmp_path: Path) -> None:
    trial = tmp_path / "tune" / "trial_a"
    for it in (1, 2):
        save_state(trial / f"checkpoint_{it:06d}", {"v": it}, iteration=it)
    # today's failure: a copy cut short by a full disk, a 0-byte state.pt
    cut = trial / "checkpoint_000003"
    shutil.copytree(trial / "checkpoint_000002", cut)
    (cut / "state.pt").write_bytes(b"")
    # a copy that stopped before the marker arrived
    no_marker = trial / "checkpoint_000004"
    shutil.copytree(trial / "checkpoint_000002", no_marker)
    (no_marker / COMPLETE_FILE).unlink()
    # a marker cut short
    bad_marker = trial / "checkpoint_000005"
    shutil.copytree(trial / "checkpoint_000002", bad_marker)
    (bad_marker / COMPLETE_FILE).write_bytes(b'{"iteration": 5, "fi')

    assert [p.name for p in sorted_checkpoints(trial)] == ["checkpoint_000001", "checkpoint_000002"]
    assert len(sorted_checkpoints(trial, complete_only=False)) == 5
    for folder in (cut, no_marker, bad_marker):
        with pytest.raises(IncompleteCheckpointError, match=folder.name):
            load_state(folder)
    removed = remove_incomplete_checkpoints(tmp_path / "tune")
    assert [p.name for p in removed] == [p.name for p in (cut, no_marker, bad_marker)]
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000001", "checkpoint_000002"]
    assert load_state(trial / "checkpoint_000002", restore_rng=False)["family"] == {"v": 2}


def test_checkpoints_from_before_markers_are_never_deleted(tmp_path: Path) -> None:
    legacy = tmp_path / "tune" / "trial_a" / "checkpoint_000001"
    legacy.mkdir(parents=True)
    (legacy / "state.pt").write_bytes(b"old format")
    assert remove_incomplete_checkpoints(tmp_path / "tune") == [] and legacy.is_dir()
    assert sorted_checkpoints(legacy.parent) == []  # kept, never used


def _full_disk_save(data: bytes):  # torch.save that writes part of the file, then ENOSPC
    def save(obj: object, f: object) -> None:
        f.write(data)  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_save_state_on_a_full_disk_raises_disk_full_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "checkpoint_000007"
    monkeypatch.setattr(torch, "save", _full_disk_save(b"partial"))
    with pytest.raises(DiskFullError) as info:
        save_state(folder, {"v": 1}, iteration=7)
    err = info.value
    assert err.exit_code == EXIT_DISK_FULL and err.errno == errno.ENOSPC
    assert isinstance(err, OSError) and err.path == str(folder / "state.pt")
    assert str(folder / "state.pt") in str(err) and "\n" not in str(err)
    assert not is_complete_checkpoint(folder) and not list(folder.glob("*.tmp"))
    assert sorted_checkpoints(tmp_path) == []


def test_failed_rewrite_keeps_the_previous_complete_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_state(tmp_path, {"v": 1}, iteration=1)
    monkeypatch.setattr(torch, "save", _full_disk_save(b"partial"))
    with pytest.raises(DiskFullError):
        save_state(tmp_path, {"v": 2}, iteration=2)
    monkeypatch.undo()
    assert is_complete_checkpoint(tmp_path)
    assert load_state(tmp_path, restore_rng=False)["family"] == {"v": 1}


def test_atomic_json_on_a_full_quota_raises_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError, match="quota") as info:
        atomic_write_json(tmp_path / "summary.json", {"a": 1})
    assert info.value.errno == errno.EDQUOT and info.value.path.endswith("summary.json")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_reserved_space_is_held_and_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = reserve_space(tmp_path, 1 << 16)
    assert path == tmp_path / RESERVE_FILE and path.stat().st_size == 1 << 16
    assert os.stat(path).st_blocks * 512 >= 1 << 16  # allocated, not a sparse file
    assert release_space(tmp_path) and not path.exists() and not release_space(tmp_path)

    def fallocate(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(DiskFullError, match=RESERVE_FILE):
        reserve_space(tmp_path, 1 << 16)
    assert list(tmp_path.iterdir()) == []
