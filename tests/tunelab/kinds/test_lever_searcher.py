"""The lever A/B searcher driven offline: suggestions, verdicts, stacking, JSON state.

No Ray runs here: :class:`_OfflineTune` plays Tune's part the way
``tunelab.schedulers.replay_curves`` does for schedulers. It asks the searcher
for every trial it will hand out, then completes them in order with synthetic
metrics, until the searcher answers ``Searcher.FINISHED``.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray.tune.search import Searcher
from statsmodels.stats.multitest import multipletests

from tests.conftest import TOY
from tunelab import parse_spec
from tunelab import verdicts as vd
from tunelab.kinds.lever_ab import LeverABSpec
from tunelab.kinds.lever_searcher import LeverState, PairedLeverSearcher, PlannedTrial, Stage
from tunelab.names import ARM_CONTROL, DIVERGED, ITERATION

BUDGET = 3
METRIC = "val/score"
SEEDS = [1, 2, 3, 4, 5, 6]
CONTROL = {"hidden": 8, "lr": 0.001}

#: What a trial ends with: (its last result or None, whether Tune reports an error).
Ending = tuple[dict[str, Any] | None, bool]


def _spec(**over: Any) -> LeverABSpec:
    raw: dict[str, Any] = {
        "kind": "lever_ab",
        "name": "toy-levers",
        "family": TOY,
        "control": CONTROL,
        "levers": {"fast": {"lr": 0.03}},
        "seeds": SEEDS,
        "budget": BUDGET,
        "metric": {"name": METRIC, "mode": "max"},
        "decision": {"min_effect": 0.1, "correction": "none"},
    }
    raw.update(over)
    spec = parse_spec(raw)
    assert isinstance(spec, LeverABSpec)
    return spec


def _noise(cfg: dict[str, Any], sd: float) -> float:
    """Deterministic per (round, arm, seed) noise, so reruns see the same values."""
    key = [cfg["round"], zlib.crc32(cfg["arm"].encode()), cfg["seed"]]
    return float(np.random.default_rng(key).normal(0.0, sd))


def _finished(value: float) -> Ending:
    return {ITERATION: BUDGET, METRIC: value}, False


def _by_config(lifts: dict[tuple[str, Any], float], sd: float = 0.01) -> Callable[..., Ending]:
    """Score = seed level + the lift of every (config key, value) the trial runs + noise.

    The lift follows the config, not the arm name, so a stacked lever lifts
    the next round's control too.
    """

    def ending(cfg: dict[str, Any]) -> Ending:
        lift = sum(v for (key, val), v in lifts.items() if cfg["config"].get(key) == val)
        return _finished(0.1 * cfg["seed"] + lift + _noise(cfg, sd))

    return ending


@dataclasses.dataclass
class _OfflineTune:
    """Tune's part, offline: take every trial the searcher hands out, then complete them."""

    searcher: PairedLeverSearcher
    ending: Callable[[dict[str, Any]], Ending]
    suggested: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    running: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    next_id: int = 0

    def run(self, completions: int | None = None) -> None:
        """Run to ``Searcher.FINISHED``, or stop after ``completions`` trials completed."""
        done = 0
        while self._fill():
            assert self.running, "the searcher waits, but no trial is running"
            while self.running:
                if completions is not None and done >= completions:
                    return
                tid, cfg = self.running.pop(0)
                result, error = self.ending(cfg)
                self.searcher.on_trial_complete(tid, result=result, error=error)
                done += 1

    def _fill(self) -> bool:
        while True:
            tid = f"t{self.next_id:04d}"
            cfg = self.searcher.suggest(tid)
            if cfg == Searcher.FINISHED:
                return False
            if cfg is None:
                return True
            assert isinstance(cfg, dict)
            self.next_id += 1
            self.running.append((tid, cfg))
            self.suggested.append(cfg)


def _run(
    spec: LeverABSpec, ending: Callable[[dict[str, Any]], Ending], tmp_path: Path
) -> _OfflineTune:
    tune = _OfflineTune(PairedLeverSearcher(spec, state_file=str(tmp_path / "lever.json")), ending)
    tune.run()
    return tune


def _planned(tune: _OfflineTune, stage: str) -> list[tuple[str, int]]:
    return [(c["arm"], c["seed"]) for c in tune.suggested if c["stage"] == stage]


# -- planning ------------------------------------------------------------------------------


def test_every_arm_runs_on_the_same_seeds_look_by_look(tmp_path: Path) -> None:
    # Each planned look hands out its new seeds once per arm (control first), with each arm's config.
    spec = _spec(
        levers={"fast": {"lr": 0.03}, "wide": {"hidden": 16}},
        decision={"min_effect": 0.1, "looks": [3, 6], "correction": "none"},
    )
    tune = _run(spec, _by_config({}), tmp_path)
    arms = [ARM_CONTROL, "fast", "wide"]
    assert _planned(tune, "look1") == [(a, s) for s in (1, 2, 3) for a in arms]
    assert _planned(tune, "look2") == [(a, s) for s in (4, 5, 6) for a in arms]
    assert len(tune.suggested) == 18
    configs = {c["arm"]: c["config"] for c in tune.suggested}
    assert configs == {
        ARM_CONTROL: CONTROL,
        "fast": {**CONTROL, "lr": 0.03},
        "wide": {**CONTROL, "hidden": 16},
    }


