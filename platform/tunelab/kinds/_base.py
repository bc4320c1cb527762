"""The strategy interface every experiment kind implements."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from tunelab.names import Role

if TYPE_CHECKING:
    from tunelab.layout import ExperimentLayout, RunState
    from tunelab.outcome import TrialOutcome
    from tunelab.spec import BaseSpec
    from tunelab.tracking import Tracker

__all__ = ["ExperimentKind", "FinalizeContext"]


@dataclasses.dataclass
class FinalizeContext:
    """What a kind's post-processing may use once every trial has ended.

    Attributes:
        state: The experiment's recorded state (``tunelab.json``).
        layout: Its folder.
        tracker: The tracking backend (runs, tags, artifacts).
        table: The results table (one row per trial), already written.
    """

    state: RunState
    layout: ExperimentLayout
    tracker: Tracker
    table: Any


class ExperimentKind:
    """Everything one kind of experiment decides; the driver asks, never branches.

    Subclasses set :attr:`spec_cls` (a :class:`~tunelab.spec.BaseSpec`
    subclass with ``kind: Literal["<name>"]``) and override what differs from
    the defaults here (a FIFO run of ``config`` on every seed).

    Args:
        spec: The validated spec.
        layout: The experiment folder (where a kind keeps its own state).
    """

    spec_cls: ClassVar[type[BaseSpec]]
    #: ``tunelab.role`` of every child run (None: decided per trial by :meth:`trial_tags`).
    role: ClassVar[Role | None] = None
    #: Placement keys of a trial's config kept in the results and summary (``arm``...).
    placement: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: Any, layout: ExperimentLayout) -> None:
        self.spec = spec
        self.layout = layout

    # -- trials ------------------------------------------------------------------------
    def milestones(self) -> tuple[int, ...]:
        """Iterations every trial checkpoints at besides ``checkpoint.every`` (cull points)."""
        return ()

    def scheduler(self) -> Any:
        """The Tune trial scheduler (FIFO: every trial runs to the budget)."""
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()

    def search_alg(self) -> Any:
        """The Tune search algorithm (None: the param space's grid and samples)."""
        return None

    def num_samples(self) -> int:
        """Tune's ``num_samples`` (-1: until the search algorithm says it is finished)."""
        return 1

    def param_space(self) -> dict[str, Any] | None:
        """Tune's param space: ``{"seed": ..., "config": {...}}`` (None with a searcher)."""
        from ray import tune

        seeds = list(self.spec.seeds)
        seed: Any = seeds[0] if len(seeds) == 1 else tune.grid_search(seeds)
        return {"seed": seed, "config": dict(self.spec.config)}

    def total_trials(self) -> int | None:
        """How many trials will run: the spec's planned trials (seeds x samples x grid points).

        None when a searcher decides as it goes (``num_samples() < 0``).
        """
        return None if self.num_samples() < 0 else self.spec.planned_trials()[0]

    def trial_tags(self) -> Callable[[dict[str, Any]], dict[str, str]] | None:
        """A picklable ``f(trial config) -> tags`` for per-trial tags (None: none)."""
        return None

    # -- post-processing -----------------------------------------------------------------
    def finalize(self, ctx: FinalizeContext, outcomes: list[TrialOutcome]) -> dict[str, Any]:
        """Decide (select, best, verdicts), write the kind's files and tags.

        Returns the kind's part of ``summary.json``.
        """
        return {}
