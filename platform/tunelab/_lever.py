"""Lever A/B on paired seeds as a Ray Tune searcher.

:class:`PairedLeverSearcher` hands Tune one trial per (arm, seed): the
control and every lever run on the same seeds, a planned look at a time
(shared/VERDICTS.md, "Sequential looks"). When every trial of a look has
finished it decides each lever still running at that look's threshold; a
decisive lever (``win``, ``negative``, ``crashed``) receives no more seeds.
After the last look the round's verdicts are corrected across the levers
(Holm / BH). With ``rounds > 1`` a meaningful win that also wins on every
confirmation seed is merged into the next round's control ("stack on win",
shared/seeds/action_flow_matching_pr.txt); the old control is superseded.

The searcher's state is saved and restored by Tune with the experiment, and
mirrored to ``tunelab_lever.json`` for the post-processing and for humans.
"""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from tunelab import verdicts as vd
from tunelab._checkpoint import atomic_write_json, read_json
from tunelab._names import as_float
from tunelab._spec import LeverABSpec, apply_overrides
from tunelab.metrics import record_verdicts

__all__ = [
    "CONTROL",
    "PairedLeverSearcher",
    "decision_of",
    "finalize_levers",
    "guardrails_of",
    "lever_trial_tags",
]

CONTROL = "control"
_DECISIVE = (vd.WIN, vd.NEGATIVE, vd.CRASHED)


def decision_of(spec: LeverABSpec) -> vd.Decision:
    """The spec's decision block as the verdict engine's :class:`Decision`."""
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


def lever_trial_tags(config: dict[str, Any]) -> dict[str, str]:
    """MLflow tags of a lever A/B trial, from its Tune config."""
    arm = config.get("arm", CONTROL)
    return {
        "tunelab.role": "control" if arm == CONTROL else "variant",
        "tunelab.lever": arm,
        "tunelab.round": str(config.get("round", 1)),
        "tunelab.stage": str(config.get("stage", "look")),
    }


