"""Exact training-state checkpoints: atomic writes, RNG capture, ordering.

A checkpoint is a directory holding ``state.pt`` (``torch.save`` of the family
state, tunelab's RNG snapshot, the iteration and the best value),
``meta.json`` (iteration, for humans and tools) and, written last, the
completion marker ``tunelab_complete.json`` (the iteration and the size of
every other file). Writes go to a temporary file that is renamed into place,
so a crash never leaves a half-written file in a folder tunelab writes
itself.

Tune copies a trial's checkpoint folder into the experiment's storage in no
particular file order, and a full disk or a crash can stop the copy half way
(a 0-byte ``state.pt``). A folder is *complete* only when its marker is there
and every file it lists has its recorded size: an incomplete folder is never
loaded (:func:`load_state` raises :class:`IncompleteCheckpointError`), never
listed by :func:`sorted_checkpoints` (so never used for resume or selection)
and is deleted by :func:`remove_incomplete_checkpoints`.

A write that fails because the disk is full or the quota is used up raises
:class:`~tunelab.errors.DiskFullError` naming the path.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import DiskFullError, ExperimentError, find_disk_full

__all__ = [
    "COMPLETE_FILE",
    "STATE_FILE",
    "IncompleteCheckpointError",
    "atomic_write_bytes",
    "atomic_write_json",
    "capture_rng_state",
    "data_lock",
    "has_marked_checkpoints",
    "is_complete_checkpoint",
    "load_state",
    "read_json",
    "release_space",
    "remove_incomplete_checkpoints",
    "reserve_space",
    "restore_rng_state",
    "save_state",
    "seed_everything",
    "sorted_checkpoints",
    "strict_json",
    "write_complete_marker",
]

STATE_FILE = "state.pt"
META_FILE = "meta.json"
COMPLETE_FILE = "tunelab_complete.json"
RESERVE_FILE = ".tunelab_reserve"
RESERVE_BYTES = 16 * 2**20
_CKPT_RE = re.compile(r"checkpoint_(\d+)$")


class IncompleteCheckpointError(ExperimentError):
    """A checkpoint folder without a valid completion marker (a write or copy that stopped)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = str(directory)
        super().__init__(
            f"{self.directory}: incomplete checkpoint (no {COMPLETE_FILE}, or a file shorter "
            "than recorded): the write stopped before the end; it is never loaded"
        )

    def __reduce__(self) -> tuple[type[IncompleteCheckpointError], tuple[str]]:
        return type(self), (self.directory,)


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
    with _disk_full_names(path):
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


