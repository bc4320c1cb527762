"""Lever A/B on paired seeds: control and levers on the same seeds, a verdict per lever.

shared/seeds/action_flow_matching_pr.txt and shared/VERDICTS.md: every arm
runs on the same seeds (same init and data order per seed), a planned look at
a time; paired per-seed differences of the pre-registered metric give each
lever an effect, a confidence interval and a verdict (``win``, ``negative``,
``null``, ``inconclusive``, ``crashed``), guardrails must not regress, and
confirmed wins are stacked into the next round's control. The trials are
planned by :class:`~tunelab.kinds.lever_searcher.PairedLeverSearcher`, a Tune
searcher; this module holds the spec and the post-processing (tags, verdicts.json).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tunelab.checkpoint import atomic_write_json
from tunelab.kinds._base import ExperimentKind, FinalizeContext
from tunelab.names import (
    ARM_CONTROL,
    TAG_CI_HIGH,
    TAG_CI_LOW,
    TAG_EFFECT,
    TAG_LEVER,
    TAG_MEANINGFUL,
    TAG_N_PAIRS,
    TAG_OUTCOME,
    TAG_P_VALUE,
    TAG_ROLE,
    TAG_ROUND,
    TAG_ROUNDS,
    TAG_STACKED,
    TAG_STAGE,
    TAG_VERDICT,
    Outcome,
    Role,
    TrialStatus,
)
from tunelab.outcome import TrialOutcome
from tunelab.spec import (
    MAX_SEEDS,
    BaseSpec,
    ConfigUse,
    Finite,
    Seed,
    Strict,
    WholeNumber,
    apply_overrides,
)

__all__ = ["DecisionSpec", "GuardrailSpec", "LeverAB", "LeverABSpec", "lever_trial_tags"]


class GuardrailSpec(Strict):
    """A metric that must not regress by more than ``margin`` (non-inferiority)."""

    name: str
    mode: Literal["max", "min"]
    margin: Annotated[Finite, Field(ge=0)] = 0.0


class DecisionSpec(Strict):
    """The pre-registered decision rule (shared/VERDICTS.md).

    ``min_effect``: the smallest effect of interest (the keep bar), raw units;
    ``looks``: seeds analysed at each planned look, e.g. [5, 10, 20];
    ``correction``: across the levers of a round (``holm`` confirmatory, ``bh``
    screening); ``confirm_seeds``: seeds a meaningful win must also win on
    before it is stacked into the next round's control.
    """

    min_effect: Annotated[Finite, Field(gt=0)]
    alpha: Annotated[Finite, Field(gt=0, lt=1)] = 0.05
    looks: list[Annotated[WholeNumber, Field(ge=2, le=MAX_SEEDS)]] | None = None
    correction: Literal["holm", "bh", "none"] = "holm"
    confirm_seeds: Annotated[list[Seed], Field(max_length=MAX_SEEDS)] = Field(default_factory=list)

    @field_validator("looks")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(b <= a for a, b in itertools.pairwise(v))):
            raise ValueError(
                f"looks must be a non-empty, strictly increasing list of seed counts, got {v}"
            )
        return v


class LeverABSpec(BaseSpec):
    """Control vs levers on the same seeds; a verdict per lever."""

    kind: Literal["lever_ab"]
    control: dict[str, Any] = Field(default_factory=dict)
    levers: dict[str, dict[str, Any]]
    seeds: list[Seed]
    guardrails: list[GuardrailSpec] = Field(default_factory=list)
    decision: DecisionSpec
    rounds: Annotated[WholeNumber, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _check_levers(self) -> LeverABSpec:
        if self.config:
            raise ValueError(
                "config: a lever_ab spec names its base config under `control:`; move it there"
            )
        if not self.seeds:
            raise ValueError(
                "seeds: needs at least one seed; paired verdicts need several (e.g. [1, 2, 3, 4, 5])"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: seeds must be distinct")
        if not self.levers:
            raise ValueError("levers: needs at least one lever, e.g. {lds: {lds_alpha: 0.5}}")
        for name, overrides in self.levers.items():
            if name == "control" or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise ValueError(
                    f"levers.{name}: a lever name is letters, digits, _ . - and not 'control'"
                )
            if not overrides:
                raise ValueError(f"levers.{name}: a lever needs at least one config override")
        looks = self.decision.looks
        if looks and looks[-1] > len(self.seeds):
            raise ValueError(
                f"decision.looks: the last look ({looks[-1]}) needs more seeds than the {len(self.seeds)} listed"
            )
        if set(self.decision.confirm_seeds) & set(self.seeds):
            raise ValueError(
                "decision.confirm_seeds: confirmation seeds must differ from the seeds"
            )
        if self.rounds > 1 and not self.decision.confirm_seeds:
            raise ValueError(
                "decision.confirm_seeds: stacking wins over rounds needs confirmation seeds "
                "(a single-seed win is never stacked)"
            )
        return self

    def planned_trials(self) -> tuple[int, str, str]:
        arms, seeds = 1 + len(self.levers), len(self.seeds) + len(self.decision.confirm_seeds)
        how = f"{arms} arms x {seeds} seeds x {self.rounds} rounds"
        return arms * seeds * self.rounds, "rounds" if self.rounds > 1 else "seeds", how

    def family_configs(self) -> Iterator[ConfigUse]:
        yield ConfigUse("control", dict(self.control))
        for name, overrides in self.levers.items():
            keys = tuple((f"levers.{name}.{key}", key) for key in overrides)
            yield ConfigUse(f"levers.{name}", self.lever_config(name), keys, append_loc=False)

    def metric_refs(self) -> list[tuple[str, str]]:
        guards = [(f"guardrails.{i}.name", g.name) for i, g in enumerate(self.guardrails)]
        return [*super().metric_refs(), *guards]

    def lever_config(self, name: str) -> dict[str, Any]:
        """The control config with lever ``name``'s overrides applied."""
        return apply_overrides(self.control, self.levers[name])


