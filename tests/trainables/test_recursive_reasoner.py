"""Tests of the recursive_reasoner family: mazes, trajectory noise, rollouts, resume, export."""

from __future__ import annotations

import copy
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, shortest_path

import tunelab
from trainables import recursive_reasoner as rr
from tunelab.devices import DeviceFields, DeviceUnavailable
from tunelab.health import HealthMonitor, HealthPolicy
from tunelab.names import M_HEALTH_AMP_SKIPPED, is_per_name_health_metric

TINY: dict[str, Any] = {
    "maze_size": 7,
    "n_train": 48,
    "n_val": 16,
    "n_test": 16,
    "hidden": 8,
    "n_layers": 1,
    "H_cycles": 2,
    "L_cycles": 2,
    "halt_max_steps": 2,
    "n_sup": 2,
    "K": 3,
    "batch_size": 8,
    "steps_per_iter": 2,
    "eval_batch_size": 16,
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rr_data")


def make_config(**overrides: Any) -> rr.Config:
    return rr.FAMILY.make_config({**TINY, **overrides})


def build(seed: int, data_root: Path, **overrides: Any) -> rr.RecursiveReasonerExperiment:
    tunelab.seed_everything(seed)
    return rr.build(make_config(**overrides), seed, data_root)


# ---------------------------------------------------------------------------------------------
# Mazes
# ---------------------------------------------------------------------------------------------
def _grid_graph(open_: np.ndarray) -> coo_matrix:
    """Adjacency of open cells (4-neighbourhood) over flat indices, for scipy's csgraph."""
    h, w = open_.shape
    rows, cols = [], []
    for r, c in zip(*np.nonzero(open_), strict=True):
        for dr, dc in ((1, 0), (0, 1)):
            if r + dr < h and c + dc < w and open_[r + dr, c + dc]:
                rows += [r * w + c, (r + dr) * w + c + dc]
                cols += [(r + dr) * w + c + dc, r * w + c]
    return coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(h * w, h * w))


def _count_simple_paths(
    open_: np.ndarray, start: tuple[int, int], goal: tuple[int, int], limit: int
) -> int:
    """Brute force: simple start -> goal paths with at most ``limit`` steps (DFS)."""
    h, w = open_.shape
    seen = {start}

    def walk(cell: tuple[int, int], steps: int) -> int:
        if cell == goal:
            return 1
        if steps == limit:
            return 0
        total = 0
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            nxt = (cell[0] + dr, cell[1] + dc)
            if 0 <= nxt[0] < h and 0 <= nxt[1] < w and open_[nxt] and nxt not in seen:
                seen.add(nxt)
                total += walk(nxt, steps + 1)
                seen.remove(nxt)
        return total

    return walk(start, 0)


