"""The health monitor itself (imports torch); public names are in :mod:`tunelab.health`."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tunelab import distributed
from tunelab.health import Diagnosis, HealthPolicy, StepResult, TrialDiverged
from tunelab.names import (
    M_HEALTH_ACT_RMS,
    M_HEALTH_ACT_RMS_MAX,
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

__all__ = ["HealthMonitor", "default_layers"]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def default_layers(model: nn.Module) -> list[str]:
    """The module paths per-layer norms are grouped by: the model's top-level modules.

    A container child (``ModuleList``, ``Sequential``, ``ModuleDict``) is opened:
    ``stages.0``, ``stages.1``; a ``ModuleDict`` root's entries are models of
    their own (``gen.encoder``, ``disc.body``). Parameters held by no listed
    module fall in ``(root)`` (or the entry's name).
    """
    out: list[str] = []

    def walk(prefix: str, module: nn.Module, open_all: bool) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, _CONTAINERS) or open_all:
                before = len(out)
                walk(path + ".", child, open_all=False)
                if len(out) == before or _own_params(child):
                    out.append(path)
            else:
                out.append(path)

    walk("", model, open_all=isinstance(model, nn.ModuleDict))
    return out


def _own_params(module: nn.Module) -> bool:
    return any(True for _ in module.named_parameters(recurse=False))


def _layer_of(name: str, layers: Sequence[str]) -> str:
    best = ""
    for layer in layers:
        if (name == layer or name.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    return best or "(root)"


def _module_path(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else "(root)"


def _tensor_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Per-tensor 2-norms, as ``clip_grad_norm_`` computes them (foreach where it can)."""
    if not tensors:
        return []
    device, dtype = tensors[0].device, tensors[0].dtype
    if all(t.device == device and t.dtype == dtype for t in tensors) and device.type in (
        "cpu",
        "cuda",
    ):
        return list(torch._foreach_norm(list(tensors), 2.0))
    return [torch.linalg.vector_norm(t, 2.0) for t in tensors]


class _Opt:
    """One optimizer's parameters, their names and layers, and its detector state."""

    def __init__(
        self,
        name: str,
        optimizer: torch.optim.Optimizer,
        names: dict[int, str],
        layers: Sequence[str],
    ) -> None:
        self.name, self.optimizer = name, optimizer
        self.params: list[nn.Parameter] = [
            p for g in optimizer.param_groups for p in g["params"] if p.requires_grad
        ]
        self.param_names = [names.get(id(p), f"{name}.param{i}") for i, p in enumerate(self.params)]
        # module order: the model's named_parameters order (the optimizer's may differ)
        order = {n: i for i, n in enumerate(names.values())}
        self.module_order = sorted(
            range(len(self.params)), key=lambda i: order.get(self.param_names[i], 1 << 30)
        )
        self.layer_names = sorted(
            {_layer_of(n, layers) for n in self.param_names},
            key=lambda lay: min(
                order.get(n, 1 << 30) for n in self.param_names if _layer_of(n, layers) == lay
            ),
        )
        index = {lay: i for i, lay in enumerate(self.layer_names)}
        self.param_layer = torch.tensor([index[_layer_of(n, layers)] for n in self.param_names])
        self.layer_index: Tensor | None = None  # param_layer on the gradients' device
        self.buffer: list[Tensor] | None = None  # parameters before a check step
        self.layer_pending: list[Tensor] = []  # this iteration's per-layer norms, on device
        self.window: collections.deque[float] = collections.deque()
        self.layer_window: collections.deque[list[float]] = collections.deque()
        self.iter_max: list[float] = []  # largest finite norm per past iteration
        self.in_explosion = False
        self.reset_iteration()

    def reset_iteration(self) -> None:
        self.norms: list[float] = []
        self.steps = self.clipped = self.skipped = self.amp_skipped = self.explosions = 0
        self.layer_sq_sum: Tensor | None = None  # sum over steps of per-layer norms
        self.layer_max: Tensor | None = None
        self.layer_steps = 0
        self.layer_pending = []
        self.ratios: list[Tensor] = []


class HealthMonitor:
    """Backward, measure, clip, step: the numerical health of a model's training.

    Args:
        model: The module whose parameters the optimizers train (a
            ``ModuleDict`` of several models is fine); parameter and layer
            names come from it.
        optimizers: One optimizer, or a mapping name -> optimizer (the first is
            the primary: its metrics have no name infix).
        clip: Max global 2-norm per optimizer step (None or inf: no clipping).
        policy: What to do about unhealthy steps (tunelab sets the spec's).
        layers: Module paths per-layer norms are grouped by (default:
            :func:`default_layers`).
        watch: Module paths whose output RMS is reported per iteration
            (``health/act_rms/<path>``), measured in training mode only.
        scaler: A ``torch.amp.GradScaler`` for fp16 AMP (None: fp32 or bf16).

    Raises:
        ValueError: a watched module path does not exist.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
        *,
        clip: float | None = None,
        policy: HealthPolicy | None = None,
        layers: Sequence[str] | None = None,
        watch: Sequence[str] = (),
        scaler: Any = None,
    ) -> None:
        self.model = model
        self.clip = math.inf if clip is None else float(clip)
        self.policy = policy or HealthPolicy()
        self.scaler = scaler
        names = {id(p): n for n, p in model.named_parameters()}
        self.layers = list(layers) if layers is not None else default_layers(model)
        opts = {"main": optimizers} if isinstance(optimizers, torch.optim.Optimizer) else optimizers
        self._opts = {k: _Opt(k, o, names, self.layers) for k, o in opts.items()}
        self.primary = next(iter(self._opts))
        self.all_params = [p for p in model.parameters() if p.requires_grad]
        self.iteration = 1  # the iteration being trained (1-based)
        self.step_count = 0  # optimizer steps taken or skipped, all optimizers
        self.consecutive_skips = 0
        self.diagnosis: Diagnosis | None = None  # set when the policy ended the trial
        self.events: list[Diagnosis] = []  # every event (explosions, skips' culprits), capped
        self.history: list[dict[str, Any]] = []  # per-iteration layer norms (artifacts)
        self._pending: dict[str, Tensor] = {}
        self._pending_total: Tensor | None = None
        self._weights: dict[str, float] = {}
        self._share_sum: dict[str, float] = {}
        self._share_steps = 0
        self._act: dict[str, list[Tensor]] = {}
        self._step_acts: list[tuple[str, Tensor]] = []  # (watched module, output RMS), this step
        self._hooks = [self._watch(path) for path in watch]
        self._param_check: tuple[_Opt, Tensor] | None = None
        self._grads_stale = False
        # the last applied step's term values and weights (the growth rule names a term)
        self._last_values: dict[str, float] = {}
        self._last_weights: dict[str, float] = {}

    # -- activation watches ------------------------------------------------------------
    def _watch(self, path: str) -> Any:
        try:
            module = self.model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(
                f"health watch: no module {path!r} in {type(self.model).__name__}"
            ) from err
        self._act[path] = []

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if not (mod.training and torch.is_grad_enabled()):
                return
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, Tensor):
                rms = t.detach().float().square().mean().sqrt()
                self._act[path].append(rms)
                self._step_acts.append((path, rms))  # read only if this step goes non-finite

        return module.register_forward_hook(hook)

    # -- the step ------------------------------------------------------------------------
    def backward(
        self, losses: Mapping[str, Tensor], weights: Mapping[str, float] | None = None
    ) -> Tensor:
        """Backward of ``sum_k w_k * losses[k]`` (weights default 1); gradients accumulate.

        Args:
            losses: Named scalar loss terms (unweighted), in culprit order.
            weights: Their weights; a missing term weighs 1.

        Returns:
            The weighted total (a 0-dim tensor, detached).
        """
        if self._grads_stale:  # the previous step's gradients: released right before backward
            self._zero_grad()
        w = {k: float(weights.get(k, 1.0)) if weights is not None else 1.0 for k in losses}
        total = torch.stack([w[k] * v for k, v in losses.items()]).sum()
        (self.scaler.scale(total) if self.scaler is not None else total).backward()
        d_total = total.detach()
        self._pending_total = (
            d_total if self._pending_total is None else self._pending_total + d_total
        )
        for k, v in losses.items():
            d = v.detach()
            self._pending[k] = self._pending[k] + d if k in self._pending else d
            self._weights[k] = w[k]
        return total.detach()

    def step(
        self,
        losses: Mapping[str, Tensor],
        weights: Mapping[str, float] | None = None,
        *,
        optimizer: str | None = None,
    ) -> StepResult:
        """:meth:`backward` then :meth:`apply`: one optimizer step of the weighted terms.

        Raises:
            TrialDiverged: the policy ends the trial (see :class:`HealthPolicy`).
        """
        self.backward(losses, weights)
        return self.apply(optimizer)

    def apply(self, optimizer: str | None = None) -> StepResult:
        """Check, clip and step (or skip) the accumulated gradients.

        Every gradient is released (``None``) just before the next backward pass
        (or at :meth:`end_iteration`), as ``zero_grad(set_to_none=True)`` before
        ``backward`` does: released earlier, the allocator hands the memory back
        and the next backward faults it in again (measured: +20-40 % per step).

        Raises:
            TrialDiverged: the policy ends the trial.
        """
        opt = self._opts[optimizer or self.primary]
        self.step_count += 1
        self._check_params()  # the previous check step's parameters
        terms, self._pending = self._pending, {}
        weights, self._weights = self._weights, {}
        pending_total, self._pending_total = self._pending_total, None
        step_acts, self._step_acts = self._step_acts, []
        self._grads_stale = True
        if self.scaler is not None:
            self.scaler.unscale_(opt.optimizer)
        params = opt.params
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        local: tuple[str | None, str | None, str | None] | None = None
        if distributed.is_distributed():  # average over the workers first (DDP's arithmetic)
            local = self._local_culprit(opt, with_grad, terms, step_acts)
            distributed.average_gradients([params[i] for i in with_grad])
        grads = [params[i].grad for i in with_grad]
        norms = _tensor_norms(grads)  # type: ignore[arg-type]
        dev = grads[0].device if grads else torch.device("cpu")  # type: ignore[union-attr]
        stacked = torch.stack([n.to(dev) for n in norms]) if norms else torch.zeros(0, device=dev)
        total_norm = torch.linalg.vector_norm(stacked, 2.0)  # = clip_grad_norm_'s, bit for bit
        names = list(terms)
        nan = torch.full((), math.nan, device=dev)
        host = torch.stack(
            [
                total_norm.float(),
                (pending_total if pending_total is not None else nan).float().to(dev).reshape(()),
                *(terms[k].float().to(dev).reshape(()) for k in names),
            ]
        ).tolist()  # the step's one host sync
        grad_norm, total = host[0], host[1]
        values = dict(zip(names, host[2:], strict=True))
        bad_term = next((k for k in names if not math.isfinite(values[k])), None)
        if bad_term is None and math.isfinite(grad_norm):
            self.consecutive_skips = 0
            clipped = grad_norm > self.clip
            if math.isfinite(self.clip):
                torch.nn.utils.clip_grads_with_norm_(
                    [params[i] for i in with_grad], self.clip, total_norm
                )
            # sampled from each iteration's first applied step on: every iteration has them
            p = self.policy
            layers = opt.steps % p.layer_norms_every == 0
            layer_norms = self._layer_norms(opt, with_grad, stacked) if layers else None
            ratio = opt.steps % p.update_ratio_every == 0
            if ratio:
                self._before_step(opt)
            if self.scaler is not None:
                self.scaler.step(opt.optimizer)
                self.scaler.update()
            else:
                opt.optimizer.step()
            if ratio:
                self._after_step(opt)
            self._record(
                opt,
                grad_norm,
                clipped,
                layer_norms,
                values,
                weights,
                lambda: self._layer_norms(opt, with_grad, stacked),
            )
            return StepResult(True, total, values, grad_norm, clipped)
        # non-finite: the loss (culprit term) or the gradients (culprit parameter)
        amp_overflow = bad_term is None and self.scaler is not None
        if self.scaler is not None:
            self.scaler.step(opt.optimizer)  # skips on inf/NaN gradients, then lowers the scale
            self.scaler.update()
        if amp_overflow:
            opt.amp_skipped += 1
            return StepResult(False, total, values, grad_norm, False)
        opt.skipped += 1
        self.consecutive_skips += 1
        if bad_term is not None:
            # a non-finite loss makes every gradient non-finite: the layer is the first
            # watched module whose output was non-finite in this step's forward, if any
            param = _first_nonfinite_output(step_acts)
            layer = param
        else:
            param = self._first_nonfinite(opt, with_grad, stacked)
            layer = _layer_of(param, self.layers) if param else None
            param = _module_path(param) if param else None
        self._zero_grad()  # a skipped step's gradients are never used
        rank = None
        if local is not None:  # every worker skips this step: name the worker it came from
            culprits = distributed.all_gather_objects(local)
            rank = next((r for r, c in enumerate(culprits) if c != (None, None, None)), None)
            if rank is not None:
                bad_term, layer, param = culprits[rank]
        diag = Diagnosis(
            kind="nonfinite_loss" if bad_term else "nonfinite_grad",
            iteration=self.iteration,
            step=self.step_count,
            optimizer=opt.name,
            term=bad_term,
            layer=layer,
            parameter=param,
            grad_norm=grad_norm,
            level=_median(opt.window),
            rank=rank,
        )
        self._event(diag)
        p = self.policy
        if not p.skip_nonfinite or (
            p.max_consecutive_skips and self.consecutive_skips >= p.max_consecutive_skips
        ):
            self._diverge(diag)
        return StepResult(False, total, values, grad_norm, False)

    # -- per-step pieces ----------------------------------------------------------------
    def _local_culprit(
        self,
        opt: _Opt,
        with_grad: list[int],
        terms: Mapping[str, Tensor],
        step_acts: Sequence[tuple[str, Tensor]],
    ) -> tuple[str | None, str | None, str | None]:
        """This worker's (term, layer, parameter) if its own loss or gradients are non-finite.

        Read before the gradients are averaged (after that every worker sees the
        same non-finite values). A non-finite term on this worker poisons its
        gradients with NaN so that every worker skips the step. One host sync.
        """
        params = opt.params
        grads = [params[i].grad for i in with_grad]
        norms = _tensor_norms(grads)  # type: ignore[arg-type]
        dev = grads[0].device if grads else torch.device("cpu")  # type: ignore[union-attr]
        stacked = torch.stack([n.to(dev) for n in norms]) if norms else torch.zeros(0, device=dev)
        names = list(terms)
        host = torch.stack(
            [torch.linalg.vector_norm(stacked, 2.0).float()]
            + [terms[k].detach().float().to(dev).reshape(()) for k in names]
        ).tolist()
        bad_term = next(
            (k for k, v in zip(names, host[1:], strict=True) if not math.isfinite(v)), None
        )
        if bad_term is not None:
            for g in grads:
                g.fill_(math.nan)  # type: ignore[union-attr]
            layer = _first_nonfinite_output(step_acts)
            return bad_term, layer, layer
        if math.isfinite(host[0]):
            return None, None, None
        param = self._first_nonfinite(opt, with_grad, stacked)
        return (
            None,
            _layer_of(param, self.layers) if param else None,
            (_module_path(param) if param else None),
        )

    def _zero_grad(self) -> None:
        for p in self.all_params:
            p.grad = None
        self._grads_stale = False

    def _layer_norms(self, opt: _Opt, with_grad: list[int], stacked: Tensor) -> Tensor:
        """(L,) per-layer 2-norms: sqrt of the sum of squared parameter norms in each layer."""
        dev = stacked.device
        sq = torch.zeros(len(opt.layer_names), device=dev)
        if stacked.numel():
            if len(with_grad) == len(opt.params):  # the usual case: the index is cached
                if opt.layer_index is None or opt.layer_index.device != dev:
                    opt.layer_index = opt.param_layer.to(dev)
                idx = opt.layer_index
            else:
                idx = opt.param_layer[with_grad].to(dev)
            sq.index_add_(0, idx, stacked.float().square())
        return sq.sqrt()

    def _first_nonfinite(self, opt: _Opt, with_grad: list[int], stacked: Tensor) -> str | None:
        """The first parameter (module order) whose gradient norm is non-finite."""
        if not stacked.numel():
            return None
        finite = stacked.isfinite().tolist()
        pos = {i: k for k, i in enumerate(with_grad)}
        for i in opt.module_order:
            if i in pos and not finite[pos[i]]:
                return opt.param_names[i]
        return None

    def _before_step(self, opt: _Opt) -> None:
        """Copy the parameters into one kept buffer (no new allocation per check)."""
        with torch.no_grad():
            if opt.buffer is None:
                opt.buffer = [p.detach().clone() for p in opt.params]
            else:
                torch._foreach_copy_(opt.buffer, [p.detach() for p in opt.params])

    def _after_step(self, opt: _Opt) -> None:
        """Update-to-weight ratio ||delta|| / ||theta|| (after the step); finiteness later.

        Nothing is read back here: the ratio is averaged at :meth:`end_iteration`,
        the parameters' finiteness is read at the next step's :meth:`apply`.
        """
        assert opt.buffer is not None
        with torch.no_grad():
            after = [p.detach() for p in opt.params]
            torch._foreach_sub_(opt.buffer, after)  # = -delta
            delta = torch.linalg.vector_norm(torch.stack(_tensor_norms(opt.buffer)))
            wn = torch.stack(_tensor_norms(after))
            self._param_check = (opt, wn)
            opt.ratios.append(delta / torch.linalg.vector_norm(wn).clamp_min(1e-12))

    def _check_params(self) -> None:
        if self._param_check is None:
            return
        opt, wn = self._param_check
        self._param_check = None
        finite = wn.isfinite().tolist()
        if all(finite):
            return
        bad = next(i for i in opt.module_order if not finite[i])
        name = opt.param_names[bad]
        diag = Diagnosis(
            kind="nonfinite_param",
            iteration=self.iteration,
            step=self.step_count - 1,
            optimizer=opt.name,
            layer=_layer_of(name, self.layers),
            parameter=_module_path(name),
            level=_median(opt.window),
        )
        self._event(diag)
        self._diverge(diag)  # the weights are gone: nothing can be skipped

    def _record(
        self,
        opt: _Opt,
        norm: float,
        clipped: bool,
        layer_norms: Tensor | None,
        values: dict[str, float],
        weights: dict[str, float],
        layers_now: Callable[[], Tensor],
    ) -> None:
        opt.steps += 1
        opt.clipped += int(clipped)
        opt.norms.append(norm)
        if layer_norms is not None:
            opt.layer_sq_sum = (
                layer_norms if opt.layer_sq_sum is None else opt.layer_sq_sum + layer_norms
            )
            opt.layer_max = (
                layer_norms if opt.layer_max is None else torch.maximum(opt.layer_max, layer_norms)
            )
            opt.layer_steps += 1
        if opt.name == self.primary and values:
            parts = {k: abs(weights[k] * values[k]) for k in values}
            whole = math.fsum(parts.values())
            if whole > 0:
                for k, v in parts.items():
                    self._share_sum[k] = self._share_sum.get(k, 0.0) + v / whole
                self._share_steps += 1
        p = self.policy
        level = _median(opt.window)
        exploding = (
            len(opt.window) >= p.min_history and level > 0 and norm > p.explosion_factor * level
        )
        if exploding and not opt.in_explosion:
            opt.explosions += 1
            layer_now = (layer_norms if layer_norms is not None else layers_now()).tolist()
            recent = torch.stack(opt.layer_pending).tolist() if opt.layer_pending else []
            ref = _layer_levels([*opt.layer_window, *recent][-p.window :], len(layer_now))
            layer, growth = _grew_most(opt.layer_names, layer_now, ref)
            diag = Diagnosis(
                kind="explosion",
                iteration=self.iteration,
                step=self.step_count,
                optimizer=opt.name,
                term=_largest_share(values, weights),
                layer=layer,
                grad_norm=norm,
                level=level,
                layer_growth=growth,
            )
            self._event(diag)
            if p.stop_on_explosion:
                self._diverge(diag)
        opt.in_explosion = exploding
        opt.window.append(norm)
        if len(opt.window) > p.window:
            opt.window.popleft()
        if not exploding and layer_norms is not None:
            opt.layer_pending.append(layer_norms)  # read back at end_iteration (no sync here)
        self._last_values, self._last_weights = values, weights

    def _event(self, diag: Diagnosis) -> None:
        if len(self.events) < 100:
            self.events.append(diag)

    def _diverge(self, diag: Diagnosis) -> None:
        self.diagnosis = dataclasses.replace(diag, diverged=True)
        raise TrialDiverged(self.diagnosis)

    # -- the iteration -------------------------------------------------------------------
    def end_iteration(self) -> dict[str, float]:
        """The iteration's ``health/*`` metrics; starts the next iteration.

        May set :attr:`diagnosis` (sustained growth with ``stop_on_explosion``):
        tunelab then ends the trial after reporting this iteration.
        """
        self._check_params_quietly()
        if self._grads_stale:
            self._zero_grad()
        out: dict[str, float] = {}
        record: dict[str, Any] = {"iteration": self.iteration, "layers": {}}
        for opt in self._opts.values():
            infix = "" if opt.name == self.primary else f"{opt.name}/"

            def key(metric: str, infix: str = infix) -> str:
                return metric.replace("health/", f"health/{infix}", 1)

            finite = [n for n in opt.norms if math.isfinite(n)]
            out[key(M_HEALTH_GRAD_NORM)] = statistics.fmean(finite) if finite else math.nan
            out[key(M_HEALTH_GRAD_NORM_MAX)] = max(finite) if finite else math.nan
            out[key(M_HEALTH_CLIP_RATE)] = opt.clipped / opt.steps if opt.steps else math.nan
            out[key(M_HEALTH_NAN_SKIPPED)] = float(opt.skipped)
            out[key(M_HEALTH_EXPLOSIONS)] = float(opt.explosions)
            out[key(M_HEALTH_UPDATE_RATIO)] = (
                float(torch.stack(opt.ratios).mean()) if opt.ratios else math.nan
            )
            if opt.layer_pending:  # the per-layer levels the explosion detector compares with
                opt.layer_window.extend(torch.stack(opt.layer_pending).tolist())
                while len(opt.layer_window) > self.policy.window:
                    opt.layer_window.popleft()
            if self.scaler is not None:
                out[key(M_HEALTH_AMP_SKIPPED)] = float(opt.amp_skipped)
            if opt.layer_max is not None and opt.layer_sq_sum is not None:
                maxes, sums = opt.layer_max.tolist(), opt.layer_sq_sum.tolist()
                for lay, mx, sm in zip(opt.layer_names, maxes, sums, strict=True):
                    out[f"{key(M_HEALTH_LAYER_NORM_MAX)}/{lay}"] = mx
                    out[f"{key(M_HEALTH_LAYER_NORM_MEAN)}/{lay}"] = sm / opt.layer_steps
                    record["layers"][f"{infix}{lay}"] = [mx, sm / opt.layer_steps]
            growth = self._growth(opt, max(finite) if finite else math.nan)
            if growth is not None:
                out[key(M_HEALTH_EXPLOSIONS)] += 1.0
                self._event(growth)
                if self.policy.stop_on_explosion and self.diagnosis is None:
                    self.diagnosis = dataclasses.replace(growth, diverged=True)
            opt.reset_iteration()
        if self._share_steps:
            for k, v in self._share_sum.items():
                out[f"{M_HEALTH_LOSS_SHARE}/{k}"] = v / self._share_steps
        self._share_sum, self._share_steps = {}, 0
        for path, values in self._act.items():
            if values:
                rms = torch.stack(values)
                out[f"{M_HEALTH_ACT_RMS}/{path}"] = float(rms.mean())
                out[f"{M_HEALTH_ACT_RMS_MAX}/{path}"] = float(rms.max())
            self._act[path] = []
        record["grad_norm_max"] = out[M_HEALTH_GRAD_NORM_MAX]
        self.history.append(record)
        del self.history[:-_HISTORY]
        self.iteration += 1
        return out

    def _check_params_quietly(self) -> None:
        with contextlib.suppress(TrialDiverged):  # self.diagnosis is set: tunelab ends the
            self._check_params()  # trial after this iteration's report

    def _growth(self, opt: _Opt, peak: float) -> Diagnosis | None:
        """The iteration rule: over the last ``n = growth_iterations`` iterations the largest
        norm grew at least ``growth_factor ** n``-fold, and it grew again in the last one
        (a cumulative rule: one slower iteration in a steady climb does not hide it)."""
        p = self.policy
        opt.iter_max.append(peak)
        del opt.iter_max[: -(p.growth_iterations + 1) or None]
        n = p.growth_iterations
        if n == 0 or len(opt.iter_max) < n + 1:
            return None
        seq = opt.iter_max[-(n + 1) :]
        if not all(math.isfinite(v) and v > 0 for v in seq):
            return None
        if seq[-1] < p.growth_factor**n * seq[0] or seq[-1] <= seq[-2]:
            return None
        prev = self.history[-2]["layers"] if len(self.history) >= 2 else {}
        now = self.history[-1]["layers"]
        names = [k for k in now if k in prev]
        layer, growth = _grew_most(names, [now[k][0] for k in names], [prev[k][0] for k in names])
        return Diagnosis(
            kind="growth",
            iteration=self.iteration,
            step=self.step_count,
            optimizer=opt.name,
            term=_largest_share(self._last_values, self._last_weights),
            layer=layer,
            grad_norm=peak,
            level=seq[0],
            layer_growth=growth,
        )

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What continuing bit-exactly needs (windows, counters); plain lists and numbers."""
        return {
            "iteration": self.iteration,
            "step_count": self.step_count,
            "consecutive_skips": self.consecutive_skips,
            "opts": {
                k: {
                    "window": list(o.window),
                    "layer_window": [list(v) for v in o.layer_window],
                    "iter_max": list(o.iter_max),
                    "in_explosion": o.in_explosion,
                }
                for k, o in self._opts.items()
            },
            "history": self.history,
            "events": [dataclasses.asdict(e) for e in self.events],
            # fp16: the loss scale and its growth tracker (a resume must not restart at 2**16)
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (call at an iteration boundary)."""
        self.iteration = int(state["iteration"])
        self.step_count = int(state["step_count"])
        self.consecutive_skips = int(state["consecutive_skips"])
        for k, s in state["opts"].items():
            o = self._opts[k]
            o.window = collections.deque(float(v) for v in s["window"])
            o.layer_window = collections.deque([float(x) for x in v] for v in s["layer_window"])
            o.iter_max = [float(v) for v in s["iter_max"]]
            o.in_explosion = bool(s["in_explosion"])
        self.history = list(state["history"])
        self.events = [Diagnosis(**e) for e in state["events"]]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def report(self) -> dict[str, Any]:
        """The artifact tunelab writes (``health.json``): diagnosis, events, per-layer history."""
        return {
            "diagnosis": self.diagnosis.to_dict() if self.diagnosis else None,
            "events": [e.to_dict() for e in self.events],
            "layer_norm_history": self.history,
            "policy": self.policy.model_dump(),
        }

    def close(self) -> None:
        """Remove the activation hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


#: Iterations of per-layer norm history kept (the artifact stays small).
_HISTORY = 200


def _first_nonfinite_output(acts: Sequence[tuple[str, Tensor]]) -> str | None:
    """The first watched module (forward order) whose output RMS was non-finite."""
    if not acts:
        return None
    finite = torch.stack([r for _, r in acts]).isfinite().tolist()
    return next((path for (path, _), ok in zip(acts, finite, strict=True) if not ok), None)


def _median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else math.nan


def _layer_levels(window: Iterable[list[float]], n: int) -> list[float]:
    rows = [r for r in window if len(r) == n]
    if not rows:
        return [math.nan] * n
    return [statistics.median(col) for col in zip(*rows, strict=True)]


def _grew_most(
    names: Sequence[str], now: Sequence[float], ref: Sequence[float]
) -> tuple[str | None, float]:
    best, best_ratio = None, -math.inf
    for name, a, b in zip(names, now, ref, strict=True):
        ratio = a / b if b > 0 and math.isfinite(b) else (math.inf if a > 0 else math.nan)
        if not math.isnan(ratio) and ratio > best_ratio:
            best, best_ratio = name, ratio
    return best, best_ratio if best is not None else math.nan


def _largest_share(values: Mapping[str, float], weights: Mapping[str, float]) -> str | None:
    parts = {k: abs(weights.get(k, 1.0) * v) for k, v in values.items() if math.isfinite(v)}
    return max(parts, key=lambda k: parts[k]) if parts else None
