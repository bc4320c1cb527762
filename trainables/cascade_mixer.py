"""cascade_mixer: a small cascade transformer that mixes a rhythm into a harmony.

The numerical-health showcase (shared/seeds/powermuse_training_log.txt,
FAMILIES.md "cascade_mixer"). PowerMuse's 3-stage cascade with a 0.1x residual
in its last stage exploded at epoch 3 (gradient norm 2.45 -> 6.66 -> 16.71 ->
NaN): the weak residual let the stage's output RMS collapse (1.09 against a
target of 5.69), the unclamped RMS scale factor amplified it about 5x, and the
gradients blew up. The fix was a clamp on the scale factor ([0.7, 1.5]),
spectral norm on the output projections, or two stages with full residuals.
This family reproduces that failure at a CPU-quick size, so that tunelab's
health monitor (:mod:`tunelab.health`) can be shown to catch it, name the
layer and the loss term, and so that the A/B "clamp on vs off" shows it.

Data (synthetic, generated in memory from ``data_seed``, the same for every
trial seed): a rhythmic "input" (decaying noise clicks on a beat grid) and a
harmonic "target" (a few partials under a slow tremolo). The ground-truth mix
gates the harmony by the rhythm's envelope and adds the clicks back at half
level. All three are cut into ``frames`` frames of ``frame_len`` samples and
encoded by a FIXED (never trained) random projection to ``enc_dim`` features,
so the model works on (B, T, E) frame encodings; the true mix is rescaled to
the sources' RMS.

Model: a mask agent gates both sources (sigmoid masks, kept near 50/50 by the
balance loss), then ``stages`` transformer stages run in cascade. Stage k sees
the masked sources and (k > 0) the previous stage, concatenated; its output is
``y = g_k * mean(residual sources) + 3 tanh(out_proj(transformer(...)))`` with a
learnable residual gain ``g_k`` initialised at ``residual_weights[k]`` (the
residual sources are the unmasked ones plus the previous stage, PowerMuse's
``(input + stage0 + target) / 3``), rescaled to the sources' RMS by the factor
``target_rms / (output_rms + eps)`` (module ``stages.k.scale``, clamped to
``rms_clamp`` when set; ``output_rms`` is a detached statistic).

Why it explodes: the output ``s * y`` always has the target RMS, but the
gradient reaches ``y`` multiplied by ``s`` and, ``s`` being a statistic, with a
radial part that shrinks ``y`` whenever the output's direction is imperfect
(the MSE-best magnitude is below the target's). Unclamped, shrinking ``y``
changes nothing the loss sees, so nothing resists: with a full residual the
bounded body cannot cancel ``g * mean(...)`` and ``g`` moves about ``lr`` per
step, so the collapse is slow; with ``g = 0.1`` the stage's RMS collapses
within about 100 steps, ``s`` grows hyperbolically and so does every gradient
through the stage. With the clamp, ``s <= 1.5``: a smaller ``y`` makes a
smaller output and the loss pushes back.

Loss terms (weights in the config): ``recon`` (MSE to the true mix frames),
``novelty`` (squared cosine similarity to either source: no copying),
``anti_mod`` ((1 - corr) / 2 of the output's frame envelope with the rhythm's
envelope), ``balance`` (PowerMuse's ``(m_in.mean() - 0.5)**2 + (m_tgt.mean() -
0.5)**2``) and, with ``discriminator: true``, ``adv`` (non-saturating GAN loss
of a small frame discriminator that has its own optimizer). Every optimizer
step goes through the :class:`~tunelab.health.HealthMonitor` in ``self.health``.

Measured at the default (quick) size: 30 steps of batch 16 per iteration,
lr 1.5e-3, about 0.25-0.4 s per iteration on one CPU core (2-core machine);
per-iteration max pre-clip gradient norm (``health/grad_norm_max``) and the
last stage's scale factor (``health/act_rms_max/mixer.stages.<k>.scale``),
monitor left running (``stop_on_explosion: false``), seed 1001:

- 3 stages, residuals [1, 1, 0.1], no clamp: norm 55 -> 92 -> 248 -> 704 ->
  988 -> 1420 -> 1640 (iterations 1-7), 3500-5100 by iteration 25; scale 4.3
  -> 11 -> 25 -> 56 -> 78 -> 93 -> 107, 337 by iteration 25; the last stage's
  pre-scale RMS (mean per iteration) 1.6 -> 0.76 -> 0.31 -> 0.14 -> 0.08
  against a target of 4.9 (PowerMuse: 1.09 vs 5.69), its gain g 0.13 -> 0.10
  -> 0.05 -> 0.02; every step clipped (clip 10). The default
  HealthPolicy's growth rule (x4 over two iterations, still growing) fires at
  iteration 3 (step 90): "sustained gradient growth; term recon; layer
  mixer.stages.2 x1.73; norm 248 (level 55.19, x4.49)"; for seeds 1002-1008
  at iteration 4 (step 120, norms 520-810), always naming mixer.stages.2 and
  recon. No NaN: the forward output is RMS-normalised
  by construction and Adam's steps are bounded, so gradients grow to ~5e3 but
  stay finite (25 iterations, fp32); the step rule (10x the median) never
  fires, the growth being smooth.
- the same with rms_clamp [0.7, 1.5]: norm 36 -> 17 -> 20 -> 12 -> 12 -> 9.7
  ... 10 (12 iterations), scale pinned at 1.5, no health event, val/mix_error
  0.503 at iteration 12.
- 2 stages, residuals [1, 1], clamp (the control): norm 17 -> 10 -> 9.6 -> 8.8
  ... 10.6 (12 iterations), no event, val/mix_error 0.518.
- 2 stages, no clamp: the slow version of the collapse: norm 21 -> 27 -> 31 ->
  34 ... 78, scale 1.9 -> 10 over 12 iterations (never x4 over two iterations,
  so no event), val/mix_error 0.78.

Device, precision and workers (:mod:`tunelab.devices`): the mixer, the
discriminator, their optimizer state, the pairs and the instance-noise
generator live on the trial's device (``device: auto`` is CUDA when the trial
holds a GPU); the forward passes and the loss terms run under the
``precision`` autocast (the parameters, the optimizer and the health monitor
stay fp32; fp16 adds a gradient scaler). The batch order is drawn on the CPU,
so it is the same on every device. The figures above are fp32 on the CPU,
where the defaults reproduce them bit for bit. With ``resources.workers: N``
every worker draws the same global batch (indices and instance noise) and
keeps its slice (``tunelab.devices.shard``); the monitor averages the
gradients. Every term but ``balance`` is a mean over examples, so N workers
follow one up to float summation order; ``balance`` squares the batch mean of
the masks, so each worker squares its slice's mean (an estimator of the same
quantity, not the same number). One iteration is ``steps_per_iter`` steps:
size it so an iteration fits the preemption grace period.

``search_spaces/cascade_health.yaml --quick`` (4 seeds, 6 iterations, 40 s on
2 cores): ``unclamped_3stage`` diverged at iteration 3 or 4 on every seed (verdict
crashed), ``clamped_3stage`` wins (val/mix_error -0.017), ``spectral_norm``
null, ``unclamped_2stage`` negative (+0.20).

Run it through a tunelab spec (``search_spaces/cascade_health.yaml``), or::

    seed_everything(1001)
    cfg = FAMILY.make_config({"stages": 3, "residual_weights": [1, 1, 0.1], "rms_clamp": None})
    exp = FAMILY.build(cfg, 1001, Path("/tmp"))
    for _ in range(5):
        print(exp.train_iteration()["health/grad_norm_max"])
    print([e.line() for e in exp.health.events])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass
from torch import nn

from tunelab import Family, atomic_write_json
from tunelab.devices import (
    DeviceFields,
    Placement,
    device_generator,
    load_generator_state,
    placement,
    shard,
)
from tunelab.health import HealthMonitor
from tunelab.names import HEALTH_METRICS

__all__ = [
    "FAMILY",
    "CascadeMixer",
    "CascadeMixerExperiment",
    "Config",
    "FrameDiscriminator",
    "RMSScale",
    "Stage",
    "build",
    "make_dataset",
]

# ---------------------------------------------------------------------------
# Metric names (dashboards and specs depend on them)
# ---------------------------------------------------------------------------
M_TRAIN_LOSS = "train/loss"  # weighted mixer objective, mean over the iteration's applied steps
TERMS = ("recon", "novelty", "anti_mod", "balance", "adv")  # loss terms, in culprit order
M_TRAIN_TERM = {t: f"train/{t}" for t in TERMS}  # unweighted term, mean over applied steps
M_TRAIN_DISC = "train/disc_loss"  # discriminator BCE (with discriminator: true)
M_VAL_MIX_ERROR = "val/mix_error"  # relative squared error of the mixed frames (the verdict metric)
M_VAL_ENV_CORR = "val/env_corr"  # correlation of output and rhythm frame envelopes
M_VAL_SCALE = "val/scale_factor"  # last stage's RMS scale factor, mean over val examples

#: Bound of a stage body's output per element (3 tanh): below the RMS of a full residual
#: (about 3.5 at source_rms 5), so the body cannot cancel it; a 0.1 residual it can.
BODY_BOUND = 3.0

METRICS = (
    M_TRAIN_LOSS,
    *M_TRAIN_TERM.values(),
    M_TRAIN_DISC,
    M_VAL_MIX_ERROR,
    M_VAL_ENV_CORR,
    M_VAL_SCALE,
    *HEALTH_METRICS,  # tunelab.health
)


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------
@dataclass(config=ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False))
class Config(DeviceFields):
    """cascade_mixer hyperparameters. The defaults are PowerMuse's stable fix (the control).

    Two stages with full residuals and the scale factor clamped to [0.7, 1.5];
    ``stages: 3, residual_weights: [1, 1, 0.1], rms_clamp: null`` is the
    configuration that exploded.

    Every field carries its domain (finite floats, positive sizes, sane upper
    bounds), so ``lr: -0.002`` or ``hidden: 1e9`` is refused at spec validation.
    ``device``, ``precision`` and ``deterministic`` come from
    :class:`tunelab.devices.DeviceFields`.
    """

    # --- data (synthetic, identical for every trial seed) ---
    data_seed: int = Field(default=0, ge=0)
    """Seed of the synthetic pairs and of the fixed encoder; the trial seed never changes them."""
    n_train: int = Field(default=512, ge=8, le=1_000_000)
    """Training pairs (rhythm, harmony)."""
    n_val: int = Field(default=128, ge=8, le=1_000_000)
    """Held-out pairs, scored every iteration (val/*)."""
    frames: int = Field(default=16, ge=4, le=4096)
    """T: frames per example."""
    frame_len: int = Field(default=64, ge=8, le=8192)
    """Samples per frame (frames do not overlap)."""
    enc_dim: int = Field(default=32, ge=4, le=4096)
    """E: features per frame of the fixed random-projection encoder."""
    source_rms: float = Field(default=5.0, gt=0, le=1e3)
    """Global RMS of each encoded source on train (PowerMuse's target RMS was 5.69)."""

    # --- model ---
    stages: int = Field(default=2, ge=2, le=3)
    """Cascade stages (PowerMuse: 3 exploded, 2 was the fix)."""
    residual_weights: tuple[float, ...] = (1.0, 1.0)
    """Residual weight per stage (one per stage); PowerMuse's unstable last stage had 0.1."""
    rms_clamp: tuple[float, float] | None = (0.7, 1.5)
    """Clamp [lo, hi] of the RMS scale factor (PowerMuse's fix: [0.7, 1.5]); null: unclamped."""
    rms_eps: float = Field(default=1e-8, gt=0, le=1.0)
    """eps in scale = target_rms / (output_rms + eps)."""
    spectral_norm: bool = False
    """Spectral norm on every stage's output projection (Lipschitz <= 1)."""
    hidden: int = Field(default=32, ge=8, le=4096)
    """d_model of every stage's transformer."""
    n_heads: int = Field(default=2, ge=1, le=64)
    """Attention heads (must divide hidden)."""
    n_layers: int = Field(default=1, ge=1, le=16)
    """Transformer encoder layers per stage."""

    # --- losses ---
    recon_weight: float = Field(default=1.0, ge=0, le=1e6)
    """Weight of the MSE to the true mix frames."""
    novelty_weight: float = Field(default=0.1, ge=0, le=1e6)
    """Weight of the novelty cost (squared cosine similarity to either source)."""
    anti_mod_weight: float = Field(default=0.1, ge=0, le=1e6)
    """Weight of the anti-modulation cost ((1 - envelope correlation with the rhythm) / 2)."""
    balance_weight: float = Field(default=1.0, ge=0, le=1e6)
    """Weight of the mask balance loss (PowerMuse used 15)."""
    discriminator: bool = False
    """Train a small frame discriminator (own optimizer) and add the ``adv`` term."""
    adv_weight: float = Field(default=0.05, ge=0, le=1e6)
    """Weight of the generator's adversarial term (with discriminator: true)."""
    disc_hidden: int = Field(default=32, ge=4, le=4096)
    """Width of the discriminator MLP."""
    disc_lr: float = Field(default=2e-3, gt=0, le=1.0)
    """Discriminator Adam learning rate."""

    # --- optimisation ---
    steps_per_iter: int = Field(default=30, ge=1, le=1_000_000)
    """Optimizer steps per tunelab iteration (then one validation pass): the unit of
    checkpoints, so one iteration must fit the preemption grace period."""
    batch_size: int = Field(default=16, ge=1, le=65_536)
    """Pairs per optimizer step (sampled with replacement by the seeded data generator); the
    global batch: with N workers each trains on batch_size / N of them."""
    lr: float = Field(default=1.5e-3, gt=0, le=1.0)
    """Adam learning rate of the mixer (constant)."""
    weight_decay: float = Field(default=0.0, ge=0, le=10.0)
    """AdamW weight decay of the mixer."""
    grad_clip: float = Field(default=10.0, gt=0, le=1e6)
    """Max global gradient norm per step (PowerMuse: 10), applied after it is measured."""

    # --- evaluation ---
    eval_seed: int = Field(default=12345, ge=0)
    """Seed of the evaluation generator (val batches), re-created for every evaluation."""
    plot_examples: int = Field(default=3, ge=1, le=32)
    """Val examples drawn in export's PNG."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        if len(self.residual_weights) != self.stages:
            raise ValueError(
                f"residual_weights has {len(self.residual_weights)} entries, but must have one per "
                f"stage ({self.stages}), e.g. [1.0, 1.0, 0.1] for stages: 3"
            )
        if any(not 0 <= w <= 10 for w in self.residual_weights):
            raise ValueError(
                f"residual_weights are {self.residual_weights}, but must be in [0, 10]"
            )
        if self.rms_clamp is not None:
            lo, hi = self.rms_clamp
            if not 0 < lo <= 1 <= hi <= 1e3:
                raise ValueError(
                    f"rms_clamp is {self.rms_clamp}, but must be [lo, hi] with 0 < lo <= 1 <= hi, "
                    "e.g. [0.7, 1.5]"
                )
        if self.hidden % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide hidden ({self.hidden})")
        return self


# ---------------------------------------------------------------------------
# Data: rhythm + harmony, their gated mix, a fixed frame encoder
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Split:
    """One split of encoded pairs."""

    rhythm: torch.Tensor
    """(N, T, E) encoded rhythmic input."""
    harmony: torch.Tensor
    """(N, T, E) encoded harmonic target."""
    mix: torch.Tensor
    """(N, T, E) encoded true mix, rescaled to the RMS of cat(rhythm, harmony)."""
    rhythm_env: torch.Tensor
    """(N, T) frame RMS envelope of the rhythm waveform."""

    def to(self, device: torch.device) -> Split:
        """The split on ``device`` (itself when it is there already)."""
        return Split(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


_DATA_FIELDS = ("data_seed", "n_train", "n_val", "frames", "frame_len", "enc_dim", "source_rms")


def make_dataset(cfg: Config) -> dict[str, Split]:
    """train / val splits, a pure function of the data fields of ``cfg`` (cached per process)."""
    return _dataset_cached(tuple(getattr(cfg, f) for f in _DATA_FIELDS))


@functools.lru_cache(maxsize=4)
def _dataset_cached(key: tuple[Any, ...]) -> dict[str, Split]:
    p = dict(zip(_DATA_FIELDS, key, strict=True))
    gen = torch.Generator().manual_seed(p["data_seed"])
    T, L, E = p["frames"], p["frame_len"], p["enc_dim"]
    proj = torch.randn(L, E, generator=gen) / math.sqrt(L)  # (L, E) the fixed encoder
    out: dict[str, Split] = {}
    gains: list[float] = []
    for name in ("train", "val"):
        waves = _waveforms(p[f"n_{name}"], T * L, L, gen)  # 3 x (N, T*L), (N, T)
        enc = [w.view(-1, T, L) @ proj for w in waves[:3]]  # 3 x (N, T, E)
        if not gains:  # train's global RMS of each source sets both splits' fixed gains
            gains = [p["source_rms"] / float(e.square().mean().sqrt()) for e in enc[:2]]
        r, h = enc[0] * gains[0], enc[1] * gains[1]  # (N, T, E), global RMS source_rms on train
        ref = _rms(torch.cat([r, h], -1))  # (N, 1, 1)
        out[name] = Split(r, h, enc[2] * ref / _rms(enc[2]), waves[3])
    return out


def _waveforms(
    n: int, length: int, frame_len: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, length) rhythm, harmony, mix and the (n, T) rhythm frame envelope."""
    t = torch.arange(length, dtype=torch.float32)  # (S,)
    # rhythm: decaying noise clicks every `period` samples (1-3 frames), random phase
    period = torch.randint(frame_len, 3 * frame_len + 1, (n, 1), generator=gen).float()
    phase = torch.rand(n, 1, generator=gen) * period
    since = torch.remainder(t - phase, period)  # (n, S) samples since the last beat
    decay = frame_len / 4 * (0.5 + torch.rand(n, 1, generator=gen))
    amp = 0.5 + 0.5 * torch.rand(n, 1, generator=gen)
    envelope = amp * torch.exp(-since / decay)  # (n, S)
    rhythm = envelope * torch.randn(n, length, generator=gen)
    # harmony: three partials of f0 (cycles/sample) under a slow tremolo
    f0 = 0.01 + 0.04 * torch.rand(n, 1, generator=gen)
    harmony = torch.zeros(n, length)
    for k, a in enumerate((1.0, 0.5, 0.25), start=1):
        ph = 2 * math.pi * torch.rand(n, 1, generator=gen)
        harmony = harmony + a * torch.sin(2 * math.pi * k * f0 * t + ph)
    lfo = 0.75 + 0.25 * torch.sin(
        2 * math.pi * t / length + 2 * math.pi * torch.rand(n, 1, generator=gen)
    )
    harmony = harmony * lfo
    # the mix: harmony gated by the rhythm's (normalised) envelope, plus the clicks at half level
    gate = envelope / envelope.amax(1, keepdim=True)
    mix = gate * harmony + 0.5 * rhythm
    frame_env = rhythm.view(n, -1, frame_len).square().mean(-1).sqrt()  # (n, T)
    return rhythm, harmony, mix, frame_env


def _rms(x: torch.Tensor) -> torch.Tensor:
    """(B, T, E) -> (B, 1, 1) RMS over frames and features."""
    return x.square().mean((1, 2), keepdim=True).sqrt()


# ---------------------------------------------------------------------------
# Model: mask agent + cascade of transformer stages with RMS scaling
# ---------------------------------------------------------------------------
class RMSScale(nn.Module):
    """The factor that rescales a stage's output to the target RMS (a module, so it can be watched).

    ``scale = target_rms / (output_rms + eps)``, clamped to ``clamp`` when set
    (PowerMuse model_simple_transformer.py, "RMS Scaling"). ``output_rms`` is a
    statistic (detached, like PowerMuse's amplitude scale): gradients reach the
    stage output multiplied by the factor, never through the RMS itself.
    """

    def __init__(self, clamp: tuple[float, float] | None, eps: float) -> None:
        super().__init__()
        self.clamp, self.eps = clamp, eps

    def forward(self, y: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
        """(B, T, E) output, (B, 1, 1) target RMS -> (B, 1, 1) factor."""
        # a statistic: no gradient flows through the output RMS (PowerMuse's amplitude scale)
        r = _rms(y).detach()  # (B, 1, 1)
        scale = target_rms / (r + self.eps)
        if self.clamp is not None:
            scale = scale.clamp(self.clamp[0], self.clamp[1])
        return scale


class Stage(nn.Module):
    """One cascade stage: ``scale(y) * y`` with ``y = g * mean(residuals) + 3 tanh(out_proj(h))``.

    ``h = transformer(in_proj(concat(inputs)) + pos)``; ``g`` is a learnable
    residual gain initialised at the stage's ``residual_weights`` entry.
    Submodules ``pre`` (y before scaling) and ``scale`` (the factor) are what
    the health monitor watches.
    """

    def __init__(self, n_sources: int, cfg: Config, residual_weight: float) -> None:
        super().__init__()
        E, H = cfg.enc_dim, cfg.hidden
        self.in_proj = nn.Linear(n_sources * E, H)
        self.pos = nn.Parameter(0.02 * torch.randn(cfg.frames, H))
        layer = nn.TransformerEncoderLayer(
            H, cfg.n_heads, dim_feedforward=2 * H, dropout=0.0, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        out_proj: nn.Module = nn.Linear(H, E)
        if cfg.spectral_norm:
            out_proj = nn.utils.parametrizations.spectral_norm(out_proj)
        self.out_proj = out_proj
        # learnable residual gain, initialised at the configured weight (LayerScale-style)
        self.res_gain = nn.Parameter(torch.tensor(float(residual_weight)))
        self.pre = nn.Identity()  # the output before scaling (watched: its RMS collapses)
        self.scale = RMSScale(cfg.rms_clamp, cfg.rms_eps)

    def forward(
        self, inputs: list[torch.Tensor], residuals: list[torch.Tensor], target_rms: torch.Tensor
    ) -> torch.Tensor:
        """inputs, residuals: k x (B, T, E); target_rms: (B, 1, 1) -> (B, T, E)."""
        x = torch.cat(inputs, -1)  # (B, T, k*E)
        h = self.body(self.in_proj(x) + self.pos)  # (B, T, H)
        residual = torch.stack(residuals).mean(0)  # (B, T, E) averaged: no source dominates
        body = BODY_BOUND * torch.tanh(self.out_proj(h))  # (B, T, E) bounded by BODY_BOUND
        y = self.pre(self.res_gain * residual + body)  # (B, T, E) before scaling
        return y * self.scale(y, target_rms)


class CascadeMixer(nn.Module):
    """(rhythm, harmony) -> (mix, rhythm mask, harmony mask), all (B, T, E)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        E = cfg.enc_dim
        self.agent = nn.Linear(2 * E, 2 * E)  # mask logits for both sources
        self.stages = nn.ModuleList(
            Stage(2 if k == 0 else 3, cfg, w) for k, w in enumerate(cfg.residual_weights)
        )

    def forward(
        self, rhythm: torch.Tensor, harmony: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        target_rms = _rms(torch.cat([rhythm, harmony], -1))  # (B, 1, 1)
        m_r, m_h = torch.sigmoid(self.agent(torch.cat([rhythm, harmony], -1))).chunk(2, -1)
        r, h = rhythm * m_r, harmony * m_h  # (B, T, E) masked sources
        y = self.stages[0]([r, h], [rhythm, harmony], target_rms)
        for stage in self.stages[1:]:
            y = stage([r, h, y], [rhythm, harmony, y], target_rms)
        return y, m_r, m_h


class FrameDiscriminator(nn.Module):
    """(B, T, E) frames -> (B, T) real/fake logits."""

    def __init__(self, enc_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(enc_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames).squeeze(-1)


# ---------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------
def novelty_cost(y: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
    """Mean over sources of cos^2(y, source) per example (0: orthogonal to both; no copying)."""
    flat = y.flatten(1)  # (B, T*E)
    cos = [F.cosine_similarity(flat, s.flatten(1), dim=1).square() for s in sources]  # (B,) each
    return torch.stack(cos).mean()


def envelope(x: torch.Tensor) -> torch.Tensor:
    """(B, T, E) -> (B, T) frame RMS."""
    return x.square().mean(-1).add(1e-12).sqrt()


def env_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, T), (B, T) -> (B,) Pearson correlation over frames."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)


def anti_mod_cost(y: torch.Tensor, rhythm_env: torch.Tensor) -> torch.Tensor:
    """(1 - corr(envelope(y), rhythm envelope)) / 2, mean over the batch: 0 when y follows the beat."""
    return ((1 - env_corr(envelope(y), rhythm_env)) / 2).mean()


def balance_cost(m_r: torch.Tensor, m_h: torch.Tensor) -> torch.Tensor:
    """PowerMuse's balance_loss: (m_in.mean() - 0.5)**2 + (m_tgt.mean() - 0.5)**2."""
    return (m_r.mean() - 0.5) ** 2 + (m_h.mean() - 0.5) ** 2


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------
class CascadeMixerExperiment:
    """One trial: data, mixer (+ discriminator), optimizers, health monitor, seeded generators.

    Everything lives on ``self.place.device`` but the data-order generator (CPU).

    Raises:
        tunelab.devices.DeviceUnavailable: ``device: cuda`` and no CUDA device is visible.
    """

    def __init__(self, cfg: Config, seed: int) -> None:
        self.cfg = cfg
        self.place: Placement = placement(cfg)
        device = self.place.device
        data = make_dataset(cfg)
        self.train, self.val = data["train"].to(device), data["val"].to(device)
        # Init uses the global torch RNG that tunelab seeded with ``seed`` (on the CPU, then moved).
        self.mixer = CascadeMixer(cfg).to(device)
        self.disc = FrameDiscriminator(cfg.enc_dim, cfg.disc_hidden).to(device)
        self.model = nn.ModuleDict({"mixer": self.mixer, "disc": self.disc})
        self.opt = torch.optim.AdamW(
            self.mixer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999))
        optimizers: dict[str, torch.optim.Optimizer] = {"mixer": self.opt}
        if cfg.discriminator:
            optimizers["disc"] = self.opt_d
        watch = [f"mixer.stages.{k}.{m}" for k in range(cfg.stages) for m in ("pre", "scale")]
        self.health = HealthMonitor(
            self.model,
            optimizers,
            clip=cfg.grad_clip,
            watch=watch,
            scaler=self.place.grad_scaler(),  # fp16 only
        )
        # Separate streams: the discriminator's draws never shift the data order. The order
        # is drawn on the CPU (the same on every device); the instance noise on the device.
        self.data_gen = torch.Generator().manual_seed(seed)
        self.disc_gen = device_generator(seed + 0x9E3779B9, device)
        self.weights = {
            "recon": cfg.recon_weight,
            "novelty": cfg.novelty_weight,
            "anti_mod": cfg.anti_mod_weight,
            "balance": cfg.balance_weight,
            "adv": cfg.adv_weight,
        }
        self.iteration = 0

    # --- training ---
    def _mixer_losses(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The named (unweighted, fp32) mixer loss terms for batch ``idx``, and the output (B, T, E)."""
        s = self.train
        r, h = s.rhythm[idx], s.harmony[idx]  # (B, T, E)
        with self.place.autocast():
            y, m_r, m_h = self.mixer(r, h)
            losses = {
                "recon": F.mse_loss(y, s.mix[idx]),
                "novelty": novelty_cost(y, r, h),
                "anti_mod": anti_mod_cost(y, s.rhythm_env[idx]),
                "balance": balance_cost(m_r, m_h),
            }
            if self.cfg.discriminator:
                fake = self.disc(y)  # (B, T)
                losses["adv"] = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
        return {k: v.float() for k, v in losses.items()}, y

    def _disc_loss(self, idx: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Discriminator BCE on this worker's pairs ``idx`` and the mixer's output ``fake``."""
        real = self.train.mix[idx]  # (B, T, E)
        # instance noise, drawn for the global batch (the same draws with any number of workers)
        shape = (self.cfg.batch_size, *real.shape[1:])
        noise = shard(0.05 * torch.randn(shape, generator=self.disc_gen, device=real.device))
        with self.place.autocast():
            lr, lf = self.disc(real + noise), self.disc(fake.detach() + noise)  # (B, T) each
            loss = F.binary_cross_entropy_with_logits(
                lr, torch.ones_like(lr)
            ) + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
        return loss.float()

    def train_iteration(self) -> dict[str, float]:
        """``steps_per_iter`` mixer steps (and discriminator steps), then a validation pass.

        Raises:
            tunelab.health.TrialDiverged: the health policy ended the trial.
        """
        cfg = self.cfg
        self.model.train()
        sums = dict.fromkeys(("loss", *TERMS), 0.0)
        d_sum, applied, d_applied = 0.0, 0, 0
        for _ in range(cfg.steps_per_iter):
            idx = torch.randint(
                0, self.train.mix.shape[0], (cfg.batch_size,), generator=self.data_gen
            )  # the global batch, drawn on the CPU
            idx = shard(idx.to(self.place.device))  # this worker's pairs (all of them with one)
            losses, y = self._mixer_losses(idx)
            step = self.health.step(losses, self.weights, optimizer="mixer")
            if step.applied:
                applied += 1
                sums["loss"] += step.total
                for k, v in step.values.items():
                    sums[k] += v
            if cfg.discriminator:
                d_step = self.health.step({"disc": self._disc_loss(idx, y)}, optimizer="disc")
                if d_step.applied:
                    d_applied += 1
                    d_sum += d_step.total
        self.iteration += 1
        nan = math.nan
        metrics = {M_TRAIN_LOSS: sums["loss"] / applied if applied else nan}
        for k in TERMS:
            if k != "adv" or cfg.discriminator:
                metrics[M_TRAIN_TERM[k]] = sums[k] / applied if applied else nan
        if cfg.discriminator:
            metrics[M_TRAIN_DISC] = d_sum / d_applied if d_applied else nan
        metrics.update(self.evaluate())
        metrics.update(self.health.end_iteration())
        return metrics

    # --- evaluation ---
    @torch.no_grad()
    def predict(self, rhythm: torch.Tensor, harmony: torch.Tensor) -> torch.Tensor:
        """(N, T, E) sources -> (N, T, E) mixed frames (eval mode)."""
        self.model.eval()
        self._scale_seen: list[torch.Tensor] = []
        scale: nn.Module = self.mixer.stages[-1].scale  # type: ignore[assignment]
        hook = scale.register_forward_hook(lambda mod, args, out: self._scale_seen.append(out))
        try:
            with self.place.autocast():
                y, _, _ = self.mixer(rhythm, harmony)
        finally:
            hook.remove()
        return y.float()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """val/* on the held-out pairs (the whole split, in a fixed order; no randomness)."""
        v = self.val
        y = self.predict(v.rhythm, v.harmony)  # (N, T, E)
        err = (y - v.mix).square().sum((1, 2)) / v.mix.square().sum((1, 2))  # (N,)
        return {
            M_VAL_MIX_ERROR: float(err.mean()),
            M_VAL_ENV_CORR: float(env_corr(envelope(y), v.rhythm_env).mean()),
            M_VAL_SCALE: float(self._scale_seen[-1].float().mean()),
        }

    # --- checkpointing ---
    def state_dict(self) -> dict[str, Any]:
        """Models, both optimizers, own generators, counters (tunelab saves the health state).

        Tensors may live on the trial's device; :meth:`load_state_dict` takes them from any
        device (``torch.load(..., map_location="cpu")`` included) onto its own.
        """
        return {
            "mixer": self.mixer.state_dict(),
            "disc": self.disc.state_dict(),
            "optimizer": self.opt.state_dict(),
            "disc_optimizer": self.opt_d.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "disc_gen": self.disc_gen.get_state(),
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixer.load_state_dict(state["mixer"])
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["optimizer"])
        self.opt_d.load_state_dict(state["disc_optimizer"])  # moved to the parameters' device
        load_generator_state(self.data_gen, state["data_gen"], name="cascade_mixer data_gen")
        load_generator_state(self.disc_gen, state["disc_gen"], name="cascade_mixer disc_gen")
        self.iteration = int(state["iteration"])

    # --- artifacts ---
    def export(self, out_dir: Path) -> dict[str, Any]:
        """Write metrics.json (final val metrics) and mix.png; return manifest fields."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest: dict[str, Any] = {
            "metrics": self.evaluate(),
            "iteration": self.iteration,
            "stages": self.cfg.stages,
            "device": str(self.place.device),
            "precision": self.place.precision,
            "config": dataclasses.asdict(self.cfg),
            "files": ["metrics.json", "mix.png"],
        }
        atomic_write_json(out_dir / "metrics.json", manifest)
        self._plot(out_dir / "mix.png")
        return manifest

    def _plot(self, path: Path) -> None:
        """Rhythm, harmony, true and predicted mix frames (T x E images) of the first val pairs."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = min(self.cfg.plot_examples, self.val.mix.shape[0])
        v = self.val.to(torch.device("cpu"))
        pred = self.predict(self.val.rhythm[:n], self.val.harmony[:n]).cpu()  # (n, T, E)
        rows = {"rhythm": v.rhythm, "harmony": v.harmony, "true mix": v.mix, "predicted": pred}
        fig = Figure(figsize=(2.2 * n, 7))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(rows), n, squeeze=False)
        for r, (name, x) in enumerate(rows.items()):
            for j in range(n):
                ax = axes[r][j]
                ax.imshow(x[j].T.numpy(), aspect="auto", origin="lower", cmap="magma")
                ax.set_title(f"val #{j} {name}", fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(path, dpi=72)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
def build(config: Config, seed: int, data_root: Path) -> CascadeMixerExperiment:
    """tunelab entry point. ``data_root`` is unused: the pairs are generated in memory."""
    del data_root
    return CascadeMixerExperiment(config, seed)


FAMILY = Family(
    name="cascade_mixer",
    config_cls=Config,
    build=build,
    metrics=METRICS,
    description="Cascade transformer mixing a rhythm into a harmony (numerical-health showcase).",
)