@pytest.mark.parametrize("size", [7, 8, 11])
def test_maze_generator_is_deterministic_per_seed(size: int) -> None:
    # same seed -> same maze; another seed -> another maze
    a = rr.make_maze_example(size, 0.3, np.random.default_rng(5))
    b = rr.make_maze_example(size, 0.3, np.random.default_rng(5))
    c = rr.make_maze_example(size, 0.3, np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(("size", "seed"), list(itertools.product([7, 8, 12, 30], range(3))))
def test_mazes_are_connected(size: int, seed: int) -> None:
    # every open cell is reachable from every other one
    open_ = rr.generate_maze(size, 0.3, np.random.default_rng(seed))
    graph = _grid_graph(open_).tocsr()
    idx = np.flatnonzero(open_.ravel())
    n_comp, _ = connected_components(graph[idx][:, idx], directed=False)
    assert n_comp == 1
    assert not open_[0].any() and not open_[-1].any() and not open_[:, 0].any()


@pytest.mark.parametrize(("size", "loop_frac"), [(7, 0.3), (9, 0.5), (15, 0.2)])
def test_extra_walls_are_removed(size: int, loop_frac: float) -> None:
    # DFS tree (rooms - 1 openings) plus round(loop_frac * remaining inner walls)
    n = (size - 1) // 2
    n_inner_walls = 2 * n * (n - 1)
    tree_edges = n * n - 1
    open_ = rr.generate_maze(size, loop_frac, np.random.default_rng(0))
    openings = int(open_.sum()) - n * n
    assert openings == tree_edges + round(loop_frac * (n_inner_walls - tree_edges))
    assert openings > tree_edges


def test_no_loops_without_wall_removal() -> None:
    # loop_frac=0 leaves a perfect maze: a spanning tree of the rooms
    n = 5
    open_ = rr.generate_maze(2 * n + 1, 0.0, np.random.default_rng(1))
    assert int(open_.sum()) - n * n == n * n - 1


@pytest.mark.parametrize(("size", "seed"), list(itertools.product([7, 9, 11], range(4))))
def test_path_label_is_the_unique_shortest_path(size: int, seed: int) -> None:
    # labelled cells: a start->goal walk as long as scipy's shortest distance, and the only one
    tokens, labels = rr.make_maze_example(size, 0.4, np.random.default_rng(seed))
    open_ = tokens != rr.WALL
    (r0, c0), (r1, c1) = np.argwhere(tokens == rr.START)[0], np.argwhere(tokens == rr.GOAL)[0]
    start, goal = (int(r0), int(c0)), (int(r1), int(c1))
    w = size
    dist = shortest_path(_grid_graph(open_), unweighted=True, indices=[start[0] * w + start[1]])
    d = int(dist[0, goal[0] * w + goal[1]])
    path = {tuple(int(v) for v in rc) for rc in np.argwhere(labels == 1)}
    assert len(path) == d + 1 and start in path and goal in path
    assert all(open_[c] for c in path)
    for cell in path - {start, goal}:  # a simple path: inner cells have 2 path neighbours
        nbrs = [(cell[0] + a, cell[1] + b) for a, b in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        assert sum(n in path for n in nbrs) == 2
    assert _count_simple_paths(open_, start, goal, d) == 1


def _maze_set(tokens: torch.Tensor) -> set[bytes]:
    return {t.numpy().tobytes() for t in tokens}


def test_test_set_is_held_out_and_shared_across_trial_seeds(data_root: Path) -> None:
    # no test maze equals a training maze; trial seeds share the data, data_seed changes it
    a, b = build(0, data_root).data, build(1, data_root).data
    c = build(0, data_root, data_seed=1).data
    assert not _maze_set(a.test_tokens) & _maze_set(a.train_tokens)
    assert torch.equal(a.train_tokens, b.train_tokens) and torch.equal(a.test_labels, b.test_labels)
    assert torch.equal(a.val_tokens, b.val_tokens)
    assert not torch.equal(a.train_tokens, c.train_tokens)


@pytest.mark.parametrize("data_seed", [0, 1])
def test_train_val_test_are_pairwise_disjoint(data_root: Path, data_seed: int) -> None:
    # the validation mazes (what selection sees) share no maze with test or train
    data = rr.load_or_generate_mazes(
        make_config(n_val=64, n_test=64, data_seed=data_seed), data_root
    )
    train, val, test = (
        _maze_set(data.train_tokens),
        _maze_set(data.val_tokens),
        _maze_set(data.test_tokens),
    )
    assert data.val_tokens.shape[0] == 64 and data.test_tokens.shape[0] == 64
    assert not val & test and not val & train and not test & train


def test_val_size_leaves_train_and_test_unchanged(data_root: Path) -> None:
    # val has its own stream: changing n_val changes neither the training nor the test mazes
    a = rr.load_or_generate_mazes(make_config(n_val=16), data_root)
    b = rr.load_or_generate_mazes(make_config(n_val=32), data_root)
    assert torch.equal(a.train_tokens, b.train_tokens) and torch.equal(a.test_tokens, b.test_tokens)
    assert torch.equal(a.val_tokens, b.val_tokens[:16])


# ---------------------------------------------------------------------------------------------
# Trajectory noise
# ---------------------------------------------------------------------------------------------
def test_noise_is_centered_with_the_right_std() -> None:
    # eps ~ N(0, sigma^2): sample mean within 4 standard errors of 0, std within 2 %
    cfg = make_config(sigma_mode="fixed", sigma=0.5, loss_mode="single_perturbed_ce", hidden=16)
    noise = rr.trajectory_noise(cfg, step=0, batch=64, generator=torch.Generator().manual_seed(0))
    assert noise.eps_H is not None
    eps = noise.eps_H.double()
    n = eps.numel()
    assert abs(float(eps.mean())) < 4 * 0.5 / math.sqrt(n)
    assert float(eps.std()) == pytest.approx(0.5, rel=0.02)


def test_loguniform_sigmas_fill_the_band() -> None:
    # per-trajectory sigma in [sigma_min, sigma_max] with log(sigma) uniform (mean at the midpoint)
    cfg = make_config(
        sigma_mode="loguniform", sigma_min=0.01, sigma_max=1.0, loss_mode="single_perturbed_ce"
    )
    sig = rr.sample_trajectory_sigmas(cfg, 1, 20000, 1.0, torch.Generator().manual_seed(0))
    assert float(sig.min()) >= 0.01 and float(sig.max()) <= 1.0
    log_sig = sig.log().double()
    se = (math.log(100) / math.sqrt(12)) / math.sqrt(sig.numel())
    assert abs(float(log_sig.mean()) - math.log(0.1)) < 4 * se


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (50, 0.5), (100, 1.0), (400, 1.0)])
def test_sigma_follows_the_ramp(step: int, expected: float) -> None:
    # fixed sigma: the sigma in force is sigma * min(1, step / ramp_steps)
    cfg = make_config(
        sigma_mode="fixed", sigma=0.2, ramp_steps=100, loss_mode="single_perturbed_ce"
    )
    noise = rr.trajectory_noise(cfg, step=step, batch=4, generator=torch.Generator())
    assert torch.allclose(noise.sigmas, torch.full((1, 4), 0.2 * expected))