class PairedLeverSearcher(Searcher):
    """Suggest (arm, seed) trials look by look; decide levers between looks.

    Args:
        spec: The validated lever A/B spec.
        state_file: JSON mirror of the state (read by the post-processing).
    """

    def __init__(self, spec: LeverABSpec, *, state_file: str) -> None:
        super().__init__(metric=spec.metric.name, mode=spec.metric.mode)
        self.spec = spec
        self.state_file = state_file
        self.st: dict[str, Any] = {
            "round": 1,
            "control": copy.deepcopy(spec.control),
            "controls": {1: copy.deepcopy(spec.control)},
            "active": list(spec.levers),
            "stage": None,  # ("look", k) or ("confirm", 0)
            "queue": [],
            "pending": {},  # trial_id -> [round, arm, seed, stage]
            "results": {},  # "round|arm|seed" -> {metric: value} or None (failed)
            "trials": {},  # "round|arm|seed" -> trial_id
            "verdicts": {},  # "round|lever" -> verdict dict
            "confirm": {},  # "round|lever" -> bool
            "stacked": [],  # [round, lever]
            "finished": False,
        }
        self._start_look(0)

    # -- Tune searcher API -----------------------------------------------------------
    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        st = self.st
        if not st["queue"] and not st["pending"] and not st["finished"]:
            self._advance()
        if st["finished"]:
            return Searcher.FINISHED
        if not st["queue"]:
            return None  # waiting for this look's trials
        rnd, arm, seed, stage = st["queue"].pop(0)
        st["pending"][trial_id] = [rnd, arm, seed, stage]
        st["trials"][_key(rnd, arm, seed)] = trial_id
        self._mirror()
        return {
            "seed": seed,
            "arm": arm,
            "round": rnd,
            "stage": stage,
            "config": self._arm_config(arm, rnd),
        }

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        entry = self.st["pending"].pop(trial_id, None)
        if entry is None:
            return
        rnd, arm, seed, _ = entry
        names = [
            self.spec.metric.name,
            *(g.name for g in self.spec.guardrails),
        ]
        ok = not error and result is not None and result.get("iteration", 0) >= self.spec.budget
        self.st["results"][_key(rnd, arm, seed)] = (
            {n: as_float(result.get(n)) for n in names} if ok and result is not None else None
        )
        self._mirror()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.st, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.st = pickle.load(f)

    # -- public views ------------------------------------------------------------------
    @property
    def state(self) -> dict[str, Any]:
        return self.st

    # -- stages --------------------------------------------------------------------------
    def _looks(self) -> list[int]:
        looks = self.spec.decision.looks
        return list(looks) if looks else [len(self.spec.seeds)]

    def _arm_config(self, arm: str, rnd: int) -> dict[str, Any]:
        control = self.st["controls"][rnd]
        if arm == CONTROL:
            return copy.deepcopy(control)
        return apply_overrides(control, self.spec.levers[arm])

    def _start_look(self, k: int) -> None:
        looks, seeds, rnd = self._looks(), self.spec.seeds, self.st["round"]
        lo = looks[k - 1] if k > 0 else 0
        self.st["stage"] = ["look", k]
        for seed in seeds[lo : looks[k]]:
            for arm in [CONTROL, *self.st["active"]]:
                self.st["queue"].append([rnd, arm, seed, f"look{k + 1}"])

    def _advance(self) -> None:
        kind, k = self.st["stage"]
        if kind == "look":
            self._decide_look(k)
            if self.st["active"] and k + 1 < len(self._looks()):
                self._start_look(k + 1)
            else:
                self._end_looks()
        else:
            self._end_confirm()
        self._mirror()

    def _decide_look(self, k: int) -> None:
        spec, rnd = self.spec, self.st["round"]
        n = self._looks()[k]
        seeds = self.spec.seeds[:n]
        last = k == len(self._looks()) - 1
        still = []
        for lever in self.st["active"]:
            v = self._analyze(
                spec, rnd, lever, seeds, look_index=k if spec.decision.looks else None
            )
            if v.verdict in _DECISIVE or last:
                self.st["verdicts"][f"{rnd}|{lever}"] = _verdict_record(v, rnd, k + 1, n)
            else:
                still.append(lever)
        self.st["active"] = still

    def _analyze(
        self, spec: LeverABSpec, rnd: int, lever: str, seeds: list[int], look_index: int | None
    ) -> vd.LeverVerdict:
        metric = spec.metric.name
        c_rows = [self.st["results"].get(_key(rnd, CONTROL, s)) for s in seeds]
        v_rows = [self.st["results"].get(_key(rnd, lever, s)) for s in seeds]
        guards = {
            g.name: (_col(c_rows, g.name), _col(v_rows, g.name), g) for g in guardrails_of(spec)
        }
        return vd.analyze_lever(
            _col(c_rows, metric),
            _col(v_rows, metric),
            mode=spec.metric.mode,
            decision=decision_of(spec),
            guardrails=guards,
            look_index=look_index,
            lever=lever,
            seeds=seeds,
        )

    def _end_looks(self) -> None:
        spec, rnd = self.spec, self.st["round"]
        records = {k: v for k, v in self.st["verdicts"].items() if k.startswith(f"{rnd}|")}
        if spec.decision.correction != "none" and len(records) > 1:
            self._correct(spec, rnd, records)
        record_verdicts(  # Prometheus counter per verdict label (tunelab.metrics)
            spec.name,
            spec.family,
            [
                rec["verdict"]
                for key, rec in self.st["verdicts"].items()
                if key.startswith(f"{rnd}|")
            ],
        )
        winners = [
            lever
            for key, rec in self.st["verdicts"].items()
            if key.startswith(f"{rnd}|") and rec["verdict"] == vd.WIN and rec["meaningful"]
            for lever in [key.split("|", 1)[1]]
        ]
        if winners and spec.decision.confirm_seeds:
            self.st["stage"] = ["confirm", 0]
            for seed in spec.decision.confirm_seeds:
                for arm in [CONTROL, *winners]:
                    self.st["queue"].append([rnd, arm, seed, "confirm"])
            self.st["confirming"] = winners
        else:
            self._next_round_or_finish([])

    def _correct(self, spec: LeverABSpec, rnd: int, records: dict[str, dict[str, Any]]) -> None:
        # Re-analyse each lever at the look it stopped at, then adjust across the family.
        verdicts = []
        for key, rec in records.items():
            lever = key.split("|", 1)[1]
            seeds = self.spec.seeds[: rec["n_seeds"]]
            look_index = rec["look_no"] - 1 if spec.decision.looks else None
            verdicts.append(self._analyze(spec, rnd, lever, seeds, look_index))
        method = {"holm": "holm", "bh": "bh"}[spec.decision.correction]
        for v in vd.adjust_family(verdicts, method=method):
            old = records[f"{rnd}|{v.lever}"]
            self.st["verdicts"][f"{rnd}|{v.lever}"] = _verdict_record(
                v, rnd, old["look_no"], old["n_seeds"]
            )

    def _end_confirm(self) -> None:
        spec, rnd = self.spec, self.st["round"]
        sign = 1.0 if spec.metric.mode == "max" else -1.0
        confirmed = []
        for lever in self.st.pop("confirming", []):
            diffs = []
            for seed in spec.decision.confirm_seeds:
                c = self.st["results"].get(_key(rnd, CONTROL, seed))
                v = self.st["results"].get(_key(rnd, lever, seed))
                if c is None or v is None:
                    diffs.append(math.nan)
                else:
                    diffs.append(sign * (v[spec.metric.name] - c[spec.metric.name]))
            ok = bool(diffs) and all(math.isfinite(d) and d > 0 for d in diffs)
            self.st["confirm"][f"{rnd}|{lever}"] = ok
            self.st["verdicts"][f"{rnd}|{lever}"]["confirmed"] = ok
            self.st["verdicts"][f"{rnd}|{lever}"]["confirm_diffs"] = diffs
            if ok:
                confirmed.append(lever)
        self._next_round_or_finish(confirmed)

    def _next_round_or_finish(self, confirmed: list[str]) -> None:
        spec, rnd = self.spec, self.st["round"]
        if not confirmed or rnd >= spec.rounds:
            self.st["finished"] = True
            return
        control = self.st["controls"][rnd]
        effects = {lv: self.st["verdicts"][f"{rnd}|{lv}"]["effect"] for lv in confirmed}
        for lever in sorted(confirmed, key=lambda lv: effects[lv]):  # the biggest win applied last
            control = apply_overrides(control, spec.levers[lever])
            self.st["stacked"].append([rnd, lever])
        nxt = rnd + 1
        self.st["round"] = nxt
        self.st["controls"][nxt] = control
        merged = {lv for _, lv in self.st["stacked"]}
        negative = {
            k.split("|", 1)[1]
            for k, r in self.st["verdicts"].items()
            if k.startswith(f"{rnd}|") and r["verdict"] == vd.NEGATIVE
        }
        self.st["active"] = [lv for lv in spec.levers if lv not in merged and lv not in negative]
        if not self.st["active"]:
            self.st["finished"] = True
            return
        self._start_look(0)

    def _mirror(self) -> None:
        atomic_write_json(Path(self.state_file), {k: v for k, v in self.st.items()})


