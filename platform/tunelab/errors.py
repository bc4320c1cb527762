"""tunelab's errors. Each carries the exit code the command line ends with.

================================ ==== ==================================================
error                            exit meaning
================================ ==== ==================================================
:class:`TunelabError`            1    base class
:class:`SpecError`               2    invalid spec or ``--set`` (nothing started)
:class:`ExperimentError`         2    a folder that is not a (resumable) experiment
:class:`TableError`              2    a results table that cannot be analysed
:class:`ReportError`             2    a report that cannot be made from the folder
:class:`DataError`               2    a family's data folder holds a bad file (nothing started)
:class:`DiskFullError`           74   a write failed: no space left / quota exceeded; ``platform resume``
                                      continues once space is freed (74 is sysexits' EX_IOERR)
:class:`TrackingUnavailable`     75   tracking down at the end: writes spooled in the folder, nothing
                                      lost, nothing finalized; ``platform resume`` sends them (75 is
                                      sysexits' EX_TEMPFAIL)
:class:`ExperimentInterrupted`   130  the driver was stopped; ``platform resume`` continues
================================ ==== ==================================================

``1`` is also the exit code when more trials failed than the spec tolerates;
``3`` when a seed cull ran to the end but no seed can be selected (every seed
diverged: its selection metric is NaN or infinite, or none finished).
"""

from __future__ import annotations

import errno
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_DISK_FULL",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID",
    "EXIT_NO_SELECTION",
    "EXIT_OK",
    "EXIT_TRACKING_UNAVAILABLE",
    "DataError",
    "DiskFullError",
    "ExperimentError",
    "ExperimentInterrupted",
    "ReportError",
    "SpecError",
    "TableError",
    "TrackingUnavailable",
    "TunelabError",
    "error_summary",
    "find_disk_full",
]

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_NO_SELECTION, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_DISK_FULL = 74  # sysexits.h EX_IOERR
EXIT_TRACKING_UNAVAILABLE = 75  # sysexits.h EX_TEMPFAIL


class TunelabError(Exception):
    """Base class of tunelab's errors; ``str(err)`` is the message users see.

    ``resumable`` errors leave the experiment open for ``platform resume`` (its
    MLflow parent run stays RUNNING); any other error raised after the parent
    run was created ends that run FAILED.
    """

    exit_code: int = EXIT_FAILED
    resumable: bool = False


class SpecError(TunelabError, ValueError):
    """An invalid spec. The message names the file, the key path and what was expected."""

    exit_code = EXIT_INVALID

    def __init__(self, file: str | Path, key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + message)


class ExperimentError(TunelabError, RuntimeError):
    """An experiment folder that cannot be resumed or read."""

    exit_code = EXIT_INVALID


class TableError(TunelabError, ValueError):
    """A results table (or a guardrail argument) that cannot be analysed."""

    exit_code = EXIT_INVALID


class ReportError(TunelabError, RuntimeError):
    """An experiment folder (or name) the report cannot be made from."""

    exit_code = EXIT_INVALID


class DataError(TunelabError, ValueError):
    """A family's data that cannot be trained on: a garbage or truncated audio file, a
    missing, empty or non-numeric annotation, a corrupt cached data set.

    ``str(err)`` is ``"<file>: <reason>"``. Raised by a family's data check
    (``Family.data_check``, run by ``tunelab.family.check_family_data`` before any
    trial starts) and by its loader (inside a trial, where it is the same on every
    attempt: a deterministic error, not worth a retry).
    """

    exit_code = EXIT_INVALID

    def __init__(self, file: str | Path, reason: str) -> None:
        self.file = str(file)
        self.reason = reason
        super().__init__(f"{self.file}: {reason}")

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str]]:
        return type(self), (self.file, self.reason)  # picklable across Ray workers


class ExperimentInterrupted(TunelabError, RuntimeError):
    """The driver was stopped (Ctrl-C, SIGTERM, SLURM preemption) with trials unfinished.

    Trials' latest checkpoints and the experiment state are saved; nothing was
    finalized. ``platform resume`` continues it. ``unfinished`` is -1 when the
    driver was stopped before Tune ran (Ray start-up). ``left`` breaks the
    unfinished trials down by status (``{"interrupted": 2, "pending": 1}``), as
    ``platform status`` counts them.
    """

    exit_code = EXIT_INTERRUPTED
    resumable = True

    def __init__(
        self, experiment_dir: Path, unfinished: int, left: Mapping[str, int] | None = None
    ) -> None:
        self.experiment_dir = experiment_dir
        self.unfinished = unfinished
        self.left = dict(left or {})
        what = f"with {unfinished} trial(s) unfinished" if unfinished >= 0 else "before trials ran"
        if self.left:
            what += " (" + ", ".join(f"{n} {status}" for status, n in self.left.items()) + ")"
        super().__init__(
            f"interrupted {what}; state saved, nothing finalized. "
            f"Continue with: platform resume {shlex.quote(str(experiment_dir))}"
        )


def _resume_hint(experiment_dir: str | Path) -> str:
    return f"platform resume {shlex.quote(str(experiment_dir))}"