@pytest.mark.parametrize("step", [0, 9])
def test_clean_warmup_has_no_noise(step: int) -> None:
    # during the clean warmup every sigma is 0 and no latent is perturbed
    cfg = make_config(sigma_mode="fixed", clean_warmup_steps=10, loss_mode="single_perturbed_ce")
    noise = rr.trajectory_noise(cfg, step=step, batch=4, generator=torch.Generator())
    assert not bool(noise.sigmas.any()) and noise.eps_H is None and noise.eps_L is None


def test_ramp_starts_after_the_clean_warmup() -> None:
    # warmup 10, ramp 20: at step 20 the ramp is half way
    assert rr.sigma_scale(20, ramp_steps=20, clean_warmup_steps=10) == 0.5
    assert rr.sigma_scale(10, ramp_steps=20, clean_warmup_steps=10) == 0.0


@pytest.mark.parametrize("sigma_mode", ["fixed", "loguniform"])
def test_multi_mode_first_trajectory_is_clean(sigma_mode: str) -> None:
    # multi_perturbed_ce: eps of trajectory 0 is exactly 0, the K-1 others are not
    cfg = make_config(sigma_mode=sigma_mode, loss_mode="multi_perturbed_ce", K=4)
    noise = rr.trajectory_noise(cfg, step=0, batch=5, generator=torch.Generator().manual_seed(1))
    for eps in (noise.eps_H, noise.eps_L):
        assert eps is not None and eps.shape[:2] == (4, 5)
        assert torch.equal(eps[0], torch.zeros_like(eps[0]))
        assert bool((eps[1:].flatten(2).abs().amax(dim=2) > 0).all())


def test_single_mode_has_one_perturbed_trajectory() -> None:
    # single_perturbed_ce: one trajectory per maze (K ignored), all perturbed
    cfg = make_config(loss_mode="single_perturbed_ce", K=4)
    noise = rr.trajectory_noise(cfg, step=0, batch=5, generator=torch.Generator().manual_seed(1))
    assert noise.sigmas.shape == (1, 5) and bool((noise.sigmas > 0).all())