def test_a_clear_win_stops_after_the_first_look(tmp_path: Path) -> None:
    # A win decisive at look 1 (O'Brien-Fleming threshold) gets no seeds of look 2.
    spec = _spec(decision={"min_effect": 0.1, "looks": [3, 6], "correction": "none"})
    tune = _run(spec, _by_config({("lr", 0.03): 1.0}), tmp_path)
    assert {c["stage"] for c in tune.suggested} == {"look1"}
    rec = tune.searcher.state.verdicts["1|fast"]
    assert (rec["verdict"], rec["meaningful"], rec["look_no"], rec["n_seeds"]) == (
        vd.WIN,
        True,
        1,
        3,
    )
    assert rec["threshold"] == pytest.approx(vd.obf_thresholds([3, 6])[0])


def test_the_searcher_finishes_once_every_lever_has_a_verdict(tmp_path: Path) -> None:
    # After the last verdict suggest() answers FINISHED, and keeps answering it.
    tune = _run(_spec(), _by_config({("lr", 0.03): 1.0}), tmp_path)
    searcher = tune.searcher
    assert searcher.state.finished and not searcher.state.pending and not searcher.state.queue
    assert [searcher.suggest(f"late{i}") for i in range(3)] == [Searcher.FINISHED] * 3
    assert set(searcher.state.verdicts) == {"1|fast"}


# -- verdicts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "crash",
    [
        pytest.param(lambda v: ({ITERATION: BUDGET, METRIC: v}, True), id="error"),
        pytest.param(lambda v: ({ITERATION: BUDGET - 1, METRIC: v}, False), id="below-budget"),
        pytest.param(
            lambda v: ({ITERATION: BUDGET, METRIC: v, DIVERGED: 1.0}, False), id="diverged"
        ),
        pytest.param(lambda v: (None, True), id="no-result"),
    ],
)
def test_a_trial_that_did_not_finish_makes_its_lever_crashed(
    crash: Callable[[float], Ending], tmp_path: Path
) -> None:
    # A lever trial that errored, stopped below the budget or diverged is a lost pair: crashed.
    fine = _by_config({("lr", 0.03): 1.0})

    def ending(cfg: dict[str, Any]) -> Ending:
        result, _ = fine(cfg)
        assert result is not None
        if cfg["arm"] == "fast" and cfg["seed"] == 2:
            return crash(result[METRIC])
        return result, False

    tune = _run(_spec(), ending, tmp_path)
    assert tune.searcher.state.results["1|fast|2"] is None
    rec = tune.searcher.state.verdicts["1|fast"]
    assert (rec["verdict"], rec["crashed_seeds"]) == (vd.CRASHED, [2])


@pytest.mark.parametrize(
    ("wiggle", "verdict"), [(0.0, vd.NULL), (0.01, vd.NULL)], ids=["exact", "noisy"]
)
def test_identical_arms_give_no_win(wiggle: float, verdict: str, tmp_path: Path) -> None:
    # A lever that changes nothing is never a win (exact ties and zero-mean noise are both null).
    def ending(cfg: dict[str, Any]) -> Ending:
        sign = 0 if cfg["arm"] == ARM_CONTROL else (-1) ** cfg["seed"]
        return _finished(0.1 * cfg["seed"] + sign * wiggle)

    rec = _run(_spec(), ending, tmp_path).searcher.state.verdicts["1|fast"]
    assert (rec["verdict"], rec["meaningful"]) == (verdict, False)


# Per-seed differences (variant - control) with raw paired-t p of 0.026 and 0.031.
_DIFFS = {
    "a": [0.1, 0.3, 0.2, -0.05, 0.25, 0.15],
    "b": [0.3, 0.1, -0.05, 0.35, 0.2, 0.15],
}


def _by_diffs(cfg: dict[str, Any]) -> Ending:
    lift = 0.0 if cfg["arm"] == ARM_CONTROL else _DIFFS[cfg["arm"]][SEEDS.index(cfg["seed"])]
    return _finished(0.1 * cfg["seed"] + lift)