def _key(rnd: int, arm: str, seed: int) -> str:
    return f"{rnd}|{arm}|{seed}"


def _col(rows: list[dict[str, float] | None], name: str) -> np.ndarray:
    return np.array([math.nan if r is None else r.get(name, math.nan) for r in rows], dtype=float)


def _verdict_record(v: vd.LeverVerdict, rnd: int, look_no: int, n_seeds: int) -> dict[str, Any]:
    rec = vd.verdict_to_dict(v)
    rec["round"] = rnd
    rec["look_no"] = look_no
    rec["n_seeds"] = n_seeds
    rec["tags"] = vd.tags_for(v)
    return rec


def finalize_levers(
    state_file: Path, spec: LeverABSpec, rows: list[dict[str, Any]], client: Any, parent_run_id: str
) -> dict[str, Any]:
    """Tag runs with their verdicts and outcomes; write ``verdicts.json``; return the summary part."""

    from tunelab._names import TAG_OUTCOME
    from tunelab._tracking import set_tags

    st = read_json(Path(state_file))
    records = sorted(st["verdicts"].values(), key=lambda r: (r["round"], r["lever"]))
    by_round_lever = {(r["round"], r["lever"]): r for r in records}
    final_round = st["round"]
    for row in rows:
        if not row["run_id"]:
            continue
        if row["arm"] == CONTROL:
            if row["round"] < final_round:
                outcome = "superseded"
            else:
                outcome = "baseline" if row["round"] == 1 else "control"
            tags = {TAG_OUTCOME: outcome}
        else:
            rec = by_round_lever.get((row["round"], row["arm"]))
            tags = dict(rec["tags"]) if rec else {TAG_OUTCOME: "inconclusive"}
            if row["status"] == "error":
                tags[TAG_OUTCOME] = "crashed-early"
        set_tags(client, row["run_id"], tags)
    latest: dict[str, dict[str, Any]] = {}
    for rec in records:  # the last round a lever was analysed in
        latest[rec["lever"]] = rec
    parent: dict[str, Any] = {
        "tunelab.rounds": final_round,
        "tunelab.stacked": ",".join(lv for _, lv in st["stacked"]) or "-",
    }
    for lever, rec in latest.items():
        parent[f"tunelab.verdict.{lever}"] = rec["verdict"]
        parent[f"tunelab.meaningful.{lever}"] = str(bool(rec["meaningful"])).lower()
        for key in ("effect", "ci_low", "ci_high", "p_value", "n_pairs"):
            parent[f"tunelab.{key}.{lever}"] = rec[key]
    set_tags(client, parent_run_id, parent)
    out = Path(state_file).parent / "verdicts.json"
    clean = [{k: v for k, v in r.items() if k != "tags"} for r in records]
    atomic_write_json(out, clean)
    client.log_artifact(parent_run_id, str(out))
    return {
        "verdicts": clean,
        "rounds": final_round,
        "stacked": st["stacked"],
        "final_control": st["controls"][str(final_round)],
    }
