"""Tests of the flow_policy family: data, levers, sampler, determinism, resume, export."""

from __future__ import annotations

import datetime
import io
import json
import math
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainables import flow_policy as fp
from tunelab import load_state, save_state, seed_everything
from tunelab.devices import DeviceUnavailable
from tunelab.names import M_HEALTH_AMP_SKIPPED, M_HEALTH_NAN_SKIPPED, is_per_name_health_metric

torch.set_num_threads(1)

# A tiny config: a few optimizer steps per iteration, small data, small net.
TINY: dict[str, Any] = {
    "n_train": 256,
    "n_val": 64,
    "n_test": 64,
    "episode_len": 64,
    "hidden": 16,
    "n_layers": 1,
    "time_embed_dim": 8,
    "steps_per_iter": 3,
    "batch_size": 32,
    "n_steps": 2,
    "readout_k": 3,
}


def _build(seed: int = 1001, **overrides: Any) -> fp.FlowPolicyExperiment:
    seed_everything(seed)
    return fp.build(fp.FAMILY.make_config({**TINY, **overrides}), seed, Path("/nonexistent"))


def _run(seed: int = 1001, iters: int = 2, **overrides: Any) -> dict[str, float]:
    exp = _build(seed, **overrides)
    for _ in range(iters):
        metrics = exp.train_iteration()
    return metrics


# --- data -------------------------------------------------------------------


def test_about_five_percent_of_action_values_are_maneuvers() -> None:
    train = fp.make_dataset(fp.Config())["train"]
    frac = train.maneuver.float().mean().item()
    assert 0.035 < frac < 0.065


@pytest.mark.parametrize("horizon", [4, 8])
def test_targets_are_chunks_of_horizon_steps(horizon: int) -> None:
    cfg = fp.Config(**{**TINY, "horizon": horizon})
    train = fp.make_dataset(cfg)["train"]
    assert train.actions.shape == (cfg.n_train, horizon, 2)
    assert train.maneuver.shape == train.actions.shape
    assert train.cond.shape == (cfg.n_train, cfg.hist_len * 6 + cfg.route_len * 2)


def test_maneuver_values_are_larger_than_flat_values() -> None:
    train = fp.make_dataset(fp.Config())["train"]
    spike = train.actions[train.maneuver].abs().mean()
    flat = train.actions[~train.maneuver].abs().mean()
    assert spike > 4 * flat


def test_data_depends_on_data_seed_not_on_trial_seed() -> None:
    a, b = _build(seed=1), _build(seed=2)
    c = _build(seed=1, data_seed=7)
    assert torch.equal(a.train.actions, b.train.actions)
    assert torch.equal(a.val.cond, b.val.cond)
    assert not torch.equal(a.train.actions, c.train.actions)


# --- determinism and pairing ------------------------------------------------


def test_same_seed_gives_identical_metrics() -> None:
    assert _run(seed=5) == _run(seed=5)


def test_different_seeds_give_different_metrics() -> None:
    assert _run(seed=5) != _run(seed=6)


@pytest.mark.parametrize(
    "noop",
    [
        {"lds_alpha": 0.5, "lds_cap": 1.0},  # LDS path on, but cap 1 forces every weight to 1
        {"readout_k": 7},  # K is ignored by the single-draw readout
        {"time_beta_alpha": 3.0},  # Beta parameters are unused under logit-normal time
    ],
)
def test_noop_lever_reproduces_control_metrics(noop: dict[str, Any]) -> None:
    assert _run(**noop) == _run()


@pytest.mark.parametrize(
    "lever",
    [
        {"lds_alpha": 0.5},
        {"chunk_delta_weight": 1.0},
        {"gaussianize": True},
        {"time_sampling": "beta"},
    ],
)
def test_real_lever_changes_metrics(lever: dict[str, Any]) -> None:
    assert _run(**lever)[fp.M_TRAIN_LOSS] != _run()[fp.M_TRAIN_LOSS]


def test_evaluation_noise_is_fixed_across_calls() -> None:
    exp = _build()
    exp.train_iteration()
    assert exp.evaluate(exp.val, "val") == exp.evaluate(exp.val, "val")


# --- LDS --------------------------------------------------------------------


