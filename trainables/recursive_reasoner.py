"""Recursive reasoner: TRM / HRM recursion on procedural mazes, with trajectory augmentation.

Seed: shared/seeds/trajectory_augmentation_notes.txt, distilled in shared/FAMILIES.md
("recursive_reasoner"). Model references: Jolicoeur-Martineau 2025, "Less is More: Recursive
Reasoning with Tiny Networks" (TRM, arXiv:2510.04871) and Wang et al. 2025, "Hierarchical
Reasoning Model" (HRM, arXiv:2506.21734).

Task: an S x S maze (walls, open cells, one start, one goal). Label every cell 1 if it lies on
the shortest start -> goal path (mazes are kept only when that path is unique), else 0. A maze
counts as solved when every cell is right (exact match).

Model: latents z_H (the answer state, TRM's y) and z_L (TRM's z) start from fixed buffers z0.
One deep-supervision *segment* runs H_cycles x (L_cycles updates of z_L, then one of z_H),
with gradients only through the last cycle (TRM) or the last L and H update (HRM's one-step
gradient); every segment gets its own cross-entropy (+ ACT halting BCE) loss and optimizer
step, and the latents carry over detached.

Trajectory augmentation (FAMILIES.md): z0 -> z0 + eps, eps ~ N(0, sigma^2 I), centered.
sigma is fixed or drawn per trajectory from LogUniform(sigma_min, sigma_max), scaled by a
linear ramp min(1, t / ramp_steps) after an optional clean warmup, and replaced by 0 with
probability p_clean. `multi_perturbed_ce` trains K trajectories per maze, the first one clean,
and averages their CE; `single_perturbed_ce` trains one perturbed trajectory.

Evaluation: three maze sets from separate generator streams, pairwise disjoint. Every
iteration scores the validation mazes (``val/*``: what TPE, ASHA, lever verdicts and the
best-checkpoint tracking see); the test mazes are scored only by ``export`` (at the trial's
budget), as the manifest's ``test`` block (``test/*``), never as an iteration metric, so no
spec can select on them. Train mazes come from stream ``[data_seed, 0]``, test from
``[data_seed, 1]`` minus every training maze, val from ``[data_seed, 2]`` minus every training
and test maze. The mazes are cached once under ``data_root``; ``FAMILY.check_data`` checks a
cached file before any trial starts (a damaged one stops the experiment naming the file).

Randomness: the trial seed feeds two generators on separate streams, one for the data order
(epoch permutations) and one for the trajectory noise. Arms of a lever A/B that draw different
amounts of noise (sigma_mode none vs loguniform, K = 1 vs 4) therefore see the same batches in
the same order for the same seed, which is what makes their comparison paired.

Rollouts: `parallel_fixed` stacks the K trajectories into one batch (B -> B*K) and runs exactly
halt_max_steps segments with no halting; `serial_act` runs the K trajectories one after the
other as batches of B through ACT halting (gradients accumulated, one optimizer step per
segment). With the same noise and no early halt both give the same loss. One iteration is
``steps_per_iter`` training batches (each ``halt_max_steps`` optimizer steps): size it so an
iteration fits the preemption grace period.

Device, precision and workers (:mod:`tunelab.devices`): the model, its optimizer state, the
training batches and the trajectory-noise generator live on the trial's device (``device:
auto`` is CUDA when the trial holds a GPU); the data order is drawn on the CPU, so it is the
same on every device (on CUDA the noise comes from a CUDA generator: same seed, another
stream). Every segment runs under the ``precision`` autocast (bf16 replaces the old ``dtype:
bfloat16``); the initial latents z0 + eps are formed in fp32 outside it and the carried
latents stay fp32, so the noise survives in the residual stream, but the convolutions see the
latents rounded to bf16 (spacing 2^-7 near 1.0) or fp16 (2^-10): noise of sigma <= 3e-3 is
mostly rounded away there (trajectory-augmentation notes), and the experiment warns when the
noise band reaches that low under bf16 or fp16. With ``resources.workers: N`` every worker
draws the same global batch (indices and the noise of every trajectory) and keeps its slice
of the mazes (``tunelab.devices.shard``); the losses are means over trajectories and the
monitor averages the gradients, so N workers follow one up to float summation order. In
``serial_act`` the workers stop a batch together, when every trajectory of every worker has
halted.

By hand (tunelab normally drives ``FAMILY``)::

    from pathlib import Path
    import tunelab
    from trainables.recursive_reasoner import FAMILY, QUICK_CONFIG
    tunelab.seed_everything(0)
    exp = FAMILY.build(FAMILY.make_config(QUICK_CONFIG), 0, Path("/tmp/tunelab_data"))
    for _ in range(8):
        print(exp.train_iteration())

    python bench/bench_rollout.py     # parallel_fixed vs serial_act steps/s at K = 4
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import warnings
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

import tunelab
from tunelab.devices import (
    DeviceFields,
    Placement,
    device_generator,
    load_generator_state,
    placement,
    shard,
    world_size,
)
from tunelab.distributed import average_metrics
from tunelab.errors import DataError
from tunelab.health import HealthMonitor, StepResult
from tunelab.names import HEALTH_METRICS, M_HEALTH_GRAD_NORM, M_HEALTH_NAN_SKIPPED

__all__ = [
    "FAMILY",
    "QUICK_CONFIG",
    "Config",
    "MazeData",
    "RecursiveReasoner",
    "TrajectoryNoise",
    "build",
    "check_data",
    "evaluate_exact_match",
    "generate_maze",
    "load_or_generate_mazes",
    "make_maze_example",
    "make_mazes",
    "maze_file",
    "n_trajectories",
    "read_mazes",
    "sample_trajectory_sigmas",
    "shortest_path_labels",
    "sigma_scale",
    "train_batch",
    "trajectory_noise",
]

# ---------------------------------------------------------------------------------------------
# Metric names
# ---------------------------------------------------------------------------------------------
M_TRAIN_LOSS = "train/loss"
M_TRAIN_LOSS_CE = "train/loss_ce"
M_TRAIN_LOSS_HALT = "train/loss_halt"
M_TRAIN_SIGMA = "train/sigma"  # band max x ramp factor in force after the iteration
M_VAL_CLEAN_ACC = "val/clean_acc"
M_VAL_PERTURBED = "val/perturbed_success"
M_VAL_PERTURBED_10X = "val/perturbed_success_10x"
M_VAL_BEST_ACC = "val/best_acc"
M_VAL_FINAL_ACC = "val/final_acc"
# Manifest fields of export() (the ``test`` block), NOT iteration metrics: nothing selects on them.
M_TEST_CLEAN_ACC = "test/clean_acc"  # final model
M_TEST_PERTURBED = "test/perturbed_success"  # final model, noise at the band max
M_TEST_PERTURBED_10X = "test/perturbed_success_10x"  # final model, noise at 10x the band max
M_TEST_BEST_ACC = "test/best_acc"  # clean, of the checkpoint with the best val/clean_acc
M_GRAD_NORM = M_HEALTH_GRAD_NORM
M_NAN_SKIPPED = M_HEALTH_NAN_SKIPPED

METRICS = (
    M_TRAIN_LOSS,
    M_TRAIN_LOSS_CE,
    M_TRAIN_LOSS_HALT,
    M_TRAIN_SIGMA,
    M_VAL_CLEAN_ACC,
    M_VAL_PERTURBED,
    M_VAL_PERTURBED_10X,
    M_VAL_BEST_ACC,
    M_VAL_FINAL_ACC,
    *HEALTH_METRICS,  # tunelab.health (M_GRAD_NORM, M_NAN_SKIPPED among them)
)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclass(config=ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False))
class Config(DeviceFields):
    """Recursive reasoner config; every field has a CPU-sized default.

    Every field carries its domain: floats are finite, sizes and rates positive,
    and each has an upper bound far above any sane run, so ``lr: -0.002``,
    ``hidden: 1e9`` or ``lr: .nan`` is refused at spec validation naming the field.
    ``device``, ``precision`` (bf16: what ``dtype: bfloat16`` was) and ``deterministic``
    come from :class:`tunelab.devices.DeviceFields`.
    """

    # --- data --------------------------------------------------------------------------------
    maze_size: Annotated[int, Field(ge=5, le=255)] = 7
    """Maze side S in cells, outer walls included; rooms sit at odd coordinates (7 on a CPU,
    30 on a GPU)."""
    loop_frac: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    """Fraction of the inner walls left by the DFS spanning tree that are knocked down, so the
    maze has loops and the *shortest* path matters."""
    n_train: Annotated[int, Field(ge=1, le=10_000_000)] = 4096
    """Training mazes."""
    n_val: Annotated[int, Field(ge=1, le=10_000_000)] = 256
    """Validation mazes (own generator stream, none equal to a training or test maze): the
    val/* metrics, scored every iteration (three times: clean, band max, 10x), which tuning,
    culling and the best checkpoint select on."""
    n_test: Annotated[int, Field(ge=1, le=10_000_000)] = 512
    """Held-out test mazes (own generator stream, none equal to a training maze), scored once
    by export (the manifest's test/* block); nothing selects on them."""
    data_seed: Annotated[int, Field(ge=0)] = 0
    """Seed of the maze data; the same for every trial seed (the trial seed fixes init, data
    order and noise, the last two on separate streams)."""

    # --- model -------------------------------------------------------------------------------
    arch: Literal["trm", "hrm"] = "trm"
    """trm: one network updates both latents; hrm: separate L and H modules."""
    hidden: Annotated[int, Field(ge=1, le=4096)] = 32
    """Channels D of the latents and of the conv network."""
    n_layers: Annotated[int, Field(ge=1, le=64)] = 2
    """Residual conv layers (conv3x3-GELU-conv3x3, post RMSNorm) per network call."""
    H_cycles: Annotated[int, Field(ge=1, le=64)] = 2
    """H cycles per segment (TRM's T); all but the last run without gradient."""
    L_cycles: Annotated[int, Field(ge=1, le=64)] = 2
    """z_L updates per H cycle (TRM's n)."""
    halt_max_steps: Annotated[int, Field(ge=1, le=1000)] = 3
    """Deep-supervision segments per training batch (TRM's N_sup, HRM's halt_max_steps): the
    ACT cap; parallel_fixed always runs exactly this many."""
    n_sup: Annotated[int, Field(ge=1, le=1000)] = 3
    """Segments unrolled at evaluation (test-time depth, no halting); above halt_max_steps
    tests thinking longer than trained."""
    act: bool = False
    """Train the halting head (BCE on 'this segment solved the maze'); serial_act then stops a
    trajectory once its halting logit is > 0."""

    # --- trajectory augmentation -------------------------------------------------------------
    sigma_mode: Literal["fixed", "loguniform", "none"] = "loguniform"
    """fixed: sigma for every trajectory; loguniform: per trajectory LogUniform(sigma_min,
    sigma_max); none: clean training (val/perturbed_success still probes at `sigma`)."""
    sigma: Annotated[float, Field(ge=0.0, le=1e3)] = 0.1
    """Noise std of sigma_mode=fixed, and the probe band of sigma_mode=none."""
    sigma_min: Annotated[float, Field(gt=0.0, le=1e3)] = 0.01
    """Lower end of the LogUniform band."""
    sigma_max: Annotated[float, Field(gt=0.0, le=1e3)] = 0.3
    """Upper end of the LogUniform band (the band max that train/sigma reports)."""
    ramp_steps: Annotated[int, Field(ge=0, le=1_000_000_000)] = 0
    """Training batches over which sigma ramps linearly from 0 to the band, counted after the
    clean warmup (0: no ramp)."""
    clean_warmup_steps: Annotated[int, Field(ge=0, le=1_000_000_000)] = 0
    """Training batches at the start with no noise at all."""
    p_clean: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Probability that a trajectory is clean (mixture p_clean * delta_0 + (1 - p_clean) * band)."""
    perturb: Literal["z_H", "z_L", "both"] = "both"
    """Which initial latent gets the noise."""
    loss_mode: Literal["single_perturbed_ce", "multi_perturbed_ce"] = "multi_perturbed_ce"
    """single_perturbed_ce: one perturbed trajectory per maze (K is ignored);
    multi_perturbed_ce: K trajectories (the first clean, K - 1 perturbed), mean CE."""
    K: Annotated[int, Field(ge=1, le=1024)] = 2
    """Trajectories per maze in multi_perturbed_ce."""

    # --- training ----------------------------------------------------------------------------
    rollout: Literal["parallel_fixed", "serial_act"] = "parallel_fixed"
    """parallel_fixed: B -> B*K in one batch, exactly halt_max_steps segments; serial_act: the
    K trajectories one by one through ACT halting."""
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 2e-3
    """AdamW learning rate (constant)."""
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0
    """AdamW weight decay."""
    grad_clip: Annotated[float, Field(gt=0.0, le=1e6)] = 1.0
    """Clip of the total gradient norm per optimizer step."""
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    """Mazes per training batch (B, before the K trajectories); the global batch: with N
    workers each trains on batch_size / N of them."""
    steps_per_iter: Annotated[int, Field(ge=1, le=1_000_000)] = 30
    """Training batches per iteration (each batch = halt_max_steps optimizer steps): the unit
    of checkpoints, so one iteration must fit the preemption grace period."""
    eval_batch_size: Annotated[int, Field(ge=1, le=1_048_576)] = 512
    """Mazes per evaluation chunk."""

    @model_validator(mode="after")
    def _check_band(self) -> Config:
        if self.sigma_min > self.sigma_max:
            raise ValueError(
                f"sigma_min={self.sigma_min} is above sigma_max={self.sigma_max}; "
                "the LogUniform band needs sigma_min <= sigma_max"
            )
        return self


QUICK_CONFIG: dict[str, Any] = {
    "maze_size": 7,
    "n_train": 4096,
    "n_val": 256,
    "n_test": 256,
    "hidden": 32,
    "n_layers": 1,
    "H_cycles": 2,
    "L_cycles": 2,
    "halt_max_steps": 3,
    "n_sup": 3,
    "K": 2,
    "batch_size": 32,
    "steps_per_iter": 15,
}
"""CPU budget: ~1.5-2.5 s per iteration on one core; 8 iterations reach val/clean_acc ~0.7."""


# ---------------------------------------------------------------------------------------------
# Mazes: generation, BFS labels, the dataset
# ---------------------------------------------------------------------------------------------
WALL, OPEN, START, GOAL = 0, 1, 2, 3
N_TOKENS = 4
_DIRS = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DATA_VERSION = 2  # 2: adds the validation mazes


def generate_maze(size: int, loop_frac: float, rng: np.random.Generator) -> np.ndarray:
    """Carve an S x S maze: randomized DFS over rooms at odd coordinates, then loops.

    After the spanning tree, ``round(loop_frac * n)`` of the n remaining walls between two
    adjacent rooms are removed, so several paths exist and the shortest one matters.

    Returns:
        (S, S) bool, True = open cell. The border (and, for even S, the last row and column)
        stays wall.
    """
    n = (size - 1) // 2  # rooms per side
    open_ = np.zeros((size, size), dtype=bool)
    visited = np.zeros((n, n), dtype=bool)
    r0, c0 = int(rng.integers(n)), int(rng.integers(n))
    visited[r0, c0] = True
    open_[2 * r0 + 1, 2 * c0 + 1] = True
    stack = [(r0, c0)]
    while stack:
        r, c = stack[-1]
        nbrs = [
            (r + dr, c + dc)
            for dr, dc in _DIRS
            if 0 <= r + dr < n and 0 <= c + dc < n and not visited[r + dr, c + dc]
        ]
        if not nbrs:
            stack.pop()
            continue
        nr, nc = nbrs[int(rng.integers(len(nbrs)))]
        visited[nr, nc] = True
        open_[r + nr + 1, c + nc + 1] = True  # the wall cell between the two rooms
        open_[2 * nr + 1, 2 * nc + 1] = True
        stack.append((nr, nc))
    walls = [
        (i, j)
        for i in range(1, 2 * n)
        for j in range(1, 2 * n)
        if (i + j) % 2 == 1 and not open_[i, j]  # between two rooms, still closed
    ]
    n_remove = round(loop_frac * len(walls))
    if n_remove:
        for k in rng.choice(len(walls), size=n_remove, replace=False):
            open_[walls[int(k)]] = True
    return open_


def bfs_distances(open_: np.ndarray, source: tuple[int, int]) -> np.ndarray:
    """Breadth-first distances from ``source`` over open cells (4-neighbourhood); -1 = unreachable."""
    dist = np.full(open_.shape, -1, dtype=np.int64)
    dist[source] = 0
    queue = deque([source])
    h, w = open_.shape
    while queue:
        r, c = queue.popleft()
        for dr, dc in _DIRS:
            nr, nc = r + dr, c + dc
            if 0 <= nr < h and 0 <= nc < w and open_[nr, nc] and dist[nr, nc] < 0:
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
    return dist


def shortest_path_labels(
    open_: np.ndarray, start: tuple[int, int], goal: tuple[int, int]
) -> tuple[np.ndarray, int]:
    """Cells on a shortest start -> goal path, and the number of shortest paths.

    A cell v is on a shortest path iff d(start, v) + d(v, goal) = d(start, goal). Paths are
    counted along the BFS layers (count[v] = sum of count[u] over neighbours u one step
    closer); when the count is 1 the labelled cells are exactly the unique shortest path.
    """
    d_s, d_g = bfs_distances(open_, start), bfs_distances(open_, goal)
    total = d_s[goal]
    if total < 0:
        raise ValueError(f"goal {goal} is not reachable from start {start}")
    on_path = (d_s >= 0) & (d_g >= 0) & (d_s + d_g == total)
    count = np.zeros(open_.shape, dtype=np.int64)
    count[start] = 1
    for r, c in sorted(zip(*np.nonzero(on_path), strict=True), key=lambda rc: d_s[rc]):
        for dr, dc in _DIRS:
            nr, nc = r + dr, c + dc
            inside = 0 <= nr < open_.shape[0] and 0 <= nc < open_.shape[1]
            if inside and on_path[nr, nc] and d_s[nr, nc] == d_s[r, c] - 1:
                count[r, c] += count[nr, nc]
    return on_path, int(count[goal])


def make_maze_example(
    size: int, loop_frac: float, rng: np.random.Generator, max_tries: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """One maze with a unique shortest path between two distinct random rooms.

    Returns:
        tokens (S, S) uint8 in {WALL, OPEN, START, GOAL}; labels (S, S) uint8, 1 on the path.
    """
    n = (size - 1) // 2
    while True:
        open_ = generate_maze(size, loop_frac, rng)
        for _ in range(max_tries):
            a, b = rng.choice(n * n, size=2, replace=False)
            start = (2 * int(a // n) + 1, 2 * int(a % n) + 1)
            goal = (2 * int(b // n) + 1, 2 * int(b % n) + 1)
            labels, n_paths = shortest_path_labels(open_, start, goal)
            if n_paths == 1:
                tokens = open_.astype(np.uint8) * OPEN
                tokens[start], tokens[goal] = START, GOAL
                return tokens, labels.astype(np.uint8)


def make_mazes(
    n: int,
    size: int,
    loop_frac: float,
    rng: np.random.Generator,
    exclude: set[bytes] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` maze examples, none whose tokens are in ``exclude`` (tokens.tobytes()).

    Returns:
        tokens (n, S, S) uint8, labels (n, S, S) uint8.
    """
    tokens: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    while len(tokens) < n:
        t, y = make_maze_example(size, loop_frac, rng)
        if exclude is not None and t.tobytes() in exclude:
            continue
        tokens.append(t)
        labels.append(y)
    return np.stack(tokens), np.stack(labels)


@dataclasses.dataclass(frozen=True)
class MazeData:
    """Train, validation and test mazes: tokens (N, S, S) int64, labels (N, S, S) int64."""

    train_tokens: Tensor
    train_labels: Tensor
    val_tokens: Tensor
    val_labels: Tensor
    test_tokens: Tensor
    test_labels: Tensor


def maze_file(config: Config, data_root: Path) -> Path:
    """Where the mazes of ``config`` are cached under ``data_root`` (one file per data config)."""
    name = (
        f"mazes_v{_DATA_VERSION}_s{config.maze_size}_loop{config.loop_frac:g}"
        f"_train{config.n_train}_val{config.n_val}_test{config.n_test}"
        f"_seed{config.data_seed}.npz"
    )
    return Path(data_root) / "recursive_reasoner" / name


def read_mazes(path: Path, config: Config) -> dict[str, np.ndarray]:
    """The cached maze arrays of ``config``, checked.

    Raises:
        DataError: the file is not a readable ``.npz``, lacks an array, or holds arrays
            of the wrong shape, token or label values, or a maze without exactly one
            start and one goal (the message names the file; delete it to generate it
            again).
    """
    path = Path(path)
    again = "; delete it to generate it again"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # truncated zip, bad CRC, not a zip, pickled object arrays ...
        raise DataError(
            path, f"unreadable maze file ({type(err).__name__}: {err}){again}"
        ) from None
    size = config.maze_size
    for split, n in (("train", config.n_train), ("val", config.n_val), ("test", config.n_test)):
        x, y = arrays.get(f"{split}_x"), arrays.get(f"{split}_y")
        if x is None or y is None:
            raise DataError(path, f"no {split}_x / {split}_y arrays{again}")
        for key, a in ((f"{split}_x", x), (f"{split}_y", y)):
            if a.shape != (n, size, size) or a.dtype.kind not in "iu":
                raise DataError(
                    path,
                    f"{key} is {a.dtype} {a.shape}, expected integer ({n}, {size}, {size}){again}",
                )
        if x.min(initial=0) < 0 or x.max(initial=0) >= N_TOKENS or not np.isin(y, (0, 1)).all():
            raise DataError(path, f"{split} mazes hold token or label values out of range{again}")
        one = ((x == START).sum((1, 2)) == 1) & ((x == GOAL).sum((1, 2)) == 1)
        if not one.all():
            bad = int(np.flatnonzero(~one)[0])
            raise DataError(path, f"{split} maze {bad} has no single start and goal{again}")
    return arrays


def check_data(config: Config, data_root: Path) -> None:
    """The family's data check (before any trial starts): a cached maze file must be sound.

    A file that does not exist yet is fine (the first trial generates it).
    """
    path = maze_file(config, data_root)
    if path.exists():
        read_mazes(path, config)


def load_or_generate_mazes(config: Config, data_root: Path) -> MazeData:
    """Generate the mazes of ``config`` once under ``data_root`` (shared by all trials).

    Train mazes come from the generator stream ``[data_seed, 0]``, test mazes from
    ``[data_seed, 1]`` with every maze equal to a training maze rejected, validation mazes
    from ``[data_seed, 2]`` with every maze equal to a training or test maze rejected. The
    three sets are pairwise disjoint, and train and test do not depend on ``n_val``.

    Raises:
        DataError: the cached file is damaged (:func:`read_mazes`).
    """
    path = maze_file(config, data_root)
    with tunelab.data_lock(path):
        if not path.exists():
            size, loop = config.maze_size, config.loop_frac
            tr_x, tr_y = make_mazes(
                config.n_train, size, loop, np.random.default_rng([config.data_seed, 0])
            )
            seen = {t.tobytes() for t in tr_x}
            te_x, te_y = make_mazes(
                config.n_test, size, loop, np.random.default_rng([config.data_seed, 1]), seen
            )
            seen |= {t.tobytes() for t in te_x}
            va_x, va_y = make_mazes(
                config.n_val, size, loop, np.random.default_rng([config.data_seed, 2]), seen
            )
            buf = io.BytesIO()
            np.savez_compressed(
                buf, train_x=tr_x, train_y=tr_y, val_x=va_x, val_y=va_y, test_x=te_x, test_y=te_y
            )
            tunelab.atomic_write_bytes(path, buf.getvalue())
        mazes = read_mazes(path, config)
    arrays = {k: torch.from_numpy(v.astype(np.int64)) for k, v in mazes.items()}
    return MazeData(
        arrays["train_x"],
        arrays["train_y"],
        arrays["val_x"],
        arrays["val_y"],
        arrays["test_x"],
        arrays["test_y"],
    )


# ---------------------------------------------------------------------------------------------
# Trajectory noise (pure functions of config, step and generator)
# ---------------------------------------------------------------------------------------------
def n_trajectories(config: Config) -> int:
    """Trajectories per maze: K in multi_perturbed_ce, 1 in single_perturbed_ce."""
    return config.K if config.loss_mode == "multi_perturbed_ce" else 1


def band_max(config: Config) -> float:
    """The top of the noise band: sigma (fixed / none) or sigma_max (loguniform)."""
    return config.sigma_max if config.sigma_mode == "loguniform" else config.sigma


def sigma_scale(step: int, ramp_steps: int, clean_warmup_steps: int = 0) -> float:
    """Factor on the band at training batch ``step``: 0 in the warmup, then min(1, t / ramp)."""
    if step < clean_warmup_steps:
        return 0.0
    if ramp_steps == 0:
        return 1.0
    return min(1.0, (step - clean_warmup_steps) / ramp_steps)


def sample_trajectory_sigmas(
    config: Config, n_traj: int, batch: int, scale: float, generator: torch.Generator
) -> Tensor:
    """Per-trajectory noise std, (n_traj, batch), on the generator's device.

    sigma (fixed) or exp(U(log sigma_min, log sigma_max)) (loguniform), times ``scale``; each
    trajectory is clean with probability p_clean; in multi_perturbed_ce trajectory 0 is clean.
    """
    shape, device = (n_traj, batch), generator.device
    if config.sigma_mode == "none" or scale == 0.0:
        return torch.zeros(shape, device=device)
    if config.sigma_mode == "fixed":
        sigmas = torch.full(shape, config.sigma, device=device)
    else:
        lo, hi = math.log(config.sigma_min), math.log(config.sigma_max)
        u = torch.rand(shape, generator=generator, device=device)
        sigmas = torch.exp(lo + (hi - lo) * u)
    sigmas = sigmas * scale
    if config.p_clean > 0.0:
        sigmas[torch.rand(shape, generator=generator, device=device) < config.p_clean] = 0.0
    if config.loss_mode == "multi_perturbed_ce":
        sigmas[0] = 0.0
    return sigmas


@dataclasses.dataclass(frozen=True)
class TrajectoryNoise:
    """Noise of one training batch: sigmas (T, B); eps_H / eps_L (T, B, D, S, S) or None."""

    sigmas: Tensor
    eps_H: Tensor | None
    eps_L: Tensor | None

    def shard(self) -> TrajectoryNoise:
        """This worker's mazes (dimension 1, B) of a global batch's noise (itself with one)."""

        def part(x: Tensor | None) -> Tensor | None:
            return None if x is None else shard(x.movedim(1, 0)).movedim(0, 1)

        if world_size() == 1:
            return self
        return TrajectoryNoise(shard(self.sigmas.T).T, part(self.eps_H), part(self.eps_L))


def trajectory_noise(
    config: Config, *, step: int, batch: int, generator: torch.Generator
) -> TrajectoryNoise:
    """Centered latent noise eps = sigma * N(0, I) for the trajectories of one batch.

    The latent that ``config.perturb`` leaves alone gets None (z0 unchanged); so does every
    latent when all sigmas are 0 (warmup, sigma_mode none), which skips the draw. Drawn in
    fp32 on the generator's device.
    """
    n_traj = n_trajectories(config)
    scale = sigma_scale(step, config.ramp_steps, config.clean_warmup_steps)
    sigmas = sample_trajectory_sigmas(config, n_traj, batch, scale, generator)  # (T, B)
    if not bool((sigmas > 0).any()):
        return TrajectoryNoise(sigmas, None, None)
    shape = (n_traj, batch, config.hidden, config.maze_size, config.maze_size)
    std = sigmas.view(n_traj, batch, 1, 1, 1)

    def draw(wanted: bool) -> Tensor | None:
        if not wanted:
            return None
        return std * torch.randn(shape, generator=generator, device=generator.device)

    return TrajectoryNoise(
        sigmas, draw(config.perturb in ("z_H", "both")), draw(config.perturb in ("z_L", "both"))
    )


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def _rms_norm(h: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm over channels per cell, computed in float32; h (N, D, S, S)."""
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(dim=1, keepdim=True) + eps)).to(h.dtype)


class _ConvLayer(nn.Module):
    """conv3x3 -> GELU -> conv3x3: a local MLP over the grid (the receptive field grows by 2)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(d, d, 3, padding=1)
        self.conv2 = nn.Conv2d(d, d, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:  # (N, D, S, S) -> (N, D, S, S)
        return self.conv2(F.gelu(self.conv1(h)))


class ReasoningNet(nn.Module):
    """net(z, inject) = layers(z + inject), each layer h <- rms_norm(h + layer(h)) (post-norm, TRM)."""

    def __init__(self, d: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_ConvLayer(d) for _ in range(n_layers))

    def forward(self, z: Tensor, inject: Tensor) -> Tensor:  # (N, D, S, S) x2 -> (N, D, S, S)
        h = z + inject
        for layer in self.layers:
            h = _rms_norm(h + layer(h))
        return h


class RecursiveReasoner(nn.Module):
    """TRM (one shared net) or HRM (separate L and H nets) recursion over the maze grid.

    Recursion of one segment (TRM, arXiv:2510.04871, Fig. 3)::

        repeat H_cycles:                      # all but the last cycle under no_grad
            repeat L_cycles: z_L = net_L(z_L, z_H + x)
            z_H = net_H(z_H, z_L)
        logits = head(z_H); q_halt = q_head(mean_cells(z_H))

    HRM keeps only the last z_L and z_H update in the graph (one-step gradient). Segments run
    under the autocast of ``config.precision`` on the device of their input; the latents stay
    fp32.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        d = config.hidden
        self.arch = config.arch
        self.H_cycles, self.L_cycles = config.H_cycles, config.L_cycles
        self.precision = config.precision
        self.embed = nn.Embedding(N_TOKENS, d)
        self.net_L = ReasoningNet(d, config.n_layers)
        self.net_H = ReasoningNet(d, config.n_layers) if config.arch == "hrm" else None
        self.head = nn.Conv2d(d, 2, 1)
        self.q_head = nn.Linear(d, 1)
        with torch.no_grad():
            self.q_head.bias.fill_(-5.0)  # TRM: start far from halting
        # fixed (not learned) initial latents, one vector broadcast over the cells
        self.z_H0: Tensor
        self.z_L0: Tensor
        self.register_buffer("z_H0", nn.init.trunc_normal_(torch.empty(d, 1, 1), 0, 1, -2, 2))
        self.register_buffer("z_L0", nn.init.trunc_normal_(torch.empty(d, 1, 1), 0, 1, -2, 2))

    def embed_input(self, tokens: Tensor) -> Tensor:
        """(N, S, S) token ids -> x (N, D, S, S)."""
        return self.embed(tokens).permute(0, 3, 1, 2).contiguous()

    def initial_latents(
        self, n: int, size: int, eps_H: Tensor | None = None, eps_L: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """z0 + eps for ``n`` trajectories: (N, D, S, S) each, in fp32 at any precision.

        Formed outside the segments' autocast: bf16 would round sigma <= 3e-3 noise around
        latents of size 1 away (its spacing near 1.0 is 2^-7).
        """
        shape = (n, self.z_H0.shape[0], size, size)
        z_H, z_L = self.z_H0.expand(shape), self.z_L0.expand(shape)
        if eps_H is not None:
            z_H = z_H + eps_H.to(z_H.device, torch.float32)
        if eps_L is not None:
            z_L = z_L + eps_L.to(z_L.device, torch.float32)
        return z_H.contiguous(), z_L.contiguous()

    def _h_net(self) -> ReasoningNet:
        return self.net_H if self.net_H is not None else self.net_L

    def _cycle(self, x: Tensor, z_H: Tensor, z_L: Tensor, n_L: int) -> tuple[Tensor, Tensor]:
        for _ in range(n_L):
            z_L = self.net_L(z_L, z_H + x)
        return self._h_net()(z_H, z_L), z_L

    def segment(self, x: Tensor, z_H: Tensor, z_L: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One deep-supervision segment.

        Args:
            x: (N, D, S, S) input embedding; z_H, z_L: (N, D, S, S) carried latents.

        Returns:
            z_H, z_L detached for the next segment (fp32: the conv outputs are added to the
            fp32 residual stream); logits (N, 2, S, S) and the halting logit (N,), both fp32.
        """
        with Placement(x.device, self.precision).autocast():
            with torch.no_grad():
                for _ in range(self.H_cycles - 1):
                    z_H, z_L = self._cycle(x, z_H, z_L, self.L_cycles)
                if self.arch == "hrm":  # all but the last z_L update of the last cycle
                    for _ in range(self.L_cycles - 1):
                        z_L = self.net_L(z_L, z_H + x)
            # the cycle in the graph: all of it (TRM), only its last z_L and z_H update (HRM)
            n_L_grad = 1 if self.arch == "hrm" else self.L_cycles
            z_H, z_L = self._cycle(x, z_H, z_L, n_L_grad)
            logits = self.head(z_H).float()  # (N, 2, S, S)
            q_halt = self.q_head(z_H.float().mean(dim=(2, 3))).squeeze(-1).float()  # (N,)
        return z_H.detach(), z_L.detach(), logits, q_halt


# ---------------------------------------------------------------------------------------------
# Training step: the two rollouts
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BatchStats:
    """What one training batch reports (losses are means over its segments)."""

    loss: float = 0.0
    loss_ce: float = 0.0
    loss_halt: float = 0.0
    grad_norms: list[float] = dataclasses.field(default_factory=list)
    nan_skipped: int = 0


def _per_trajectory_loss(
    logits: Tensor, q_halt: Tensor, labels: Tensor, act: bool
) -> tuple[Tensor, Tensor]:
    """CE (mean over cells) and halting BCE (target: maze solved), each (N,)."""
    ce = F.cross_entropy(logits, labels, reduction="none").mean(dim=(1, 2))  # (N,)
    if not act:
        return ce, torch.zeros_like(ce)
    solved = (logits.argmax(dim=1) == labels).all(dim=2).all(dim=1).float()  # (N,)
    return ce, F.binary_cross_entropy_with_logits(q_halt, solved, reduction="none")


def _record(stats: BatchStats, step: StepResult) -> None:
    """Add one optimizer step (taken or skipped as non-finite) to the batch's stats."""
    stats.loss += step.total
    stats.loss_ce += step.values["ce"]
    stats.loss_halt += step.values["halt"]
    if step.applied:
        stats.grad_norms.append(step.grad_norm)
    else:
        stats.nan_skipped += 1


def train_batch(
    model: RecursiveReasoner,
    health: HealthMonitor,
    tokens: Tensor,
    labels: Tensor,
    noise: TrajectoryNoise,
    *,
    rollout: Literal["parallel_fixed", "serial_act"],
    halt_max_steps: int,
    act: bool,
) -> BatchStats:
    """Train one batch of B mazes with T = noise.sigmas.shape[0] trajectories each.

    The segment loss is mean over the T*B trajectories of CE (+ halting BCE when ``act``);
    trajectories halted by ACT add 0. One optimizer step per segment, taken by
    ``health`` (backward, clip, step; a non-finite step is skipped and counted).

    In a data-parallel trial, ``tokens``, ``labels`` and ``noise`` are this worker's slice;
    ``serial_act`` stops when every worker's trajectories have halted, and a worker whose
    trajectories of one kind all halted still runs them as an empty batch, so every worker
    hands the monitor gradients of the same parameters to average.

    Args:
        health: The monitor over ``model`` and its optimizer.
        tokens, labels: (B, S, S) int64 on the model's device.
        noise: from :func:`trajectory_noise` (eps (T, B, D, S, S) or None).
    """
    n_traj, batch = noise.sigmas.shape
    size = tokens.shape[-1]
    stats = BatchStats()
    if rollout == "parallel_fixed":

        def flatten(eps: Tensor | None) -> Tensor | None:  # (T, B, D, S, S) -> (T*B, D, S, S)
            return None if eps is None else eps.reshape(n_traj * batch, *eps.shape[2:])

        tok, lab = tokens.repeat(n_traj, 1, 1), labels.repeat(n_traj, 1, 1)  # (T*B, S, S)
        z_H, z_L = model.initial_latents(
            n_traj * batch, size, flatten(noise.eps_H), flatten(noise.eps_L)
        )
        for _ in range(halt_max_steps):
            z_H, z_L, logits, q_halt = model.segment(model.embed_input(tok), z_H, z_L)
            ce, halt = _per_trajectory_loss(logits, q_halt, lab, act)  # (T*B,) each
            _record(stats, health.step({"ce": ce.mean(), "halt": halt.mean()}))
    elif rollout == "serial_act":
        carries = [
            model.initial_latents(
                batch,
                size,
                None if noise.eps_H is None else noise.eps_H[k],
                None if noise.eps_L is None else noise.eps_L[k],
            )
            for k in range(n_traj)
        ]
        halted = [torch.zeros(batch, dtype=torch.bool, device=tokens.device) for _ in range(n_traj)]
        denom = n_traj * batch
        for _ in range(halt_max_steps):
            if _all_halted(halted):
                break  # every trajectory halted: nothing left to train on this batch
            for k in range(n_traj):
                active = (~halted[k]).nonzero().squeeze(1)  # (n_active,)
                if active.numel() == 0 and world_size() == 1:
                    continue
                z_H, z_L = carries[k]
                sub = None if active.numel() == batch else active
                tok = tokens if sub is None else tokens[sub]
                lab = labels if sub is None else labels[sub]
                zh_in = z_H if sub is None else z_H[sub]
                zl_in = z_L if sub is None else z_L[sub]
                zh, zl, logits, q_halt = model.segment(model.embed_input(tok), zh_in, zl_in)
                ce, halt = _per_trajectory_loss(logits, q_halt, lab, act)  # (n_active,)
                health.backward({"ce": ce.sum() / denom, "halt": halt.sum() / denom})
                if sub is None:
                    carries[k] = (zh, zl)
                else:
                    z_H, z_L = z_H.clone(), z_L.clone()
                    z_H[sub], z_L[sub] = zh, zl
                    carries[k] = (z_H, z_L)
                if act:
                    halted[k][active] = q_halt > 0
            _record(stats, health.apply())  # the gradients of every trajectory, accumulated
    else:
        raise ValueError(f"rollout={rollout!r} must be 'parallel_fixed' or 'serial_act'")
    stats.loss /= halt_max_steps
    stats.loss_ce /= halt_max_steps
    stats.loss_halt /= halt_max_steps
    return stats


def _all_halted(halted: list[Tensor]) -> bool:
    """Whether every trajectory has halted, on every worker (the workers stop together)."""
    done = all(bool(h.all()) for h in halted)
    if world_size() == 1:
        return done
    return average_metrics({"running": 0.0 if done else 1.0})["running"] == 0.0


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
_EVAL_NOISE_SEED = 7919


@torch.no_grad()
def evaluate_exact_match(
    model: RecursiveReasoner,
    tokens: Tensor,
    labels: Tensor,
    *,
    n_segments: int,
    sigma: float,
    perturb: Literal["z_H", "z_L", "both"],
    chunk: int,
    noise_seed: int,
) -> float:
    """Fraction of mazes solved (every cell right) after ``n_segments`` segments, no halting.

    sigma > 0 perturbs the initial latents with noise drawn from ``noise_seed`` on the
    model's device (the same draws at every call, so scores are comparable across iterations
    and sigmas).
    """
    device = next(model.parameters()).device
    generator = device_generator(noise_seed, device)
    d, size = model.z_H0.shape[0], tokens.shape[-1]
    solved = 0
    for lo in range(0, tokens.shape[0], chunk):
        tok = tokens[lo : lo + chunk].to(device)  # (n, S, S)
        lab = labels[lo : lo + chunk].to(device)
        n = tok.shape[0]
        eps_H = eps_L = None
        if sigma > 0:
            eps = sigma * torch.randn((2, n, d, size, size), generator=generator, device=device)
            eps_H = eps[0] if perturb in ("z_H", "both") else None
            eps_L = eps[1] if perturb in ("z_L", "both") else None
        z_H, z_L = model.initial_latents(n, size, eps_H, eps_L)
        x = model.embed_input(tok)
        for _ in range(n_segments):
            z_H, z_L, logits, _ = model.segment(x, z_H, z_L)
        solved += int((logits.argmax(dim=1) == lab).all(dim=2).all(dim=1).sum())
    return solved / tokens.shape[0]


# ---------------------------------------------------------------------------------------------
# Experiment: the tunelab contract
# ---------------------------------------------------------------------------------------------
def _stream_seed(seed: int, stream: int) -> int:
    """A 64-bit seed for the trial generator ``stream`` (SeedSequence spawn key ``stream``)."""
    child = np.random.SeedSequence(seed, spawn_key=(stream,))
    return int(child.generate_state(1, dtype=np.uint64)[0])


_STREAM_DATA_ORDER, _STREAM_NOISE = 0, 1


#: Noise below this sigma is mostly rounded away around latents of size 1 in bf16 / fp16 ops.
_LOW_PRECISION_SIGMA = 3e-3


class RecursiveReasonerExperiment:
    """One trial: model, optimizer, own RNGs, data cursor, best snapshot, metric history.

    Everything lives on ``self.place.device`` but the data order (CPU) and the mazes (CPU;
    each batch is moved).

    Raises:
        tunelab.devices.DeviceUnavailable: ``device: cuda`` and no CUDA device is visible.
    """

    def __init__(
        self, config: Config, seed: int, data: MazeData, *, place: Placement | None = None
    ) -> None:
        self.config = config
        self.data = data
        self.place = place if place is not None else placement(config)
        self.device = self.place.device
        _warn_if_noise_is_rounded_away(config)
        self.model = RecursiveReasoner(config).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(0.9, 0.95),
        )
        # backward, clip, step or skip; per-layer norms, term shares, explosions (tunelab.health)
        self.health = HealthMonitor(
            self.model, self.optimizer, clip=config.grad_clip, scaler=self.place.grad_scaler()
        )
        # Separate streams: a lever that draws more (or no) noise never shifts the data order.
        # The order is drawn on the CPU (the same on every device), the noise on the device.
        self.data_gen = torch.Generator().manual_seed(_stream_seed(seed, _STREAM_DATA_ORDER))
        self.noise_gen = device_generator(_stream_seed(seed, _STREAM_NOISE), self.device)
        self.perm = torch.randperm(config.n_train, generator=self.data_gen)
        self.cursor = 0
        self.step = 0  # training batches done
        self.iteration = 0
        self.best_acc = -math.inf
        self.best_iteration = -1
        self.best_state: dict[str, Any] | None = None  # full training state at the best iteration
        self.history: list[dict[str, float]] = []

    # --- data order ----------------------------------------------------------------------------
    def _next_indices(self) -> Tensor:
        """The next batch_size training indices (epoch permutations, reshuffled when used up)."""
        parts, need = [], self.config.batch_size
        while need > 0:
            if self.cursor == self.perm.numel():
                self.perm = torch.randperm(self.config.n_train, generator=self.data_gen)
                self.cursor = 0
            take = min(need, self.perm.numel() - self.cursor)
            parts.append(self.perm[self.cursor : self.cursor + take])
            self.cursor += take
            need -= take
        return torch.cat(parts)

    # --- one iteration -------------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        cfg = self.config
        self.model.train()
        totals = BatchStats()
        for _ in range(cfg.steps_per_iter):
            idx = self._next_indices()  # the global batch
            noise = trajectory_noise(
                cfg, step=self.step, batch=idx.numel(), generator=self.noise_gen
            )
            idx = shard(idx)  # this worker's mazes (all of them with one worker)
            stats = train_batch(
                self.model,
                self.health,
                self.data.train_tokens[idx].to(self.device),
                self.data.train_labels[idx].to(self.device),
                noise.shard(),
                rollout=cfg.rollout,
                halt_max_steps=cfg.halt_max_steps,
                act=cfg.act,
            )
            self.step += 1
            totals.loss += stats.loss / cfg.steps_per_iter
            totals.loss_ce += stats.loss_ce / cfg.steps_per_iter
            totals.loss_halt += stats.loss_halt / cfg.steps_per_iter
            totals.grad_norms += stats.grad_norms
            totals.nan_skipped += stats.nan_skipped
        self.iteration += 1
        sigma_now = 0.0 if cfg.sigma_mode == "none" else band_max(cfg)
        sigma_now *= sigma_scale(self.step, cfg.ramp_steps, cfg.clean_warmup_steps)
        metrics = {
            M_TRAIN_LOSS: totals.loss,
            M_TRAIN_LOSS_CE: totals.loss_ce,
            M_TRAIN_LOSS_HALT: totals.loss_halt,
            M_TRAIN_SIGMA: sigma_now,
            **self._evaluate(),
            **self.health.end_iteration(),
        }
        clean = metrics[M_VAL_CLEAN_ACC]
        improved = clean > self.best_acc
        if improved:
            self.best_acc, self.best_iteration = clean, self.iteration
        metrics[M_VAL_BEST_ACC] = self.best_acc
        metrics[M_VAL_FINAL_ACC] = clean
        self.history.append(metrics)
        if improved:
            # a snapshot (tensors copied) that later training cannot change
            snapshot = {"family": self._training_state(), "rng": tunelab.capture_rng_state()}
            self.best_state = copy.deepcopy(snapshot)
        return metrics

    def _evaluate(self) -> dict[str, float]:
        """val/* scores: the validation mazes only (the test mazes are export's)."""
        clean, perturbed, perturbed_10x = self._scores(
            self.model, self.data.val_tokens, self.data.val_labels
        )
        return {
            M_VAL_CLEAN_ACC: clean,
            M_VAL_PERTURBED: perturbed,
            M_VAL_PERTURBED_10X: perturbed_10x,
        }

    def _scores(
        self, model: RecursiveReasoner, tokens: Tensor, labels: Tensor, *, clean_only: bool = False
    ) -> tuple[float, ...]:
        """Exact match of ``model`` at sigma 0, the band max and 10x the band max (or only 0)."""
        cfg = self.config
        band = band_max(cfg)
        sigmas = (0.0,) if clean_only else (0.0, band, 10.0 * band)
        was_training = model.training
        model.eval()
        out = tuple(
            evaluate_exact_match(
                model,
                tokens,
                labels,
                n_segments=cfg.n_sup,
                sigma=sigma,
                perturb=cfg.perturb,
                chunk=cfg.eval_batch_size,
                noise_seed=_EVAL_NOISE_SEED + cfg.data_seed,
            )
            for sigma in sigmas
        )
        model.train(was_training)
        return out

    def test_scores(self) -> dict[str, float]:
        """The test/* block: the final model and the best-val checkpoint on the test mazes.

        Called by :meth:`export` only (once, at the trial's budget); draws from no trial RNG.
        """
        tokens, labels = self.data.test_tokens, self.data.test_labels
        clean, perturbed, perturbed_10x = self._scores(self.model, tokens, labels)
        if self.best_state is None:
            best_clean = clean
        else:
            best_model = copy.deepcopy(self.model)  # a copy: no init, so no global RNG draw
            best_model.load_state_dict(self.best_state["family"]["model"])
            (best_clean,) = self._scores(best_model, tokens, labels, clean_only=True)
        return {
            M_TEST_CLEAN_ACC: clean,
            M_TEST_PERTURBED: perturbed,
            M_TEST_PERTURBED_10X: perturbed_10x,
            M_TEST_BEST_ACC: best_clean,
        }

    # --- state ---------------------------------------------------------------------------------
    def _training_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "noise_gen": self.noise_gen.get_state(),
            "perm": self.perm,
            "cursor": self.cursor,
            "step": self.step,
            "iteration": self.iteration,
            "best_acc": self.best_acc,
            "best_iteration": self.best_iteration,
            "history": list(self.history),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self._training_state(), "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, saved on any device (``map_location="cpu"`` included)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moved to the parameters' device
        name = "recursive_reasoner"
        load_generator_state(self.data_gen, state["data_gen"], name=f"{name} data_gen")
        load_generator_state(self.noise_gen, state["noise_gen"], name=f"{name} noise_gen")
        self.perm = state["perm"].to("cpu", copy=True)
        self.cursor = int(state["cursor"])
        self.step = int(state["step"])
        self.iteration = int(state["iteration"])
        self.best_acc = float(state["best_acc"])
        self.best_iteration = int(state["best_iteration"])
        self.history = [dict(m) for m in state["history"]]
        self.best_state = copy.deepcopy(state.get("best_state"))

    # --- export --------------------------------------------------------------------------------
    def export(self, out_dir: Path) -> dict[str, Any]:
        """Write best.pt, final.pt, latest.pt and metrics.json; return the manifest fields.

        Each .pt holds ``{"family": state, "rng": rng, "iteration", "best", "extra"}`` (the
        layout of :func:`tunelab.save_state`): ``tunelab.restore_rng_state(p["rng"])`` and
        ``experiment.load_state_dict(p["family"])`` continue training exactly from it. best.pt
        is the state at the best val/clean_acc; final.pt and latest.pt the current state.

        The manifest's ``test`` block (:meth:`test_scores`) is the only place the test mazes
        are scored.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        current = {"family": self.state_dict(), "rng": tunelab.capture_rng_state()}
        best = self.best_state if self.best_state is not None else current
        files = {}
        for kind, snap in (("best", best), ("final", current), ("latest", current)):
            payload = {
                "family": snap["family"],
                "rng": snap["rng"],
                "iteration": snap["family"]["iteration"],
                "best": self.best_acc,
                "extra": {"kind": kind, "config": dataclasses.asdict(self.config)},
            }
            buf = io.BytesIO()
            torch.save(payload, buf)
            tunelab.atomic_write_bytes(out_dir / f"{kind}.pt", buf.getvalue())
            files[kind] = f"{kind}.pt"
        final = self.history[-1] if self.history else {}
        manifest: dict[str, Any] = {
            "family": "recursive_reasoner",
            "device": str(self.place.device),
            "precision": self.place.precision,
            M_VAL_BEST_ACC: self.best_acc if self.history else None,
            M_VAL_FINAL_ACC: final.get(M_VAL_FINAL_ACC),
            M_VAL_PERTURBED: final.get(M_VAL_PERTURBED),
            M_VAL_PERTURBED_10X: final.get(M_VAL_PERTURBED_10X),
            "test": self.test_scores(),
            "best_iteration": self.best_iteration,
            "iterations": self.iteration,
            "train_batches": self.step,
            "arch": self.config.arch,
            "rollout": self.config.rollout,
            "loss_mode": self.config.loss_mode,
            "maze_size": self.config.maze_size,
            "sigma_band": [self.config.sigma_min, self.config.sigma_max]
            if self.config.sigma_mode == "loguniform"
            else band_max(self.config),
            "files": {**files, "metrics": "metrics.json"},
        }
        tunelab.atomic_write_json(
            out_dir / "metrics.json",
            {
                "manifest": manifest,
                "config": dataclasses.asdict(self.config),
                "history": self.history,
            },
        )
        return manifest


def _warn_if_noise_is_rounded_away(config: Config) -> None:
    """Warn when bf16 / fp16 meets a noise band reaching sigma <= 3e-3 (rounded away there)."""
    if config.precision == "fp32":
        return
    low = config.sigma_min if config.sigma_mode == "loguniform" else config.sigma
    if 0.0 < low <= _LOW_PRECISION_SIGMA:
        warnings.warn(
            f"recursive_reasoner: precision {config.precision} with noise down to sigma "
            f"{low:g} (<= {_LOW_PRECISION_SIGMA:g}): z0 + eps is kept in fp32, but the "
            f"network's {config.precision} ops round such noise around latents of size 1 "
            "mostly away; use precision fp32 to study noise that small",
            UserWarning,
            stacklevel=3,
        )


def build(config: Config, seed: int, data_root: Path) -> RecursiveReasonerExperiment:
    """tunelab entry point: mazes from ``data_seed`` (shared), everything else from ``seed``.

    Raises:
        tunelab.devices.DeviceUnavailable: ``device: cuda`` and no CUDA device is visible
            (before any maze is generated).
    """
    place = placement(config)
    data = load_or_generate_mazes(config, data_root)
    return RecursiveReasonerExperiment(config, seed, data, place=place)


FAMILY = tunelab.Family(
    name="recursive_reasoner",
    config_cls=Config,
    build=build,
    metrics=METRICS,
    data_check=check_data,
    description=(
        "TRM/HRM recursive reasoner on procedural mazes (exact-match shortest path) with "
        "centered initial-latent noise (trajectory augmentation), parallel_fixed vs serial_act."
    ),
)
