"""Tests of the cascade_mixer family: config, smoke steps, explosion detection, resume, export."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch

from trainables import cascade_mixer as cm
from tunelab import capture_rng_state, get_family, restore_rng_state, seed_everything
from tunelab.devices import DeviceUnavailable
from tunelab.names import M_HEALTH_AMP_SKIPPED, M_HEALTH_NAN_SKIPPED

torch.set_num_threads(1)

SEED = 1001  # the first seed of search_spaces/cascade_health.yaml
# A tiny config: few pairs, few steps, the real model width.
TINY: dict[str, Any] = {"n_train": 64, "n_val": 16, "steps_per_iter": 3, "batch_size": 8}
# The explosion tests run the family's default (quick) size: the growth needs its steps and lr.
QUICK: dict[str, Any] = {"n_val": 32}
WEAK: dict[str, Any] = {"stages": 3, "residual_weights": [1.0, 1.0, 0.1]}


def _build(seed: int = SEED, **overrides: Any) -> cm.CascadeMixerExperiment:
    seed_everything(seed)
    return cm.build(cm.FAMILY.make_config(overrides), seed, Path("/nonexistent"))


def _snapshot(exp: cm.CascadeMixerExperiment) -> dict[str, Any]:
    """What tunelab checkpoints: the family state, the monitor's state, the global RNGs."""
    buf = io.BytesIO()
    torch.save(exp.state_dict(), buf)  # a real serialisation round trip, not shared tensors
    return {
        "family": buf.getvalue(),
        "health": copy.deepcopy(exp.health.state_dict()),
        "rng": capture_rng_state(),
    }


def _restore(exp: cm.CascadeMixerExperiment, snap: dict[str, Any]) -> None:
    # as tunelab loads a checkpoint: onto the CPU, tensors and containers only
    state = torch.load(io.BytesIO(snap["family"]), map_location="cpu", weights_only=True)
    exp.load_state_dict(state)
    exp.health.load_state_dict(copy.deepcopy(snap["health"]))
    restore_rng_state(snap["rng"])


# --- config -----------------------------------------------------------------


def test_family_is_registered_under_its_name() -> None:
    assert get_family("cascade_mixer") is cm.FAMILY


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"stages": 3}, "residual_weights"),  # one residual weight per stage
        ({"residual_weights": [1.0, -1.0]}, "residual_weights"),
        ({"rms_clamp": [1.5, 0.7]}, "rms_clamp"),
        ({"hidden": 30, "n_heads": 4}, "n_heads"),
        ({"stages": 4, "residual_weights": [1, 1, 1, 1]}, "stages"),
        ({"lr": math.nan}, "lr"),
        ({"no_such_key": 1}, "no_such_key"),
    ],
)
def test_invalid_configs_are_refused_naming_the_key(values: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        cm.FAMILY.make_config(values)


def test_defaults_are_the_clamped_two_stage_control() -> None:
    cfg = cm.Config()
    assert (cfg.stages, cfg.residual_weights, cfg.rms_clamp) == (2, (1.0, 1.0), (0.7, 1.5))
    assert cm.FAMILY.make_config({"rms_clamp": None}).rms_clamp is None


# --- smoke ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides", [{}, WEAK, {**WEAK, "spectral_norm": True}, {"discriminator": True}]
)
def test_one_iteration_reports_finite_metrics(overrides: dict[str, Any]) -> None:
    exp = _build(**TINY, **overrides)
    metrics = exp.train_iteration()
    for name in (cm.M_TRAIN_LOSS, cm.M_VAL_MIX_ERROR, cm.M_VAL_SCALE, "health/grad_norm"):
        assert math.isfinite(metrics[name]), name
    last = len(exp.cfg.residual_weights) - 1
    assert f"health/act_rms/mixer.stages.{last}.scale" in metrics  # the watched scale factor
    assert f"health/act_rms/mixer.stages.{last}.pre" in metrics
    assert (cm.M_TRAIN_DISC in metrics) == exp.cfg.discriminator