@pytest.mark.parametrize(
    ("perturb", "on_h", "on_l"), [("z_H", True, False), ("z_L", False, True), ("both", True, True)]
)
def test_perturb_selects_the_latent(perturb: str, on_h: bool, on_l: bool) -> None:
    # only the chosen latent(s) get noise
    cfg = make_config(perturb=perturb)
    noise = rr.trajectory_noise(cfg, step=0, batch=2, generator=torch.Generator())
    assert (noise.eps_H is not None, noise.eps_L is not None) == (on_h, on_l)


def test_p_clean_mixture_frequency() -> None:
    # each trajectory is clean with probability p_clean (within 4 standard errors)
    p = 0.3
    cfg = make_config(sigma_mode="loguniform", p_clean=p, loss_mode="single_perturbed_ce")
    sig = rr.sample_trajectory_sigmas(cfg, 1, 20000, 1.0, torch.Generator().manual_seed(0))
    frac = float((sig == 0).double().mean())
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / sig.numel())


def test_reduced_precision_keeps_the_noised_latents_in_fp32() -> None:
    # the FAMILIES.md note: in bf16, sigma = 1e-3 noise on z0 mostly vanishes; so z0 + eps is
    # formed in fp32 at every precision and carries the noise bf16 would round away
    cfg32, cfg16 = make_config(hidden=64), make_config(hidden=64, precision="bf16")
    torch.manual_seed(0)
    m32 = rr.RecursiveReasoner(cfg32)
    m16 = rr.RecursiveReasoner(cfg16)
    m16.load_state_dict(m32.state_dict())
    eps = 1e-3 * torch.randn(4, 64, 7, 7)
    z16, clean16 = m16.initial_latents(4, 7, eps)[0], m16.initial_latents(4, 7)[0]
    assert z16.dtype == torch.float32
    assert torch.equal(z16, m32.initial_latents(4, 7, eps)[0])
    assert float((z16 == clean16).float().mean()) < 0.01
    rounded = z16.bfloat16() == clean16.bfloat16()
    assert float(rounded.float().mean()) > 0.5  # what a bf16 latent would have kept
    # the segment's autocast computes in bf16 but carries the latents in fp32
    x = m16.embed_input(torch.ones(4, 7, 7, dtype=torch.long))
    z_H, z_L, logits, q_halt = m16.segment(x, z16, clean16)
    assert {t.dtype for t in (z_H, z_L, logits, q_halt)} == {torch.float32}


@pytest.mark.parametrize(
    ("precision", "band", "warns"),
    [
        ("bf16", {"sigma_min": 1e-3}, True),
        ("fp16", {"sigma_mode": "fixed", "sigma": 3e-3}, True),
        ("bf16", {"sigma_min": 0.01}, False),
        ("fp32", {"sigma_min": 1e-3}, False),
        ("bf16", {"sigma_mode": "fixed", "sigma": 0.0}, False),
    ],
)
def test_reduced_precision_warns_when_the_noise_band_reaches_3e_3(
    data_root: Path, precision: str, band: dict[str, Any], warns: bool
) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build(0, data_root, precision=precision, **band)
    messages = [str(w.message) for w in seen if "mostly away" in str(w.message)]
    assert len(messages) == int(warns), messages