@pytest.mark.parametrize(("alpha", "cap"), [(0.5, 10.0), (1.0, 3.0), (2.0, 1.5)])
def test_lds_weights_are_mean_one_and_capped(alpha: float, cap: float) -> None:
    actions = fp.make_dataset(fp.Config())["train"].actions
    w = fp.lds_weights(actions, alpha=alpha, cap=cap, bins=50, sigma=2.0)
    assert w.shape == (actions.shape[0], 2)
    assert torch.allclose(w.double().mean(0), torch.ones(2, dtype=torch.float64), atol=1e-5)
    assert w.max() <= cap + 1e-5


def test_lds_upweights_rare_large_peaks() -> None:
    actions = fp.make_dataset(fp.Config())["train"].actions
    w = fp.lds_weights(actions, alpha=0.5, cap=10.0, bins=50, sigma=2.0)
    peak = actions.abs().amax(1)  # (N, C)
    big = peak[:, 1] > 1.5
    assert w[big, 1].mean() > 2 * w[~big, 1].mean()


def test_lds_alpha_zero_gives_unit_weights() -> None:
    actions = fp.make_dataset(fp.Config(**TINY))["train"].actions
    w = fp.lds_weights(actions, alpha=0.0, cap=10.0, bins=50, sigma=2.0)
    assert torch.equal(w, torch.ones(actions.shape[0], 2))


# --- action transform -------------------------------------------------------


@pytest.mark.parametrize("gaussianize", [False, True])
def test_action_transform_round_trips(gaussianize: bool) -> None:
    actions = fp.make_dataset(fp.Config())["train"].actions
    tf = fp.ActionTransform(actions, gaussianize=gaussianize, n_knots=64)
    probe = torch.cat([actions[:64], 3 * actions[:8]])  # includes values beyond the train range
    assert torch.allclose(tf.inverse(tf.forward(probe)), probe, atol=1e-4)


def test_gaussianize_makes_marginals_standard_normal() -> None:
    actions = fp.make_dataset(fp.Config())["train"].actions
    z = fp.ActionTransform(actions, gaussianize=True, n_knots=64).forward(actions)
    z = z.reshape(-1, 2).double()
    probs = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    expected = torch.special.ndtri(probs)[:, None].expand(3, 2)
    assert torch.allclose(torch.quantile(z, probs, dim=0), expected, atol=0.05)


def test_gaussianize_is_monotone() -> None:
    actions = fp.make_dataset(fp.Config())["train"].actions
    tf = fp.ActionTransform(actions, gaussianize=True, n_knots=64)
    grid = torch.linspace(-10, 10, 2001)[:, None].expand(-1, 2)
    assert (torch.diff(tf.forward(grid), dim=0) > 0).all()


# --- flow machinery ---------------------------------------------------------


def test_heun_is_exact_for_a_field_linear_in_time() -> None:
    x0 = torch.tensor([0.5, -1.0])
    x1 = fp.heun_sample(lambda x, t: torch.full_like(x, 3.0 + 2.0 * t), x0, n_steps=1)
    assert torch.allclose(x1, x0 + 4.0)


def test_heun_integrates_linear_decay_to_second_order() -> None:
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x0 * math.exp(-1.0)
    err8 = (fp.heun_sample(lambda x, t: -x, x0, n_steps=8) - exact).abs().max().item()
    err16 = (fp.heun_sample(lambda x, t: -x, x0, n_steps=16) - exact).abs().max().item()
    assert err16 < 1e-3
    assert 3.5 < err8 / err16 < 4.5


