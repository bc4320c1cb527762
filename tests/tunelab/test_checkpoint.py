"""Checkpoint helpers: atomic writes, numeric ordering, RNG capture."""

from __future__ import annotations

import pickle
import random
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


def test_checkpoints_sort_by_number_not_name(tmp_path: Path) -> None:
    # the original bug: checkpoint_9 sorted after checkpoint_15 by name
    for n in (15, 9, 100, 2):
        (tmp_path / f"checkpoint_{n}").mkdir()
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
    with pytest.raises(pickle.UnpicklingError):
        load_state(tmp_path)


def test_load_state_accepts_numpy_arrays_and_the_rng_state(tmp_path: Path) -> None:
    # numpy arrays in a family state and numpy's RNG state are allow-listed
    save_state(tmp_path, {"a": np.arange(3, dtype=np.float32)}, iteration=2)
    payload = load_state(tmp_path, restore_rng=True)
    assert payload["family"]["a"].tolist() == [0.0, 1.0, 2.0] and payload["iteration"] == 2
