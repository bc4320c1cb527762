"""Lever A/B on paired seeds as a Ray Tune searcher, with its state as typed JSON.

:class:`PairedLeverSearcher` hands Tune one trial per (arm, seed): the
control and every lever run on the same seeds, a planned look at a time
(shared/VERDICTS.md, "Sequential looks"). When every trial of a look has
finished it decides each lever still running at that look's threshold; a
decisive lever (``win``, ``negative``, ``crashed``) receives no more seeds.
After the last look the round's verdicts are corrected across the levers
(Holm / BH, "Many levers, many metrics"). With ``rounds > 1`` a meaningful win
that also wins on every confirmation seed is merged into the next round's
control ("Stacking"); the old control is superseded.

Everything the searcher knows is one :class:`LeverState`. Tune saves and
restores it with the experiment (:meth:`PairedLeverSearcher.save` /
:meth:`~PairedLeverSearcher.restore`), and every change is mirrored to
``tunelab_lever.json`` (``state_file``) for the post-processing and for
humans; both are the JSON of :meth:`LeverState.to_json`, read back with
:meth:`LeverState.read`.

Example (offline, the way the tests drive it):

    .. code::

        searcher = PairedLeverSearcher(spec, state_file="tunelab_lever.json")
        while searcher.suggest("t0") != Searcher.FINISHED:  # one trial at a time
            searcher.on_trial_complete("t0", {"iteration": spec.budget, "val/score": 0.5})
        print(searcher.state.verdicts)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, cast

import numpy as np
from ray.tune.search import Searcher

from tunelab import verdicts as vd
from tunelab.checkpoint import atomic_write_json
from tunelab.metrics import record_verdicts
from tunelab.names import ARM_CONTROL, TrialStatus, as_float
from tunelab.outcome import result_status
from tunelab.spec import apply_overrides

if TYPE_CHECKING:
    from tunelab.kinds.lever_ab import LeverABSpec

__all__ = [
    "LeverState",
    "PairedLeverSearcher",
    "PlannedTrial",
    "Stage",
    "decision_of",
    "guardrails_of",
]

_DECISIVE = (vd.WIN, vd.NEGATIVE, vd.CRASHED)
_LOOK: Final = "look"
_CONFIRM: Final = "confirm"


def decision_of(spec: LeverABSpec) -> vd.Decision:
    """The spec's decision block as the verdict engine's :class:`~tunelab.verdicts.Decision`."""
    d = spec.decision
    return vd.Decision(
        min_effect=d.min_effect,
        alpha=d.alpha,
        looks=tuple(d.looks) if d.looks else None,
        correction=d.correction,
    )


def guardrails_of(spec: LeverABSpec) -> list[vd.Guardrail]:
    """The spec's guardrails as verdict-engine objects."""
    return [vd.Guardrail(g.name, g.mode, g.margin) for g in spec.guardrails]


# -- state -----------------------------------------------------------------------------------


class Stage(NamedTuple):
    """Where a round is: planned look ``step`` (0-based), or its confirmation (step 0)."""

    kind: Literal["look", "confirm"]
    step: int


@dataclasses.dataclass(frozen=True)
class PlannedTrial:
    """One (round, arm, seed) trial the searcher plans or has handed to Tune."""

    round: int
    """The stacking round, from 1."""
    arm: str
    """``control`` (:data:`tunelab.names.ARM_CONTROL`) or a lever name."""
    seed: int
    """The seed both arms share."""
    stage: str
    """``look1``, ``look2``, ... or ``confirm`` (the ``tunelab.stage`` tag)."""

    @property
    def key(self) -> str:
        """Its key in :attr:`LeverState.results`: ``"round|arm|seed"``."""
        return _result_key(self.round, self.arm, self.seed)


