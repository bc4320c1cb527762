"""flow_policy: a flow-matching action-chunk policy on a synthetic control task.

The lever A/B showcase (shared/seeds/action_flow_matching_pr.txt, FAMILIES.md).
A PD expert drives a 2-channel double integrator (longitudinal, lateral) that
tracks a route; about 5% of the action values belong to rare, large maneuver
pulses that the route preview announces with timing/amplitude jitter, and some
announced pulses are never executed (``route_phantom_rate``: the ambiguity that
makes a model under-commit on maneuvers). The policy sees the state/action
history plus the route preview and predicts the next ``horizon`` actions as one
chunk.

Model: a velocity network v(x_t, t, cond) made of residual MLP blocks with
AdaLN modulation from a sinusoidal flow-time embedding plus the condition
(DiT-style, zero-init gates), trained by conditional flow matching
(x_t = (1 - t) eps + t a, target a - eps; t = 0 is noise) and sampled with
Heun's method. ``head: regression`` swaps in a capacity-matched deterministic
chunk regressor: the control that asks whether flow earns its complexity.

Levers (every one defaults to "off", so the default config is the control):
``gaussianize``, ``lds_alpha`` (LDS, Yang et al. 2021), ``chunk_delta_weight``,
``time_sampling`` and ``readout``.

Evaluation splits: train, val and test are windows cut from three separate sets
of simulated episodes (one ``SeedSequence(data_seed)`` child stream each, so no
window, episode or maneuver is shared between splits; the same for every trial
seed). Training fits everything it fits (condition normalisation, the
Gaussianising transform, LDS weights) on train only. Every iteration scores the
val windows (``val/*``: what sweeps, culls and lever verdicts see); the test
windows are scored only by ``export`` (the manifest's ``test/*`` metrics), never
as an iteration metric. There is no early stopping. The trial seed feeds two
generators, one for the batch order and one for the flow noise (times and
eps), so lever arms that draw different amounts of noise see the same batches.
The data is generated in memory (nothing read from disk, so no data check).

Device, precision and workers (:mod:`tunelab.devices`): the network, its
optimizer state, the windows (train, val, test, the fitted transform and LDS
weights) and the flow-noise generator live on the trial's device (``device:
auto`` is CUDA when the trial holds a GPU); the network's forward passes, in
training and in the Heun sampler, run under the ``precision`` autocast while
the losses, the integration state and the parameters stay fp32 (fp16 adds a
gradient scaler). The batch order is drawn on the CPU, so it is the same on
every device; on CUDA the flow noise comes from a CUDA generator (same seed,
another stream). With ``resources.workers: N`` every worker draws the same
global batch (indices, flow times and eps) and keeps its slice
(``tunelab.devices.shard``); the loss is a mean over examples and the monitor
averages the gradients, so N workers follow one up to float summation order.
One iteration is ``steps_per_iter`` steps: size it so an iteration fits the
preemption grace period.

Quick size (under 1 s per iteration on one CPU core, 10 iterations a trial;
LDS at lds_alpha 0.5 lowers val/spike_l1 by about 0.2 paired, raising
val/flat_l1 by about 0.03)::

    quick: {budget: 10, config: {hidden: 96, n_layers: 2, steps_per_iter: 80, n_val: 4096}}

Run it through a tunelab spec with ``family: flow_policy`` (the contract is in
``tunelab/family.py``), or directly::

    seed_everything(1001)
    exp = FAMILY.build(FAMILY.make_config({"lds_alpha": 0.5}), 1001, Path("/tmp/data"))
    for _ in range(10):
        print(exp.train_iteration())
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
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
from tunelab.names import HEALTH_METRICS, M_HEALTH_GRAD_NORM, M_HEALTH_NAN_SKIPPED

__all__ = [
    "FAMILY",
    "ActionTransform",
    "ChunkNet",
    "Config",
    "FlowPolicyExperiment",
    "build",
    "heun_sample",
    "lds_weights",
    "make_dataset",
    "mode_aware_mean",
    "sample_flow_time",
]

# ---------------------------------------------------------------------------
# Metric names (dashboards and specs depend on them)
# ---------------------------------------------------------------------------
M_TRAIN_LOSS = "train/loss"  # weighted training objective (LDS and delta terms included)
M_TRAIN_MSE = "train/mse"  # unweighted main MSE term: comparable across LDS arms
M_GRAD_NORM = M_HEALTH_GRAD_NORM  # pre-clip total grad norm, mean over the iteration
M_NAN_SKIPPED = M_HEALTH_NAN_SKIPPED  # non-finite steps skipped this iteration
M_SAMPLE_L1 = "val/sample_l1"  # L1 over every action value of the val chunks
M_SPIKE_L1 = "val/spike_l1"  # L1 over maneuver (pulse) action values
M_FLAT_L1 = "val/flat_l1"  # L1 over non-maneuver action values
CHANNELS = ("long", "lat")  # action channels: longitudinal, lateral
M_SPIKE_L1_CH = tuple(f"{M_SPIKE_L1}/{ch}" for ch in CHANNELS)
M_FLAT_L1_CH = tuple(f"{M_FLAT_L1}/{ch}" for ch in CHANNELS)

METRICS = (
    M_TRAIN_LOSS,
    M_TRAIN_MSE,
    *HEALTH_METRICS,  # tunelab.health (M_GRAD_NORM, M_NAN_SKIPPED among them)
    M_SAMPLE_L1,
    M_SPIKE_L1,
    M_FLAT_L1,
    *M_SPIKE_L1_CH,
    *M_FLAT_L1_CH,
)


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------
Amplitude = Annotated[float, Field(gt=0, le=1e3)]
"""A maneuver pulse amplitude (m/s^2)."""


@dataclass(config=ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False))
class Config(DeviceFields):
    """flow_policy hyperparameters. Every lever defaults to off (the control).

    Every field carries its domain: floats are finite, sizes and rates positive,
    and each has an upper bound far above any sane run, so ``lr: -0.002``,
    ``hidden: 1e9`` or ``lr: .nan`` is refused at spec validation naming the field.
    ``device``, ``precision`` and ``deterministic`` come from
    :class:`tunelab.devices.DeviceFields`.
    """

    # --- data (synthetic, identical for every trial seed) ---
    data_seed: int = Field(default=0, ge=0)
    """Seed of the synthetic corpus; the trial seed never changes the data."""
    n_train: int = Field(default=4096, ge=16, le=10_000_000)
    """Training windows (condition, action chunk)."""
    n_val: int = Field(default=1024, ge=16, le=10_000_000)
    """Validation windows (fixed; scored every iteration)."""
    n_test: int = Field(default=1024, ge=16, le=10_000_000)
    """Test windows (scored by export only)."""
    episode_len: int = Field(default=256, ge=64, le=1_000_000)
    """Simulated steps per episode; windows are cut from episodes."""
    horizon: int = Field(default=8, ge=2, le=1024)
    """H: actions per predicted chunk."""
    hist_len: int = Field(default=8, ge=1, le=1024)
    """Steps of state/action history in the condition."""
    route_len: int = Field(default=12, ge=1, le=1024)
    """Steps of route preview (planned feedforward acceleration) in the condition."""
    dt: float = Field(default=0.1, gt=0, le=10)
    """Simulation step in seconds."""
    kp: float = Field(default=4.0, gt=0, le=1e4)
    """Expert PD position gain."""
    kd: float = Field(default=4.0, gt=0, le=1e4)
    """Expert PD velocity gain."""
    disturbance_std: float = Field(default=0.3, ge=0, le=1e3)
    """Stationary std of the Ornstein-Uhlenbeck force disturbance (m/s^2)."""
    disturbance_tau: float = Field(default=0.5, gt=0, le=1e4)
    """Correlation time of the disturbance in seconds."""
    expert_noise: float = Field(default=0.05, ge=0, le=1e3)
    """Std of white noise on the expert's actions."""
    maneuver_rate: float = Field(default=0.05, gt=0, lt=0.5)
    """Target fraction of action values (step x channel) inside a maneuver pulse."""
    maneuver_len: int = Field(default=8, ge=2, le=1024)
    """Steps per maneuver pulse (half sine longitudinal, full sine lateral)."""
    maneuver_amp: tuple[Amplitude, Amplitude] = (2.0, 4.0)
    """Uniform range of the pulse amplitude (m/s^2); the sign is random."""
    route_jitter: int = Field(default=1, ge=0, le=1024)
    """The route shows a pulse up to this many steps early/late (uniform)."""
    route_amp_noise: float = Field(default=0.1, ge=0, le=10)
    """Relative amplitude noise of a pulse as the route shows it."""
    route_phantom_rate: float = Field(default=0.3, ge=0, lt=1)
    """Fraction of route-announced pulses the expert does not execute (ambiguous maneuvers)."""

    # --- model ---
    head: Literal["flow", "regression"] = "flow"
    """flow: flow-matching velocity net; regression: deterministic chunk regressor (control)."""
    hidden: int = Field(default=128, ge=8, le=8192)
    """Width of the condition encoder and the AdaLN MLP blocks."""
    n_layers: int = Field(default=3, ge=1, le=64)
    """AdaLN residual MLP blocks."""
    time_embed_dim: int = Field(default=64, ge=4, le=4096)
    """Width of the sinusoidal flow-time embedding (even)."""

    # --- optimisation ---
    steps_per_iter: int = Field(default=100, ge=1, le=1_000_000)
    """Optimizer steps per tunelab iteration (then one validation pass): the unit of
    checkpoints, so one iteration must fit the preemption grace period."""
    batch_size: int = Field(default=256, ge=1, le=65_536)
    """Windows per optimizer step (sampled with replacement by the seeded data generator); the
    global batch: with N workers each trains on batch_size / N of them."""
    lr: float = Field(default=1e-3, gt=0, le=1.0)
    """AdamW learning rate (constant)."""
    weight_decay: float = Field(default=0.0, ge=0, le=10.0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, gt=0, le=1e6)
    """Gradient-norm clip applied after measuring health/grad_norm."""

    # --- flow ---
    time_sampling: Literal["logit_normal", "beta"] = "logit_normal"
    """Training flow-time law: logit-normal (SD3) or pi0's Beta skewed to the noisy end."""
    time_ln_mean: float = Field(default=0.0, ge=-10.0, le=10.0)
    """Logit-normal location (median sigmoid(mean))."""
    time_ln_std: float = Field(default=1.0, gt=0, le=10.0)
    """Logit-normal scale."""
    time_beta_alpha: float = Field(default=1.5, gt=0, le=100.0)
    """pi0 Beta: t = s (1 - x), x ~ Beta(alpha, 1)."""
    time_beta_s: float = Field(default=0.999, gt=0, le=1)
    """pi0 Beta cutoff s (t < s)."""
    n_steps: int = Field(default=8, ge=1, le=1000)
    """Heun integration steps at sampling time (2 network calls each)."""

    # --- levers (all off by default) ---
    gaussianize: bool = False
    """Map each standardised action channel through its empirical CDF to N(0, 1) (train-fitted knots)."""
    gaussianize_knots: int = Field(default=64, ge=4, le=100_000)
    """Quantile knots of the Gaussianising transform."""
    lds_alpha: float = Field(default=0.0, ge=0, le=10.0)
    """LDS exponent: weight = (1 / smoothed label density)^alpha; 0 = off."""
    lds_cap: float = Field(default=10.0, ge=1, le=1e6)
    """Cap on LDS weights (applied with mean-1 normalisation)."""
    lds_bins: int = Field(default=50, ge=4, le=100_000)
    """Histogram bins of the LDS label (peak |action| over the chunk)."""
    lds_sigma: float = Field(default=2.0, gt=0, le=1e4)
    """Gaussian smoothing kernel width in bins (Yang et al. 2021)."""
    chunk_delta_weight: float = Field(default=0.0, ge=0, le=1e6)
    """Weight of the loss on successive-step deltas within the chunk; 0 = off."""
    readout: Literal["single", "mean_of_k", "mode_aware"] = "single"
    """Flow readout: one draw, mean of K draws, or the dominant-mode mean of K draws."""
    readout_k: int = Field(default=8, ge=1, le=1024)
    """K draws for mean_of_k / mode_aware (ignored by single and regression)."""
    mode_channel: int = Field(default=1, ge=0, le=1)
    """Channel whose chunk mean splits draws into modes (1 = lateral)."""
    mode_gap: float = Field(default=0.5, ge=0, le=1e6)
    """Smallest gap (raw units) between sorted draw means that counts as two modes."""
    mode_min_frac: float = Field(default=0.2, gt=0, le=0.5)
    """Minority mode must hold at least this fraction of draws (outlier guard)."""

    # --- evaluation ---
    eval_seed: int = Field(default=12345, ge=0)
    """Seed of the evaluation noise generator, re-created for every evaluation."""
    plot_chunks: int = Field(default=4, ge=1, le=64)
    """Chunks drawn in export's PNG."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim is {self.time_embed_dim}, but must be even")
        lo, hi = self.maneuver_amp
        if not 0 < lo <= hi:
            raise ValueError(f"maneuver_amp is {self.maneuver_amp}, but must be 0 < lo <= hi")
        if self.route_jitter >= self.maneuver_len:
            raise ValueError("route_jitter must be smaller than maneuver_len")
        return self


# ---------------------------------------------------------------------------
# Data: PD expert on a double integrator with rare maneuver pulses
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Split:
    """One split of windows, raw units."""

    cond: torch.Tensor
    """(N, D) condition: state/action history + route preview, flattened."""
    actions: torch.Tensor
    """(N, H, C) expert action chunk."""
    maneuver: torch.Tensor
    """(N, H, C) bool: the action value belongs to a maneuver pulse."""

    def to(self, device: torch.device) -> Split:
        """The split on ``device`` (itself when it is there already)."""
        return Split(self.cond.to(device), self.actions.to(device), self.maneuver.to(device))


_DATA_FIELDS = (
    "data_seed",
    "n_train",
    "n_val",
    "n_test",
    "episode_len",
    "horizon",
    "hist_len",
    "route_len",
    "dt",
    "kp",
    "kd",
    "disturbance_std",
    "disturbance_tau",
    "expert_noise",
    "maneuver_rate",
    "maneuver_len",
    "maneuver_amp",
    "route_jitter",
    "route_amp_noise",
    "route_phantom_rate",
)


def make_dataset(cfg: Config) -> dict[str, Split]:
    """train / val / test splits, a pure function of the data fields of ``cfg``.

    Generation takes well under a second, so it happens in memory (cached per
    process) instead of under ``data_root``.
    """
    return _dataset_cached(tuple(getattr(cfg, f) for f in _DATA_FIELDS))


@functools.lru_cache(maxsize=4)
def _dataset_cached(key: tuple[Any, ...]) -> dict[str, Split]:
    p = dict(zip(_DATA_FIELDS, key, strict=True))
    streams = np.random.SeedSequence(p["data_seed"]).spawn(3)
    sizes = {"train": p["n_train"], "val": p["n_val"], "test": p["n_test"]}
    return {
        name: _simulate_split(np.random.default_rng(ss), n, p)
        for (name, n), ss in zip(sizes.items(), streams, strict=True)
    }


def _pulse_shapes(length: int) -> np.ndarray:
    """(C, D) unit pulses: half sine (brake/accelerate) and full sine (lane change)."""
    k = (np.arange(length) + 0.5) / length
    return np.stack([np.sin(np.pi * k), np.sin(2 * np.pi * k)])


def _simulate_split(rng: np.random.Generator, n: int, p: dict[str, Any]) -> Split:
    """Simulate episodes and cut ``n`` random windows out of them."""
    H, T, K, L, D = p["horizon"], p["hist_len"], p["route_len"], p["episode_len"], p["maneuver_len"]
    C = len(CHANNELS)
    first, last = T, L - max(H, K)  # window starts t in [first, last]
    per_episode = last - first + 1
    if per_episode < 1:
        raise ValueError("episode_len is too short for hist_len + max(horizon, route_len)")
    E = max(1, math.ceil(8 * n / per_episode))  # ~8x oversampling, then a random subset

    # Maneuver pulses: the route announces them (jittered, some phantom); u is what is executed.
    shapes = _pulse_shapes(D)  # (C, D)
    phantom = p["route_phantom_rate"]
    onset = rng.random((E, C, L)) < p["maneuver_rate"] / D / (1 - phantom)
    u = np.zeros((E, C, L + D))
    u_route = np.zeros((E, C, L + 2 * D))
    lo, hi = p["maneuver_amp"]
    for e, c, t in zip(*np.nonzero(onset), strict=True):
        amp = rng.choice([-1.0, 1.0]) * rng.uniform(lo, hi)
        if rng.random() >= phantom:
            u[e, c, t : t + D] += amp * shapes[c]
        shift = D + t + int(rng.integers(-p["route_jitter"], p["route_jitter"] + 1))
        seen = amp * (1.0 + p["route_amp_noise"] * rng.standard_normal())
        u_route[e, c, shift : shift + D] += seen * shapes[c]
    u, u_route = u[:, :, :L], u_route[:, :, D : D + L]
    maneuver = np.abs(u) > 0

    # Closed loop: plant tracks the reference (integral of u) under an OU force disturbance.
    dt, theta = p["dt"], 1.0 / p["disturbance_tau"]
    w_std = p["disturbance_std"] * math.sqrt(2 * theta * dt)
    e_pos, e_vel, w = np.zeros((E, C)), np.zeros((E, C)), np.zeros((E, C))
    acts, errs = np.zeros((E, C, L)), np.zeros((E, C, 2, L))
    for t in range(L):
        errs[:, :, 0, t], errs[:, :, 1, t] = e_pos, e_vel
        a = u[:, :, t] - p["kp"] * e_pos - p["kd"] * e_vel
        a = a + p["expert_noise"] * rng.standard_normal((E, C))
        acts[:, :, t] = a
        w = w * (1 - theta * dt) + w_std * rng.standard_normal((E, C))
        e_vel = e_vel + (a - u[:, :, t] + w) * dt  # tracking error: feedforward cancels u
        e_pos = e_pos + e_vel * dt

    # Windows: condition at step t, target actions t .. t+H-1.
    starts = np.arange(first, last + 1)
    ep = np.repeat(np.arange(E), per_episode)
    ts = np.tile(starts, E)
    pick = rng.choice(ep.size, size=n, replace=ep.size < n)
    ep, ts = ep[pick], ts[pick]
    hist_t = ts[:, None] - np.arange(T)[None, :]  # (n, T) steps t, t-1, ...
    err_hist = errs[ep[:, None], :, :, hist_t]  # (n, T, C, 2) state at t-k
    act_hist = acts[ep[:, None], :, hist_t - 1]  # (n, T, C) action at t-1-k
    route = u_route[ep[:, None], :, ts[:, None] + np.arange(K)]  # (n, K, C)
    cond = np.concatenate(
        [err_hist.reshape(n, -1), act_hist.reshape(n, -1), route.reshape(n, -1)], axis=1
    )
    chunk_t = ts[:, None] + np.arange(H)  # (n, H)
    target = acts[ep[:, None], :, chunk_t]  # (n, H, C)
    mask = maneuver[ep[:, None], :, chunk_t]  # (n, H, C)
    return Split(
        cond=torch.from_numpy(cond.astype(np.float32)),
        actions=torch.from_numpy(target.astype(np.float32)),
        maneuver=torch.from_numpy(mask),
    )


# ---------------------------------------------------------------------------
# Levers on the data side: action transform and LDS weights
# ---------------------------------------------------------------------------
class ActionTransform:
    """Raw actions <-> model space: per-channel standardisation, then optionally Gaussianize.

    Gaussianize (seed PR, "per-channel Gaussianize (empirical CDF -> N(0,1)) via
    data-fit quantile knots; monotonic, invertible, non-clipping"): a piecewise
    linear map through (train quantile, normal quantile) knots, extended linearly
    past the end knots so it is defined and invertible everywhere.
    """

    def __init__(self, actions: torch.Tensor, *, gaussianize: bool, n_knots: int) -> None:
        flat = actions.reshape(-1, actions.shape[-1]).double()  # (N*H, C)
        self.mean = flat.mean(0)  # (C,)
        self.std = flat.std(0).clamp_min(1e-6)  # (C,)
        self.knots_x: torch.Tensor | None = None
        self.knots_z: torch.Tensor | None = None
        if gaussianize:
            probs = torch.linspace(0.5 / n_knots, 1 - 0.5 / n_knots, n_knots, dtype=torch.float64)
            std = (flat - self.mean) / self.std
            qs = torch.quantile(std, probs, dim=0).T  # (C, n_knots)
            qs = torch.cummax(
                qs + 1e-6 * torch.arange(n_knots), dim=1
            ).values  # strictly increasing
            self.knots_x, self.knots_z = qs, torch.special.ndtri(probs)

    def to(self, device: torch.device) -> ActionTransform:
        """A copy whose fitted tensors live on ``device`` (itself when they are there)."""
        if self.mean.device == device:
            return self
        out = copy.copy(self)
        out.mean, out.std = self.mean.to(device), self.std.to(device)
        if self.knots_x is not None and self.knots_z is not None:
            out.knots_x, out.knots_z = self.knots_x.to(device), self.knots_z.to(device)
        return out

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """Raw (..., C) -> model space (..., C)."""
        z = (a.double() - self.mean) / self.std
        if self.knots_x is not None and self.knots_z is not None:
            z = torch.stack(
                [_interp(z[..., c], self.knots_x[c], self.knots_z) for c in range(z.shape[-1])], -1
            )
        return z.to(a.dtype)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Model space (..., C) -> raw (..., C)."""
        x = z.double()
        if self.knots_x is not None and self.knots_z is not None:
            x = torch.stack(
                [_interp(x[..., c], self.knots_z, self.knots_x[c]) for c in range(x.shape[-1])], -1
            )
        return (x * self.std + self.mean).to(z.dtype)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through increasing knots, linear beyond the ends."""
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (f1 - f0) / (x1 - x0) * (x - x0)


def lds_weights(
    actions: torch.Tensor, *, alpha: float, cap: float, bins: int, sigma: float
) -> torch.Tensor:
    """Label-distribution-smoothing loss weights (Yang et al., ICML 2021; seed PR).

    Per chunk and channel, label = peak |action| over the chunk (raw units).
    Weight = (1 / smoothed density(label))^alpha, where the density is the label
    histogram convolved with a Gaussian kernel (``sigma`` bins); then scaled so
    the weights have mean 1 over the training set with no weight above ``cap``
    (w = min(s * w_raw, cap), s found by bisection). ``alpha = 0`` gives ones.

    Args:
        actions: (N, H, C) raw training chunks.

    Returns:
        (N, C) weights, float32.
    """
    n, _, n_ch = actions.shape
    if alpha == 0 or cap <= 1:
        return torch.ones(n, n_ch)
    label = actions.abs().amax(1).double().numpy()  # (N, C)
    radius = max(1, math.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    out = np.empty_like(label)
    for c in range(n_ch):
        edges = np.linspace(0.0, label[:, c].max() + 1e-9, bins + 1)
        hist, _ = np.histogram(label[:, c], bins=edges)
        smooth = np.convolve(hist.astype(np.float64), kernel / kernel.sum(), mode="same")
        idx = np.clip(np.digitize(label[:, c], edges) - 1, 0, bins - 1)
        raw = smooth[idx] ** -alpha
        out[:, c] = _cap_mean_one(raw / raw.mean(), cap)
    return torch.from_numpy(out.astype(np.float32))


def _cap_mean_one(w: np.ndarray, cap: float) -> np.ndarray:
    """min(s * w, cap) with s chosen so the mean is 1 (needs cap >= 1)."""
    lo, hi = 0.0, cap / w.min()  # mean(min(hi * w, cap)) == cap >= 1
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.minimum(mid * w, cap).mean() < 1 else (lo, mid)
    return np.minimum(hi * w, cap)


# ---------------------------------------------------------------------------
# Model: AdaLN MLP velocity network
# ---------------------------------------------------------------------------
def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) flow times in [0, 1] -> (B, dim) sin/cos features (DiT scale 1000)."""
    half = dim // 2
    steps = torch.arange(half, dtype=t.dtype, device=t.device)
    freqs = torch.exp(-math.log(10_000.0) * steps / half)  # (half,)
    args = 1000.0 * t[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class AdaLNBlock(nn.Module):
    """h + gate * MLP(LN(h) * (1 + scale) + shift); (shift, scale, gate) from c, zero-init."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
        )
        self.modulation = nn.Linear(hidden, 3 * hidden)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(F.silu(c)).chunk(3, dim=-1)  # 3 x (B, hidden)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class ChunkNet(nn.Module):
    """f(x, t, cond) -> (B, H, C): flow velocity, or (x = 0, t = 0) the regression chunk."""

    def __init__(
        self, cond_dim: int, horizon: int, channels: int, hidden: int, n_layers: int, t_dim: int
    ) -> None:
        super().__init__()
        self.horizon, self.channels, self.t_dim = horizon, channels, t_dim
        self.cond_enc = nn.Sequential(
            nn.Linear(cond_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.time_mlp = nn.Sequential(
            nn.Linear(t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.x_in = nn.Linear(horizon * channels, hidden)
        self.blocks = nn.ModuleList(AdaLNBlock(hidden) for _ in range(n_layers))
        self.out_norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.out_mod = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, horizon * channels)
        nn.init.zeros_(self.out_mod.weight)
        nn.init.zeros_(self.out_mod.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cond_h = self.cond_enc(cond)  # (B, hidden)
        c = cond_h + self.time_mlp(sinusoidal_embedding(t, self.t_dim))  # (B, hidden)
        h = self.x_in(x.flatten(1)) + cond_h  # (B, hidden)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.out_mod(F.silu(c)).chunk(2, dim=-1)  # 2 x (B, hidden)
        y = self.out(self.out_norm(h) * (1 + scale) + shift)  # (B, H*C)
        return y.view(-1, self.horizon, self.channels)


# ---------------------------------------------------------------------------
# Flow time sampling, Heun sampler, readouts
# ---------------------------------------------------------------------------
def sample_flow_time(n: int, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """(n,) training flow times in (0, 1); t = 0 is noise, t = 1 is data.

    logit_normal: t = sigmoid(mean + std * z) (median sigmoid(mean)).
    beta (pi0, seed PR): t = s * (1 - x), x ~ Beta(alpha, 1) by inverse CDF
    x = U^(1/alpha), which puts more mass at the noisy end for alpha > 1.
    Drawn on the generator's device.
    """
    if cfg.time_sampling == "logit_normal":
        z = torch.randn(n, generator=gen, device=gen.device)
        t = torch.sigmoid(cfg.time_ln_mean + cfg.time_ln_std * z)
    else:
        x = torch.rand(n, generator=gen, device=gen.device) ** (1.0 / cfg.time_beta_alpha)
        t = cfg.time_beta_s * (1.0 - x)
    return t.clamp(1e-5, 1 - 1e-5)


def heun_sample(
    velocity: Callable[[torch.Tensor, float], torch.Tensor],
    x0: torch.Tensor,
    n_steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t0 to t1 with ``n_steps`` Heun (RK2) steps.

    ``velocity(x, t: float) -> tensor like x``. Exact for fields linear in t and
    independent of x; second-order accurate otherwise.
    """
    x, h = x0, (t1 - t0) / n_steps
    for i in range(n_steps):
        ta, tb = t0 + i * h, t0 + (i + 1) * h
        va = velocity(x, ta)
        vb = velocity(x + h * va, tb)
        x = x + 0.5 * h * (va + vb)
    return x


def mode_aware_mean(draws: torch.Tensor, channel: int, gap: float, min_frac: float) -> torch.Tensor:
    """Winner-take-all consensus over K draws (seed PR, "mode-aware readout").

    Split the draws at the largest gap of their sorted chunk means on
    ``channel``; if that gap exceeds ``gap`` and the minority holds at least
    ``min_frac`` of the draws, average only the dominant cluster, else all draws
    (= mean of K on unimodal frames).

    Args:
        draws: (B, K, H, C) raw-space samples.

    Returns:
        (B, H, C).
    """
    n_draws = draws.shape[1]
    if n_draws < 2:
        return draws[:, 0]
    f = draws[..., channel].mean(-1)  # (B, K)
    fs, _ = f.sort(-1)  # (B, K)
    gmax, j = (fs[:, 1:] - fs[:, :-1]).max(-1)  # (B,), split after sorted index j
    n_low = j + 1  # (B,)
    minority = torch.minimum(n_low, n_draws - n_low)
    bimodal = (gmax > gap) & (minority >= math.ceil(min_frac * n_draws))  # (B,)
    in_low = f <= fs.gather(-1, j[:, None])  # (B, K)
    keep = torch.where((2 * n_low >= n_draws)[:, None], in_low, ~in_low)
    keep = torch.where(bimodal[:, None], keep, torch.ones_like(keep))  # (B, K)
    w = keep.to(draws.dtype)[..., None, None]  # (B, K, 1, 1)
    return (draws * w).sum(1) / w.sum(1)


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------
class FlowPolicyExperiment:
    """One trial: data, transform, LDS weights, model, optimizer, seeded generators.

    Everything lives on ``self.place.device`` but the data-order generator (CPU); the
    statistics (condition normalisation, transform, LDS weights) are fitted on the CPU.

    Raises:
        tunelab.devices.DeviceUnavailable: ``device: cuda`` and no CUDA device is visible.
    """

    def __init__(self, cfg: Config, seed: int) -> None:
        self.cfg = cfg
        self.place: Placement = placement(cfg)
        device = self.place.device
        data = make_dataset(cfg)
        train = data["train"]
        # fitted on the CPU (the same numbers on every device), then moved
        cond_mean = train.cond.mean(0)  # (D,)
        cond_std = train.cond.std(0).clamp_min(1e-3)  # (D,)
        transform = ActionTransform(
            train.actions, gaussianize=cfg.gaussianize, n_knots=cfg.gaussianize_knots
        )
        train_z = transform.forward(train.actions)  # (N, H, C) model space
        train_c = (train.cond - cond_mean) / cond_std  # (N, D)
        weights = lds_weights(
            train.actions,
            alpha=cfg.lds_alpha,
            cap=cfg.lds_cap,
            bins=cfg.lds_bins,
            sigma=cfg.lds_sigma,
        )  # (N, C)
        self.train, self.val, self.test = (data[k].to(device) for k in ("train", "val", "test"))
        self.cond_mean, self.cond_std = cond_mean.to(device), cond_std.to(device)
        self.transform = transform.to(device)
        self.train_z, self.train_c, self.weights = (
            train_z.to(device),
            train_c.to(device),
            weights.to(device),
        )
        # Init uses the global torch RNG that tunelab seeded with ``seed`` (on the CPU, then moved).
        self.net = ChunkNet(
            cond_dim=train.cond.shape[1],
            horizon=cfg.horizon,
            channels=len(CHANNELS),
            hidden=cfg.hidden,
            n_layers=cfg.n_layers,
            t_dim=cfg.time_embed_dim,
        ).to(device)
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        # backward, clip, step or skip; per-layer norms, term shares, explosions (tunelab.health)
        self.health = HealthMonitor(
            self.net, self.opt, clip=cfg.grad_clip, scaler=self.place.grad_scaler()
        )
        # Separate streams: a lever that draws more noise never shifts the data order. The
        # order is drawn on the CPU (the same on every device), the flow noise on the device.
        self.data_gen = torch.Generator().manual_seed(seed)
        self.noise_gen = device_generator(seed + 0x9E3779B9, device)
        self.step = 0
        self.iteration = 0

    def _norm_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return (cond - self.cond_mean) / self.cond_std

    # --- training ---
    def _loss(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Loss terms (``main``: LDS-weighted MSE; ``chunk_delta``) and the unweighted MSE.

        ``idx`` is the global batch: the flow noise is drawn for all of it, then this
        worker keeps its slice of every per-window tensor (all of it with one worker).
        """
        cfg = self.cfg
        n = idx.shape[0]  # the global batch
        idx = shard(idx)
        a = self.train_z[idx]  # (B, H, C)
        cond = self.train_c[idx]  # (B, D)
        w = self.weights[idx][:, None, :]  # (B, 1, C), broadcast over slots
        if cfg.head == "flow":
            t = shard(sample_flow_time(n, cfg, self.noise_gen))  # (B,)
            eps = torch.randn((n, *a.shape[1:]), generator=self.noise_gen, device=a.device)
            eps = shard(eps)  # (B, H, C)
            tb = t[:, None, None]
            with self.place.autocast():
                pred = self.net((1 - tb) * eps + tb * a, t, cond)  # velocity (B, H, C)
            target = a - eps
        else:
            t0 = torch.zeros(a.shape[0], device=a.device)
            with self.place.autocast():
                pred = self.net(torch.zeros_like(a), t0, cond)
            target = a
        sq = (pred.float() - target) ** 2  # (B, H, C)
        terms = {"main": (sq * w).mean()}
        if cfg.chunk_delta_weight > 0:
            d_err = torch.diff(pred, dim=1) - torch.diff(target, dim=1)  # (B, H-1, C)
            terms["chunk_delta"] = (d_err**2 * w).mean()
        return terms, sq.mean().detach()

    def train_iteration(self) -> dict[str, float]:
        cfg = self.cfg
        self.net.train()
        weights = {"main": 1.0, "chunk_delta": cfg.chunk_delta_weight}
        losses, mses = [], []
        for _ in range(cfg.steps_per_iter):
            idx = torch.randint(
                0, self.train_z.shape[0], (cfg.batch_size,), generator=self.data_gen
            )  # the global batch, drawn on the CPU
            terms, mse = self._loss(idx.to(self.place.device))
            step = self.health.step(terms, weights)
            if not step.applied:
                continue
            self.step += 1
            losses.append(step.total)
            mses.append(mse.item())
        self.iteration += 1
        nan = float("nan")
        metrics = {
            M_TRAIN_LOSS: float(np.mean(losses)) if losses else nan,
            M_TRAIN_MSE: float(np.mean(mses)) if mses else nan,
            **self.health.end_iteration(),
        }
        metrics.update(self.evaluate(self.val, prefix="val"))
        return metrics

    # --- inference and evaluation ---
    @torch.no_grad()
    def predict(self, cond: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B, D) raw conditions -> (B, H, C) raw action chunks under the configured readout.

        ``cond`` and ``gen`` on the trial's device; the network runs under its autocast, the
        Heun state stays fp32.
        """
        cfg = self.cfg
        self.net.eval()
        c = self._norm_cond(cond)  # (B, D)
        n, shape, dev = c.shape[0], (cfg.horizon, len(CHANNELS)), c.device
        if cfg.head == "regression":
            with self.place.autocast():
                z = self.net(torch.zeros(n, *shape, device=dev), torch.zeros(n, device=dev), c)
            return self.transform.inverse(z.float())
        k = 1 if cfg.readout == "single" else cfg.readout_k
        ck = c.repeat_interleave(k, dim=0)  # (B*K, D)
        x0 = torch.randn(n * k, *shape, generator=gen, device=dev)  # (B*K, H, C)

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            with self.place.autocast():
                v = self.net(x, torch.full((x.shape[0],), t, device=dev), ck)
            return v.float()

        z = heun_sample(velocity, x0, cfg.n_steps)  # (B*K, H, C)
        draws = self.transform.inverse(z).view(n, k, *shape)  # (B, K, H, C)
        if cfg.readout == "mode_aware":
            return mode_aware_mean(draws, cfg.mode_channel, cfg.mode_gap, cfg.mode_min_frac)
        return draws.mean(1)

    def evaluate(self, split: Split, prefix: str) -> dict[str, float]:
        """L1 metrics on ``split`` with a freshly seeded eval generator (same noise every call)."""
        gen = device_generator(self.cfg.eval_seed, self.place.device)
        err = (self.predict(split.cond, gen) - split.actions).abs()  # (N, H, C)
        m = split.maneuver
        out = {
            f"{prefix}/sample_l1": err.mean().item(),
            f"{prefix}/spike_l1": _masked_mean(err, m),
            f"{prefix}/flat_l1": _masked_mean(err, ~m),
        }
        for c, ch in enumerate(CHANNELS):
            out[f"{prefix}/spike_l1/{ch}"] = _masked_mean(err[..., c], m[..., c])
            out[f"{prefix}/flat_l1/{ch}"] = _masked_mean(err[..., c], ~m[..., c])
        return out

    # --- checkpointing ---
    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, own generators, counters; loads on any device (load_state_dict)."""
        return {
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "noise_gen": self.noise_gen.get_state(),
            "step": self.step,
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])  # moved to the parameters' device
        load_generator_state(self.data_gen, state["data_gen"], name="flow_policy data_gen")
        load_generator_state(self.noise_gen, state["noise_gen"], name="flow_policy noise_gen")
        self.step = int(state["step"])
        self.iteration = int(state["iteration"])

    # --- artifacts ---
    def export(self, out_dir: Path) -> dict[str, Any]:
        """Write metrics.json (final val/test metrics) and chunks.png; return manifest fields."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        scores = {**self.evaluate(self.val, "val"), **self.evaluate(self.test, "test")}
        manifest: dict[str, Any] = {
            "metrics": scores,
            "iteration": self.iteration,
            "step": self.step,
            "head": self.cfg.head,
            "readout": self.cfg.readout,
            "device": str(self.place.device),
            "precision": self.place.precision,
            "config": dataclasses.asdict(self.cfg),
            "files": ["metrics.json", "chunks.png"],
        }
        atomic_write_json(out_dir / "metrics.json", manifest)
        self._plot_chunks(out_dir / "chunks.png")
        return manifest

    def _plot_chunks(self, path: Path) -> None:
        """Predicted vs true chunks for the first val windows, maneuver ones first."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = self.cfg.plot_chunks
        has_spike = self.val.maneuver.flatten(1).any(1)  # (N,)
        spiky = torch.nonzero(has_spike)[: (n + 1) // 2, 0]
        idx = torch.cat([spiky, torch.nonzero(~has_spike)[: n - spiky.numel(), 0]])
        gen = device_generator(self.cfg.eval_seed, self.place.device)
        pred = self.predict(self.val.cond[idx], gen).cpu()  # (n, H, C)
        val = self.val.to(torch.device("cpu"))
        fig = Figure(figsize=(3 * len(idx), 4))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(CHANNELS), len(idx), squeeze=False)
        for j, i in enumerate(idx.tolist()):
            for c, ch in enumerate(CHANNELS):
                ax = axes[c][j]
                ax.plot(val.actions[i, :, c].numpy(), "k-", label="true")
                ax.plot(pred[j, :, c].numpy(), "C1--", label="pred")
                spikes = torch.nonzero(val.maneuver[i, :, c])[:, 0].numpy()
                ax.plot(spikes, val.actions[i, spikes, c].numpy(), "r.", label="maneuver")
                ax.set_title(f"val #{i} {ch}", fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=80)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float((x * mask).sum() / n) if n else float("nan")


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
def build(config: Config, seed: int, data_root: Path) -> FlowPolicyExperiment:
    """tunelab entry point. ``data_root`` is unused: the corpus is generated in memory."""
    del data_root
    return FlowPolicyExperiment(config, seed)


FAMILY = Family(
    name="flow_policy",
    config_cls=Config,
    build=build,
    metrics=METRICS,
    description="Flow-matching action-chunk policy on a synthetic maneuver task (lever A/B showcase).",
)
