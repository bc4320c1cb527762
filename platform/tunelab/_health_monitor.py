"""The health monitor itself (imports torch); public names are in :mod:`tunelab.health`.

Owns the step (backward, check, clip, step or skip, the culprit of a
non-finite step, across workers too), the iteration's ``health/*`` metrics,
the policy's decisions, the event log and state. Its parts live apart:
parameter naming, norms and per-optimizer tallies in
:mod:`tunelab._health_params`, the explosion detector's rules and diagnoses
in :mod:`tunelab._health_rules`, the activation watches in
:mod:`tunelab._activation_watch`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tunelab import distributed
from tunelab._activation_watch import ActivationWatch, first_nonfinite_output
from tunelab._health_params import (
    OptimizerWatch,
    default_layers,
    layer_of,
    metric_key,
    module_path,
    tensor_norms,
)
from tunelab._health_rules import explosion_diagnosis, growth_diagnosis
from tunelab.health import Diagnosis, HealthPolicy, StepResult, TrialDiverged
from tunelab.names import M_HEALTH_EXPLOSIONS, M_HEALTH_GRAD_NORM_MAX, M_HEALTH_LOSS_SHARE

__all__ = ["HealthMonitor", "default_layers"]


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
        self._opts = {k: OptimizerWatch(k, o, names, self.layers) for k, o in opts.items()}
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
        self._acts = ActivationWatch(model, watch)
        self._param_check: tuple[OptimizerWatch, Tensor] | None = None
        self._grads_stale = False
        # the last applied step's term values and weights (the growth rule names a term)
        self._last_values: dict[str, float] = {}
        self._last_weights: dict[str, float] = {}

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
        step_acts = self._acts.take_step()
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
        norms = tensor_norms(grads)  # type: ignore[arg-type]
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
            layer_norms = opt.layer_norms(with_grad, stacked) if layers else None
            ratio = opt.steps % p.update_ratio_every == 0
            if ratio:
                opt.copy_params()
            if self.scaler is not None:
                self.scaler.step(opt.optimizer)
                self.scaler.update()
            else:
                opt.optimizer.step()
            if ratio:
                self._param_check = (opt, opt.measure_update())
            self._record(
                opt,
                grad_norm,
                clipped,
                layer_norms,
                values,
                weights,
                lambda: opt.layer_norms(with_grad, stacked),
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
            param = first_nonfinite_output(step_acts)
            layer = param
        else:
            param = opt.first_nonfinite(with_grad, stacked)
            layer = layer_of(param, self.layers) if param else None
            param = module_path(param) if param else None
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
            level=opt.detector.level(),
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
        opt: OptimizerWatch,
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
        norms = tensor_norms(grads)  # type: ignore[arg-type]
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
            layer = first_nonfinite_output(step_acts)
            return bad_term, layer, layer
        if math.isfinite(host[0]):
            return None, None, None
        param = opt.first_nonfinite(with_grad, stacked)
        return (
            None,
            layer_of(param, self.layers) if param else None,
            (module_path(param) if param else None),
        )

    def _zero_grad(self) -> None:
        for p in self.all_params:
            p.grad = None
        self._grads_stale = False

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
            layer=layer_of(name, self.layers),
            parameter=module_path(name),
            level=opt.detector.level(),
        )
        self._event(diag)
        self._diverge(diag)  # the weights are gone: nothing can be skipped

    def _record(
        self,
        opt: OptimizerWatch,
        norm: float,
        clipped: bool,
        layer_norms: Tensor | None,
        values: dict[str, float],
        weights: dict[str, float],
        layers_now: Callable[[], Tensor],
    ) -> None:
        opt.tally(norm, clipped, layer_norms)
        if opt.name == self.primary and values:
            parts = {k: abs(weights[k] * values[k]) for k in values}
            whole = math.fsum(parts.values())
            if whole > 0:
                for k, v in parts.items():
                    self._share_sum[k] = self._share_sum.get(k, 0.0) + v / whole
                self._share_steps += 1
        p, det = self.policy, opt.detector
        exploding, level = det.check_step(norm, p)
        if exploding and not det.in_explosion:
            opt.explosions += 1
            layer_now = (layer_norms if layer_norms is not None else layers_now()).tolist()
            diag = explosion_diagnosis(
                iteration=self.iteration,
                step=self.step_count,
                optimizer=opt.name,
                layer_names=opt.layer_names,
                layer_now=layer_now,
                reference=det.layer_reference(len(layer_now), p),
                norm=norm,
                level=level,
                values=values,
                weights=weights,
            )
            self._event(diag)
            if p.stop_on_explosion:
                self._diverge(diag)
        det.observe(norm, exploding, layer_norms, p)
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
            metrics, layers, peak = opt.iteration_metrics(infix, amp=self.scaler is not None)
            opt.detector.end_iteration(self.policy)
            out.update(metrics)
            record["layers"].update(layers)
            growth = self._growth(opt, peak)
            if growth is not None:
                out[metric_key(M_HEALTH_EXPLOSIONS, infix)] += 1.0
                self._event(growth)
                if self.policy.stop_on_explosion and self.diagnosis is None:
                    self.diagnosis = dataclasses.replace(growth, diverged=True)
            opt.reset_iteration()
        if self._share_steps:
            for k, v in self._share_sum.items():
                out[f"{M_HEALTH_LOSS_SHARE}/{k}"] = v / self._share_steps
        self._share_sum, self._share_steps = {}, 0
        out.update(self._acts.end_iteration())
        record["grad_norm_max"] = out[M_HEALTH_GRAD_NORM_MAX]
        self.history.append(record)
        del self.history[:-_HISTORY]
        self.iteration += 1
        return out

    def _check_params_quietly(self) -> None:
        with contextlib.suppress(TrialDiverged):  # self.diagnosis is set: tunelab ends the
            self._check_params()  # trial after this iteration's report

    def _growth(self, opt: OptimizerWatch, peak: float) -> Diagnosis | None:
        """The iteration rule (``ExplosionDetector.check_growth``) and its diagnosis."""
        level = opt.detector.check_growth(peak, self.policy)
        if level is None:
            return None
        return growth_diagnosis(
            iteration=self.iteration,
            step=self.step_count,
            optimizer=opt.name,
            history=self.history,
            peak=peak,
            level=level,
            values=self._last_values,
            weights=self._last_weights,
        )

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What continuing bit-exactly needs (windows, counters); plain lists and numbers."""
        return {
            "iteration": self.iteration,
            "step_count": self.step_count,
            "consecutive_skips": self.consecutive_skips,
            "opts": {k: o.detector.state_dict() for k, o in self._opts.items()},
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
            self._opts[k].detector.load_state_dict(s)
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
        self._acts.close()


#: Iterations of per-layer norm history kept (the artifact stays small).
_HISTORY = 200