@dataclasses.dataclass
class LeverState:
    """Everything a :class:`PairedLeverSearcher` knows; JSON via :meth:`to_json` / :meth:`from_json`."""

    round: int = 1
    """The current stacking round, from 1."""
    controls: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Round -> that round's control config (round 1: the spec's ``control``)."""
    active: list[str] = dataclasses.field(default_factory=list)
    """Levers of the current round still receiving seeds, in spec order."""
    stage: Stage = Stage(_LOOK, 0)  # noqa: RUF009 (an immutable tuple)
    """The stage of the current round whose trials are queued or running."""
    queue: list[PlannedTrial] = dataclasses.field(default_factory=list)
    """Trials of the current stage not yet handed to Tune, in order."""
    pending: dict[str, PlannedTrial] = dataclasses.field(default_factory=dict)
    """Tune trial id -> the trial it runs, until it completes."""
    results: dict[str, dict[str, float] | None] = dataclasses.field(default_factory=dict)
    """``"round|arm|seed"`` -> the primary and guardrail metrics of a finished trial,
    or ``None`` when it did not finish (error, stopped below the budget, diverged)."""
    verdicts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """``"round|lever"`` -> :func:`tunelab.verdicts.verdict_to_dict` plus ``round``,
    ``look_no`` (1-based look it was decided at), ``n_seeds`` and, for a
    meaningful win sent to confirmation, ``confirmed`` and ``confirm_diffs``."""
    stacked: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    """(round, lever) merged into the next round's control, in merge order."""
    confirming: list[str] = dataclasses.field(default_factory=list)
    """Levers of the current round running their confirmation seeds."""
    finished: bool = False
    """No trial is left to plan: the searcher answers ``Searcher.FINISHED``."""

    def round_verdicts(self, rnd: int) -> dict[str, dict[str, Any]]:
        """Lever -> verdict record of round ``rnd``."""
        prefix = f"{rnd}|"
        return {k[len(prefix) :]: r for k, r in self.verdicts.items() if k.startswith(prefix)}

    def to_json(self) -> dict[str, Any]:
        """A JSON-able copy (round keys of ``controls`` as strings); see :meth:`from_json`."""
        return {
            "round": self.round,
            "controls": {str(r): copy.deepcopy(c) for r, c in self.controls.items()},
            "active": list(self.active),
            "stage": list(self.stage),
            "queue": [dataclasses.asdict(t) for t in self.queue],
            "pending": {tid: dataclasses.asdict(t) for tid, t in self.pending.items()},
            "results": copy.deepcopy(self.results),
            "verdicts": copy.deepcopy(self.verdicts),
            "stacked": [[r, lever] for r, lever in self.stacked],
            "confirming": list(self.confirming),
            "finished": self.finished,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LeverState:
        """The state :meth:`to_json` wrote (int round keys and tuples restored)."""
        kind, step = data["stage"]
        return cls(
            round=int(data["round"]),
            controls={int(r): copy.deepcopy(c) for r, c in data["controls"].items()},
            active=list(data["active"]),
            stage=Stage(cast(Literal["look", "confirm"], kind), int(step)),
            queue=[PlannedTrial(**t) for t in data["queue"]],
            pending={tid: PlannedTrial(**t) for tid, t in data["pending"].items()},
            results={
                k: None if r is None else {n: float(x) for n, x in r.items()}
                for k, r in data["results"].items()
            },
            verdicts=copy.deepcopy(data["verdicts"]),
            stacked=[(int(r), str(lever)) for r, lever in data["stacked"]],
            confirming=list(data["confirming"]),
            finished=bool(data["finished"]),
        )

    @classmethod
    def read(cls, path: str | Path) -> LeverState:
        """The state in a JSON file written by the searcher (``tunelab_lever.json``)."""
        return cls.from_json(json.loads(Path(path).read_text()))


# -- searcher ----------------------------------------------------------------------------


class PairedLeverSearcher(Searcher):
    """Suggest (arm, seed) trials look by look; decide levers between looks.

    Each suggestion is ``{"seed", "arm", "round", "stage", "config"}``, the
    family config of that arm in that round. A completed trial counts only
    when :func:`tunelab.outcome.result_status` calls it ``finished``; any other
    end leaves its pair missing and the lever ``crashed``.

    Args:
        spec: The validated lever A/B spec.
        state_file: JSON mirror of :attr:`state`, rewritten atomically on
            every change (read by the post-processing).
    """

    def __init__(self, spec: LeverABSpec, *, state_file: str) -> None:
        super().__init__(metric=spec.metric.name, mode=spec.metric.mode)
        self.spec = spec
        self.state_file = state_file
        self.state = LeverState(controls={1: copy.deepcopy(spec.control)}, active=list(spec.levers))
        self._start_look(0)

    # -- Tune searcher API -----------------------------------------------------------
    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        st = self.state
        if not st.queue and not st.pending and not st.finished:
            self._advance()
        if st.finished:
            return Searcher.FINISHED
        if not st.queue:
            return None  # waiting for this stage's trials
        planned = st.queue.pop(0)
        st.pending[trial_id] = planned
        self._mirror()
        return {
            "seed": planned.seed,
            "arm": planned.arm,
            "round": planned.round,
            "stage": planned.stage,
            "config": self._arm_config(planned.arm, planned.round),
        }

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        planned = self.state.pending.pop(trial_id, None)
        if planned is None:
            return
        self.state.results[planned.key] = self._usable(result, error)
        self._mirror()

    def save(self, checkpoint_path: str) -> None:
        atomic_write_json(Path(checkpoint_path), self.state.to_json())

    def restore(self, checkpoint_path: str) -> None:
        self.state = LeverState.read(checkpoint_path)

    # -- stages ------------------------------------------------------------------------
    def _looks(self) -> list[int]:
        looks = self.spec.decision.looks
        return list(looks) if looks else [len(self.spec.seeds)]

    def _usable(self, result: dict | None, error: bool) -> dict[str, float] | None:
        status = result_status("ERROR" if error else "TERMINATED", result, self.spec.budget)
        if result is None or status is not TrialStatus.FINISHED:
            return None
        names = [self.spec.metric.name, *(g.name for g in self.spec.guardrails)]
        values = {n: as_float(result.get(n)) for n in names}
        # A non-finite value (a diverged arm) is a missing pair: the verdict engine calls it crashed.
        return {n: v if math.isfinite(v) else math.nan for n, v in values.items()}

    def _arm_config(self, arm: str, rnd: int) -> dict[str, Any]:
        control = self.state.controls[rnd]
        if arm == ARM_CONTROL:
            return copy.deepcopy(control)
        return apply_overrides(control, self.spec.levers[arm])

    def _start_look(self, k: int) -> None:
        st, looks = self.state, self._looks()
        lo = looks[k - 1] if k > 0 else 0
        st.stage = Stage(_LOOK, k)
        for seed in self.spec.seeds[lo : looks[k]]:
            for arm in [ARM_CONTROL, *st.active]:
                st.queue.append(PlannedTrial(st.round, arm, seed, f"look{k + 1}"))

    def _advance(self) -> None:
        kind, k = self.state.stage
        if kind == _LOOK:
            self._decide_look(k)
            if self.state.active and k + 1 < len(self._looks()):
                self._start_look(k + 1)
            else:
                self._end_looks()
        else:
            self._end_confirm()
        self._mirror()

    def _decide_look(self, k: int) -> None:
        st, spec = self.state, self.spec
        n = self._looks()[k]
        seeds = spec.seeds[:n]
        last = k == len(self._looks()) - 1
        still = []
        for lever in st.active:
            v = self._analyze(lever, seeds, look_index=k if spec.decision.looks else None)
            if v.verdict in _DECISIVE or last:
                st.verdicts[_verdict_key(st.round, lever)] = _verdict_record(v, st.round, k + 1, n)
            else:
                still.append(lever)
        st.active = still

    def _analyze(self, lever: str, seeds: list[int], look_index: int | None) -> vd.LeverVerdict:
        spec, rnd, results = self.spec, self.state.round, self.state.results
        c_rows = [results.get(_result_key(rnd, ARM_CONTROL, s)) for s in seeds]
        v_rows = [results.get(_result_key(rnd, lever, s)) for s in seeds]
        guards = {
            g.name: (_col(c_rows, g.name), _col(v_rows, g.name), g) for g in guardrails_of(spec)
        }
        return vd.analyze_lever(
            _col(c_rows, spec.metric.name),
            _col(v_rows, spec.metric.name),
            mode=spec.metric.mode,
            decision=decision_of(spec),
            guardrails=guards,
            look_index=look_index,
            lever=lever,
            seeds=seeds,
        )

    def _end_looks(self) -> None:
        st, spec = self.state, self.spec
        records = st.round_verdicts(st.round)
        if spec.decision.correction != "none" and len(records) > 1:
            self._correct(records)
        records = st.round_verdicts(st.round)
        # Prometheus counter per verdict label (tunelab.metrics)
        record_verdicts(spec.name, spec.family, [rec["verdict"] for rec in records.values()])
        winners = [
            lever
            for lever, rec in records.items()
            if rec["verdict"] == vd.WIN and rec["meaningful"]
        ]
        if winners and spec.decision.confirm_seeds:
            st.stage = Stage(_CONFIRM, 0)
            for seed in spec.decision.confirm_seeds:
                for arm in [ARM_CONTROL, *winners]:
                    st.queue.append(PlannedTrial(st.round, arm, seed, _CONFIRM))
            st.confirming = winners
        else:
            self._next_round_or_finish([])

    def _correct(self, records: dict[str, dict[str, Any]]) -> None:
        # Re-analyse each lever at the look it stopped at, then adjust across the family.
        st, spec = self.state, self.spec
        verdicts = []
        for lever, rec in records.items():
            seeds = spec.seeds[: rec["n_seeds"]]
            look_index = rec["look_no"] - 1 if spec.decision.looks else None
            verdicts.append(self._analyze(lever, seeds, look_index))
        for v in vd.adjust_family(verdicts, method=spec.decision.correction):
            old = records[v.lever]
            st.verdicts[_verdict_key(st.round, v.lever)] = _verdict_record(
                v, st.round, old["look_no"], old["n_seeds"]
            )

    def _end_confirm(self) -> None:
        st, spec = self.state, self.spec
        sign = 1.0 if spec.metric.mode == "max" else -1.0
        metric = spec.metric.name
        confirming, st.confirming = st.confirming, []
        confirmed = []
        for lever in confirming:
            diffs = []
            for seed in spec.decision.confirm_seeds:
                c = st.results.get(_result_key(st.round, ARM_CONTROL, seed))
                v = st.results.get(_result_key(st.round, lever, seed))
                diffs.append(math.nan if c is None or v is None else sign * (v[metric] - c[metric]))
            ok = bool(diffs) and all(math.isfinite(d) and d > 0 for d in diffs)
            rec = st.verdicts[_verdict_key(st.round, lever)]
            rec["confirmed"] = ok
            rec["confirm_diffs"] = diffs
            if ok:
                confirmed.append(lever)
        self._next_round_or_finish(confirmed)

    def _next_round_or_finish(self, confirmed: list[str]) -> None:
        st, spec, rnd = self.state, self.spec, self.state.round
        if not confirmed or rnd >= spec.rounds:
            st.finished = True
            return
        records = st.round_verdicts(rnd)
        control = st.controls[rnd]
        # the biggest win is applied last
        for lever in sorted(confirmed, key=lambda lv: records[lv]["effect"]):
            control = apply_overrides(control, spec.levers[lever])
            st.stacked.append((rnd, lever))
        st.round = rnd + 1
        st.controls[st.round] = control
        merged = {lever for _, lever in st.stacked}
        negative = {lever for lever, r in records.items() if r["verdict"] == vd.NEGATIVE}
        st.active = [lv for lv in spec.levers if lv not in merged and lv not in negative]
        if not st.active:
            st.finished = True
            return
        self._start_look(0)

    def _mirror(self) -> None:
        atomic_write_json(Path(self.state_file), self.state.to_json())


def _result_key(rnd: int, arm: str, seed: int) -> str:
    return f"{rnd}|{arm}|{seed}"


def _verdict_key(rnd: int, lever: str) -> str:
    return f"{rnd}|{lever}"


def _col(rows: list[dict[str, float] | None], name: str) -> np.ndarray:
    return np.array([math.nan if r is None else r.get(name, math.nan) for r in rows], dtype=float)


def _verdict_record(v: vd.LeverVerdict, rnd: int, look_no: int, n_seeds: int) -> dict[str, Any]:
    rec = vd.verdict_to_dict(v)
    rec["round"] = rnd
    rec["look_no"] = look_no
    rec["n_seeds"] = n_seeds
    return rec