@contextmanager
def _disk_full_names(path: Path) -> Iterator[None]:
    """Turn an ``ENOSPC`` / ``EDQUOT`` ``OSError`` into :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as err:
        full = find_disk_full(err, path)
        if full is None:
            raise
        raise DiskFullError(path, quota=full.quota) from err


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
    The completion marker is written last (:func:`write_complete_marker`).
    Returns the path of the state file.

    Raises:
        DiskFullError: no space left (or quota exceeded); the folder has no
            marker, so it is never used.
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
    with _disk_full_names(directory / STATE_FILE):
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
        with _disk_full_names(directory / META_FILE):
            (directory / META_FILE).write_bytes(meta)
    write_complete_marker(
        directory, iteration=iteration, files=(STATE_FILE, META_FILE), durable=durable
    )
    return directory / STATE_FILE


def write_complete_marker(
    directory: Path,
    *,
    iteration: int,
    files: Sequence[str] | None = None,
    durable: bool = True,
) -> Path:
    """Write the completion marker of a checkpoint folder: call it after every other file.

    The marker lists ``files`` (default: every regular file of the folder,
    hidden and temporary ones aside) with their sizes, so a copy of the
    folder that stopped half way is recognised whatever order its files were
    copied in.
    """
    directory = Path(directory)
    names = (
        list(files)
        if files is not None
        else [
            p.name
            for p in sorted(directory.iterdir())
            if p.is_file() and p.name != COMPLETE_FILE and not p.name.startswith(".")
        ]
    )
    sizes = {name: (directory / name).stat().st_size for name in names}
    data = (json.dumps({"iteration": iteration, "files": sizes}) + "\n").encode()
    marker = directory / COMPLETE_FILE
    if durable:
        atomic_write_bytes(marker, data)
    else:
        with _disk_full_names(marker):
            tmp = directory / f".{COMPLETE_FILE}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, marker)
    return marker


def is_complete_checkpoint(directory: Path) -> bool:
    """True when ``directory`` has a readable marker and every file it lists has its size."""
    directory = Path(directory)
    try:
        marker = json.loads((directory / COMPLETE_FILE).read_text())
        files = marker["files"]
        if not isinstance(files, dict) or not files:
            return False
        return all(
            isinstance(size, int) and (directory / name).stat().st_size == size
            for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_state(directory: Path, *, restore_rng: bool = True) -> dict[str, Any]:
    """Load a state written by :func:`save_state`; restores global RNGs by default.

    ``directory`` is a checkpoint folder, or a state file itself (e.g. a
    family's exported ``best.pt``). A folder must be complete (its marker
    written last is there and every file has its recorded size), else
    :class:`IncompleteCheckpointError`.

    Loaded with ``weights_only=True``: a checkpoint folder anyone can write to
    must not run code when it is read. Only tensors, containers, numbers and
    numpy arrays (numpy's RNG state is one) are accepted; anything else raises
    ``pickle.UnpicklingError``.
    """
    import torch

    path = Path(directory)
    if path.is_dir() and not is_complete_checkpoint(path):
        raise IncompleteCheckpointError(path)
    with torch.serialization.safe_globals(_numpy_safe_globals()):
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


def has_marked_checkpoints(folder: Path) -> bool:
    """True when some ``checkpoint_N`` folder at any depth under ``folder`` has a marker."""
    return any(_CKPT_RE.search(marker.parent.name) for marker in Path(folder).rglob(COMPLETE_FILE))


def sorted_checkpoints(trial_dir: Path, *, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders of a trial ordered by their number, oldest first.

    Ordering is numeric (``checkpoint_000009`` < ``checkpoint_15``), never by
    name. Incomplete folders (see :func:`is_complete_checkpoint`) are left
    out unless ``complete_only=False``.
    """
    found = []
    for p in Path(trial_dir).iterdir():
        m = _CKPT_RE.search(p.name)
        if m and p.is_dir() and (not complete_only or is_complete_checkpoint(p)):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def remove_incomplete_checkpoints(folder: Path) -> list[Path]:
    """Delete every incomplete ``checkpoint_N`` folder at any depth under ``folder``.

    Call it only where nothing writes checkpoints there at the same time: the
    driver before Tune runs (resume) or after it ended, or a trial on its own
    folder before it restores. Returns the folders removed.

    Nothing is deleted under a folder where no checkpoint has a marker: one
    written before markers existed (its checkpoints are kept, though never
    loaded), or not a tunelab experiment.
    """
    folder = Path(folder)
    if not folder.is_dir() or not has_marked_checkpoints(folder):
        return []
    removed = []
    stack = [folder]
    while stack:
        for p in stack.pop().iterdir():
            if not p.is_dir() or p.is_symlink():
                continue
            if _CKPT_RE.search(p.name):
                if not is_complete_checkpoint(p):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
            else:
                stack.append(p)
    return sorted(removed)


def reserve_space(folder: Path, nbytes: int = RESERVE_BYTES) -> Path:
    """Hold ``nbytes`` of ``folder``'s disk in an allocated file (:data:`RESERVE_FILE`).

    When the disk fills up, :func:`release_space` gives them back so that the
    last writes of a stopping experiment (Tune's experiment state, result
    and error files) complete instead of being cut off. Creating it is also
    an early check that the disk has room to start.

    Raises:
        DiskFullError: there are not ``nbytes`` left.
    """
    folder = Path(folder)
    path = folder / RESERVE_FILE
    if path.is_file() and path.stat().st_size >= nbytes:
        return path
    tmp = folder / f"{RESERVE_FILE}.tmp"
    with _disk_full_names(path):
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, nbytes)  # real blocks, not a sparse file
                except (AttributeError, OSError) as err:
                    if find_disk_full(err) is not None:
                        raise
                    chunk = b"\0" * 2**20  # a file system without fallocate
                    for start in range(0, nbytes, len(chunk)):
                        os.write(fd, chunk[: nbytes - start])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def release_space(folder: Path) -> bool:
    """Delete :func:`reserve_space`'s file; True if there was one."""
    path = Path(folder) / RESERVE_FILE
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


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
