"""The health monitor (tunelab.health): culprits, norms, the explosion detector, the policy.

Real models and optimizers on CPU; every number asserted is recomputed here
from torch's own functions (``clip_grad_norm_``, ``vector_norm``).
"""

from __future__ import annotations

import copy
import math

import pydantic
import pytest
import torch
from torch import nn

from tunelab.health import (
    Diagnosis,
    HealthMonitor,
    HealthPolicy,
    TrialDiverged,
    default_layers,
)
from tunelab.names import (
    M_HEALTH_ACT_RMS,
    M_HEALTH_AMP_SKIPPED,
    M_HEALTH_CLIP_RATE,
    M_HEALTH_EXPLOSIONS,
    M_HEALTH_GRAD_NORM,
    M_HEALTH_GRAD_NORM_MAX,
    M_HEALTH_LAYER_NORM_MAX,
    M_HEALTH_LAYER_NORM_MEAN,
    M_HEALTH_LOSS_SHARE,
    M_HEALTH_NAN_SKIPPED,
    M_HEALTH_UPDATE_RATIO,
)

NEVER_END = HealthPolicy(max_consecutive_skips=0)


class Net(nn.Module):
    """Three named top-level layers: ``encoder``, ``blocks.0``, ``blocks.1``, ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.encoder(x))
        for b in self.blocks:
            h = torch.tanh(b(h))
        return self.head(h)


def _batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(32, 4, generator=gen)
    return x, x.sum(1, keepdim=True)


def _setup(lr: float = 1e-2, **kw: object) -> tuple[Net, torch.optim.Optimizer, HealthMonitor]:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    return net, opt, HealthMonitor(net, opt, **kw)  # type: ignore[arg-type]


def test_layers_are_the_top_level_modules_with_containers_opened() -> None:
    assert default_layers(Net()) == ["encoder", "blocks.0", "blocks.1", "head"]
    pair = nn.ModuleDict({"gen": Net(), "disc": nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 1))})
    assert default_layers(pair) == [
        "gen.encoder",
        "gen.blocks.0",
        "gen.blocks.1",
        "gen.head",
        "disc.0",
        "disc.1",
    ]


def test_a_step_is_bit_exact_with_clip_grad_norm_and_step() -> None:
    # the monitor does the same math as the loop it replaces: same norm, same parameters
    net, _, mon = _setup(clip=0.5)
    ref = copy.deepcopy(net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-2)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = _batch(gen_a)
        step = mon.step({"mse": (net(x) - y).square().mean()})
        x, y = _batch(gen_b)
        loss = (ref(x) - y).square().mean()
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        assert step.applied and step.grad_norm == float(norm) and step.total == float(loss.detach())
        assert step.clipped == (float(norm) > 0.5)
    mon.end_iteration()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
        assert a.grad is None  # released (by the next backward, or at the iteration's end)


def test_per_layer_norms_keep_a_spike_and_the_global_norm_matches() -> None:
    net, _, mon = _setup()
    gen = torch.Generator().manual_seed(2)
    layer_norms: list[dict[str, float]] = []
    globals_: list[float] = []
    for k in range(6):
        x, y = _batch(gen)
        scale = 100.0 if k == 3 else 1.0  # one spiking step
        loss = scale * (net(x) - y).square().mean()
        net.zero_grad(set_to_none=True)  # the monitor releases its last step's lazily
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}  # type: ignore[union-attr]
        net.zero_grad(set_to_none=True)
        per = {}
        for layer in default_layers(net):
            g = [v for n, v in grads.items() if n.startswith(layer + ".")]
            per[layer] = float(torch.linalg.vector_norm(torch.stack([v.norm() for v in g])))
        layer_norms.append(per)
        globals_.append(float(torch.linalg.vector_norm(torch.tensor(list(per.values())))))
        # the same batch through the monitor (the parameters have not moved yet)
        step = mon.step({"mse": scale * (net(x) - y).square().mean()})
        assert step.grad_norm == pytest.approx(globals_[-1], rel=1e-5)
    m = mon.end_iteration()
    for layer in default_layers(net):
        values = [row[layer] for row in layer_norms]
        assert m[f"{M_HEALTH_LAYER_NORM_MAX}/{layer}"] == pytest.approx(max(values), rel=1e-4)
        assert m[f"{M_HEALTH_LAYER_NORM_MEAN}/{layer}"] == pytest.approx(
            sum(values) / len(values), rel=1e-4
        )
    assert m[M_HEALTH_GRAD_NORM_MAX] == pytest.approx(max(globals_), rel=1e-5)
    assert (
        m[M_HEALTH_GRAD_NORM_MAX] > 10 * m[M_HEALTH_GRAD_NORM] / 2
    )  # the spike is not averaged away
    assert m[M_HEALTH_CLIP_RATE] == 0.0 and m[M_HEALTH_NAN_SKIPPED] == 0.0


def test_a_nan_loss_term_is_the_culprit_and_the_step_is_skipped() -> None:
    net, _, mon = _setup(policy=NEVER_END)
    gen = torch.Generator().manual_seed(3)
    x, y = _batch(gen)
    before = [p.detach().clone() for p in net.parameters()]
    out = net(x)
    terms = {
        "recon": (out - y).square().mean(),
        "novelty": out.abs().mean() * math.nan,  # the named term goes non-finite
        "balance": out.mean().square(),
    }
    step = mon.step(terms, {"recon": 1.0, "novelty": 0.5, "balance": 2.0})
    assert not step.applied and math.isnan(step.values["novelty"])
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    (event,) = mon.events
    assert event.kind == "nonfinite_loss" and event.term == "novelty"
    assert "term novelty" in event.line() and "iteration 1 step 1" in event.line()
    assert mon.end_iteration()[M_HEALTH_NAN_SKIPPED] == 1.0


def test_a_nan_gradient_in_one_layer_names_that_layer() -> None:
    net, _, mon = _setup(policy=NEVER_END)
    hook = net.blocks[1].weight.register_hook(lambda g: g * math.nan)
    x, y = _batch(torch.Generator().manual_seed(4))
    step = mon.step({"mse": (net(x) - y).square().mean()})
    hook.remove()
    assert not step.applied
    (event,) = mon.events
    # the loss is finite; the first non-finite gradient in module order is blocks.1's weight
    assert event.kind == "nonfinite_grad" and event.term is None
    assert event.layer == "blocks.1" and event.parameter == "blocks.1"
    assert "layer blocks.1" in event.line()


def test_a_non_finite_parameter_after_the_step_ends_the_trial() -> None:
    net, opt, mon = _setup(policy=HealthPolicy(update_ratio_every=1))
    gen = torch.Generator().manual_seed(5)
    x, y = _batch(gen)
    opt.param_groups[0]["lr"] = math.inf  # finite gradients, an infinite update
    mon.step({"mse": (net(x) - y).square().mean()})
    with pytest.raises(TrialDiverged) as stop:
        mon.step({"mse": (net(x) - y).square().mean()})
    d = stop.value.diagnosis
    assert d.kind == "nonfinite_param" and d.diverged and d.step == 1
    assert d.layer is not None and mon.diagnosis == d


@pytest.mark.parametrize(
    ("policy", "ends_at"),
    [
        (HealthPolicy(), 10),
        (HealthPolicy(max_consecutive_skips=3), 3),
        (HealthPolicy(skip_nonfinite=False), 1),
    ],
)
def test_the_policy_ends_the_trial_after_consecutive_skips(
    policy: HealthPolicy, ends_at: int
) -> None:
    net, _, mon = _setup(policy=policy)
    x, y = _batch(torch.Generator().manual_seed(6))
    mon.step({"mse": (net(x) - y).square().mean()})  # a good step resets nothing yet
    for k in range(1, 20):
        try:
            mon.step({"mse": (net(x) - y).square().mean() * math.nan})
        except TrialDiverged as stop:
            assert k == ends_at
            assert stop.diagnosis.term == "mse" and stop.diagnosis.diverged
            return
    pytest.fail("the policy never ended the trial")


def test_a_good_step_resets_the_consecutive_skips() -> None:
    net, _, mon = _setup(policy=HealthPolicy(max_consecutive_skips=2))
    x, y = _batch(torch.Generator().manual_seed(7))
    for _ in range(5):  # bad, good, bad, good ...: never two in a row
        mon.step({"mse": (net(x) - y).square().mean() * math.nan})
        mon.step({"mse": (net(x) - y).square().mean()})
    assert mon.diagnosis is None


def test_the_explosion_detector_fires_before_the_first_nan_on_a_scaled_up_learning_rate() -> None:
    # SGD at a sane rate, then the rate x300: norms grow geometrically, then NaN
    net, opt, mon = _setup(lr=1e-2, policy=NEVER_END)
    gen = torch.Generator().manual_seed(8)
    first_nan = None
    for k in range(1, 400):
        if k == 40:
            opt.param_groups[0]["lr"] = 3.0
        x, y = _batch(gen)
        step = mon.step({"mse": (net(x) - y).square().mean()})
        if not step.applied:
            first_nan = k
            break
    assert first_nan is not None, "the scaled-up rate must diverge for this test to mean anything"
    explosions = [e for e in mon.events if e.kind == "explosion"]
    assert explosions and explosions[0].step < first_nan
    first = explosions[0]
    assert first.grad_norm > 10 * first.level and first.layer in default_layers(net)
    assert first.term == "mse"


def test_stop_on_explosion_ends_the_trial_with_the_layer_that_grew_most() -> None:
    net, _, mon = _setup(policy=HealthPolicy(stop_on_explosion=True))
    gen = torch.Generator().manual_seed(9)
    for _ in range(20):
        x, y = _batch(gen)
        mon.step({"mse": (net(x) - y).square().mean()})
    hook = net.blocks[0].weight.register_hook(lambda g: g * 1e4)  # only blocks.0 explodes
    x, y = _batch(gen)
    with pytest.raises(TrialDiverged) as stop:
        mon.step({"mse": (net(x) - y).square().mean()})
    hook.remove()
    d = stop.value.diagnosis
    assert d.kind == "explosion" and d.layer == "blocks.0" and d.layer_growth > 100


def test_sustained_growth_over_iterations_is_an_explosion() -> None:
    # 2.45 -> 6.66 -> 16.71 (the PowerMuse cascade): x2.7, x2.5 in a row
    net, _, mon = _setup(policy=HealthPolicy(stop_on_explosion=True))
    gen = torch.Generator().manual_seed(10)
    for scale in (1.0, 2.7, 2.7 * 2.5):
        for _ in range(5):
            x, y = _batch(gen)
            mon.step({"mse": scale * (net(x) - y).square().mean()})
        metrics = mon.end_iteration()
    assert mon.diagnosis is not None and mon.diagnosis.kind == "growth"
    assert mon.diagnosis.iteration == 3 and metrics[M_HEALTH_EXPLOSIONS] >= 1


def test_loss_shares_are_weighted_values_over_their_sum() -> None:
    net, _, mon = _setup()
    x, y = _batch(torch.Generator().manual_seed(11))
    out = net(x)
    a, b = (out - y).square().mean(), out.abs().mean()
    step = mon.step({"a": a, "b": b}, {"a": 1.0, "b": 3.0})
    m = mon.end_iteration()
    wa, wb = abs(step.values["a"]), 3.0 * abs(step.values["b"])
    assert m[f"{M_HEALTH_LOSS_SHARE}/a"] == pytest.approx(wa / (wa + wb))
    assert m[f"{M_HEALTH_LOSS_SHARE}/a"] + m[f"{M_HEALTH_LOSS_SHARE}/b"] == pytest.approx(1.0)
    assert step.total == pytest.approx(step.values["a"] + 3.0 * step.values["b"], rel=1e-6)


def test_update_ratio_and_activation_watch() -> None:
    net, _, mon = _setup(watch=["blocks.1"], policy=HealthPolicy(update_ratio_every=1))
    x, y = _batch(torch.Generator().manual_seed(12))
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    with torch.no_grad():  # the watched output: blocks.1's (pre-tanh) at the step
        out = net.blocks[1](torch.tanh(net.blocks[0](torch.tanh(net.encoder(x)))))
        rms = float(out.square().mean().sqrt())
    mon.step({"mse": (net(x) - y).square().mean()})
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    with torch.no_grad():
        net.eval()
        net(x)  # an eval forward is not watched
    m = mon.end_iteration()
    ratio = float((after - before).norm() / after.norm())
    assert m[M_HEALTH_UPDATE_RATIO] == pytest.approx(ratio, rel=1e-4)
    assert m[f"{M_HEALTH_ACT_RMS}/blocks.1"] == pytest.approx(rms, rel=1e-5)
    with pytest.raises(ValueError, match="no module 'nope'"):
        HealthMonitor(net, torch.optim.SGD(net.parameters(), lr=0.1), watch=["nope"])


def test_two_optimizers_have_their_own_norms_and_gradients() -> None:
    torch.manual_seed(0)
    pair = nn.ModuleDict(
        {"gen": Net(), "disc": nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))}
    )
    opt_g = torch.optim.Adam(pair["gen"].parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(pair["disc"].parameters(), lr=1e-3)
    mon = HealthMonitor(pair, {"gen": opt_g, "disc": opt_d}, clip=1.0)
    x, y = _batch(torch.Generator().manual_seed(13))
    fake = pair["gen"](x)
    d_step = mon.step(
        {
            "real": pair["disc"](y).sigmoid().log().neg().mean(),
            "fake": (1 - pair["disc"](fake.detach()).sigmoid()).log().neg().mean(),
        },
        optimizer="disc",
    )
    g_step = mon.step(
        {"adv": pair["disc"](pair["gen"](x)).sigmoid().log().neg().mean()}, optimizer="gen"
    )
    assert d_step.applied and g_step.applied
    m = mon.end_iteration()
    assert all(p.grad is None for p in pair.parameters())  # the generator's pass left no disc grads
    assert m[M_HEALTH_GRAD_NORM] == pytest.approx(g_step.grad_norm)
    assert m["health/disc/grad_norm"] == pytest.approx(d_step.grad_norm)
    assert f"{M_HEALTH_LAYER_NORM_MAX}/gen.head" in m
    assert "health/disc/layer_grad_norm_max/disc.2" in m


def test_fp16_overflow_under_a_grad_scaler_is_not_divergence() -> None:
    net, opt, _ = _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # fp16 overflows the first steps
    mon = HealthMonitor(net, opt, scaler=scaler, policy=HealthPolicy(max_consecutive_skips=2))
    gen = torch.Generator().manual_seed(14)
    applied = []
    for _ in range(20):
        x, y = _batch(gen)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = (net(x) - y).square().mean()
        applied.append(mon.step({"mse": loss.float()}).applied)
    m = mon.end_iteration()
    assert not applied[0] and applied[-1]  # skipped on overflow, then the scale came down
    assert m[M_HEALTH_AMP_SKIPPED] == applied.count(False) and m[M_HEALTH_NAN_SKIPPED] == 0
    assert scaler.get_scale() < 2.0**24 and mon.diagnosis is None


def test_bf16_autocast_steps() -> None:
    net, _, mon = _setup(clip=1.0)
    x, y = _batch(torch.Generator().manual_seed(15))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (net(x) - y).square().mean()
    assert mon.step({"mse": loss}).applied


def test_state_round_trip_continues_identically() -> None:
    net, _, mon = _setup(policy=HealthPolicy(window=5, min_history=2))
    gen = torch.Generator().manual_seed(16)
    for _ in range(7):
        x, y = _batch(gen)
        mon.step({"mse": (net(x) - y).square().mean()})
    mon.end_iteration()
    state = copy.deepcopy(mon.state_dict())
    twin_net = copy.deepcopy(net)
    twin_opt = torch.optim.SGD(twin_net.parameters(), lr=1e-2)
    twin = HealthMonitor(twin_net, twin_opt, policy=HealthPolicy(window=5, min_history=2))
    twin.load_state_dict(state)
    gen_b = copy.deepcopy(gen)
    for _ in range(4):
        x, y = _batch(gen)
        mon.step({"mse": (net(x) - y).square().mean()})
        x, y = _batch(gen_b)
        twin.step({"mse": (twin_net(x) - y).square().mean()})
    assert mon.end_iteration() == twin.end_iteration()
    assert mon.state_dict() == twin.state_dict()


def test_policy_is_checked() -> None:
    with pytest.raises(pydantic.ValidationError, match="min_history"):
        HealthPolicy(window=5, min_history=10)
    with pytest.raises(pydantic.ValidationError):
        HealthPolicy(explosion_factor=1.0)
    with pytest.raises(pydantic.ValidationError):
        HealthPolicy(bogus=1)  # type: ignore[call-arg]


def test_diagnosis_line_reads_as_one_line() -> None:
    d = Diagnosis(
        kind="explosion",
        iteration=3,
        step=41,
        optimizer="main",
        term="recon",
        layer="stages.2",
        grad_norm=45.3,
        level=3.71,
        layer_growth=31.0,
    )
    assert d.line() == (
        "iteration 3 step 41 (main): gradient explosion; term recon; layer stages.2 x31; "
        "norm 45.3 (level 3.71, x12.2)"
    )
    assert "\n" not in d.line() and d.to_dict()["line"] == d.line()