@pytest.mark.parametrize(
    ("correction", "verdict"),
    [("none", vd.WIN), ("holm", vd.INCONCLUSIVE), ("bh", vd.WIN)],
)
def test_the_correction_is_applied_across_the_levers_of_a_round(
    correction: str, verdict: str, tmp_path: Path
) -> None:
    # Two levers at p 0.026 / 0.031 both win alone; Holm's adjusted p (0.052) makes both inconclusive.
    spec = _spec(
        levers={"a": {"lr": 0.03}, "b": {"hidden": 16}},
        decision={"min_effect": 0.01, "correction": correction},
    )
    verdicts = _run(spec, _by_diffs, tmp_path).searcher.state.verdicts
    assert [verdicts[k]["verdict"] for k in ("1|a", "1|b")] == [verdict, verdict]
    if correction != "none":
        raw = [verdicts[k]["p_decision"] for k in ("1|a", "1|b")]
        method = {"holm": "holm", "bh": "fdr_bh"}[correction]
        expected = multipletests(raw, method=method)[1]
        assert [verdicts[k]["p_adjusted"] for k in ("1|a", "1|b")] == pytest.approx(expected)
        assert {verdicts[k]["correction"] for k in ("1|a", "1|b")} == {correction}


def test_verdict_records_hold_no_mlflow_tags(tmp_path: Path) -> None:
    # A verdict record is verdict_to_dict plus its placement; tagging is the tracking side's job.
    rec = _run(_spec(), _by_config({("lr", 0.03): 1.0}), tmp_path).searcher.state.verdicts["1|fast"]
    assert "tags" not in rec
    assert {"round", "look_no", "n_seeds", "lever", "verdict", "effect", "p_value"} <= set(rec)


# -- stacking ------------------------------------------------------------------------------


def _stacking_spec() -> LeverABSpec:
    return _spec(
        levers={"fast": {"lr": 0.03}, "wide": {"hidden": 16}},
        decision={"min_effect": 0.1, "correction": "holm", "confirm_seeds": [100]},
        rounds=2,
    )


_STACK_LIFTS = {("lr", 0.03): 1.0}


def test_a_confirmed_win_is_stacked_into_the_next_rounds_control(tmp_path: Path) -> None:
    # A meaningful win that also wins on the confirmation seed becomes round 2's control.
    tune = _run(_stacking_spec(), _by_config(_STACK_LIFTS), tmp_path)
    st = tune.searcher.state
    assert _planned(tune, "confirm") == [(ARM_CONTROL, 100), ("fast", 100)]
    assert st.verdicts["1|fast"]["confirmed"] is True
    assert st.verdicts["1|fast"]["confirm_diffs"][0] > 0
    assert st.stacked == [(1, "fast")]
    assert st.controls == {1: CONTROL, 2: {**CONTROL, "lr": 0.03}}
    round2 = {c["arm"]: c["config"] for c in tune.suggested if c["round"] == 2}
    assert round2 == {
        ARM_CONTROL: {**CONTROL, "lr": 0.03},
        "wide": {**CONTROL, "lr": 0.03, "hidden": 16},
    }
    assert st.round == 2 and set(st.verdicts) == {"1|fast", "1|wide", "2|wide"}
    assert st.finished


# -- state ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completions", [1, 18, 19, 25], ids=["look", "confirm-queued", "confirm-half", "round2"]
)
def test_save_and_restore_mid_run_continues_identically(completions: int, tmp_path: Path) -> None:
    # A fresh searcher restored from a save continues with the same suggestions and verdicts.
    spec, ending = _stacking_spec(), _by_config(_STACK_LIFTS)
    whole = _run(spec, ending, tmp_path / "whole")

    (tmp_path / "cut").mkdir()
    cut = _OfflineTune(PairedLeverSearcher(spec, state_file=str(tmp_path / "cut/a.json")), ending)
    cut.run(completions)
    saved = tmp_path / "searcher-state"
    cut.searcher.save(str(saved))
    json.loads(saved.read_text())  # JSON, not a pickle
    cut.searcher = PairedLeverSearcher(spec, state_file=str(tmp_path / "cut/b.json"))
    cut.searcher.restore(str(saved))
    cut.run()

    assert cut.suggested == whole.suggested
    assert cut.searcher.state.verdicts == whole.searcher.state.verdicts
    assert cut.searcher.state == whole.searcher.state


def test_the_json_state_round_trips_exactly(tmp_path: Path) -> None:
    # to_json -> JSON text -> from_json gives back the state: int round keys, tuples, dataclasses.
    tune = _OfflineTune(
        PairedLeverSearcher(_stacking_spec(), state_file=str(tmp_path / "lever.json")),
        _by_config(_STACK_LIFTS),
    )
    tune.run(completions=25)  # mid round 2: queue, pending, results and verdicts all filled
    st = tune.searcher.state
    assert st.round == 2 and st.pending and st.stacked
    back = LeverState.from_json(json.loads(json.dumps(st.to_json())))
    assert back == st
    assert set(back.controls) == {1, 2}
    assert back.stacked == [(1, "fast")] and isinstance(back.stage, Stage)
    assert all(isinstance(t, PlannedTrial) for t in back.pending.values())
    # the mirror file is the same JSON, read back with LeverState.read
    assert LeverState.read(tmp_path / "lever.json") == st