def test_data_depends_on_data_seed_not_on_trial_seed() -> None:
    a, b, c = _build(1, **TINY), _build(2, **TINY), _build(1, **TINY, data_seed=7)
    assert torch.equal(a.train.mix, b.train.mix)
    assert not torch.equal(a.train.mix, c.train.mix)


def test_export_writes_metrics_and_png(tmp_path: Path) -> None:
    exp = _build(**TINY)
    exp.train_iteration()
    manifest = exp.export(tmp_path)
    json.dumps(manifest)  # JSON-able
    assert {"metrics.json", "mix.png"} <= {p.name for p in tmp_path.iterdir()}
    assert math.isfinite(manifest["metrics"][cm.M_VAL_MIX_ERROR])
    assert (manifest["device"], manifest["precision"]) == ("cpu", "fp32")


# --- device and precision ---------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_a_gpu_is_refused_by_build() -> None:
    with pytest.raises(DeviceUnavailable, match="device: cuda"):
        _build(**TINY, device="cuda")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_an_iteration_on_the_cpu(precision: str) -> None:
    # autocast on the CPU; fp16 steps through a gradient scaler (its overflow skips counted)
    exp = _build(**TINY, discriminator=True, device="cpu", precision=precision)
    metrics = exp.train_iteration()
    assert isinstance(exp.health.scaler, torch.amp.GradScaler) == (precision == "fp16")
    assert (M_HEALTH_AMP_SKIPPED in metrics) == (precision == "fp16")
    skipped = metrics[M_HEALTH_NAN_SKIPPED] + metrics.get(M_HEALTH_AMP_SKIPPED, 0.0)
    assert math.isfinite(metrics[cm.M_TRAIN_LOSS]) or skipped == TINY["steps_per_iter"]
    assert math.isfinite(metrics[cm.M_VAL_MIX_ERROR])
    assert {p.dtype for p in exp.model.parameters()} == {torch.float32}  # fp32 master weights


# --- numerical health -------------------------------------------------------


def test_unclamped_weak_residual_explodes_and_is_caught_before_any_nonfinite_step() -> None:
    # PowerMuse's failure: 3 stages, 0.1 residual in the last, no clamp (default policy)
    exp = _build(**QUICK, **WEAK, rms_clamp=None)
    for _ in range(4):  # the growth rule (x4 over two iterations) fires by iteration 4
        exp.train_iteration()
    kinds = [e.kind for e in exp.health.events]
    assert kinds and kinds[0] in ("explosion", "growth"), kinds
    first = exp.health.events[0]
    assert first.layer == "mixer.stages.2"  # the weak stage
    assert first.term == "recon"


def test_clamped_weak_residual_trains_without_events() -> None:
    exp = _build(**QUICK, **WEAK)
    for _ in range(4):
        metrics = exp.train_iteration()
    assert exp.health.events == []
    assert metrics["health/act_rms_max/mixer.stages.2.scale"] <= 1.5 + 1e-6


# --- checkpointing ----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [WEAK, {"discriminator": True}, {"precision": "fp16"}],
)
def test_resume_is_bit_exact(overrides: dict[str, Any]) -> None:
    exp = _build(**TINY, **overrides)
    exp.train_iteration()
    snap = _snapshot(exp)
    expected = exp.train_iteration()

    other = _build(SEED + 1, **TINY, **overrides)  # different init: the state must overwrite it
    _restore(other, snap)
    got = other.train_iteration()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == value or (math.isnan(got[name]) and math.isnan(value)), name
    for (name, p), q in zip(exp.mixer.named_parameters(), other.mixer.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_discriminator_optimizer_state_round_trips() -> None:
    exp = _build(**TINY, discriminator=True)
    exp.train_iteration()
    state = exp.state_dict()
    assert state["disc_optimizer"]["state"]  # the discriminator has stepped
    other = _build(SEED + 1, **TINY, discriminator=True)
    other.load_state_dict(copy.deepcopy(state))
    got = other.opt_d.state_dict()["state"]
    for k, s in state["disc_optimizer"]["state"].items():
        assert torch.equal(got[k]["exp_avg_sq"], s["exp_avg_sq"])
    for p, q in zip(exp.disc.parameters(), other.disc.parameters(), strict=True):
        assert torch.equal(p, q)