# ---------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------
def _rollout_pair(
    data_root: Path, act: bool, **overrides: Any
) -> dict[str, tuple[rr.BatchStats, rr.RecursiveReasoner]]:
    cfg = make_config(act=act, **overrides)
    data = rr.load_or_generate_mazes(cfg, data_root)
    noise = rr.trajectory_noise(cfg, step=0, batch=8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    init = rr.RecursiveReasoner(cfg)
    out = {}
    for rollout in ("parallel_fixed", "serial_act"):
        model = copy.deepcopy(init)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        stats = rr.train_batch(
            model,
            HealthMonitor(model, opt, clip=cfg.grad_clip),
            data.train_tokens[:8],
            data.train_labels[:8],
            noise,
            rollout=rollout,
            halt_max_steps=cfg.halt_max_steps,
            act=act,
        )
        out[rollout] = (stats, model)
    return out


@pytest.mark.parametrize(("act", "arch"), [(False, "trm"), (True, "trm"), (False, "hrm")])
def test_parallel_and_serial_rollouts_agree(data_root: Path, act: bool, arch: str) -> None:
    # same data and noise, no early halt (q_head bias -5 at init): same loss, same update
    out = _rollout_pair(data_root, act, arch=arch, halt_max_steps=3)
    (sp, mp), (ss, ms) = out["parallel_fixed"], out["serial_act"]
    assert len(sp.grad_norms) == len(ss.grad_norms) == 3
    assert ss.loss == pytest.approx(sp.loss, rel=1e-5)
    assert ss.loss_halt == pytest.approx(sp.loss_halt, rel=1e-5)
    for a, b in zip(mp.parameters(), ms.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_serial_act_stops_halted_trajectories(
    data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a halting logit > 0 everywhere: serial_act trains one segment, parallel_fixed all of them
    original = rr.RecursiveReasoner.__init__

    def eager_halting(self: rr.RecursiveReasoner, config: rr.Config) -> None:
        original(self, config)
        with torch.no_grad():
            self.q_head.bias.fill_(100.0)

    monkeypatch.setattr(rr.RecursiveReasoner, "__init__", eager_halting)
    out = _rollout_pair(data_root, act=True, halt_max_steps=3)
    assert len(out["serial_act"][0].grad_norms) == 1
    assert len(out["parallel_fixed"][0].grad_norms) == 3


def test_non_finite_steps_are_skipped_and_counted(data_root: Path) -> None:
    # a NaN weight makes every loss NaN: no optimizer step, health/nan_skipped counts them
    exp = build(0, data_root)
    exp.health.policy = HealthPolicy(max_consecutive_skips=0)  # skip, never end the trial
    with torch.no_grad():
        exp.model.head.weight[0, 0] = math.nan
    before = copy.deepcopy(exp.model.state_dict())
    metrics = exp.train_iteration()
    assert metrics[rr.M_NAN_SKIPPED] == TINY["steps_per_iter"] * TINY["halt_max_steps"]
    assert math.isnan(metrics[rr.M_GRAD_NORM])
    after = exp.model.state_dict()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Config, metrics, resume, export
# ---------------------------------------------------------------------------------------------
def test_unknown_config_key_is_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="sigma_maximum"):
        rr.FAMILY.make_config({"sigma_maximum": 0.3})


def test_inverted_sigma_band_is_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="sigma_min"):
        rr.FAMILY.make_config({"sigma_min": 0.5, "sigma_max": 0.1})


def test_config_fields_are_documented() -> None:
    # the device keys are documented where they are declared, on DeviceFields (pydantic does
    # not carry attribute docstrings into a subclass)
    fields = rr.Config.__pydantic_fields__  # type: ignore[attr-defined]
    inherited = DeviceFields.__pydantic_fields__  # type: ignore[attr-defined]
    assert all(f.description or inherited[k].description for k, f in fields.items())


@pytest.mark.parametrize("arch", ["trm", "hrm"])
def test_iteration_reports_the_family_metrics(data_root: Path, arch: str) -> None:
    # every declared metric, finite, accuracies in [0, 1], final = clean, sigma = band * ramp
    exp = build(0, data_root, arch=arch, sigma_mode="fixed", sigma=0.2, ramp_steps=8)
    metrics = exp.train_iteration()
    # besides the declared ones: one health metric per layer and loss term (tunelab.health)
    names = {k for k in metrics if not is_per_name_health_metric(k)}
    assert names == set(rr.FAMILY.metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics[rr.M_VAL_CLEAN_ACC] <= 1.0
    assert metrics[rr.M_VAL_FINAL_ACC] == metrics[rr.M_VAL_CLEAN_ACC]
    assert metrics[rr.M_TRAIN_SIGMA] == pytest.approx(0.2 * TINY["steps_per_iter"] / 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_a_gpu_is_refused_before_any_maze_is_made(tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailable, match="device: cuda"):
        build(0, tmp_path, device="cuda")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("rollout", ["parallel_fixed", "serial_act"])
def test_reduced_precision_trains_an_iteration_on_the_cpu(
    data_root: Path, precision: str, rollout: str
) -> None:
    # autocast on the CPU; fp16 steps through a gradient scaler (its overflow skips counted)
    exp = build(0, data_root, device="cpu", precision=precision, rollout=rollout, act=True)
    metrics = exp.train_iteration()
    assert isinstance(exp.health.scaler, torch.amp.GradScaler) == (precision == "fp16")
    assert (M_HEALTH_AMP_SKIPPED in metrics) == (precision == "fp16")
    assert math.isfinite(metrics[rr.M_TRAIN_LOSS_CE])
    assert 0.0 <= metrics[rr.M_VAL_CLEAN_ACC] <= 1.0
    assert {p.dtype for p in exp.model.parameters()} == {torch.float32}  # fp32 master weights


def test_bit_exact_resume(data_root: Path, tmp_path: Path) -> None:
    # A: 2n iterations straight; B: n, saved; C: other seed, restored, n more == A
    n, over = 2, {"rollout": "serial_act", "act": True, "p_clean": 0.2}
    a = build(0, data_root, **over)
    for _ in range(2 * n):
        metrics_a = a.train_iteration()
    b = build(0, data_root, **over)
    for _ in range(n):
        b.train_iteration()
    assert {"data_gen", "noise_gen"} <= set(b.state_dict())
    tunelab.save_state(tmp_path, b.state_dict(), iteration=n)
    c = build(123, data_root, **over)
    payload = tunelab.load_state(tmp_path)  # torch.load(map_location="cpu", weights_only=True)
    c.load_state_dict(payload["family"])
    for _ in range(n):
        metrics_c = c.train_iteration()
    for (name, pa), pc in zip(
        a.model.state_dict().items(), c.model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pc), name
    assert metrics_a == metrics_c


def test_export_writes_resumable_best_final_latest(data_root: Path, tmp_path: Path) -> None:
    # best.pt restores the best iteration; manifest records device, precision and the scores
    exp = build(0, data_root, precision="bf16")
    for _ in range(3):
        exp.train_iteration()
    manifest = exp.export(tmp_path)
    assert (manifest["device"], manifest["precision"]) == ("cpu", "bf16")
    assert manifest[rr.M_VAL_BEST_ACC] == max(m[rr.M_VAL_CLEAN_ACC] for m in exp.history)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "best.pt",
        "final.pt",
        "latest.pt",
        "metrics.json",
    }
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert len(saved["history"]) == 3 and saved["manifest"]["precision"] == "bf16"
    best = tunelab.load_state(tmp_path / "best.pt", restore_rng=False)
    fresh = build(5, data_root, precision="bf16")
    fresh.load_state_dict(best["family"])
    assert fresh.iteration == exp.best_iteration and fresh.best_acc == exp.best_acc
    latest = tunelab.load_state(tmp_path / "latest.pt", restore_rng=False)
    assert latest["family"]["step"] == exp.step


# ---------------------------------------------------------------------------------------------
# Honest evaluation: selection on val, test once at the end; paired data order
# ---------------------------------------------------------------------------------------------
def _record_eval_sets(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Patch evaluate_exact_match to record the token tensor of every call."""
    seen: list[torch.Tensor] = []
    original = rr.evaluate_exact_match

    def recording(model: rr.RecursiveReasoner, tokens: torch.Tensor, *a: Any, **k: Any) -> float:
        seen.append(tokens)
        return original(model, tokens, *a, **k)

    monkeypatch.setattr(rr, "evaluate_exact_match", recording)
    return seen


def test_iterations_score_only_the_validation_mazes(
    data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # val/* (and so TPE, ASHA, best tracking) never look at the test mazes
    exp = build(0, data_root)
    seen = _record_eval_sets(monkeypatch)
    for _ in range(2):
        exp.train_iteration()
    assert len(seen) == 2 * 3 and all(t is exp.data.val_tokens for t in seen)


def test_export_scores_the_test_mazes(data_root: Path, tmp_path: Path) -> None:
    # the manifest's test block: the final model's three scores and the best-val checkpoint's
    exp = build(0, data_root)
    for _ in range(3):
        exp.train_iteration()
    test = exp.export(tmp_path)["test"]
    assert set(test) == {
        rr.M_TEST_CLEAN_ACC,
        rr.M_TEST_PERTURBED,
        rr.M_TEST_PERTURBED_10X,
        rr.M_TEST_BEST_ACC,
    }
    assert all(0.0 <= v <= 1.0 for v in test.values())

    def clean_test_acc(model: rr.RecursiveReasoner) -> float:
        cfg = exp.config
        return rr.evaluate_exact_match(
            model,
            exp.data.test_tokens,
            exp.data.test_labels,
            n_segments=cfg.n_sup,
            sigma=0.0,
            perturb=cfg.perturb,
            chunk=cfg.eval_batch_size,
            noise_seed=rr._EVAL_NOISE_SEED + cfg.data_seed,
        )

    best = build(5, data_root)
    best.load_state_dict(tunelab.load_state(tmp_path / "best.pt", restore_rng=False)["family"])
    assert test[rr.M_TEST_BEST_ACC] == clean_test_acc(best.model)
    assert test[rr.M_TEST_CLEAN_ACC] == clean_test_acc(exp.model)


def test_export_leaves_training_unchanged(data_root: Path, tmp_path: Path) -> None:
    # scoring the test mazes draws from no RNG and changes no state: training continues the same
    a, b = build(0, data_root), build(0, data_root)
    for _ in range(2):
        a.train_iteration()
        b.train_iteration()
    b.export(tmp_path)
    assert a.train_iteration() == b.train_iteration()


def test_no_test_metric_is_selectable(tmp_path: Path) -> None:
    # test/* are manifest fields, not family metrics: a spec that selects on one is rejected
    assert not any(name.startswith("test/") for name in rr.FAMILY.metrics)
    spec = tmp_path / "leak.yaml"
    spec.write_text(
        "kind: sweep\nname: leak\nfamily: recursive_reasoner\nconfig: {}\n"
        "search: {K: {choice: [2, 4]}}\nnum_samples: 2\nbudget: 2\n"
        f"metric: {{name: {rr.M_TEST_CLEAN_ACC}, mode: max}}\n"
    )
    with pytest.raises(tunelab.SpecError, match="test/clean_acc"):
        tunelab.load_spec(spec)


@pytest.mark.parametrize(
    "lever",
    [
        {"sigma_mode": "loguniform", "sigma_min": 0.01, "sigma_max": 0.3, "ramp_steps": 3, "K": 4},
        {"sigma_mode": "loguniform", "loss_mode": "single_perturbed_ce"},
        {"sigma_mode": "fixed", "sigma": 0.05, "p_clean": 0.5, "K": 2},
    ],
    ids=["multi4_ramp", "single_perturbed", "fixed_p_clean"],
)
def test_noise_levers_see_the_same_batches(data_root: Path, lever: dict[str, Any]) -> None:
    # the unperturbed control (draws no noise) and a noisy arm: same batch indices, same order,
    # across epoch reshuffles (48 mazes / 8 per batch = 6 batches per epoch; 10 batches here)
    control = {"sigma_mode": "none", "sigma": 0.3, "K": 1}
    batches: dict[str, list[torch.Tensor]] = {}
    for arm, over in (("control", control), ("lever", {**control, **lever})):
        exp = build(7, data_root, **over)
        original = exp._next_indices
        drawn: list[torch.Tensor] = []

        def recording(original: Any = original, drawn: list[torch.Tensor] = drawn) -> torch.Tensor:
            idx = original()
            drawn.append(idx.clone())
            return idx

        exp._next_indices = recording  # type: ignore[method-assign]
        for _ in range(5):
            exp.train_iteration()
        batches[arm] = drawn
    assert len(batches["control"]) == 5 * TINY["steps_per_iter"]
    for a, b in zip(batches["control"], batches["lever"], strict=True):
        assert torch.equal(a, b)
