"""Exact training-state checkpoints: atomic writes, RNG capture, ordering.

A checkpoint is a directory holding ``state.pt`` (``torch.save`` of the family
state, tunelab's RNG snapshot, the iteration and the best value) and
``meta.json`` (iteration, for humans and tools). Writes go to a temporary file
that is renamed into place, so a crash never leaves a half-written state.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "STATE_FILE",
    "atomic_write_bytes",
    "atomic_write_json",
    "capture_rng_state",
    "data_lock",
    "load_state",
    "read_json",
    "restore_rng_state",
    "save_state",
    "seed_everything",
    "sorted_checkpoints",
    "strict_json",
]

STATE_FILE = "state.pt"
META_FILE = "meta.json"
_CKPT_RE = re.compile(r"checkpoint_(\d+)$")


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global python / numpy / torch RNG states."""
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned."""
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented, strict JSON (non-finite numbers become null)."""
    text = json.dumps(strict_json(obj), indent=2, default=str, allow_nan=False)
    atomic_write_bytes(Path(path), (text + "\n").encode())


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN / +-inf float (also numpy floats) replaced by None.

    JSON has no NaN: Python writes a bare ``NaN`` token that strict parsers
    (``jq``, JavaScript, pandas' ``orient=...``) reject. A diverged value is
    kept visible as ``null``.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.floating):
        return float(obj) if np.isfinite(obj) else None
    return obj


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file does not exist (yet)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def save_state(
    directory: Path,
    family_state: dict[str, Any],
    *,
    iteration: int,
    best: float | None = None,
    extra: dict[str, Any] | None = None,
    durable: bool = True,
) -> Path:
    """Write a complete training state (family state + global RNGs) atomically.

    ``durable=False`` skips the fsync: for a staging folder that Tune copies
    into the experiment's storage (the copy is the one that must survive).
    Returns the path of the state file.
    """
    import torch

    directory = Path(directory)
    payload = {
        "family": family_state,
        "rng": capture_rng_state(),
        "iteration": iteration,
        "best": best,
        "extra": extra or {},
    }
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = (json.dumps({"iteration": iteration, "best": best}) + "\n").encode()
    if durable:
        atomic_write_bytes(directory / META_FILE, meta)
    else:
        (directory / META_FILE).write_bytes(meta)
    return directory / STATE_FILE


def load_state(directory: Path, *, restore_rng: bool = True) -> dict[str, Any]:
    """Load a state written by :func:`save_state`; restores global RNGs by default.

    ``directory`` is a checkpoint folder, or a state file itself (e.g. a
    family's exported ``best.pt``).

    Loaded with ``weights_only=True``: a checkpoint folder anyone can write to
    must not run code when it is read. Only tensors, containers, numbers and
    numpy arrays (numpy's RNG state is one) are accepted; anything else raises
    ``pickle.UnpicklingError``.
    """
    import torch

    with torch.serialization.safe_globals(_numpy_safe_globals()):
        path = Path(directory)
        payload: dict[str, Any] = torch.load(
            path if path.is_file() else path / STATE_FILE, map_location="cpu", weights_only=True
        )
    if restore_rng:
        restore_rng_state(payload["rng"])
    return payload


def _numpy_safe_globals() -> list[Any]:
    """What unpickling numpy arrays needs (numpy's legacy RNG state holds a uint32 array)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtype_classes = [type(np.dtype(t)) for t in ("uint32", "int64", "float32", "float64", "bool")]
    return [_reconstruct, np.ndarray, np.dtype, *dtype_classes]


def sorted_checkpoints(trial_dir: Path) -> list[Path]:
    """Checkpoint folders of a trial ordered by their number, oldest first.

    Ordering is numeric (``checkpoint_000009`` < ``checkpoint_15``), never by name.
    """
    found = []
    for p in Path(trial_dir).iterdir():
        m = _CKPT_RE.search(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


@contextmanager
def data_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (``path`` + ``.lock``) for one-time data generation."""
    import fcntl

    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