class TrackingUnavailable(TunelabError, RuntimeError):
    """The tracking server (or store) stayed unreachable past the client's retries.

    With ``experiment_dir``: the trials ran, and every tracking write that could
    not be sent (``points`` metric points, ``records`` other writes, ``runs``
    trial runs still to create) is spooled in the experiment folder; nothing is
    lost and nothing was finalized. ``platform resume`` sends them once tracking
    is back, then finalizes. Without it: nothing started.
    """

    exit_code = EXIT_TRACKING_UNAVAILABLE
    resumable = True

    def __init__(
        self,
        uri: str,
        reason: str,
        experiment_dir: str | Path | None = None,
        *,
        points: int = 0,
        records: int = 0,
        runs: int = 0,
    ) -> None:
        self.uri, self.reason = uri, reason
        self.experiment_dir = None if experiment_dir is None else str(experiment_dir)
        self.points, self.records, self.runs = points, records, runs
        head = f"tracking at {uri} is unavailable ({reason})"
        if self.experiment_dir is None:
            message = f"{head}; nothing started. Run again once it is back."
        else:
            message = (
                f"{head}; {points} metric point(s), {records} other write(s) and {runs} run(s) "
                f"to create are spooled in {self.experiment_dir} (nothing lost, nothing "
                f"finalized). Once tracking is back, continue with: {_resume_hint(self.experiment_dir)}"
            )
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return _make_tracking_unavailable, (
            self.uri,
            self.reason,
            self.experiment_dir,
            self.points,
            self.records,
            self.runs,
        )


def _make_tracking_unavailable(
    uri: str, reason: str, experiment_dir: str | None, points: int, records: int, runs: int
) -> TrackingUnavailable:
    return TrackingUnavailable(
        uri, reason, experiment_dir, points=points, records=records, runs=runs
    )


class DiskFullError(TunelabError, OSError):
    """A write failed because the disk is full (``ENOSPC``) or the quota is used up (``EDQUOT``).

    Raised wherever tunelab writes (checkpoints, experiment state, artifacts),
    in the driver or inside a trial. It is an :class:`OSError` (``errno`` is
    set), so code that handles I/O errors keeps handling it. Nothing was
    finalized; trials keep their last complete checkpoint, and once space is
    freed ``platform resume`` continues. ``str(err)`` is one line naming the
    path and, once the driver knows it (``experiment_dir``), the resume command.
    """

    exit_code = EXIT_DISK_FULL
    resumable = True

    def __init__(
        self, path: str | Path, experiment_dir: str | Path | None = None, *, quota: bool = False
    ) -> None:
        self.path = str(path)
        self.experiment_dir = None if experiment_dir is None else str(experiment_dir)
        self.quota = quota
        what = "disk quota exceeded" if quota else "no space left on device"
        message = f"disk full ({what}) at {self.path}; nothing was finalized"
        if self.experiment_dir is not None:
            message += f". Free space, then continue with: {_resume_hint(self.experiment_dir)}"
        self.message = message
        super().__init__(errno.EDQUOT if quota else errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.message

    def in_experiment(self, experiment_dir: str | Path) -> DiskFullError:
        """The same error, naming the experiment folder to resume (the message the CLI prints)."""
        path = experiment_dir if self.path == "?" else self.path
        return DiskFullError(path, experiment_dir, quota=self.quota)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray workers
        return _make_disk_full, (self.path, self.experiment_dir, self.quota)


def _make_disk_full(path: str, experiment_dir: str | None, quota: bool) -> DiskFullError:
    return DiskFullError(path, experiment_dir, quota=quota)


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# sqlite (the embedded MLflow store) and pyarrow (Tune's checkpoint copies) say it in words.
_DISK_FULL_WORDS = ("database or disk is full", "no space left on device", "disk quota exceeded")


def find_disk_full(
    exc: BaseException | None, path: str | Path | None = None
) -> DiskFullError | None:
    """The :class:`DiskFullError` behind ``exc`` (its causes, Ray's wrappers), or None.

    An ``OSError`` with ``ENOSPC`` / ``EDQUOT`` (or sqlite's "database or disk
    is full") anywhere in the chain counts; its file name, else ``path``,
    else "?" is the path named.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError: the trial's own error
        if isinstance(cause, BaseException) and cause is not exc:
            exc = cause
            continue
        if isinstance(exc, DiskFullError):
            return exc
        code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
        text = str(exc).lower() if code is None else ""
        if code in _DISK_FULL_ERRNOS or any(w in text for w in _DISK_FULL_WORDS):
            where = getattr(exc, "filename", None) or path or "?"
            return DiskFullError(where, quota=code == errno.EDQUOT or "quota" in text)
        exc = exc.__cause__ or exc.__context__
    return None


def error_summary(exc: BaseException | None) -> str | None:
    """``"<ExceptionType>: <first line of its message>"`` of the root cause, or None.

    Ray wraps a trial's exception (``RayTaskError``: "ray::ImplicitFunc.train()
    (pid=..., ip=...)" and a traceback); this is the user's exception itself,
    e.g. ``ValueError: hidden must be even``.
    """
    if exc is None:
        return None
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    if type(exc).__module__.startswith("ray.") and exc.__cause__ is not None:
        exc = exc.__cause__  # Tune's own wrappers (TuneError) around the real error
    text = str(exc).strip().splitlines()
    name = getattr(type(exc), "__qualname__", type(exc).__name__)
    if "ray::" in name or name.startswith("RayTaskError("):  # a cause that could not be unpickled
        name = name.split("(", 1)[-1].rstrip(")") or name
    return (f"{name}: {text[0]}" if text else name)[:500]