def test_logit_normal_time_is_in_unit_interval_with_median_half() -> None:
    t = fp.sample_flow_time(100_000, fp.Config(), torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    assert abs(t.median().item() - 0.5) < 0.01
    assert abs(t.mean().item() - 0.5) < 0.01


def test_beta_time_is_skewed_to_the_noisy_end() -> None:
    cfg = fp.Config(time_sampling="beta", time_beta_alpha=1.5, time_beta_s=0.999)
    t = fp.sample_flow_time(100_000, cfg, torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    assert abs(t.mean().item() - 0.999 / 2.5) < 0.01  # E[s (1 - x)], x ~ Beta(alpha, 1)
    assert (t < 0.5).float().mean() > 0.6


def test_mode_aware_commits_to_the_dominant_mode() -> None:
    draws = torch.zeros(1, 8, 4, 2)
    draws[0, :6, :, 1] = -1.0
    draws[0, 6:, :, 1] = 1.0
    out = fp.mode_aware_mean(draws, channel=1, gap=0.5, min_frac=0.2)
    assert torch.allclose(out[0, :, 1], torch.full((4,), -1.0))


def test_mode_aware_equals_mean_when_unimodal() -> None:
    draws = torch.randn(5, 8, 4, 2, generator=torch.Generator().manual_seed(0)) * 0.01
    out = fp.mode_aware_mean(draws, channel=1, gap=0.5, min_frac=0.2)
    assert torch.allclose(out, draws.mean(1))


# --- heads, readouts, config -----------------------------------------------


@pytest.mark.parametrize("readout", ["single", "mean_of_k", "mode_aware"])
def test_every_readout_runs(readout: str) -> None:
    metrics = _run(iters=1, readout=readout)
    assert all(math.isfinite(v) for v in metrics.values())


def test_regression_head_runs_and_is_deterministic() -> None:
    exp = _build(head="regression")
    metrics = exp.train_iteration()
    assert all(math.isfinite(v) for v in metrics.values())
    a = exp.predict(exp.val.cond, torch.Generator().manual_seed(0))
    b = exp.predict(exp.val.cond, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_returned_metrics_are_the_declared_ones() -> None:
    # besides the declared ones: one health metric per layer and loss term (tunelab.health)
    names = {k for k in _run(iters=1) if not is_per_name_health_metric(k)}
    assert names == set(fp.FAMILY.metrics)


def test_unknown_config_key_is_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="lds_alhpa"):
        fp.FAMILY.make_config({"lds_alhpa": 0.5})


def test_nonfinite_steps_are_skipped_and_counted() -> None:
    exp = _build()
    with torch.no_grad():
        exp.net.out.bias.fill_(float("nan"))
    before = {k: v.clone() for k, v in exp.net.state_dict().items()}
    metrics = exp.train_iteration()
    assert metrics[fp.M_NAN_SKIPPED] == TINY["steps_per_iter"]
    for name, value in exp.net.state_dict().items():  # no optimizer step happened
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)


# --- resume and export ------------------------------------------------------


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    n = 2
    a = _build(seed=11)
    for _ in range(2 * n):
        metrics_a = a.train_iteration()

    b = _build(seed=11)
    for _ in range(n):
        b.train_iteration()
    save_state(tmp_path, b.state_dict(), iteration=n)

    c = _build(seed=999)  # a different seed: the restore must do all the work
    payload = load_state(tmp_path)  # torch.load(map_location="cpu", weights_only=True)
    c.load_state_dict(payload["family"])
    for _ in range(n):
        metrics_c = c.train_iteration()

    for (name, pa), pc in zip(a.net.state_dict().items(), c.net.state_dict().values(), strict=True):
        assert torch.equal(pa, pc), name
    assert metrics_a == metrics_c


def test_export_writes_metrics_and_plot(tmp_path: Path) -> None:
    exp = _build()
    exp.train_iteration()
    manifest = exp.export(tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "chunks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"val/spike_l1", "test/spike_l1", "test/flat_l1"} <= set(saved["metrics"])
    assert manifest["metrics"] == saved["metrics"]
    assert (manifest["device"], manifest["precision"]) == ("cpu", "fp32")


def test_a_generator_state_from_another_device_reseeds_with_a_warning() -> None:
    # a CUDA generator's state (16 bytes of Philox seed and offset) cannot set a CPU one:
    # the checkpoint still loads, the stream is re-seeded from it, the same way every time
    exp = _build()
    exp.train_iteration()
    buf = io.BytesIO()
    torch.save({**exp.state_dict(), "noise_gen": torch.arange(16, dtype=torch.uint8)}, buf)
    resumed = []
    for _ in range(2):
        buf.seek(0)
        state = torch.load(buf, map_location="cpu", weights_only=True)
        c = _build(seed=999)
        with pytest.warns(RuntimeWarning, match="flow_policy noise_gen"):
            c.load_state_dict(state)
        assert torch.equal(c.data_gen.get_state(), exp.data_gen.get_state())
        resumed.append(c.train_iteration())
    assert resumed[0] == resumed[1]


# --- device and precision ---------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_a_gpu_is_refused_by_build() -> None:
    with pytest.raises(DeviceUnavailable, match="device: cuda"):
        _build(device="cuda")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_an_iteration_on_the_cpu(precision: str) -> None:
    # autocast on the CPU; fp16 steps through a gradient scaler (its overflow skips counted)
    exp = _build(device="cpu", precision=precision, readout="mode_aware")
    metrics = exp.train_iteration()
    assert isinstance(exp.health.scaler, torch.amp.GradScaler) == (precision == "fp16")
    assert (M_HEALTH_AMP_SKIPPED in metrics) == (precision == "fp16")
    skipped = metrics[M_HEALTH_NAN_SKIPPED] + metrics.get(M_HEALTH_AMP_SKIPPED, 0.0)
    assert math.isfinite(metrics[fp.M_TRAIN_LOSS]) or skipped == TINY["steps_per_iter"]
    assert math.isfinite(metrics[fp.M_SAMPLE_L1])
    assert {p.dtype for p in exp.net.parameters()} == {torch.float32}  # fp32 master weights


def _data_parallel_worker(rank: int, world: int, store: str, out: str) -> None:
    """One worker of a gloo group: one iteration on its shard of every global batch."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a failed peer ends the test, not the job
    )
    try:
        exp = _build(seed=5)
        metrics = exp.train_iteration()
        torch.save({"metrics": metrics, "params": exp.net.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="this torch has no torch.distributed")
def test_two_workers_follow_one_worker_on_the_same_global_batch(tmp_path: Path) -> None:
    # each worker trains on its half of every global batch (same indices, times and eps), the
    # monitor averages the gradients: the replicas agree, and follow one worker up to float
    # summation order; the mean of the workers' slice losses is the global batch's loss
    out = str(tmp_path / "worker")
    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    workers = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    one = _build(seed=5)
    alone = one.train_iteration()
    for name, p in one.net.state_dict().items():
        assert torch.equal(workers[0]["params"][name], workers[1]["params"][name]), name
        torch.testing.assert_close(workers[0]["params"][name], p, rtol=1e-5, atol=1e-6)
    for name in (fp.M_TRAIN_LOSS, fp.M_TRAIN_MSE):
        mean = (workers[0]["metrics"][name] + workers[1]["metrics"][name]) / 2
        assert mean == pytest.approx(alone[name], rel=1e-5), name
    for name in (fp.M_SAMPLE_L1, fp.M_SPIKE_L1, fp.M_FLAT_L1):  # full evaluation on each
        assert workers[0]["metrics"][name] == workers[1]["metrics"][name], name
        assert workers[0]["metrics"][name] == pytest.approx(alone[name], rel=1e-5), name


# --- evaluation honesty -------------------------------------------------------


def test_train_val_test_share_no_window() -> None:
    # three separately simulated episode sets: no window (condition + chunk) is in two splits
    data = fp.make_dataset(fp.FAMILY.make_config(TINY))

    def rows(split: fp.Split) -> set[bytes]:
        flat = torch.cat([split.cond, split.actions.flatten(1)], 1)
        return {r.numpy().tobytes() for r in flat}

    train, val, test = rows(data["train"]), rows(data["val"]), rows(data["test"])
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)


def test_iterations_score_only_the_val_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    # val/* (what sweeps, culls and verdicts see) never touches the test windows
    exp = _build()
    seen: list[fp.Split] = []
    real = exp.evaluate
    monkeypatch.setattr(
        exp, "evaluate", lambda split, prefix: seen.append(split) or real(split, prefix)
    )
    metrics = exp.train_iteration()
    assert seen == [exp.val]
    assert not any(k.startswith("test/") for k in metrics)


@pytest.mark.parametrize(
    "arm", [{"head": "regression"}, {"readout": "mean_of_k"}, {"lds_alpha": 0.5}]
)
def test_lever_arms_see_the_same_batches(arm: dict[str, Any]) -> None:
    # data order has its own generator: an arm that draws no (or more) noise is still paired
    control, lever = _build(), _build(**arm)
    for _ in range(2):
        control.train_iteration()
        lever.train_iteration()
    assert torch.equal(control.data_gen.get_state(), lever.data_gen.get_state())
