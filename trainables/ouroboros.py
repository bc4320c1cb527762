"""ouroboros: a polynomial neural-ODE birdsong synthesizer trained by spectral rollout.

Reproduces shared/seeds/ouroboros_spectral_rollout_pr.txt ("Spectral-rollout loss +
cold-start training for poly Ouroboros", PR #5) as a tunelab family. Read top to
bottom: metric names, config, data (synthetic corpus, loader, file holdout,
edge-biased sampler), model (causal SSM encoder -> drives -> polynomial ODE),
integration (RK4 rollouts), losses, horizon curriculum, autonomy score, the
experiment and the ``FAMILY`` registration.

Model (PR #5, "poly Ouroboros"), with time in samples (dt = 1 sample)::

    x'' = -omega(t)^2 x - gamma(t) x' - sum_{i+j<=P} w_ij(t) x^i x'^j

where the drives omega, gamma, w_ij come from a small causal SSM encoder that
reads the waveform (x, x'); the (0, 0) term is dropped unless ``keep_const``.
Training integrates the ODE with RK4 at one step per sample, soft-tanh
saturating (x, x') after every step ("teacher-forced rollout": drives encoded
from the target, state integrated freely from the data initial condition, or
for ONSET segments from N(0, ic_noise_rms^2): the cold start). Validation runs
the model closed-loop (the encoder reads the model's own output: the snake eats
its tail) from a noise initial condition over held-out (silence lead-in +
vocalisation) windows and scores ``autonomy = spec_corr - amp_pen - pitch_pen``;
a divergent rollout scores the sentinel -5.0.

Evaluation splits (file-level holdout by ``data_seed``, the same for every trial
seed; train, val and test are disjoint sets of recordings, and every segment
and window of a split is cut from that split's files only):

- train: ``n_train_files`` recordings; the training segments (``max_segs``) and
  the Var(d2x) normaliser come from them alone.
- val: ``n_val_files`` recordings, scored every iteration: ``val/autonomy`` and
  its breakdown on cold-start windows, ``val/loss`` on edge-biased segments.
  These are what culls, selection and search see.
- test: ``n_test_files`` recordings, scored only by ``export`` (at the trial's
  budget and for the selected seed): the manifest's ``test/*`` block
  (autonomy breakdown and ``test/loss``), never an iteration metric.

Randomness: the trial seed feeds two generators on separate streams, one for
the batch order and one for the cold-start noise, so the arms of a lever A/B
see the same batches in the same order. Evaluation noise is a fixed draw
(``EVAL_SEED``). Before any trial starts, tunelab runs ``FAMILY.check_data``
over the data folder: a garbage or truncated WAV, or a missing, empty or
non-numeric annotation, stops the experiment naming the file (exit 2).

Device, precision and workers (:mod:`tunelab.devices`): the model, its
optimizer state, the training and held-out segments and the cold-start noise
generator live on the trial's device (``device: auto`` is CUDA when the trial
holds a GPU); the batch order is drawn on the CPU, so it is the same on every
device (on CUDA the noise comes from a CUDA generator: same seed, another
stream). The encoder (the network) runs under the ``precision`` autocast; the
drive maps, the polynomial ODE, its RK4 rollout and adjoint, the losses and
the closed-loop evaluation run in fp32 (the rollout's rounding compounds over
H steps, and torch.fft has no bf16), as do the parameters and the optimizer
(fp16 adds a gradient scaler). With ``resources.workers: N`` every worker
draws the same global batch (indices and cold-start noise) and keeps its slice
(``tunelab.devices.shard``); the monitor averages the gradients. The tf, env
and env_log terms are means over segments, so N workers follow one up to float
summation order on them; the spectral term's convergence part is a ratio of
batch norms, so each worker's is over its slice (not the same number). One
iteration is ``steps_per_iter`` steps: size it so an iteration fits the
preemption grace period.

Run it (tunelab owns the loop)::

    platform sweep search_spaces/seed_cull.yaml            # seed cull, 4 seeds
    platform sweep search_spaces/seed_cull.yaml --quick    # CPU smoke size

Sizes, by config alone: :data:`QUICK_CONFIG` is the CPU smoke size (about 1-1.5
CPU-seconds per iteration, 6 iterations); the defaults are a CPU-minutes size
(about 4.5 CPU-seconds per iteration at H = 1024); the seed document's A100 size
is ``{sample_rate: 44100, hidden: 64, n_layers: 2, H_min: 512, H_max: 2048,
h_schedule: pow2, lr: 1.0e-4, batch_size: 32, steps_per_iter: 200,
curriculum_epochs: 50, n_train_files: 500, silence_prefix_ms: 10}`` (the
silence prefix must be shorter than H_min: 441 < 512 samples).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from tunelab import Family, atomic_write_json, data_lock
from tunelab.devices import (
    DeviceFields,
    Placement,
    device_generator,
    load_generator_state,
    placement,
    shard,
)
from tunelab.errors import DataError
from tunelab.health import HealthMonitor
from tunelab.names import HEALTH_METRICS

__all__ = ["FAMILY", "QUICK_CONFIG", "Config", "OuroborosExperiment", "build", "check_data"]

# --------------------------------------------------------------------------- #
# Metric names (dashboards depend on them)
# --------------------------------------------------------------------------- #
M_TRAIN_LOSS = "train/loss"
M_TRAIN_SPEC = "train/spec"
M_TRAIN_TF = "train/tf"
M_TRAIN_ENV = "train/env"
M_TRAIN_ENV_LOG = "train/env_log"
M_TRAIN_HORIZON = "train/horizon"
M_TRAIN_LAM_SPEC = "train/lam_spec"
M_TRAIN_LAM_ENV = "train/lam_env"
M_VAL_LOSS = "val/loss"
M_VAL_AUTONOMY = "val/autonomy"
M_VAL_SPEC_CORR = "val/spec_corr"
M_VAL_AMP_PEN = "val/amp_pen"
M_VAL_PITCH_PEN = "val/pitch_pen"
M_VAL_BOUNDED_FRAC = "val/bounded_frac"

METRICS = (
    M_TRAIN_LOSS,
    M_TRAIN_SPEC,
    M_TRAIN_TF,
    M_TRAIN_ENV,
    M_TRAIN_ENV_LOG,
    M_TRAIN_HORIZON,
    M_TRAIN_LAM_SPEC,
    M_TRAIN_LAM_ENV,
    M_VAL_LOSS,
    M_VAL_AUTONOMY,
    M_VAL_SPEC_CORR,
    M_VAL_AMP_PEN,
    M_VAL_PITCH_PEN,
    M_VAL_BOUNDED_FRAC,
    *HEALTH_METRICS,  # tunelab.health
)

#: The autonomy score breakdown, reported as ``val/<key>`` and ``test/<key>``.
SCORE_KEYS = ("autonomy", "spec_corr", "amp_pen", "pitch_pen", "bounded_frac")

#: Autonomy score of a divergent (non-finite or saturated) rollout (PR #5).
AUTONOMY_SENTINEL = -5.0

#: Segment categories of the edge-biased sampler (PR #5, data/load_data.py).
ONSET, OFFSET, MID = 0, 1, 2

#: Seed of the noise initial conditions used by validation/test generation, so
#: every trial and every iteration is scored on the same draws (PR #5 used 1234).
EVAL_SEED = 1234

#: Floor of the precomputed Var(d2x) normaliser of the acceleration MSE (PR #5).
TF_VAR_FLOOR = 1e-6

_CORPUS_MARKER = "corpus.json"

#: The CPU smoke size (a spec's ``quick: {budget: 6, config: QUICK_CONFIG}``).
QUICK_CONFIG: dict[str, Any] = {
    "sample_rate": 8000,
    "hidden": 16,
    "n_train_files": 24,
    "n_val_files": 4,
    "n_test_files": 4,
    "max_segs": 192,
    "H_min": 128,
    "H_max": 512,
    "curriculum_epochs": 6,
    "batch_size": 16,
    "steps_per_iter": 8,
}


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #
# Domains of the config fields: every float is finite (``allow_inf_nan=False`` on
# the config), sizes and rates are positive, and every size has an upper bound
# far above the seed document's A100 size, so a typo (``hidden: 1e9``) is refused
# at spec validation with a message that names the field.
Ms = Annotated[float, Field(ge=0.0, le=10_000.0)]
"""A duration in milliseconds (0 allowed)."""
PosMs = Annotated[float, Field(gt=0.0, le=10_000.0)]
"""A positive duration in milliseconds."""
Hz = Annotated[float, Field(gt=0.0, le=200_000.0)]
"""A positive frequency in Hz."""
Weight = Annotated[float, Field(ge=0.0, le=1e6)]
"""A non-negative loss weight or scale."""
Frac = Annotated[float, Field(ge=0.0, le=1.0)]
"""A fraction in [0, 1]."""
Epochs = Annotated[int, Field(ge=0, le=1_000_000)]
"""A count of epochs (0 = off)."""


@dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class Config(DeviceFields):
    """Every key of an ``ouroboros`` spec's ``config``; all have defaults.

    "epoch" in field names means one tunelab iteration (``steps_per_iter``
    optimizer steps followed by validation). ``device``, ``precision`` and
    ``deterministic`` come from :class:`tunelab.devices.DeviceFields`.
    """

    # --- data: corpus --------------------------------------------------------
    data_dir: str | None = None
    """Folder of ``{stem}.wav`` + ``{stem}.txt`` (one "onset offset" pair in seconds
    per line). None: generate the synthetic corpus once under
    ``data_root/ouroboros/<hash of the data-generation fields>``."""
    data_seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 1234
    """Seed of the synthetic corpus, the file holdout and the segment sampler: the
    data is the same for every trial seed."""
    sample_rate: Annotated[int, Field(ge=1000, le=384_000)] = 16000
    """Working sample rate (Hz); files at another rate are resampled on load."""
    n_train_files: Annotated[int, Field(ge=0, le=1_000_000)] = 48
    """Training files (synthetic: generated, >= 1; real folder: cap, 0 = all left over)."""
    n_val_files: Annotated[int, Field(ge=1, le=1_000_000)] = 6
    """Held-out validation files (file-level holdout): the val/* metrics."""
    n_test_files: Annotated[int, Field(ge=1, le=1_000_000)] = 6
    """Held-out test files (file-level holdout): the test/* block of export only."""
    norm_peak: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    """Each file is peak-normalised to this amplitude on load."""
    # --- data: synthetic syllables (harmonic chirps) --------------------------
    syllables_per_file: Annotated[int, Field(ge=1, le=10_000)] = 3
    """Syllable renditions per synthetic file."""
    syllable_ms: tuple[PosMs, PosMs] = (90.0, 130.0)
    """Range of syllable durations (ms)."""
    lead_silence_ms: tuple[Ms, Ms] = (40.0, 80.0)
    """Range of the leading silence before the first syllable (ms)."""
    gap_ms: tuple[Ms, Ms] = (40.0, 80.0)
    """Range of the silent gap between syllables (ms); also the trailing silence."""
    f0_start_hz: Hz = 650.0
    """Fundamental at the syllable start (Hz)."""
    f0_end_hz: Hz = 900.0
    """Fundamental at the syllable end (Hz)."""
    f0_bend_hz: Annotated[float, Field(ge=-200_000.0, le=200_000.0)] = 150.0
    """Mid-syllable upward bend of the fundamental, f0 += bend * sin(pi * tau) (Hz)."""
    f0_jitter: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Relative per-rendition jitter of the fundamental contour."""
    n_harmonics: Annotated[int, Field(ge=1, le=256)] = 3
    """Harmonics per chirp (those above 0.45 * sample_rate are dropped)."""
    harmonic_decay: Annotated[float, Field(gt=0.0, le=10.0)] = 0.45
    """Amplitude ratio between consecutive harmonics."""
    attack_ms: Ms = 8.0
    """Raised-cosine attack of the syllable envelope (ms)."""
    release_ms: Ms = 15.0
    """Raised-cosine release of the syllable envelope (ms)."""
    noise_rms: Frac = 2e-3
    """Background noise RMS relative to the syllable peak (the near-silence floor)."""
    # --- data: edge-biased segment sampler ------------------------------------
    max_segs: Annotated[int, Field(ge=1, le=10_000_000)] = 384
    """Training segments drawn from the train files."""
    segment_ratio: tuple[Frac, Frac, Frac] = (0.4, 0.4, 0.2)
    """ONSET / OFFSET / MID sampling ratio (PR #5 default 0.4 / 0.4 / 0.2)."""
    silence_prefix_ms: Ms = 12.0
    """Silence kept before the onset in ONSET segments (ms)."""
    silence_suffix_ms: Ms = 12.0
    """Silence kept after the offset in OFFSET segments (ms)."""
    edge_ms: Ms = 10.0
    """MID windows stay this far inside [onset, offset] (ms)."""
    seg_val_frac: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    """Segments for ``val/loss``, as a fraction of ``max_segs``: cut from the val files
    with the same category ratio (at least one per category that fits, so val always
    holds ONSET examples; without replacement, so capped by what fits)."""
    seg_test_frac: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    """Segments for ``test/loss`` (export only), as a fraction of ``max_segs``: cut from
    the test files like ``seg_val_frac``."""
    # --- autonomy windows (validation / test) ---------------------------------
    eval_lead_ms: Ms = 20.0
    """Silence lead-in before the onset in autonomy windows (ms)."""
    eval_voc_ms: PosMs = 80.0
    """Vocalisation part of autonomy windows (ms)."""
    n_eval_windows: Annotated[int, Field(ge=1, le=1_000_000)] = 16
    """Autonomy windows from the val files (and, separately, from the test files)."""
    eval_nfft_ms: PosMs = 16.0
    """STFT window of the autonomy score (ms, rounded to a power of two samples)."""
    diverge_frac: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    """A rollout whose peak |x| reaches this fraction of ``sat_x`` is divergent."""
    listen_s: Annotated[float, Field(gt=0.0, le=600.0)] = 1.0
    """Length (s) of the deployed closed-loop generation export writes as generated.wav
    (same cold-start IC and RMS factor as the scored test window, which it extends; the
    deployed/* scores stay on that window). Closed-loop generation costs 0.4-0.8 ms per
    sample on one (shared) CPU core at both the seed cull's quick size (8 kHz, hidden 16)
    and the default size: measured there, an export took 1.5 s with the old 0.1 s
    window, 7.1 s at 1 s and 2.3 s at 0.25 s, which the quick block sets."""
    # --- model ----------------------------------------------------------------
    hidden: Annotated[int, Field(ge=1, le=4096)] = 32
    """Encoder width (channels of the SSM layers)."""
    n_layers: Annotated[int, Field(ge=1, le=64)] = 2
    """Causal SSM encoder layers."""
    ssm_state: Annotated[int, Field(ge=1, le=1024)] = 8
    """Diagonal SSM states per channel."""
    ssm_tau_ms: tuple[PosMs, PosMs] = (0.25, 40.0)
    """Range of the SSM decay time constants at init (ms, log-uniform)."""
    enc_input_gain: Annotated[float, Field(gt=0.0, le=1e6)] = 4.0
    """Gain on (x, x') before the encoder's (x, x', x^2, x'^2) features."""
    head_init_scale: Weight = 0.1
    """Scale of the drive head's initial weights (drives start near constants)."""
    poly_degree: Annotated[int, Field(ge=1, le=12)] = 3
    """Total degree P of the polynomial kernel sum_{i+j<=P} w_ij x^i x'^j."""
    keep_const: bool = False
    """Keep the (0, 0) constant term of the kernel (PR #5: zeroed by default)."""
    omega_min_hz: Hz = 150.0
    """Lower bound of omega / 2pi (Hz)."""
    omega_max_hz: Hz = 2000.0
    """Upper bound of omega / 2pi (Hz)."""
    gamma_max: Annotated[float, Field(gt=0.0, le=1e6)] = 1.0
    """|gamma| bound in 1/ms (gamma = gamma_max * tanh(.))."""
    w_scale: Weight = 0.1
    """Kernel weights are w_scale * omega_mid^2 * head output."""
    drive_lowpass_ms: Ms = 0.0
    """Zero-phase Gaussian low-pass of the drives, sigma in ms (0 = off). Closed-loop
    generation can only use the causal half of the kernel."""
    osc_init: bool = True
    """Seed a bounded limit cycle (small negative damping, x^2 x' re-damping,
    hardening x^3) so a noise IC ignites; head rows of those terms start at zero
    (PR #5 --osc-init; the seed's default was off)."""
    osc_tau_ms: PosMs = 4.0
    """osc_init: e-folding time of the noise-IC growth (ms); gamma0 = -2 / tau."""
    osc_amp: Annotated[float, Field(gt=0.0, le=1e3)] = 0.35
    """osc_init: limit-cycle amplitude set by the x^2 x' re-damping term."""
    osc_cubic: Weight = 0.2
    """osc_init: hardening x^3 coefficient relative to omega_mid^2 / osc_amp^2."""
    sat_x: Annotated[float, Field(gt=0.0, le=1e3)] = 1.0
    """Soft-tanh saturation level of x after each RK4 step."""
    sat_v: Annotated[float, Field(gt=0.0, le=1e3)] = 1.0
    """Soft-tanh saturation level of x' (per sample) after each RK4 step."""
    ic_noise_rms: Frac = 1e-3
    """Cold-start initial condition: (x, x') ~ N(0, ic_noise_rms^2)."""
    # --- loss -------------------------------------------------------------------
    lam_spec: Weight = 1.0
    """Weight of the multi-resolution STFT magnitude loss."""
    lam_tf: Weight = 1.0
    """Weight of the teacher-forced acceleration MSE / Var(d2x)."""
    lam_env: Weight = 1.0
    """Weight of the envelope L1 loss."""
    lam_env_log: Weight = 0.1
    """Weight of the log-ratio envelope loss |log((env(a)+eps)/(env(g)+eps))|."""
    env_ms: PosMs = 4.0
    """Gaussian envelope smoothing sigma (ms)."""
    env_log_eps: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3
    """Noise floor eps of the log-ratio envelope loss."""
    spec_warmup_epochs: Epochs = 2
    """lam_spec ramps linearly from 0 over this many epochs (0 = no ramp)."""
    env_warmup_epochs: Epochs = 2
    """lam_env and lam_env_log ramp linearly from 0 over this many epochs."""
    mrstft_ffts: Annotated[
        tuple[Annotated[int, Field(ge=8, le=1 << 16)], ...], Field(min_length=1, max_length=16)
    ] = (64, 128, 256, 512)
    """FFT sizes of the MRSTFT loss (hop = n_fft / 4); sizes > H are dropped."""
    spec_log_eps: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-2
    """eps of the MRSTFT log-magnitude term log(|S| + eps); near the data's noise-floor
    magnitude so between-harmonic bins do not dominate (DDSP used 1e-7)."""
    # --- optimisation -----------------------------------------------------------
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 2e-3
    """AdamW learning rate."""
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0
    """AdamW weight decay."""
    grad_clip: Annotated[float, Field(gt=0.0, le=1e6)] = 5.0
    """Total gradient-norm clip (PR #5: 5.0)."""
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 16
    """Segments per optimizer step; the global batch: with N workers each trains on
    batch_size / N of them."""
    steps_per_iter: Annotated[int, Field(ge=1, le=1_000_000)] = 12
    """Optimizer steps per iteration (epoch): the unit of checkpoints, so one iteration must
    fit the preemption grace period."""
    h_schedule: Literal["const", "linear", "geom", "pow2"] = "pow2"
    """Rollout horizon curriculum from H_min to H_max."""
    H_min: Annotated[int, Field(ge=16, le=1 << 22)] = 256
    """First rollout horizon (samples)."""
    H_max: Annotated[int, Field(ge=16, le=1 << 22)] = 1024
    """Final rollout horizon (samples); also the training segment length."""
    curriculum_epochs: Epochs = 12
    """Epochs over which the horizon ramps from H_min to H_max."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        def bad(key: str, rule: str) -> ValueError:
            return ValueError(f"`{key}` {rule}")

        if self.H_min < 16 or self.H_min > self.H_max:
            raise bad("H_min", f"is {self.H_min}, but must be 16 <= H_min <= H_max ({self.H_max})")
        if min(self.mrstft_ffts) > self.H_min:
            raise bad("mrstft_ffts", f"needs at least one n_fft <= H_min ({self.H_min})")
        ratio = self.segment_ratio
        if min(ratio) < 0 or abs(sum(ratio) - 1.0) > 1e-6 or ratio[ONSET] <= 0:
            raise bad("segment_ratio", f"is {ratio}, but must be >= 0, sum to 1, ONSET > 0")
        for key in ("syllable_ms", "lead_silence_ms", "gap_ms", "ssm_tau_ms"):
            lo, hi = getattr(self, key)
            if lo > hi:
                raise bad(key, f"is ({lo}, {hi}), but must be a range (low, high) with low <= high")
        if self.attack_ms + self.release_ms > self.syllable_ms[0]:
            raise bad(
                "attack_ms", "plus release_ms must fit in the shortest syllable (syllable_ms)"
            )
        if not 0 < self.omega_min_hz < self.omega_max_hz < self.sample_rate / 2:
            raise bad(
                "omega_max_hz", "must satisfy 0 < omega_min_hz < omega_max_hz < sample_rate/2"
            )
        if self.poly_degree < 1:
            raise bad("poly_degree", f"is {self.poly_degree}, but must be >= 1")
        if self.osc_init and self.poly_degree < 3:
            raise bad("osc_init", "needs poly_degree >= 3 (x^2 x' and x^3 terms)")
        if self.osc_init and 2.0 / self.osc_tau_ms >= self.gamma_max:
            raise bad("osc_tau_ms", "gives |gamma0| = 2/osc_tau_ms >= gamma_max; raise one of them")
        if self.silence_prefix_ms * self.sample_rate / 1000 >= self.H_min:
            raise bad("silence_prefix_ms", "must be shorter than H_min samples")
        if self.n_val_files < 1 or self.n_test_files < 1 or self.n_eval_windows < 1:
            raise bad("n_val_files", "n_val_files, n_test_files and n_eval_windows must be >= 1")
        if self.data_dir is None and self.n_train_files < 1:
            raise bad(
                "n_train_files", "must be >= 1 for the synthetic corpus (0 = all: real folders)"
            )
        return self

    def ms(self, milliseconds: float) -> int:
        """Milliseconds -> samples at the working sample rate."""
        return round(milliseconds * self.sample_rate / 1000)


#: Config fields that define the synthetic corpus (its folder is their hash).
_CORPUS_FIELDS = (
    "data_seed",
    "sample_rate",
    "n_train_files",
    "n_val_files",
    "n_test_files",
    "syllables_per_file",
    "syllable_ms",
    "lead_silence_ms",
    "gap_ms",
    "f0_start_hz",
    "f0_end_hz",
    "f0_bend_hz",
    "f0_jitter",
    "n_harmonics",
    "harmonic_decay",
    "attack_ms",
    "release_ms",
    "noise_rms",
)


# --------------------------------------------------------------------------- #
# Data: synthetic corpus ({stem}.wav + {stem}.txt) and the folder loader
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class Recording:
    """One file: waveform at the working rate, its derivatives and annotations."""

    stem: str
    x: np.ndarray  # (T,) peak-normalised waveform
    v: np.ndarray  # (T,) dx/dt per sample
    a: np.ndarray  # (T,) d2x/dt2 per sample
    syllables: np.ndarray  # (K, 2) int onset/offset sample indices


def write_recording(
    folder: Path, stem: str, x: np.ndarray, sr: int, syllables_s: np.ndarray
) -> None:
    """Write ``{stem}.wav`` (16-bit PCM) and ``{stem}.txt`` ("onset offset" seconds per line)."""
    sf.write(folder / f"{stem}.wav", np.clip(x, -1.0, 1.0), sr, subtype="PCM_16")
    lines = "".join(f"{on:.6f} {off:.6f}\n" for on, off in syllables_s)
    (folder / f"{stem}.txt").write_text(lines)


def read_annotations(path: Path, duration_s: float | None = None) -> np.ndarray:
    """(K, 2) onset/offset seconds from a ``.txt`` file (blank and ``#`` lines skipped).

    Each line starts with two numbers, "onset offset" in seconds (comma or
    whitespace separated; further columns, e.g. a label, are ignored), with
    0 <= onset < offset (<= ``duration_s`` plus one millisecond when given).

    Raises:
        DataError: the file is missing, unreadable, empty (no annotation line), or a
            line is not two finite numbers in that order (the message names the line).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "missing annotation file (each {stem}.wav needs a {stem}.txt)")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(
            path, "not a text file (expected 'onset offset' seconds per line)"
        ) from None
    rows = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        toks = line.split()
        try:
            on, off = float(toks[0]), float(toks[1])
        except (IndexError, ValueError):
            on = off = math.nan
        if not (math.isfinite(on) and math.isfinite(off)):
            raise DataError(
                path,
                f"line {number}: {raw.strip()!r} is not 'onset offset' (two numbers in seconds)",
            )
        if not 0.0 <= on < off:
            raise DataError(
                path, f"line {number}: needs 0 <= onset < offset, got onset {on:g}, offset {off:g}"
            )
        if duration_s is not None and off > duration_s + 1e-3:
            raise DataError(
                path,
                f"line {number}: offset {off:g} s is past the end of the recording ({duration_s:g} s)",
            )
        rows.append((on, off))
    if not rows:
        raise DataError(path, "empty annotation file (no 'onset offset' line)")
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def wav_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete WAV file, or None (reads the chunk headers only).

    Catches what decoders let through: a file cut short (the ``data`` chunk declares
    more bytes than the file holds; libsndfile silently reads what is there), an
    empty file, and a file that is not RIFF/WAVE at all.
    """
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    with path.open("rb") as f:
        head = f.read(12)
        if (
            len(head) < 12
            or head[:4] not in (b"RIFF", b"RIFX", b"RF64", b"BW64")
            or head[8:12] != b"WAVE"
        ):
            return "not a WAV file (no RIFF/WAVE header)"
        if head[:4] in (b"RF64", b"BW64"):
            return None  # 64-bit sizes live in the ds64 chunk; the decoder checks them
        endian = "<" if head[:4] == b"RIFF" else ">"
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_len = struct.unpack(endian + "4sI", f.read(8))
            if chunk_id == b"data":
                if chunk_len != 0xFFFFFFFF and pos + 8 + chunk_len > size:
                    return (
                        f"truncated: its data chunk declares {chunk_len} bytes of audio, "
                        f"the file holds {size - pos - 8}"
                    )
                return None
            pos += 8 + chunk_len + (chunk_len & 1)
    return "truncated or not audio: no 'data' chunk"


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A WAV file as a mono float64 waveform (channels averaged) and its sample rate.

    Raises:
        DataError: missing, garbage, truncated, empty, non-finite or all-zero audio.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "missing recording")
    problem = wav_problem(path)
    if problem is not None:
        raise DataError(path, problem)
    try:
        audio, sr = sf.read(path, dtype="float64", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as err:
        raise DataError(path, f"cannot decode the audio ({err})") from None
    if audio.shape[0] == 0:
        raise DataError(path, "no audio samples")
    x = audio.mean(axis=1)
    if not np.isfinite(x).all():
        raise DataError(path, "holds non-finite (NaN or infinite) samples")
    if not np.abs(x).max() > 0:
        raise DataError(path, "silent: every sample is 0")
    return x, int(sr)


def synth_syllable_file(cfg: Config, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic recording: leading silence + harmonic-chirp syllables + noise.

    File ``index`` depends only on (``data_seed``, ``index``). Returns the
    waveform (peak 0.9) and the (K, 2) onset/offset times in seconds.
    """
    rng = np.random.default_rng([cfg.data_seed, index])
    sr = cfg.sample_rate
    durs = rng.uniform(*cfg.syllable_ms, cfg.syllables_per_file) / 1000
    gaps = rng.uniform(*cfg.gap_ms, cfg.syllables_per_file) / 1000
    lead = rng.uniform(*cfg.lead_silence_ms) / 1000
    x = np.zeros(math.ceil((lead + durs.sum() + gaps.sum()) * sr) + 1)
    syllables = []
    t0 = lead
    for dur, gap in zip(durs, gaps, strict=True):
        n = int(dur * sr)
        tau = np.arange(n) / n
        scale = 1.0 + cfg.f0_jitter * rng.uniform(-1, 1)
        f0 = scale * (
            cfg.f0_start_hz
            + (cfg.f0_end_hz - cfg.f0_start_hz) * tau
            + cfg.f0_bend_hz * np.sin(np.pi * tau)
        )
        phase = 2 * np.pi * np.cumsum(f0) / sr + rng.uniform(0, 2 * np.pi)
        y = sum(
            cfg.harmonic_decay**h * np.sin((h + 1) * phase)
            for h in range(cfg.n_harmonics)
            if (h + 1) * f0.max() < 0.45 * sr
        )
        env = np.ones(n)
        na, nr = cfg.ms(cfg.attack_ms), cfg.ms(cfg.release_ms)
        env[:na] = 0.5 - 0.5 * np.cos(np.pi * np.arange(na) / na)
        env[n - nr :] = 0.5 + 0.5 * np.cos(np.pi * np.arange(1, nr + 1) / nr)
        i0 = round(t0 * sr)
        x[i0 : i0 + n] += env * y
        syllables.append((i0 / sr, (i0 + n) / sr))
        t0 = (i0 + n) / sr + gap
    x /= np.abs(x).max()
    x += cfg.noise_rms * rng.standard_normal(x.shape)
    return 0.9 * x / np.abs(x).max(), np.asarray(syllables)


def corpus_dir(cfg: Config, data_root: Path) -> Path:
    """``data_root/ouroboros/<hash>``: the hash covers every data-generation field."""
    fields = {k: getattr(cfg, k) for k in _CORPUS_FIELDS}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return Path(data_root) / "ouroboros" / digest


def ensure_corpus(cfg: Config, data_root: Path) -> Path:
    """Generate the synthetic corpus once (inter-process locked, atomic rename)."""
    folder = corpus_dir(cfg, data_root)
    with data_lock(folder):
        if (folder / _CORPUS_MARKER).exists():
            return folder
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        n_files = cfg.n_train_files + cfg.n_val_files + cfg.n_test_files
        for i in range(n_files):
            x, syl = synth_syllable_file(cfg, i)
            write_recording(tmp, f"syn{i:05d}", x, cfg.sample_rate, syl)
        fields = {k: getattr(cfg, k) for k in _CORPUS_FIELDS}
        atomic_write_json(tmp / _CORPUS_MARKER, {"n_files": n_files, "fields": fields})
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def list_stems(folder: Path) -> list[str]:
    """The stems of the ``{stem}.wav`` + ``{stem}.txt`` pairs in ``folder``, sorted.

    Raises:
        DataError: the folder is missing, or a ``.wav`` has no ``.txt`` (or a ``.txt``
            no ``.wav``): an unpaired file would silently change the file holdout.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "data folder does not exist")
    wavs = {p.stem for p in folder.glob("*.wav")}
    txts = {p.stem for p in folder.glob("*.txt")}
    for stem in sorted(wavs - txts):
        raise DataError(folder / f"{stem}.txt", f"missing annotation file for {stem}.wav")
    for stem in sorted(txts - wavs):
        raise DataError(folder / f"{stem}.wav", f"missing recording for the annotations {stem}.txt")
    return sorted(wavs)


def load_recording(folder: Path, stem: str, sample_rate: int, norm_peak: float) -> Recording:
    """Read one ``{stem}.wav`` + ``{stem}.txt`` (int16 or float WAV, any rate, mono mix).

    Raises:
        DataError: a bad WAV (:func:`read_wav`) or annotation (:func:`read_annotations`).
    """
    x, sr = read_wav(Path(folder) / f"{stem}.wav")
    annotations = read_annotations(Path(folder) / f"{stem}.txt", duration_s=len(x) / sr)
    if sr != sample_rate:
        from scipy.signal import resample_poly  # slow import, only for real recordings

        g = math.gcd(sr, sample_rate)
        x = resample_poly(x, sample_rate // g, sr // g)
    x = norm_peak * x / max(float(np.abs(x).max()), 1e-12)
    v = np.gradient(x)
    syl = np.rint(annotations * sample_rate).astype(np.int64)
    return Recording(
        stem, x.astype(np.float32), v.astype(np.float32), np.gradient(v).astype(np.float32), syl
    )


def split_files(
    stems: list[str], n_val: int, n_test: int, n_train: int, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """File-level holdout: shuffle by ``seed``; test first, then val, then train.

    ``n_train = 0`` keeps every remaining file for training.
    """
    if len(stems) < n_val + n_test + 1:
        raise ValueError(f"need at least {n_val + n_test + 1} annotated files, found {len(stems)}")
    order = [stems[i] for i in np.random.default_rng(seed).permutation(len(stems))]
    test, val, rest = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return rest[:n_train] if n_train > 0 else rest, val, test


def segment_pools(
    recs: list[Recording], length: int, prefix: int, suffix: int, edge: int
) -> dict[int, list[tuple[int, int]]]:
    """(recording, start) candidates per category (PR #5, get_audio_training_edge_weighted).

    ONSET: starts ``prefix`` samples before an onset; OFFSET: ends ``suffix``
    samples after an offset; MID: non-overlapping windows inside
    [onset + edge, offset - edge].
    """
    pools: dict[int, list[tuple[int, int]]] = {ONSET: [], OFFSET: [], MID: []}
    for r, rec in enumerate(recs):
        n = len(rec.x)
        for on, off in rec.syllables:
            if on - prefix >= 0 and on - prefix + length <= n:
                pools[ONSET].append((r, int(on - prefix)))
            if off + suffix - length >= 0 and off + suffix <= n:
                pools[OFFSET].append((r, int(off + suffix - length)))
            start = on + edge
            while start + length <= off - edge:
                pools[MID].append((r, int(start)))
                start += length
    return pools


def ratio_counts(ratio: tuple[float, ...], total: int) -> list[int]:
    """Largest-remainder integer counts of ``total`` in proportion to ``ratio``."""
    raw = [r * total for r in ratio]
    counts = [math.floor(c) for c in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def sample_segments(
    pools: dict[int, list[tuple[int, int]]],
    ratio: tuple[float, float, float],
    max_segs: int,
    rng: np.random.Generator,
) -> list[tuple[int, int, int]]:
    """Draw ``max_segs`` (recording, start, category) with the ONSET/OFFSET/MID ratio.

    Without replacement while a pool is large enough, with replacement otherwise.
    """
    out: list[tuple[int, int, int]] = []
    for cat, n in zip((ONSET, OFFSET, MID), ratio_counts(ratio, max_segs), strict=True):
        pool = pools[cat]
        if n == 0:
            continue
        if not pool:
            if cat == ONSET:
                raise ValueError(
                    "no ONSET segment fits: lengthen the leading silence or shorten H_max"
                )
            continue
        idx = rng.choice(len(pool), size=n, replace=n > len(pool))
        out += [(*pool[i], cat) for i in idx]
    return out


def heldout_segments(
    pools: dict[int, list[tuple[int, int]]],
    ratio: tuple[float, float, float],
    total: int,
    rng: np.random.Generator,
) -> list[tuple[int, int, int]]:
    """Draw about ``total`` held-out (recording, start, category) with the category ratio.

    Stratified like PR #5's _stratified_split: every category with a positive
    ratio and a non-empty pool gets at least one segment, so val/test always
    hold ONSET examples even at a low ONSET ratio. Without replacement (a
    held-out set never repeats a segment), so a small pool caps its category.
    """
    out: list[tuple[int, int, int]] = []
    for cat, n in zip((ONSET, OFFSET, MID), ratio_counts(ratio, total), strict=True):
        pool = pools[cat]
        n = min(max(n, 1 if ratio[cat] > 0 else 0), len(pool))
        if cat == ONSET and n == 0:
            raise ValueError(
                "no ONSET segment fits in the held-out files: lengthen the leading silence "
                "or shorten H_max"
            )
        idx = np.sort(rng.choice(len(pool), size=n, replace=False))
        out += [(*pool[i], cat) for i in idx]
    return out


@dataclasses.dataclass
class Segments:
    """A set of training segments (tensors, all (N, L) but ``cat`` (N,))."""

    x: Tensor
    v: Tensor
    a: Tensor
    cat: Tensor

    def subset(self, idx: np.ndarray | Tensor) -> Segments:
        i = torch.as_tensor(idx, dtype=torch.long, device=self.x.device)
        return Segments(self.x[i], self.v[i], self.a[i], self.cat[i])

    def to(self, device: torch.device) -> Segments:
        """The segments on ``device`` (itself when they are there already)."""
        if self.x.device == device:
            return self
        return Segments(
            self.x.to(device), self.v.to(device), self.a.to(device), self.cat.to(device)
        )

    def shard(self) -> Segments:
        """This worker's rows of a global batch (:func:`tunelab.devices.shard`)."""
        return Segments(shard(self.x), shard(self.v), shard(self.a), shard(self.cat))

    def __len__(self) -> int:
        return len(self.cat)


def gather_segments(
    recs: list[Recording], picks: list[tuple[int, int, int]], length: int
) -> Segments:
    """Cut (recording, start, category) picks into tensors."""

    def cut(field: str) -> Tensor:
        rows = [getattr(recs[r], field)[s : s + length] for r, s, _ in picks]
        return torch.from_numpy(np.stack(rows))

    return Segments(cut("x"), cut("v"), cut("a"), torch.tensor([c for _, _, c in picks]))


def autonomy_windows(recs: list[Recording], lead: int, voc: int, limit: int) -> Tensor:
    """Cold-start windows (silence lead-in + vocalisation), first ``limit`` that fit: (N, W)."""
    rows = []
    for rec in recs:
        for on, _ in rec.syllables:
            if on - lead >= 0 and on + voc <= len(rec.x):
                rows.append(rec.x[on - lead : on + voc])
    if not rows:
        raise ValueError("no autonomy window fits: shorten eval_lead_ms / eval_voc_ms")
    return torch.from_numpy(np.stack(rows[:limit]))


@dataclasses.dataclass
class Corpus:
    """Everything a trial needs from disk; identical for every trial seed."""

    train: Segments
    val: Segments
    test: Segments
    val_windows: Tensor  # (Nv, W)
    test_windows: Tensor  # (Nt, W)
    files: dict[str, list[str]]


#: Generator streams of the data sampler (``default_rng([data_seed, stream])``;
#: training keeps ``default_rng(data_seed)``, PR #5's sampler seed).
_STREAM_VAL_SEGS, _STREAM_TEST_SEGS = 1, 2


def load_corpus(cfg: Config, data_root: Path) -> Corpus:
    """Folder -> file holdout -> edge-biased segments per split + autonomy windows.

    train / val / test are disjoint files (:func:`split_files`); every segment
    and window of a split is cut from that split's files only.

    Raises:
        DataError: a bad file in the folder (see :func:`check_corpus`).
    """
    folder = corpus_folder(cfg, data_root, create=True)
    stems = _enough_files(folder, cfg)
    train_f, val_f, test_f = split_files(
        stems, cfg.n_val_files, cfg.n_test_files, cfg.n_train_files, cfg.data_seed
    )

    def load(names: list[str]) -> list[Recording]:
        return [load_recording(folder, s, cfg.sample_rate, cfg.norm_peak) for s in names]

    def pools(recs: list[Recording]) -> dict[int, list[tuple[int, int]]]:
        prefix, suffix = cfg.ms(cfg.silence_prefix_ms), cfg.ms(cfg.silence_suffix_ms)
        return segment_pools(recs, cfg.H_max, prefix, suffix, cfg.ms(cfg.edge_ms))

    def heldout(recs: list[Recording], frac: float, stream: int) -> Segments:
        rng = np.random.default_rng([cfg.data_seed, stream])
        total = max(1, round(frac * cfg.max_segs))
        picks = heldout_segments(pools(recs), cfg.segment_ratio, total, rng)
        return gather_segments(recs, picks, cfg.H_max)

    train_recs, val_recs, test_recs = load(train_f), load(val_f), load(test_f)
    rng = np.random.default_rng(cfg.data_seed)
    picks = sample_segments(pools(train_recs), cfg.segment_ratio, cfg.max_segs, rng)
    lead, voc = cfg.ms(cfg.eval_lead_ms), cfg.ms(cfg.eval_voc_ms)
    return Corpus(
        train=gather_segments(train_recs, picks, cfg.H_max),
        val=heldout(val_recs, cfg.seg_val_frac, _STREAM_VAL_SEGS),
        test=heldout(test_recs, cfg.seg_test_frac, _STREAM_TEST_SEGS),
        val_windows=autonomy_windows(val_recs, lead, voc, cfg.n_eval_windows),
        test_windows=autonomy_windows(test_recs, lead, voc, cfg.n_eval_windows),
        files={"train": train_f, "val": val_f, "test": test_f},
    )


# --------------------------------------------------------------------------- #
# Data check (tunelab calls FAMILY.check_data before any trial starts)
# --------------------------------------------------------------------------- #
def corpus_folder(cfg: Config, data_root: Path, *, create: bool = False) -> Path:
    """The folder ``cfg`` trains on: ``data_dir``, or the synthetic corpus (made if ``create``)."""
    if cfg.data_dir is not None:
        return Path(cfg.data_dir)
    return ensure_corpus(cfg, data_root) if create else corpus_dir(cfg, data_root)


def _enough_files(folder: Path, cfg: Config) -> list[str]:
    stems = list_stems(folder)
    need = cfg.n_val_files + cfg.n_test_files + 1
    if len(stems) < need:
        raise DataError(
            folder,
            f"holds {len(stems)} annotated recording(s); the file holdout needs at least {need} "
            "(n_val_files + n_test_files + 1 for training)",
        )
    return stems


#: Folders :func:`check_corpus` passed, by (folder, file names, sizes and mtimes).
_CHECKED: set[tuple[Any, ...]] = set()


def check_corpus(folder: Path) -> None:
    """Read every ``{stem}.wav`` + ``{stem}.txt`` pair of ``folder`` as a trial would.

    Raises:
        DataError: the folder is missing; a ``.wav`` without its ``.txt`` (or the
            reverse); a garbage, truncated, empty, non-finite or silent WAV; a
            missing, empty or non-numeric annotation, or one past the end of its
            recording. The message names the file and the reason.
    """
    folder = Path(folder)
    stems = list_stems(folder)
    signature = (
        str(folder.resolve()),
        tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())),
    )
    if signature in _CHECKED:
        return
    for stem in stems:
        x, sr = read_wav(folder / f"{stem}.wav")
        read_annotations(folder / f"{stem}.txt", duration_s=len(x) / sr)
    _CHECKED.add(signature)


def check_data(cfg: Config, data_root: Path) -> None:
    """The family's data check: the folder ``cfg`` trains on, before any trial starts.

    A real folder (``data_dir``) is checked file by file and must hold enough
    annotated recordings for the file holdout. The synthetic corpus is checked
    once generated (before that, trials generate it); a damaged one names the
    file and says to delete the folder so it is generated again.
    """
    folder = corpus_folder(cfg, data_root)
    if cfg.data_dir is None and not (folder / _CORPUS_MARKER).exists():
        return  # not generated yet: the first trial generates it
    try:
        check_corpus(folder)
        _enough_files(folder, cfg)
    except DataError as err:
        if cfg.data_dir is not None:
            raise
        raise DataError(
            err.file, f"{err.reason} (synthetic corpus: delete {folder} to generate it again)"
        ) from None


# --------------------------------------------------------------------------- #
# Model: causal SSM encoder -> drives (omega, gamma, w_ij) -> polynomial ODE
# --------------------------------------------------------------------------- #
def poly_terms(degree: int, keep_const: bool) -> list[tuple[int, int]]:
    """Exponents (i, j) of x^i x'^j with i + j <= degree; (0, 0) only if keep_const."""
    terms = [(i, d - i) for d in range(degree + 1) for i in range(d, -1, -1)]
    return terms if keep_const else terms[1:]


def autocast_off(device: torch.device) -> AbstractContextManager[Any]:
    """Autocast disabled on ``device`` (nothing to disable where autocast does not exist)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class SSMLayer(nn.Module):
    """Pre-norm residual block: LayerNorm -> diagonal real SSM (S4D-real) -> GELU -> Linear.

    Per channel d and state n: h_t = a h_{t-1} + B z_t, y_t = sum_n C h_t + D z_t,
    a = exp(-1 / tau). Training runs it as a causal FFT convolution with kernel
    K_d(k) = sum_n C B a^k, in fp32 under any autocast (torch.fft has no bf16 and
    fp16 only at powers of two); generation steps the recurrence one sample at a time.
    """

    def __init__(self, d: int, n: int, tau_min: float, tau_max: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        lo, hi = math.log(tau_min), math.log(tau_max)
        self.log_tau = nn.Parameter(lo + (hi - lo) * torch.rand(d, n))  # (d, n) log samples
        self.B = nn.Parameter(torch.randn(d, n) / math.sqrt(n))
        self.C = nn.Parameter(torch.randn(d, n) / math.sqrt(n))
        self.D = nn.Parameter(torch.randn(d))
        self.out = nn.Linear(d, d)

    def forward(self, u: Tensor) -> Tensor:  # (B, L, d) -> (B, L, d)
        with autocast_off(u.device):  # the convolution in fp32
            z = self.norm(u.float())
            length = z.shape[1]
            t = torch.arange(length, dtype=z.dtype, device=z.device)
            decay = torch.exp(-t / self.log_tau.exp()[..., None])  # (d, n, L)
            kernel = torch.einsum("dn,dnl->dl", self.B * self.C, decay)  # (d, L)
            n_fft = 1 << (2 * length - 1).bit_length()
            zf = torch.fft.rfft(z.transpose(1, 2), n=n_fft)  # (B, d, F)
            y = torch.fft.irfft(zf * torch.fft.rfft(kernel, n=n_fft), n=n_fft)[..., :length]
            y = y.transpose(1, 2) + self.D * z  # (B, L, d)
        return u + self.out(F.gelu(y))

    def step(self, u: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:  # (B, d), (B, d, n)
        z = self.norm(u)
        h = torch.exp(-1.0 / self.log_tau.exp()) * h + self.B * z[..., None]  # (B, d, n)
        y = (self.C * h).sum(-1) + self.D * z  # (B, d)
        return u + self.out(F.gelu(y)), h


class Encoder(nn.Module):
    """Causal SSM over (x, x', x^2, x'^2) features -> raw drives (2 + n_terms per sample)."""

    def __init__(self, cfg: Config, n_out: int) -> None:
        super().__init__()
        self.gain = cfg.enc_input_gain
        self.inp = nn.Linear(4, cfg.hidden)
        tau = (max(cfg.ms(cfg.ssm_tau_ms[0]), 1.0), cfg.ssm_tau_ms[1] * cfg.sample_rate / 1000)
        self.layers = nn.ModuleList(
            SSMLayer(cfg.hidden, cfg.ssm_state, *tau) for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, n_out)
        with torch.no_grad():
            self.head.weight.mul_(cfg.head_init_scale)
            self.head.bias.zero_()

    def features(self, x: Tensor, v: Tensor) -> Tensor:  # (...), (...) -> (..., 4)
        gx, gv = self.gain * x, self.gain * v
        return torch.stack([gx, gv, gx * gx, gv * gv], -1)

    def forward(self, x: Tensor, v: Tensor) -> Tensor:  # (B, L) x2 -> (B, L, n_out)
        u = self.inp(self.features(x, v))
        for layer in self.layers:
            u = layer(u)
        return self.head(self.norm(u))

    def ssm_layers(self) -> list[SSMLayer]:
        return [cast(SSMLayer, layer) for layer in self.layers]

    def init_state(self, batch: int) -> list[Tensor]:
        return [
            torch.zeros(batch, *layer.log_tau.shape, device=layer.log_tau.device)
            for layer in self.ssm_layers()
        ]

    def step(self, x: Tensor, v: Tensor, states: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        u = self.inp(self.features(x, v))  # (B, d)
        new = []
        for layer, h in zip(self.ssm_layers(), states, strict=True):
            u, h = layer.step(u, h)
            new.append(h)
        return self.head(self.norm(u)), new


@dataclasses.dataclass
class Drives:
    """ODE drives per sample: omega (rad/sample), gamma (1/sample), w (per term)."""

    omega: Tensor  # (B, L)
    gamma: Tensor  # (B, L)
    w: Tensor  # (B, L, T)


def gaussian_kernel(sigma: float) -> Tensor:
    """Normalised Gaussian taps over +-3 sigma samples: (2M+1,)."""
    half = max(1, math.ceil(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return g / g.sum()


def smooth_same(x: Tensor, kernel: Tensor) -> Tensor:
    """Zero-phase smoothing of (B, C, L) along L, edge-renormalised (any L)."""
    k = kernel.to(x.device, x.dtype).view(1, 1, -1).expand(x.shape[1], 1, -1)
    pad = kernel.numel() // 2
    num = F.conv1d(x, k, padding=pad, groups=x.shape[1])
    den = F.conv1d(torch.ones_like(x[:1]), k, padding=pad, groups=x.shape[1])
    return num / den


class PolyOuroboros(nn.Module):
    """Encoder + drive parametrisation + polynomial kernel (PR #5, poly Ouroboros)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.degree = cfg.poly_degree
        self.terms = poly_terms(cfg.poly_degree, cfg.keep_const)
        self.encoder = Encoder(cfg, 2 + len(self.terms))
        sr = cfg.sample_rate
        self.f_lo, self.f_hi = cfg.omega_min_hz, cfg.omega_max_hz
        self.gamma_max = cfg.gamma_max * 1000 / sr  # 1/ms -> 1/sample
        self.omega_mid = 2 * math.pi * 0.5 * (self.f_lo + self.f_hi) / sr
        self.w_scale = cfg.w_scale * self.omega_mid**2
        p1 = cfg.poly_degree + 1
        sel = torch.zeros(len(self.terms), p1 * p1)  # term -> flat (i, j) of the coefficient matrix
        for t, (i, j) in enumerate(self.terms):
            sel[t, i * p1 + j] = 1.0
        self.register_buffer("sel", sel, persistent=False)
        self.sel: Tensor
        lowpass = (
            gaussian_kernel(cfg.ms(cfg.drive_lowpass_ms)) if cfg.drive_lowpass_ms > 0 else None
        )
        self.register_buffer("lowpass", lowpass, persistent=False)  # moves with the model
        self.lowpass: Tensor | None
        if cfg.osc_init:
            self._osc_init()

    def _osc_init(self) -> None:
        """Limit-cycle prior (PR #5 --osc-init): van der Pol damping + hardening cubic.

        gamma0 = -2 / tau (noise grows as exp(t / tau)); x^2 x' re-damping
        c = -4 gamma0 / A^2 saturates the growth at amplitude A; x^3 hardening
        h = osc_cubic * omega_mid^2 / A^2. The head rows of these terms are zeroed
        so they start as clean constants the encoder learns to modulate.
        """
        cfg = self.cfg
        gamma0 = -2.0 / cfg.ms(cfg.osc_tau_ms)
        c = -4.0 * gamma0 / cfg.osc_amp**2
        h = cfg.osc_cubic * self.omega_mid**2 / cfg.osc_amp**2
        head = self.encoder.head
        rows = {1: math.atanh(gamma0 / self.gamma_max)}
        rows[2 + self.terms.index((2, 1))] = c / self.w_scale
        rows[2 + self.terms.index((3, 0))] = h / self.w_scale
        with torch.no_grad():
            for row, bias in rows.items():
                head.weight[row].zero_()
                head.bias[row] = bias

    def raw_to_drives(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # (..., 2+T)
        f = self.f_lo + (self.f_hi - self.f_lo) * torch.sigmoid(raw[..., 0])  # Hz
        omega = (2 * math.pi / self.cfg.sample_rate) * f
        gamma = self.gamma_max * torch.tanh(raw[..., 1])
        return omega, gamma, self.w_scale * raw[..., 2:]

    def drives(
        self,
        x: Tensor,
        v: Tensor,
        *,
        autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> Drives:
        """Teacher-forced drives from a target (B, L) waveform and its derivative (fp32).

        The encoder runs under ``autocast`` (a trial's ``Placement.autocast``); the drive
        maps and the low-pass in fp32.
        """
        with autocast():
            raw = self.encoder(x, v)  # (B, L, 2+T)
        omega, gamma, w = self.raw_to_drives(raw.float())
        if self.lowpass is not None:  # zero-phase Gaussian low-pass (PR #5 drive_lowpass_ms)
            stacked = torch.cat([omega[..., None], gamma[..., None], w], -1)  # (B, L, 2+T)
            stacked = smooth_same(stacked.transpose(1, 2), self.lowpass).transpose(1, 2)
            omega, gamma, w = stacked[..., 0], stacked[..., 1], stacked[..., 2:]
        return Drives(omega, gamma, w)

    def coefficients(self, omega: Tensor, gamma: Tensor, w: Tensor) -> Tensor:
        """Coefficient matrix K with x'' = -sum_ij K_ij x^i x'^j: (..., P+1, P+1).

        K_10 += omega^2 and K_01 += gamma are folded in once over the whole
        horizon, so the rollout's inner loop never squares or slices drives.
        """
        p1 = self.degree + 1
        k = w @ self.sel.to(w.dtype)  # (..., (P+1)^2)
        k = k.unflatten(-1, (p1, p1)).clone()
        k[..., 1, 0] += omega * omega
        k[..., 0, 1] += gamma
        return k

    def accel(self, x: Tensor, v: Tensor, drives: Drives) -> Tensor:
        """Model acceleration on given states, vectorised over time: (B, L)."""
        coef = self.coefficients(drives.omega, drives.gamma, drives.w)  # (B, L, P+1, P+1)
        px, pv = powers(x, self.degree), powers(v, self.degree)  # (B, L, P+1)
        return -torch.einsum("bli,blij,blj->bl", px, coef, pv)


# --------------------------------------------------------------------------- #
# Integration: RK4, one step per sample, soft-tanh saturation of (x, x')
# --------------------------------------------------------------------------- #
def powers(s: Tensor, degree: int) -> Tensor:
    """[1, s, s^2, ..., s^P] by repeated multiplication: (..., P+1)."""
    cols = [torch.ones_like(s), s]
    for _ in range(degree - 1):
        cols.append(cols[-1] * s)
    return torch.stack(cols, -1)


def field_matrix(coef: Tensor) -> Tensor:
    """Coefficients (..., P+1, P+1) -> F (..., (P+1)^2, 2) with d(x, x')/dt = m(s) @ F.

    m(s) is the flattened monomial matrix x^i x'^j; column 0 of F picks x'
    (the (0, 1) monomial), column 1 is -K (x'' = -sum_ij K_ij x^i x'^j).
    """
    flat = coef.flatten(-2)  # (..., (P+1)^2)
    pick_v = torch.zeros(flat.shape[-1], dtype=coef.dtype, device=coef.device)
    pick_v[1] = 1.0  # flat index of (i, j) = (0, 1)
    return torch.stack([pick_v.expand_as(flat), -flat], -1)


def _field(s: Tensor, fm: Tensor, ones: Tensor, degree: int) -> Tensor:
    """d(x, x')/dt for state s (B, 2) under field matrix fm (B, (P+1)^2, 2): (B, 2)."""
    cols = [ones, s]
    for _ in range(degree - 1):
        cols.append(cols[-1] * s)
    pw = torch.stack(cols, -1)  # (B, 2, P+1): row 0 powers of x, row 1 powers of x'
    mono = pw[:, 0, :, None] * pw[:, 1, None, :]  # (B, P+1, P+1) x^i x'^j
    return (mono.view(s.shape[0], 1, -1) @ fm).view(s.shape[0], 2)


def rk4_step(
    s: Tensor, fm: Tensor, degree: int, sat: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One RK4 step (dt = 1 sample, drives held over the step) + soft-tanh saturation.

    Returns the next state (B, 2) and the stage states s2, s3, s4 (for the adjoint).
    """
    ones = torch.ones_like(s)
    k1 = _field(s, fm, ones, degree)
    s2 = torch.add(s, k1, alpha=0.5)
    k2 = _field(s2, fm, ones, degree)
    s3 = torch.add(s, k2, alpha=0.5)
    k3 = _field(s3, fm, ones, degree)
    s4 = s + k3
    k4 = _field(s4, fm, ones, degree)
    u = torch.add(s, torch.add(k1 + k4, k2 + k3, alpha=2.0), alpha=1.0 / 6.0)
    return sat * torch.tanh(u / sat), s2, s3, s4


class _RK4Rollout(torch.autograd.Function):
    """RK4 rollout with an exact discrete adjoint (gradient of the same float ops).

    Forward runs the sequential loop without recording an autograd graph (the
    recording, not the maths, dominates a loop of tiny ops). Backward is the
    adjoint of the discrete scheme: with J = d f / d(x, x') = [[0, 1], [a_x, a_v]]
    at the four stage states, every step's Jacobian M_k = d s_{k+1} / d s_k and
    the stage adjoints are built for the whole horizon at once; the only
    sequential part left is the 2x2 linear recurrence g_k = M_k^T g_{k+1} + e_k.

    Device-agnostic: every tensor it makes follows ``coef`` (CPU or CUDA, same
    code, no host sync). Give it fp32 inputs outside autocast (the callers
    do): under a bf16 autocast its small matmuls would round every step. On
    CUDA both sequential loops (H steps forward, H steps back) launch a few
    small kernels per step, so a rollout is bound by launch latency, not by
    arithmetic; the batch rides along for free.
    """

    @staticmethod
    def forward(
        ctx: Any, x0: Tensor, v0: Tensor, coef: Tensor, degree: int, sat_x: float, sat_v: float
    ) -> Tensor:
        sat = torch.tensor([sat_x, sat_v], dtype=coef.dtype, device=coef.device)
        s = torch.stack([x0, v0], -1)  # (B, 2)
        states, z2, z3, z4 = [s], [], [], []
        with autocast_off(coef.device):  # in the inputs' dtype
            for fm in field_matrix(coef).unbind(1)[:-1]:  # hoisted: one unbind, no slicing
                s, a, b, c = rk4_step(s, fm, degree, sat)
                states.append(s)
                z2.append(a)
                z3.append(b)
                z4.append(c)
        S = torch.stack(states, 1)  # (B, H, 2)
        ctx.save_for_backward(coef)
        ctx.degree, ctx.sat, ctx.S = degree, sat, S
        ctx.Z = (
            None
            if not z2
            else torch.stack([S[:, :-1], *(torch.stack(z, 1) for z in (z2, z3, z4))], 2)
        )
        return S[..., 0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # gy (B, H)
        (coef,) = ctx.saved_tensors
        S, Z, sat, degree = ctx.S, ctx.Z, ctx.sat, ctx.degree
        e = torch.stack([gy, torch.zeros_like(gy)], -1)  # (B, H, 2) direct gradient on states
        if Z is None:
            return e[:, 0, 0], e[:, 0, 1], torch.zeros_like(coef), None, None, None
        K = coef[:, :-1]  # (B, H-1, P+1, P+1): drives of steps 0 .. H-2
        px, pv = powers(Z[..., 0], degree), powers(Z[..., 1], degree)  # (B, H-1, 4, P+1)
        i = torch.arange(1, degree + 1, dtype=coef.dtype, device=coef.device)
        dpx = torch.cat([torch.zeros_like(px[..., :1]), i * px[..., :-1]], -1)  # d x^i / dx
        dpv = torch.cat([torch.zeros_like(pv[..., :1]), i * pv[..., :-1]], -1)
        a_x = -torch.einsum("bhsi,bhij,bhsj->bhs", dpx, K, pv)  # (B, H-1, 4)
        a_v = -torch.einsum("bhsi,bhij,bhsj->bhs", px, K, dpv)
        T = coef.new_zeros(*a_x.shape, 2, 2)  # J^T = [[0, a_x], [1, a_v]]
        T[..., 0, 1], T[..., 1, 0], T[..., 1, 1] = a_x, 1.0, a_v
        eye = torch.eye(2, dtype=coef.dtype, device=coef.device)
        A4 = (eye / 6).expand_as(T[:, :, 3])  # stage adjoints dk_i = A_i du (du: pre-saturation)
        A3 = eye / 3 + T[:, :, 3] @ A4
        A2 = eye / 3 + 0.5 * T[:, :, 2] @ A3
        A1 = eye / 6 + 0.5 * T[:, :, 1] @ A2
        G = eye + T[:, :, 0] @ A1 + T[:, :, 1] @ A2 + T[:, :, 2] @ A3 + T[:, :, 3] @ A4
        dsat = 1.0 - (S[:, 1:] / sat).square()  # (B, H-1, 2) tanh' at each output
        MT = G * dsat[..., None, :]  # (B, H-1, 2, 2) = M_k^T
        g = e[:, -1]
        gs = [g]
        for mt, ek in zip(reversed(MT.unbind(1)), reversed(e[:, :-1].unbind(1)), strict=True):
            g = (mt @ g[:, :, None]).view(-1, 2) + ek
            gs.append(g)
        gs.reverse()
        g_all = torch.stack(gs, 1)  # (B, H, 2) adjoint of every state
        du = dsat * g_all[:, 1:]  # (B, H-1, 2)
        A = torch.stack([A1, A2, A3, A4], 2)  # (B, H-1, 4, 2, 2)
        dk_v = (A[..., 1, :] * du[:, :, None, :]).sum(-1)  # (B, H-1, 4) adjoint of a at stages
        g_coef = torch.zeros_like(coef)
        g_coef[:, :-1] = -torch.einsum("bhs,bhsi,bhsj->bhij", dk_v, px, pv)
        return g_all[:, 0, 0], g_all[:, 0, 1], g_coef, None, None, None


def rk4_rollout(
    x0: Tensor, v0: Tensor, coef: Tensor, degree: int, sat_x: float, sat_v: float
) -> Tensor:
    """Autonomous RK4 rollout from (x0, v0) under per-sample coefficients (fast path).

    Args:
        x0, v0: (B,) initial condition.
        coef: (B, H, P+1, P+1) from :meth:`PolyOuroboros.coefficients`.

    Returns:
        (B, H) states x_0 .. x_{H-1} (x_0 = the IC; drives k advance k -> k+1).

    Runs on the inputs' device (CPU or CUDA); pass fp32 tensors outside autocast.
    PR #5's speedups (omega^2 and gamma folded into the coefficients once per
    horizon, drives sliced once per step, powers reused) plus an exact
    adjoint instead of a recorded graph (:class:`_RK4Rollout`). Differentiable
    once; equal to :func:`rk4_rollout_naive` up to float rounding.
    """
    out: Tensor = _RK4Rollout.apply(x0, v0, coef, degree, sat_x, sat_v)
    return out


def rk4_rollout_naive(
    x0: Tensor,
    v0: Tensor,
    omega: Tensor,
    gamma: Tensor,
    w: Tensor,
    terms: list[tuple[int, int]],
    sat_x: float,
    sat_v: float,
) -> Tensor:
    """Reference rollout, written the obvious way (the pre-PR-#5-speedup kernel).

    Eager autograd; every RK4 substep re-slices the drives, re-squares omega
    and builds the kernel from ``torch.pow`` with freshly allocated exponent
    tensors. Same maths as :func:`rk4_rollout`; kept for the tests and
    bench/bench_rk4.py.
    """
    x, v = x0, v0
    out = [x]
    for k in range(omega.shape[1] - 1):

        def f(x: Tensor, v: Tensor, k: int = k) -> tuple[Tensor, Tensor]:
            ei = torch.tensor([i for i, _ in terms], dtype=x.dtype)
            ej = torch.tensor([j for _, j in terms], dtype=x.dtype)
            kernel = (w[:, k] * x[:, None] ** ei * v[:, None] ** ej).sum(-1)
            return v, -(omega[:, k] ** 2) * x - gamma[:, k] * v - kernel

        k1x, k1v = f(x, v)
        k2x, k2v = f(x + 0.5 * k1x, v + 0.5 * k1v)
        k3x, k3v = f(x + 0.5 * k2x, v + 0.5 * k2v)
        k4x, k4v = f(x + k3x, v + k3v)
        x = x + (k1x + 2 * k2x + 2 * k3x + k4x) / 6
        v = v + (k1v + 2 * k2v + 2 * k3v + k4v) / 6
        x = sat_x * torch.tanh(x / sat_x)
        v = sat_v * torch.tanh(v / sat_v)
        out.append(x)
    return torch.stack(out, 1)


@torch.no_grad()
def generate_closed_loop(model: PolyOuroboros, n_steps: int, ic: Tensor) -> Tensor:
    """Autonomous generation: the encoder reads the model's own (x, x'): (N, n_steps).

    Starts from ``ic`` (N, 2) (on the model's device, fp32; no autocast: a
    sequential loop of tiny ops that reduced precision would not speed up and
    whose rounding compounds) with a zero encoder state (as training segments
    do). With ``drive_lowpass_ms`` only the causal half of the Gaussian is
    available here (renormalised), unlike the zero-phase teacher-forced filter.
    """
    cfg = model.cfg
    sat = torch.tensor([cfg.sat_x, cfg.sat_v], dtype=ic.dtype, device=ic.device)
    states = model.encoder.init_state(ic.shape[0])
    s = ic.clone()
    out = [s[:, 0]]
    taps = None
    history: list[Tensor] = []
    if model.lowpass is not None:
        taps = model.lowpass[model.lowpass.numel() // 2 :]  # causal half, taps[0] = now
    for _ in range(n_steps - 1):
        raw, states = model.encoder.step(s[:, 0], s[:, 1], states)
        omega, gamma, w = model.raw_to_drives(raw)  # (N,), (N,), (N, T)
        if taps is not None:
            history = [torch.cat([omega[:, None], gamma[:, None], w], -1), *history][: taps.numel()]
            t = taps[: len(history)]
            d = torch.einsum("k,kbc->bc", t / t.sum(), torch.stack(history))
            omega, gamma, w = d[:, 0], d[:, 1], d[:, 2:]
        s = rk4_step(s, field_matrix(model.coefficients(omega, gamma, w)), model.degree, sat)[0]
        out.append(s[:, 0])
    return torch.stack(out, 1)


# --------------------------------------------------------------------------- #
# Losses (PR #5, train/spectral_rollout.py and train/rollout_refine.py)
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=16)
def _hann(n_fft: int) -> Tensor:
    return torch.hann_window(n_fft)


def mrstft_configs(ffts: tuple[int, ...], horizon: int) -> list[tuple[int, int]]:
    """(n_fft, hop) pairs of the MRSTFT loss at ``horizon``: n_fft > H is dropped."""
    return [(n, n // 4) for n in ffts if n <= horizon]


def stft_mag(x: Tensor, n_fft: int, hop: int) -> Tensor:
    """|STFT| of (B, T): (B, F, frames), clamped away from 0 for a finite gradient."""
    window = _hann(n_fft).to(x.device, x.dtype)
    spec = torch.stft(x, n_fft, hop, window=window, return_complex=True)
    return (spec.real.square() + spec.imag.square()).clamp_min(1e-10).sqrt()


def mrstft_loss(pred: Tensor, target: Tensor, ffts: tuple[int, ...], eps: float = 1e-5) -> Tensor:
    """Multi-resolution STFT magnitude loss (DDSP, arXiv:1910.11480; PR #5).

    Mean over resolutions of spectral convergence ||S_t - S_p||_F / ||S_t||_F
    (over the batch) + mean |log(S_t + eps) - log(S_p + eps)|.
    """
    terms = []
    for n_fft, hop in mrstft_configs(ffts, pred.shape[-1]):
        sp, st = stft_mag(pred, n_fft, hop), stft_mag(target, n_fft, hop)
        sc = torch.linalg.vector_norm(st - sp) / (torch.linalg.vector_norm(st) + 1e-8)
        terms.append(sc + (torch.log(st + eps) - torch.log(sp + eps)).abs().mean())
    return torch.stack(terms).mean() if terms else pred.new_zeros(())


def accel_variance(a: Tensor) -> float:
    """Var(d2x) over the whole training set, floored at 1e-6 (PR #5 fix 1)."""
    return max(float(a.double().var()), TF_VAR_FLOOR)


def envelope(x: Tensor, kernel: Tensor) -> Tensor:
    """Gaussian-smoothed |x| (zero-phase): (B, T)."""
    return smooth_same(x.abs()[:, None], kernel)[:, 0]


def horizon_for_epoch(epoch: int, schedule: str, h_min: int, h_max: int, n_epochs: int) -> int:
    """Rollout horizon at ``epoch`` (0-based) of an ``n_epochs`` ramp (PR #5).

    const: H_max. linear / geom: arithmetic / geometric ramp. pow2: factor-of-2
    buckets H_min, 2 H_min, ... (the last capped at H_max) spread evenly over
    the ramp, so only a few distinct horizons occur.
    """
    if schedule == "const" or n_epochs <= 1:
        return h_max
    frac = min(1.0, epoch / (n_epochs - 1))
    if schedule == "linear":
        return round(h_min + (h_max - h_min) * frac)
    if schedule == "geom":
        return round(h_min * (h_max / h_min) ** frac)
    if schedule == "pow2":
        n_buckets = math.ceil(math.log2(h_max / h_min) - 1e-9) + 1
        bucket = min(n_buckets - 1, epoch * n_buckets // n_epochs)
        return min(h_min * 2**bucket, h_max)
    raise ValueError(f"unknown h_schedule {schedule!r}; use const | linear | geom | pow2")


def ramp(epoch: int, warmup: int) -> float:
    """Linear 0 -> 1 over ``warmup`` epochs (1 when warmup is 0)."""
    return 1.0 if warmup <= 0 else min(1.0, epoch / warmup)


# --------------------------------------------------------------------------- #
# Autonomy score (PR #5, autonomy_score)
# --------------------------------------------------------------------------- #
def autonomy_scores(gen: Tensor, target: Tensor, lead: int, cfg: Config) -> dict[str, float]:
    """Cold-start autonomy of generated (N, W) vs target windows (silence lead + voc).

    Per window: spec_corr (Pearson r of log-magnitude spectrograms) - amp_pen
    (|log(rms_gen / rms_target)| over the vocalisation) - pitch_pen
    (|log2(f_gen / f_target)| of the dominant frequency over the vocalisation).
    A window whose rollout is non-finite or reaches ``diverge_frac * sat_x``
    scores the sentinel -5.0. Returns means over windows plus bounded_frac. Scored on
    the CPU in float64, whatever device the rollout ran on.
    """
    gen, target = gen.cpu(), target.cpu()
    finite = torch.isfinite(gen).all(1)
    g = torch.nan_to_num(gen.double(), nan=0.0, posinf=0.0, neginf=0.0)
    t = target.double()
    bounded = finite & (g.abs().amax(1) < cfg.diverge_frac * cfg.sat_x)
    n_fft = 1 << max(3, round(math.log2(cfg.ms(cfg.eval_nfft_ms))))
    hop = n_fft // 4
    sg, st = stft_mag(g, n_fft, hop), stft_mag(t, n_fft, hop)  # (N, F, frames)
    lg, lt = torch.log(sg + 1e-5).flatten(1), torch.log(st + 1e-5).flatten(1)
    lg, lt = lg - lg.mean(1, keepdim=True), lt - lt.mean(1, keepdim=True)
    spec_corr = (lg * lt).sum(1) / (lg.norm(dim=1) * lt.norm(dim=1) + 1e-12)
    rms_g = g[:, lead:].square().mean(1).sqrt()
    rms_t = t[:, lead:].square().mean(1).sqrt()
    amp_pen = (torch.log(rms_g + 1e-8) - torch.log(rms_t + 1e-8)).abs()
    freqs = torch.fft.rfftfreq(n_fft, 1.0 / cfg.sample_rate).double()
    band = freqs >= cfg.omega_min_hz
    first = lead // hop + 1  # frames centred inside the vocalisation

    def peak_hz(mag: Tensor) -> Tensor:  # dominant frequency, parabolic interpolation
        logp = mag[:, band, first:].square().mean(-1).log()  # (N, F_band)
        k = logp.argmax(1).clamp(1, logp.shape[1] - 2)
        a, b, c = (logp.gather(1, (k + d)[:, None])[:, 0] for d in (-1, 0, 1))
        den = a - 2 * b + c
        delta = torch.where(den < 0, 0.5 * (a - c) / den.clamp(max=-1e-12), 0.0).clamp(-0.5, 0.5)
        return freqs[band][k] + delta * (freqs[1] - freqs[0])

    pitch_pen = torch.log2(peak_hz(sg) / peak_hz(st)).abs()
    score = torch.where(bounded, spec_corr - amp_pen - pitch_pen, AUTONOMY_SENTINEL)
    return {
        "autonomy": float(score.mean()),
        "spec_corr": float(spec_corr.mean()),
        "amp_pen": float(amp_pen.mean()),
        "pitch_pen": float(pitch_pen.mean()),
        "bounded_frac": float(bounded.double().mean()),
    }


# --------------------------------------------------------------------------- #
# The experiment
# --------------------------------------------------------------------------- #
def _stream_seed(seed: int, stream: int) -> int:
    """A 64-bit seed for the trial generator ``stream`` (SeedSequence spawn key ``stream``)."""
    child = np.random.SeedSequence(seed, spawn_key=(stream,))
    return int(child.generate_state(1, dtype=np.uint64)[0])


_STREAM_DATA_ORDER, _STREAM_NOISE = 0, 1


class OuroborosExperiment:
    """One trial: data, model, optimizer, own RNG; tunelab drives the loop.

    Everything lives on ``self.place.device`` but the data-order generator (CPU) and the
    autonomy windows (scored on the CPU).

    Raises:
        tunelab.devices.DeviceUnavailable: ``device: cuda`` and no CUDA device is visible
            (before any data is read).
    """

    def __init__(self, cfg: Config, seed: int, data_root: Path) -> None:
        self.cfg = cfg
        self.seed = seed  # titles the exported spectrogram
        self.place: Placement = placement(cfg)
        device = self.place.device
        data = load_corpus(cfg, data_root)
        self.tf_var = accel_variance(data.train.a)  # once, over the training set (on the CPU)
        self.data = dataclasses.replace(
            data, train=data.train.to(device), val=data.val.to(device), test=data.test.to(device)
        )
        # init from the global torch RNG (seeded by tunelab) on the CPU, then moved
        self.model = PolyOuroboros(cfg).to(device)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        # backward, clip, step or skip; per-layer norms, term shares, explosions (tunelab.health)
        self.health = HealthMonitor(
            self.model, self.opt, clip=cfg.grad_clip, scaler=self.place.grad_scaler()
        )
        # Separate streams: a lever that draws more (or less) noise never shifts the data order.
        # The order is drawn on the CPU (the same on every device), the noise on the device.
        self.data_gen = torch.Generator().manual_seed(_stream_seed(seed, _STREAM_DATA_ORDER))
        self.noise_gen = device_generator(_stream_seed(seed, _STREAM_NOISE), device)
        self.epoch = 0
        self.env_kernel = gaussian_kernel(cfg.ms(cfg.env_ms)).to(device)

    # --- loss ---------------------------------------------------------------------
    def loss_terms(
        self, batch: Segments, horizon: int, gen: torch.Generator, *, shard_rows: bool = False
    ) -> dict[str, Tensor]:
        """Spectral-rollout loss parts on a batch (PR #5, spectral_rollout_step).

        One encoder pass gives the drives for both the teacher-forced
        acceleration anchor (whole segment) and the RK4 rollout (horizon H:
        segment start for ONSET and MID, segment end for OFFSET). The encoder
        runs under the trial's autocast, the ODE and the losses in fp32.
        ``shard_rows``: ``batch`` is the global training batch; the cold-start
        noise is drawn for all of it, then this worker keeps its rows of both.
        """
        cfg, model = self.cfg, self.model
        noise = cfg.ic_noise_rms * torch.randn(
            len(batch), 2, generator=gen, device=batch.x.device
        )  # (B, 2) cold-start ICs, drawn for every row
        if shard_rows:
            batch, noise = batch.shard(), shard(noise)
        length = batch.x.shape[1]
        drives = model.drives(batch.x, batch.v, autocast=self.place.autocast)  # fp32
        tf = (model.accel(batch.x, batch.v, drives) - batch.a).square().mean() / self.tf_var
        start = torch.where(batch.cat == OFFSET, length - horizon, 0)  # (B,)
        idx = start[:, None] + torch.arange(horizon, device=start.device)  # (B, H)
        coef = model.coefficients(drives.omega, drives.gamma, drives.w)  # (B, L, P+1, P+1)
        coef = coef.gather(1, idx[..., None, None].expand(-1, -1, *coef.shape[2:]))
        target = batch.x.gather(1, idx)  # (B, H)
        cold = batch.cat == ONSET  # cold start from N(0, ic_noise_rms^2)
        x0 = torch.where(cold, noise[:, 0], target[:, 0])
        v0 = torch.where(cold, noise[:, 1], batch.v.gather(1, idx[:, :1])[:, 0])
        pred = rk4_rollout(x0, v0, coef, model.degree, cfg.sat_x, cfg.sat_v)  # (B, H)
        env_p, env_t = envelope(pred, self.env_kernel), envelope(target, self.env_kernel)
        eps = cfg.env_log_eps
        return {
            "spec": mrstft_loss(pred, target, cfg.mrstft_ffts, cfg.spec_log_eps),
            "tf": tf,
            "env": (env_p - env_t).abs().mean(),
            "env_log": torch.log((env_t + eps) / (env_p + eps)).abs().mean(),
        }

    def weights(self) -> dict[str, float]:
        cfg = self.cfg
        env = ramp(self.epoch, cfg.env_warmup_epochs)
        return {
            "spec": cfg.lam_spec * ramp(self.epoch, cfg.spec_warmup_epochs),
            "tf": cfg.lam_tf,
            "env": cfg.lam_env * env,
            "env_log": cfg.lam_env_log * env,
        }

    def horizon(self) -> int:
        cfg = self.cfg
        return horizon_for_epoch(
            self.epoch, cfg.h_schedule, cfg.H_min, cfg.H_max, cfg.curriculum_epochs
        )

    # --- evaluation ---------------------------------------------------------------
    def evaluate(self, windows: Tensor) -> dict[str, float]:
        """Cold-start closed-loop autonomy on held-out windows (fixed noise draws)."""
        g = device_generator(EVAL_SEED, self.place.device)
        ic = self.cfg.ic_noise_rms * torch.randn(windows.shape[0], 2, generator=g, device=g.device)
        self.model.eval()
        gen = generate_closed_loop(self.model, windows.shape[1], ic)
        self.model.train()
        return autonomy_scores(gen, windows, self.cfg.ms(self.cfg.eval_lead_ms), self.cfg)

    @torch.no_grad()
    def segment_loss(self, segs: Segments) -> float:
        """Weighted loss on held-out segments at the current horizon and weights."""
        gen = device_generator(EVAL_SEED, self.place.device)
        parts = self.loss_terms(segs, self.horizon(), gen)
        return float(torch.stack([w * parts[k] for k, w in self.weights().items()]).sum())

    # --- tunelab contract -----------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        cfg = self.cfg
        horizon, lam = self.horizon(), self.weights()
        sums = dict.fromkeys(("loss", "spec", "tf", "env", "env_log"), 0.0)
        done = 0
        for _ in range(cfg.steps_per_iter):
            # the global batch (the order drawn on the CPU); every worker keeps its rows
            idx = torch.randint(len(self.data.train), (cfg.batch_size,), generator=self.data_gen)
            batch = self.data.train.subset(idx)
            parts = self.loss_terms(batch, horizon, self.noise_gen, shard_rows=True)
            step = self.health.step(parts, lam)  # PR #5: a NaN step is skipped and counted
            if not step.applied:
                continue
            done += 1
            sums["loss"] += step.total
            for k in lam:
                sums[k] += step.values[k]
        val = self.evaluate(self.data.val_windows)
        mean = {k: v / done if done else math.nan for k, v in sums.items()}
        metrics = {
            M_TRAIN_LOSS: mean["loss"],
            M_TRAIN_SPEC: mean["spec"],
            M_TRAIN_TF: mean["tf"],
            M_TRAIN_ENV: mean["env"],
            M_TRAIN_ENV_LOG: mean["env_log"],
            M_TRAIN_HORIZON: float(horizon),
            M_TRAIN_LAM_SPEC: lam["spec"],
            M_TRAIN_LAM_ENV: lam["env"],
            M_VAL_LOSS: self.segment_loss(self.data.val),
            **{f"val/{k}": val[k] for k in SCORE_KEYS},
            **self.health.end_iteration(),
        }
        self.epoch += 1
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, own generators, epoch; loads on any device (load_state_dict)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "noise_gen": self.noise_gen.get_state(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, saved on any device (``map_location="cpu"`` included)."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])  # moved to the parameters' device
        load_generator_state(self.data_gen, state["data_gen"], name="ouroboros data_gen")
        load_generator_state(self.noise_gen, state["noise_gen"], name="ouroboros noise_gen")
        self.epoch = int(state["epoch"])

    def export(self, out_dir: Path) -> dict[str, Any]:
        """Test scores, the deployed (RMS-rescaled) generation as WAV, a spectrogram PNG.

        The deployed generation runs ``listen_s`` seconds closed-loop from the fixed
        cold-start IC; its first test-window's worth of samples is exactly the rollout
        that is rescaled and scored (deployed/*) and drawn against the target.
        """
        cfg = self.cfg
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        val = self.evaluate(self.data.val_windows)
        test = self.evaluate(self.data.test_windows)
        lead = cfg.ms(cfg.eval_lead_ms)
        target = self.data.test_windows[:1]  # (1, W)
        width = target.shape[1]
        n_listen = max(1, round(cfg.listen_s * cfg.sample_rate))
        g = device_generator(EVAL_SEED, self.place.device)
        ic = cfg.ic_noise_rms * torch.randn(1, 2, generator=g, device=g.device)
        self.model.eval()
        # causal: the first W samples of a longer rollout are the W-sample rollout
        raw_all = generate_closed_loop(self.model, max(width, n_listen), ic).cpu()
        self.model.train()
        raw_all = torch.nan_to_num(raw_all, nan=0.0, posinf=0.0, neginf=0.0)
        raw = raw_all[:, :width]
        rms_t = float(target[:, lead:].square().mean().sqrt())
        rms_g = float(raw[:, lead:].square().mean().sqrt())
        factor = rms_t / max(rms_g, 1e-8)  # amplitude rescale to the target RMS
        deployed = raw * factor
        deployed_scores = autonomy_scores(deployed, target, lead, cfg)
        listen = raw_all[0, :n_listen] * factor
        peak = max(float(listen.abs().max()), 1e-8)
        wav_scale = min(1.0, 0.99 / peak)  # keep the WAV inside [-1, 1]
        sf.write(out_dir / "generated.wav", (wav_scale * listen).numpy(), cfg.sample_rate)
        sf.write(out_dir / "target.wav", target[0].numpy(), cfg.sample_rate)
        title = (
            f"seed {self.seed} · trial {out_dir.name} · "
            f"deployed autonomy {deployed_scores['autonomy']:.4g}"
        )
        _plot_spectrograms(
            out_dir / "spectrogram.png", target[0], deployed[0], cfg.sample_rate, title=title
        )
        test_loss = self.segment_loss(self.data.test)
        return {
            "sample_rate": cfg.sample_rate,
            "generated_s": n_listen / cfg.sample_rate,
            "device": str(self.place.device),
            "precision": self.place.precision,
            "val": {
                **{f"val/{k}": val[k] for k in SCORE_KEYS},
                M_VAL_LOSS: self.segment_loss(self.data.val),
            },
            "test": {**{f"test/{k}": test[k] for k in SCORE_KEYS}, "test/loss": test_loss},
            "deployed": {f"deployed/{k}": deployed_scores[k] for k in SCORE_KEYS},
            "files": ["generated.wav", "target.wav", "spectrogram.png"],
            "data_files": {k: len(v) for k, v in self.data.files.items()},
        }


def _plot_spectrograms(
    path: Path, target: Tensor, generated: Tensor, sr: int, *, title: str | None = None
) -> None:
    """2x2 figure: waveform + spectrogram, target (top) vs generated (bottom).

    The generated row shares the target's waveform ylim, frequency ylim and
    colour scale, so it is read on the target's scale. ``title`` (e.g. seed,
    trial, score) goes above the panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    if title:
        fig.suptitle(title)
    dur_ms = target.numel() / sr * 1000
    t = np.arange(target.numel()) / sr * 1000
    lim = 1.1 * float(target.abs().max())
    n_fft = 1 << max(3, round(math.log2(0.016 * sr)))
    clim: dict[str, float] = {}
    for row, (name, y) in enumerate((("target", target), ("generated (rescaled)", generated))):
        axes[row, 0].plot(t, y.numpy(), lw=0.6)
        axes[row, 0].set_ylim(-lim, lim)
        axes[row, 0].set_ylabel(name)
        *_, image = axes[row, 1].specgram(
            y.numpy(),
            NFFT=n_fft,
            Fs=sr,
            noverlap=3 * n_fft // 4,
            cmap="magma",
            xextent=(0, dur_ms),
            **clim,
        )
        clim = clim or dict(zip(("vmin", "vmax"), image.get_clim(), strict=True))
        axes[row, 1].set_ylim(0, sr / 2)
        axes[row, 1].set_ylabel("Hz")
    for ax in axes[1]:
        ax.set_xlabel("time (ms)")
    fig.savefig(path, dpi=100)


def build(cfg: Config, seed: int, data_root: Path) -> OuroborosExperiment:
    """tunelab entry point: ``build(config, seed, data_root) -> Experiment``."""
    return OuroborosExperiment(cfg, seed, Path(data_root))


FAMILY = Family(
    name="ouroboros",
    config_cls=Config,
    build=build,
    metrics=METRICS,
    data_check=check_data,
    description=(
        "Polynomial neural-ODE birdsong synthesizer (poly Ouroboros) trained with a "
        "spectral-rollout loss and cold-start ONSET segments; selected by closed-loop "
        "cold-start autonomy (shared/seeds/ouroboros_spectral_rollout_pr.txt)."
    ),
)
