"""tunelab's errors. Each carries the exit code the command line ends with.

================================ ==== ==================================================
error                            exit meaning
================================ ==== ==================================================
:class:`TunelabError`            1    base class
:class:`SpecError`               2    invalid spec or ``--set`` (nothing started)
:class:`ExperimentError`         2    a folder that is not a (resumable) experiment
:class:`TableError`              2    a results table that cannot be analysed
:class:`ReportError`             2    a report that cannot be made from the folder
:class:`ExperimentInterrupted`   130  the driver was stopped; ``platform resume`` continues
================================ ==== ==================================================

``1`` is also the exit code when more trials failed than the spec tolerates;
``3`` when a seed cull ran to the end but no seed can be selected (every seed
diverged: its selection metric is NaN or infinite, or none finished).
"""

from __future__ import annotations

import shlex
from pathlib import Path

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID",
    "EXIT_NO_SELECTION",
    "EXIT_OK",
    "ExperimentError",
    "ExperimentInterrupted",
    "ReportError",
    "SpecError",
    "TableError",
    "TunelabError",
]

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_NO_SELECTION, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


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


class ExperimentInterrupted(TunelabError, RuntimeError):
    """The driver was stopped (Ctrl-C, SIGTERM, SLURM preemption) with trials unfinished.

    Trials' latest checkpoints and the experiment state are saved; nothing was
    finalized. ``platform resume`` continues it. ``unfinished`` is -1 when the
    driver was stopped before Tune ran (Ray start-up).
    """

    exit_code = EXIT_INTERRUPTED
    resumable = True

    def __init__(self, experiment_dir: Path, unfinished: int) -> None:
        self.experiment_dir = experiment_dir
        self.unfinished = unfinished
        what = f"with {unfinished} trial(s) unfinished" if unfinished >= 0 else "before trials ran"
        super().__init__(
            f"interrupted {what}; state saved, nothing finalized. "
            f"Continue with: platform resume {shlex.quote(str(experiment_dir))}"
        )
