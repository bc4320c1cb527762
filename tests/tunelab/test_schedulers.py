"""Cull schedulers driven offline with recorded curves (tunelab.schedulers.replay_curves)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from ray.tune.schedulers import ASHAScheduler

from tunelab.schedulers import OptunaPrunerScheduler, SyncCullScheduler, replay_curves

BUDGET = 8


def _curves(finals: list[float], tie: list[float] | None = None) -> list[list[dict[str, float]]]:
    """Linear curves from 0 to each final value; `tie` is a constant second metric."""
    tie = tie or [0.0] * len(finals)
    return [
        [{"score": f * (t + 1) / BUDGET, "tie": b} for t in range(BUDGET)]
        for f, b in zip(finals, tie, strict=True)
    ]


def _sync(n: int, keep: int, state: Path | None = None) -> SyncCullScheduler:
    return SyncCullScheduler(
        metric="score",
        mode="max",
        milestone=3,
        keep=keep,
        expected=n,
        tie_break="tie",
        state_path=str(state) if state else None,
    )


def test_sync_cull_keeps_exactly_the_top_k_at_the_milestone() -> None:
    out = replay_curves(_sync(6, 2), _curves([0.1, 0.9, 0.3, 0.8, 0.2, 0.5]), BUDGET)
    assert out.iterations == [3, 8, 3, 8, 3, 3]


def test_sync_cull_waits_for_every_seed_even_with_two_workers() -> None:
    # the best seed starts last: an asynchronous cull would already have stopped others on worse evidence
    out = replay_curves(_sync(4, 1), _curves([0.5, 0.4, 0.3, 0.9]), BUDGET, workers=2)
    assert out.iterations == [3, 3, 3, 8]


def test_sync_cull_breaks_ties_with_the_second_metric() -> None:
    out = replay_curves(_sync(3, 1), _curves([0.5, 0.5, 0.1], tie=[0.2, 0.7, 0.9]), BUDGET)
    assert out.iterations == [3, 8, 3]


def test_sync_cull_ranks_nan_last() -> None:
    curves = _curves([0.1, 0.2, 0.3])
    for row in curves[2]:
        row["score"] = math.nan
    out = replay_curves(_sync(3, 1), curves, BUDGET)
    assert out.iterations == [3, 8, 3]


def test_sync_cull_decisions_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "cull.json"
    first = _sync(3, 1, state)
    out = replay_curves(first, _curves([0.1, 0.7, 0.3]), BUDGET)
    assert out.iterations == [3, 8, 3]
    again = _sync(3, 1, state)  # a new driver reads the decision back
    assert again.survivors == first.survivors == ["t0001"]


@pytest.mark.parametrize(("keep", "n"), [(0, 3), (3, 3), (4, 3)])
def test_sync_cull_rejects_impossible_keep(keep: int, n: int) -> None:
    with pytest.raises(ValueError, match="keep"):
        SyncCullScheduler(metric="score", mode="max", milestone=2, keep=keep, expected=n)


@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband", "wilcoxon"])
def test_optuna_pruners_stop_weak_seeds_and_keep_the_best(pruner: str) -> None:
    finals = [0.9, 0.1, 0.15, 0.2, 0.05, 0.12, 0.18, 0.08]
    sched = OptunaPrunerScheduler(
        metric="score", mode="max", pruner=pruner, max_t=BUDGET, min_t=2, reduction_factor=2
    )
    out = replay_curves(sched, _curves(finals), BUDGET)
    assert out.iterations[0] == BUDGET  # the best seed is never pruned
    assert any(it < BUDGET for it in out.iterations), out.iterations


@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband", "wilcoxon"])
def test_optuna_culls_are_reproducible(pruner: str) -> None:
    # Hyperband's brackets hash the study name: a random one made the cull differ per run
    finals = [0.9, 0.1, 0.15, 0.2, 0.05, 0.12, 0.18, 0.08]
    outs = [
        replay_curves(
            OptunaPrunerScheduler(
                metric="score", mode="max", pruner=pruner, max_t=BUDGET, min_t=2, reduction_factor=2
            ),
            _curves(finals),
            BUDGET,
        ).iterations
        for _ in range(5)
    ]
    assert all(o == outs[0] for o in outs), outs


def test_asha_through_the_same_harness() -> None:
    sched = ASHAScheduler(
        time_attr="iteration",
        metric="score",
        mode="max",
        max_t=BUDGET,
        grace_period=2,
        reduction_factor=3,
        brackets=1,
    )
    out = replay_curves(sched, _curves([0.2, 0.9, 0.1, 0.3, 0.05, 0.4]), BUDGET)
    assert out.iterations[1] == BUDGET and sum(out.iterations) < 6 * BUDGET


@pytest.mark.parametrize("pruner", [None, "successive_halving", "hyperband"])
def test_a_retried_trial_stays_in_the_cull(pruner: str | None) -> None:
    # the best seed crashes once before the milestone and is retried: it must still win the cull
    finals = [0.5, 0.9, 0.3, 0.2]
    scheduler = (
        _sync(4, 1)
        if pruner is None
        else OptunaPrunerScheduler(
            metric="score", mode="max", pruner=pruner, max_t=BUDGET, min_t=3, reduction_factor=4
        )
    )
    straight = replay_curves(scheduler, _curves(finals), BUDGET)
    scheduler = (
        _sync(4, 1)
        if pruner is None
        else OptunaPrunerScheduler(
            metric="score", mode="max", pruner=pruner, max_t=BUDGET, min_t=3, reduction_factor=4
        )
    )
    crashed = replay_curves(scheduler, _curves(finals), BUDGET, crashes={1: (2, True)})
    assert crashed.iterations == straight.iterations
    assert crashed.iterations[1] == BUDGET


def test_a_trial_that_failed_for_the_last_time_drops_out_of_the_sync_cull() -> None:
    # without a retry the trial is out; the cull decides among the others without waiting
    out = replay_curves(_sync(4, 1), _curves([0.5, 0.9, 0.3, 0.2]), BUDGET, crashes={1: (2, False)})
    assert out.status[1] == "ERROR" and out.iterations[1] == 1
    assert out.iterations == [BUDGET, 1, 3, 3]