def lever_trial_tags(config: dict[str, Any]) -> dict[str, str]:
    """Tags of a lever A/B trial's run, from its Tune config (role, lever, round, stage)."""
    arm = config.get("arm", ARM_CONTROL)
    return {
        TAG_ROLE: (Role.CONTROL if arm == ARM_CONTROL else Role.VARIANT).value,
        TAG_LEVER: arm,
        TAG_ROUND: str(config.get("round", 1)),
        TAG_STAGE: str(config.get("stage", "look")),
    }


class LeverAB(ExperimentKind):
    """The lever A/B kind (see the module docstring)."""

    spec_cls = LeverABSpec
    placement = ("arm", "round", "stage")
    spec: LeverABSpec

    def search_alg(self) -> Any:
        from tunelab.kinds.lever_searcher import PairedLeverSearcher

        return PairedLeverSearcher(self.spec, state_file=str(self.layout.lever_state_file))

    def num_samples(self) -> int:
        """An upper bound; the searcher ends the experiment when every lever is decided.

        Each round runs at most the control and every lever on every seed and
        every confirmation seed. One more than that: the searcher decides a look
        in the ``suggest`` call that follows its last trial, and Tune stops
        calling ``suggest`` once ``num_samples`` trials exist. (Tune's ``-1``,
        "until the searcher finishes", shows as 9223372036854775807 trials in
        its start-up box.)
        """
        spec = self.spec
        per_round = (len(spec.seeds) + len(spec.decision.confirm_seeds)) * (1 + len(spec.levers))
        return spec.rounds * per_round + 1

    def total_trials(self) -> int | None:
        return None  # decided as the looks go

    def param_space(self) -> dict[str, Any] | None:
        return None

    def trial_tags(self) -> Any:
        return lever_trial_tags

    def finalize(self, ctx: FinalizeContext, outcomes: list[TrialOutcome]) -> dict[str, Any]:
        """Tag runs with their verdicts and outcomes; write ``verdicts.json``."""
        from tunelab.kinds.lever_searcher import LeverState
        from tunelab.tracking import log_summary, verdict_tags

        tracker, parent = ctx.tracker, ctx.state.parent_run_id
        st = LeverState.read(self.layout.lever_state_file)
        records = sorted(st.verdicts.values(), key=lambda r: (r["round"], r["lever"]))
        by_round_lever = {(r["round"], r["lever"]): r for r in records}
        final_round = st.round
        for o in outcomes:
            if not o.run_id:
                continue
            if o.arm == ARM_CONTROL:
                if (o.round or 1) < final_round:
                    outcome = Outcome.SUPERSEDED
                else:
                    outcome = Outcome.BASELINE if o.round == 1 else Outcome.CONTROL
                tags = {TAG_OUTCOME: outcome.value}
            else:
                rec = by_round_lever.get((o.round, o.arm))
                tags = verdict_tags(rec) if rec else {TAG_OUTCOME: Outcome.INCONCLUSIVE.value}
                if o.status in (TrialStatus.ERROR, TrialStatus.DIVERGED):
                    tags[TAG_OUTCOME] = Outcome.CRASHED_EARLY.value
            tracker.set_tags(o.run_id, tags)
        latest: dict[str, dict[str, Any]] = {}
        for rec in records:  # the last round a lever was analysed in
            latest[rec["lever"]] = rec
        parent_tags: dict[str, Any] = {
            TAG_ROUNDS: final_round,
            TAG_STACKED: ",".join(lv for _, lv in st.stacked) or "-",
        }
        for lever, rec in latest.items():
            parent_tags[f"{TAG_VERDICT}.{lever}"] = rec["verdict"]
            parent_tags[f"{TAG_MEANINGFUL}.{lever}"] = str(bool(rec["meaningful"])).lower()
            for tag, key in (
                (TAG_EFFECT, "effect"),
                (TAG_CI_LOW, "ci_low"),
                (TAG_CI_HIGH, "ci_high"),
                (TAG_P_VALUE, "p_value"),
                (TAG_N_PAIRS, "n_pairs"),
            ):
                parent_tags[f"{tag}.{lever}"] = rec[key]
        tracker.set_tags(parent, parent_tags)
        log_summary(tracker, parent, {f"effect/{lv}": rec["effect"] for lv, rec in latest.items()})
        out = self.layout.verdicts_file
        atomic_write_json(out, records)
        tracker.log_artifact(parent, out)
        return {
            "verdicts": records,
            "rounds": final_round,
            "stacked": [list(x) for x in st.stacked],
            "final_control": st.controls[final_round],
        }
