"""Tests for the ouroboros family (trainables/ouroboros.py): data, integrator, losses, contract."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import soundfile as sf
import torch

from trainables import ouroboros as O
from tunelab import load_state, save_state, seed_everything
from tunelab.devices import DeviceUnavailable
from tunelab.health import HealthPolicy
from tunelab.names import M_HEALTH_AMP_SKIPPED, M_HEALTH_NAN_SKIPPED, is_per_name_health_metric

# A tiny size: every build + iteration takes well under a second on one core.
TINY: dict[str, Any] = {
    "sample_rate": 8000,
    "hidden": 8,
    "n_layers": 1,
    "ssm_state": 4,
    "n_train_files": 6,
    "n_val_files": 2,
    "n_test_files": 2,
    "syllables_per_file": 2,
    "syllable_ms": (40.0, 60.0),
    "lead_silence_ms": (20.0, 30.0),
    "gap_ms": (20.0, 30.0),
    "silence_prefix_ms": 5.0,
    "silence_suffix_ms": 5.0,
    "max_segs": 40,
    "H_min": 64,
    "H_max": 128,
    "curriculum_epochs": 4,
    "mrstft_ffts": (32, 64, 128),
    "batch_size": 4,
    "steps_per_iter": 2,
    "n_eval_windows": 2,
    "eval_lead_ms": 10.0,
    "eval_voc_ms": 30.0,
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def make(seed: int, data_root: Path, **over: Any) -> O.OuroborosExperiment:
    cfg = O.FAMILY.make_config({**TINY, **over})
    seed_everything(seed)
    return O.build(cfg, seed, data_root)


# --- data ---------------------------------------------------------------------


def test_synthetic_corpus_is_written_as_wav_plus_txt(data_root: Path) -> None:
    # every generated recording is a {stem}.wav with a matching {stem}.txt
    cfg = O.FAMILY.make_config(TINY)
    folder = O.ensure_corpus(cfg, data_root)
    stems = O.list_stems(folder)
    assert len(stems) == 6 + 2 + 2
    assert sorted(p.stem for p in folder.glob("*.txt")) == stems
    info = sf.info(folder / f"{stems[0]}.wav")
    assert info.samplerate == 8000
    assert info.subtype == "PCM_16"
    assert O.read_annotations(folder / f"{stems[0]}.txt").shape == (2, 2)


def test_recording_round_trips_through_wav_and_txt(tmp_path: Path) -> None:
    # what write_recording writes, load_recording reads back (int16, peak-normalised)
    sr = 8000
    t = np.arange(sr // 4) / sr
    x = 0.6 * np.sin(2 * np.pi * 440 * t)
    syl = np.array([[0.0125, 0.1], [0.15, 0.2]])
    O.write_recording(tmp_path, "bird", x, sr, syl)
    rec = O.load_recording(tmp_path, "bird", sr, norm_peak=0.5)
    np.testing.assert_allclose(rec.x, 0.5 * x / np.abs(x).max(), atol=1e-3)
    np.testing.assert_array_equal(rec.syllables, np.rint(syl * sr))


def test_loader_resamples_real_recordings_to_the_working_rate(tmp_path: Path) -> None:
    # a 16 kHz file read at 8 kHz: half the samples, annotations in 8 kHz samples
    t = np.arange(16000 // 4) / 16000
    O.write_recording(
        tmp_path, "real", 0.5 * np.sin(2 * np.pi * 300 * t), 16000, np.array([[0.05, 0.2]])
    )
    rec = O.load_recording(tmp_path, "real", 8000, norm_peak=0.5)
    assert len(rec.x) == 2000
    np.testing.assert_array_equal(rec.syllables, [[400, 1600]])


def test_corpus_folder_depends_on_data_fields_only(tmp_path: Path) -> None:
    # model/optimiser keys share the corpus; data-generation keys get their own
    base = O.FAMILY.make_config(TINY)
    assert O.corpus_dir(base, tmp_path) == O.corpus_dir(
        O.FAMILY.make_config({**TINY, "hidden": 32}), tmp_path
    )
    assert O.corpus_dir(base, tmp_path) != O.corpus_dir(
        O.FAMILY.make_config({**TINY, "data_seed": 7}), tmp_path
    )


def test_file_level_holdout_is_disjoint_and_deterministic() -> None:
    stems = [f"f{i:02d}" for i in range(20)]
    train, val, test = O.split_files(stems, 3, 4, 0, seed=5)
    assert (len(train), len(val), len(test)) == (13, 3, 4)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert sorted(train + val + test) == stems
    assert O.split_files(stems, 3, 4, 0, seed=5) == (train, val, test)
    assert O.split_files(stems, 3, 4, 0, seed=6) != (train, val, test)


def test_experiment_data_is_file_disjoint_and_seed_independent(data_root: Path) -> None:
    # val/test files never train; every trial seed sees the same data
    a, b = make(0, data_root), make(1, data_root)
    files = a.data.files
    assert set(files["train"]).isdisjoint(files["val"] + files["test"])
    assert set(files["val"]).isdisjoint(files["test"])
    assert files == b.data.files
    assert torch.equal(a.data.train.x, b.data.train.x)
    assert torch.equal(a.data.val_windows, b.data.val_windows)


@pytest.mark.parametrize(
    ("ratio", "expected"), [((0.4, 0.4, 0.2), [40, 40, 20]), ((0.1, 0.6, 0.3), [10, 60, 30])]
)
def test_sampler_draws_the_category_ratio(
    ratio: tuple[float, float, float], expected: list[int]
) -> None:
    pools = {c: [(0, i) for i in range(100)] for c in (O.ONSET, O.OFFSET, O.MID)}
    picks = O.sample_segments(pools, ratio, 100, np.random.default_rng(0))
    counts = np.bincount([c for _, _, c in picks], minlength=3)
    assert counts.tolist() == expected


@pytest.mark.parametrize("onset_ratio", [0.02, 0.1, 0.4])
def test_heldout_segments_keep_onset_and_never_repeat(onset_ratio: float) -> None:
    # a rare ONSET category still lands in a held-out set; no segment is drawn twice
    pools = {O.ONSET: [(0, i) for i in range(5)], O.OFFSET: [(1, i) for i in range(60)]}
    pools[O.MID] = [(2, i) for i in range(40)]
    ratio = (onset_ratio, 0.6, 0.4 - onset_ratio)
    picks = O.heldout_segments(pools, ratio, 10, np.random.default_rng(0))
    assert any(c == O.ONSET for _, _, c in picks)
    assert len(set(picks)) == len(picks)
    small = O.heldout_segments(pools, ratio, 1000, np.random.default_rng(0))
    assert sum(c == O.ONSET for _, _, c in small) == 5  # capped by the pool, no repeats


def _rows(t: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in t}


def test_val_and_test_are_cut_from_their_own_files_only(data_root: Path) -> None:
    # the leak this pins: val/loss and test/loss segments were cut from the training files
    exp = make(0, data_root)
    cfg, data = exp.cfg, exp.data
    folder = O.corpus_dir(cfg, data_root)

    def inside(rows: torch.Tensor, split: str) -> bool:  # every row is a cut of a split's file
        names = data.files[split]
        audio = [O.load_recording(folder, n, cfg.sample_rate, cfg.norm_peak).x for n in names]
        hay = [np.lib.stride_tricks.sliding_window_view(x, rows.shape[1]) for x in audio]
        return all(any((w == row).all(1).any() for w in hay) for row in rows.numpy())

    assert inside(data.train.x, "train")
    assert inside(data.val.x, "val") and inside(data.val_windows, "val")
    assert inside(data.test.x, "test") and inside(data.test_windows, "test")
    assert (data.val.cat == O.ONSET).any() and (data.test.cat == O.ONSET).any()
    assert _rows(data.val.x).isdisjoint(_rows(data.train.x))
    assert _rows(data.test.x).isdisjoint(_rows(data.train.x) | _rows(data.val.x))


def test_iterations_never_score_the_test_files(
    data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # val/* comes from val data only; test data is touched by export alone
    exp = make(0, data_root)
    seen: list[int] = []
    real_eval, real_loss = exp.evaluate, exp.segment_loss
    monkeypatch.setattr(exp, "evaluate", lambda w: seen.append(id(w)) or real_eval(w))
    monkeypatch.setattr(exp, "segment_loss", lambda s: seen.append(id(s)) or real_loss(s))
    metrics = exp.train_iteration()
    assert not any(k.startswith("test/") for k in metrics)
    assert id(exp.data.test) not in seen and id(exp.data.test_windows) not in seen
    assert id(exp.data.val) in seen and id(exp.data.val_windows) in seen


def test_data_order_does_not_depend_on_the_noise(data_root: Path) -> None:
    # lever arms that differ only in cold-start noise draw the same batches (paired A/B)
    a = make(0, data_root)
    b = make(0, data_root, ic_noise_rms=0.01)
    for _ in range(2):
        a.train_iteration()
        b.train_iteration()
    assert torch.equal(a.data_gen.get_state(), b.data_gen.get_state())
    a.noise_gen.manual_seed(123)  # extra noise draws leave the data order alone
    torch.randn(1000, generator=a.noise_gen)
    assert torch.equal(a.data_gen.get_state(), b.data_gen.get_state())
    assert not torch.equal(a.data_gen.get_state(), make(1, data_root).data_gen.get_state())


def test_segments_hold_onsets_after_the_silence_prefix(data_root: Path) -> None:
    # ONSET segments start with near-silence and contain the vocalisation onset
    exp = make(0, data_root)
    onset = exp.data.train.x[exp.data.train.cat == O.ONSET]
    prefix = exp.cfg.ms(exp.cfg.silence_prefix_ms)
    assert onset[:, : prefix - 8].abs().amax() < 0.05
    assert (onset[:, prefix:].abs().amax(1) > 0.2).all()


# --- integrator -----------------------------------------------------------------


def _drives(degree: int, keep_const: bool, b: int = 3, h: int = 50) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(0)
    terms = O.poly_terms(degree, keep_const)
    dt = torch.float64
    om = (0.3 + 0.3 * torch.rand(b, h, generator=g, dtype=dt)).requires_grad_()
    ga = (0.05 * torch.randn(b, h, generator=g, dtype=dt)).requires_grad_()
    w = (0.3 * torch.randn(b, h, len(terms), generator=g, dtype=dt)).requires_grad_()
    x0 = (0.3 * torch.randn(b, generator=g, dtype=dt)).requires_grad_()
    v0 = (0.3 * torch.randn(b, generator=g, dtype=dt)).requires_grad_()
    model = O.PolyOuroboros(
        O.Config(
            sample_rate=8000, hidden=8, poly_degree=degree, keep_const=keep_const, osc_init=False
        )
    )
    return model, terms, x0, v0, om, ga, w


@pytest.mark.parametrize(("degree", "keep_const"), [(1, False), (3, False), (3, True), (4, False)])
def test_fast_rollout_forward_equals_naive(degree: int, keep_const: bool) -> None:
    model, terms, x0, v0, om, ga, w = _drives(degree, keep_const)
    naive = O.rk4_rollout_naive(x0, v0, om, ga, w, terms, 1.0, 0.8)
    fast = O.rk4_rollout(x0, v0, model.coefficients(om, ga, w), degree, 1.0, 0.8)
    torch.testing.assert_close(fast, naive, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("degree", "keep_const"), [(1, False), (3, False), (3, True), (4, False)])
def test_fast_rollout_gradients_equal_naive(degree: int, keep_const: bool) -> None:
    model, terms, *inputs = _drives(degree, keep_const)
    x0, v0, om, ga, w = inputs
    weight = torch.randn(om.shape, generator=torch.Generator().manual_seed(1), dtype=om.dtype)
    naive = O.rk4_rollout_naive(x0, v0, om, ga, w, terms, 1.0, 0.8)
    g_naive = torch.autograd.grad((weight * naive).sum(), inputs)
    fast = O.rk4_rollout(x0, v0, model.coefficients(om, ga, w), degree, 1.0, 0.8)
    g_fast = torch.autograd.grad((weight * fast).sum(), inputs)
    for a, b in zip(g_fast, g_naive, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rollout_is_saturated_by_soft_tanh() -> None:
    # explosive drives (strong negative damping) stay inside the saturation levels
    model, _, x0, v0, om, ga, w = _drives(3, False)
    coef = model.coefficients(om.detach(), torch.full_like(ga, -2.0), torch.zeros_like(w))
    x = O.rk4_rollout(x0.detach(), v0.detach(), coef, 3, 0.7, 0.8)
    assert torch.isfinite(x).all() and x.abs().max() <= 0.7


def test_fused_rollout_and_its_adjoint_make_no_tensor_off_their_device() -> None:
    # the meta device stands in for CUDA (no GPU here): a tensor made on the CPU inside the
    # rollout, its adjoint, the drives, the losses or closed-loop generation fails as on CUDA
    meta = torch.device("meta")
    inputs = _drives(3, False)[2:]  # x0, v0, omega, gamma, w
    model = O.PolyOuroboros(O.Config(sample_rate=8000, hidden=8, drive_lowpass_ms=0.5)).to(meta)
    x0, v0, om, ga, w = (t.detach().float().to(meta).requires_grad_() for t in inputs)
    x = O.rk4_rollout(x0, v0, model.coefficients(om, ga, w), 3, 1.0, 0.8)
    loss = O.mrstft_loss(x, x.detach() + 1, (16, 32)) + O.envelope(x, O.gaussian_kernel(2)).mean()
    grads = torch.autograd.grad(loss, (x0, v0, om, ga, w))
    assert x.device == meta and all(g.device == meta for g in grads)
    wave = torch.zeros(2, 64, device=meta)
    assert model.drives(wave, wave).w.device == meta  # encoder FFT + drive low-pass
    assert O.generate_closed_loop(model, 8, torch.zeros(2, 2, device=meta)).device == meta


def test_rollout_integrates_in_its_inputs_dtype_under_autocast() -> None:
    # under a bf16 autocast the RK4 matmuls would round every step: the rollout switches it off
    model, _, *inputs = _drives(3, False)
    x0, v0, om, ga, w = (t.detach().float() for t in inputs)
    coef = model.coefficients(om, ga, w)
    plain = O.rk4_rollout(x0, v0, coef, 3, 1.0, 0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = O.rk4_rollout(x0, v0, coef, 3, 1.0, 0.8)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_encoder_step_mode_equals_sequence_mode() -> None:
    # closed-loop generation steps the same causal SSM that training runs as a convolution
    seed_everything(0)
    cfg = O.Config(sample_rate=8000, hidden=8, ssm_state=4)
    enc = O.Encoder(cfg, 5)
    x, v = 0.3 * torch.randn(2, 200), 0.3 * torch.randn(2, 200)
    with torch.no_grad():
        seq = enc(x, v)
        state = enc.init_state(2)
        steps = []
        for k in range(200):
            out, state = enc.step(x[:, k], v[:, k], state)
            steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), seq, rtol=1e-4, atol=1e-5)


def test_osc_init_ignites_a_bounded_limit_cycle_from_noise() -> None:
    seed_everything(0)
    cfg = O.Config(sample_rate=8000, hidden=8)
    model = O.PolyOuroboros(cfg)
    ic = cfg.ic_noise_rms * torch.randn(4, 2)
    gen = O.generate_closed_loop(model, cfg.ms(80), ic)
    tail_rms = gen[:, -cfg.ms(20) :].square().mean(1).sqrt()
    assert (tail_rms > 30 * cfg.ic_noise_rms).all()
    assert gen.abs().max() < cfg.diverge_frac * cfg.sat_x


# --- losses, curriculum, score -----------------------------------------------------


def test_mrstft_drops_fft_sizes_above_the_horizon() -> None:
    assert O.mrstft_configs((64, 128, 256, 512), 200) == [(64, 16), (128, 32)]
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 200, generator=g), torch.randn(2, 200, generator=g)
    full = O.mrstft_loss(pred, target, (64, 128, 256, 512))
    torch.testing.assert_close(full, O.mrstft_loss(pred, target, (64, 128)))


def test_tf_variance_has_a_floor() -> None:
    assert O.accel_variance(torch.zeros(5, 100)) == O.TF_VAR_FLOOR


def test_tf_anchor_uses_the_training_set_variance_on_a_silent_batch(data_root: Path) -> None:
    # Var(d2x) is computed once over the training set; a silence-only batch does not blow up
    exp = make(0, data_root, lam_spec=0.0)
    assert exp.tf_var == O.accel_variance(exp.data.train.a)
    n, length = 4, exp.cfg.H_max
    silent = O.Segments(
        torch.zeros(n, length),
        torch.zeros(n, length),
        torch.zeros(n, length),
        torch.full((n,), O.MID),
    )
    parts = exp.loss_terms(silent, exp.cfg.H_min, torch.Generator().manual_seed(0))
    drives = exp.model.drives(silent.x, silent.v)
    expected = exp.model.accel(silent.x, silent.v, drives).square().mean() / exp.tf_var
    torch.testing.assert_close(parts["tf"], expected)
    assert float(parts["tf"].detach()) < 1.0
    exp.train_iteration()
    assert exp.tf_var == O.accel_variance(exp.data.train.a)


def test_nan_step_is_skipped_and_counted(data_root: Path) -> None:
    exp = make(0, data_root)
    exp.health.policy = HealthPolicy(max_consecutive_skips=0)  # skip, never end the trial
    exp.data.train.x[:] = math.nan  # poison every training segment
    before = [p.detach().clone() for p in exp.model.parameters()]
    metrics = exp.train_iteration()
    assert metrics[M_HEALTH_NAN_SKIPPED] == exp.cfg.steps_per_iter
    assert all(torch.equal(a, b) for a, b in zip(before, exp.model.parameters(), strict=True))


def _tone_windows(n: int = 3, lead: int = 160, voc: int = 640) -> torch.Tensor:
    t = torch.arange(voc) / 8000
    tone = 0.4 * torch.sin(2 * torch.pi * 800 * t)
    return torch.cat([1e-3 * torch.randn(n, lead), tone.expand(n, voc)], 1)


@pytest.mark.parametrize("kind", ["nan", "inf", "saturated"])
def test_divergent_rollout_scores_the_sentinel(kind: str) -> None:
    cfg = O.Config(sample_rate=8000, eval_lead_ms=20.0)
    target = _tone_windows()
    gen = {
        "nan": torch.full_like(target, math.nan),
        "inf": target.clone(),
        "saturated": target.sign() * 0.99,
    }[kind]
    if kind == "inf":
        gen[:, 300] = math.inf
    scores = O.autonomy_scores(gen, target, cfg.ms(20.0), cfg)
    assert scores["autonomy"] == O.AUTONOMY_SENTINEL
    assert scores["bounded_frac"] == 0.0
    assert all(math.isfinite(v) for v in scores.values())


def test_copy_of_the_target_scores_near_one() -> None:
    cfg = O.Config(sample_rate=8000, eval_lead_ms=20.0)
    target = _tone_windows()
    scores = O.autonomy_scores(target.clone(), target, cfg.ms(20.0), cfg)
    assert scores["spec_corr"] == pytest.approx(1.0)
    assert scores["amp_pen"] == pytest.approx(0.0, abs=1e-9)
    assert scores["pitch_pen"] == pytest.approx(0.0, abs=1e-9)
    assert scores["bounded_frac"] == 1.0


def test_silent_rollout_scores_below_a_loud_one() -> None:
    cfg = O.Config(sample_rate=8000, eval_lead_ms=20.0)
    target = _tone_windows()
    silent = O.autonomy_scores(torch.zeros_like(target), target, cfg.ms(20.0), cfg)
    detuned = O.autonomy_scores(_tone_windows().roll(7, 1), target, cfg.ms(20.0), cfg)
    assert silent["amp_pen"] > 5 and silent["autonomy"] < detuned["autonomy"]


@pytest.mark.parametrize("schedule", ["const", "linear", "geom", "pow2"])
def test_horizon_schedules_ramp_from_h_min_to_h_max(schedule: str) -> None:
    hs = [O.horizon_for_epoch(e, schedule, 128, 1000, 10) for e in range(12)]
    assert hs[0] == (1000 if schedule == "const" else 128)
    assert hs[9] == hs[11] == 1000
    assert hs == sorted(hs)


def test_pow2_schedule_uses_factor_of_two_buckets() -> None:
    hs = [O.horizon_for_epoch(e, "pow2", 128, 1000, 8) for e in range(8)]
    assert hs == [128, 128, 256, 256, 512, 512, 1000, 1000]
    assert [O.horizon_for_epoch(e, "pow2", 512, 2048, 6) for e in range(6)] == [
        512,
        512,
        1024,
        1024,
        2048,
        2048,
    ]


def test_loss_weights_ramp_over_their_warmups(data_root: Path) -> None:
    exp = make(0, data_root, spec_warmup_epochs=4, env_warmup_epochs=2)
    seen = []
    for epoch in range(5):
        exp.epoch = epoch
        seen.append((exp.weights()["spec"], exp.weights()["env"]))
    assert seen == [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 1.0), (1.0, 1.0)]


# --- config and the tunelab contract ------------------------------------------------


def test_config_rejects_unknown_keys_and_bad_horizons() -> None:
    with pytest.raises(pydantic.ValidationError):
        O.FAMILY.make_config({"hiden": 16})
    with pytest.raises(pydantic.ValidationError, match="H_min"):
        O.FAMILY.make_config({"H_min": 2048, "H_max": 1024})


def test_quick_config_is_valid() -> None:
    cfg = O.FAMILY.make_config(O.QUICK_CONFIG)
    assert cfg.H_max == O.QUICK_CONFIG["H_max"]


def test_iteration_reports_every_declared_metric(data_root: Path) -> None:
    metrics = make(0, data_root).train_iteration()
    # besides the declared ones: one health metric per layer and loss term (tunelab.health)
    names = {k for k in metrics if not is_per_name_health_metric(k)}
    assert names == set(O.FAMILY.metrics)
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_a_gpu_is_refused_before_any_data_is_made(tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailable, match="device: cuda"):
        make(0, tmp_path, device="cuda")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_an_iteration_on_the_cpu(data_root: Path, precision: str) -> None:
    # the encoder under autocast, the ODE in fp32; fp16 through a gradient scaler
    exp = make(0, data_root, device="cpu", precision=precision)
    metrics = exp.train_iteration()
    assert isinstance(exp.health.scaler, torch.amp.GradScaler) == (precision == "fp16")
    assert (M_HEALTH_AMP_SKIPPED in metrics) == (precision == "fp16")
    skipped = metrics[M_HEALTH_NAN_SKIPPED] + metrics.get(M_HEALTH_AMP_SKIPPED, 0.0)
    assert math.isfinite(metrics[O.M_TRAIN_LOSS]) or skipped == TINY["steps_per_iter"]
    assert math.isfinite(metrics[O.M_VAL_AUTONOMY])
    assert {p.dtype for p in exp.model.parameters()} == {torch.float32}  # fp32 master weights


def test_resume_is_bit_exact(data_root: Path, tmp_path: Path) -> None:
    n = 2
    a = make(3, data_root)
    for _ in range(2 * n):
        last_a = a.train_iteration()
    b = make(3, data_root)
    for _ in range(n):
        b.train_iteration()
    save_state(tmp_path, b.state_dict(), iteration=n)
    c = make(99, data_root)  # a different seed: the restore must do all the work
    payload = load_state(tmp_path)  # torch.load(map_location="cpu", weights_only=True)
    c.load_state_dict(payload["family"])
    for _ in range(n):
        last_c = c.train_iteration()
    for (name, pa), pc in zip(a.model.named_parameters(), c.model.parameters(), strict=True):
        assert torch.equal(pa, pc), name
    assert last_a == last_c


def test_export_writes_readable_wav_and_png_with_finite_scores(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    titles: list[str | None] = []
    plot = O._plot_spectrograms

    def spy(*args: Any, title: str | None = None) -> None:
        titles.append(title)
        plot(*args, title=title)

    monkeypatch.setattr(O, "_plot_spectrograms", spy)
    exp = make(0, data_root, listen_s=0.1)  # longer than the 40 ms test window
    exp.train_iteration()
    out = tmp_path / "trial_00007"  # a trial's export folder is named by its trial id
    manifest = exp.export(out)
    audio, sr = sf.read(out / "generated.wav")
    assert sr == manifest["sample_rate"] == 8000
    assert (manifest["device"], manifest["precision"]) == ("cpu", "fp32")
    # the deployed generation lasts listen_s, not one test window
    assert sf.info(out / "generated.wav").duration == pytest.approx(0.1)
    assert manifest["generated_s"] == pytest.approx(0.1)
    assert len(audio) > exp.data.test_windows.shape[1] and np.isfinite(audio).all()
    assert np.abs(audio).max() <= 1.0
    assert (out / "spectrogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    autonomy = manifest["deployed"]["deployed/autonomy"]
    assert titles == [f"seed 0 · trial trial_00007 · deployed autonomy {autonomy:.4g}"]
    assert set(manifest["files"]) <= {p.name for p in out.iterdir()}
    scores = {**manifest["val"], **manifest["test"]}
    assert {f"test/{k}" for k in O.SCORE_KEYS} <= set(scores)
    assert all(math.isfinite(v) for v in scores.values())
