"""ScaLLA's first stage: training the surrogate kernel on the network's JVPs.

Each step draws a batch (half training, half context inputs when a context loader is given),
``S`` random tangents ``v_s`` (``E[vvᵀ] = I``) and the projected JVPs ``z_s = J(x) v_s`` of the
network (:class:`~fastlla.projections.ProjectionSampler`); the surrogate's features ``Φ`` are
trained so that ``ΦΦᵀ`` matches ``ZZᵀ``, an unbiased estimate of the NTK Gram, through the fused
``fastlla::kernel_matching_loss`` (the train/context cross blocks of the target zeroed). Adam
with a cosine decay to zero over the iteration budget; with ``iterations="auto"`` the budget is
set from the measured step time, and training stops at the first step that ends at or past
``time_budget`` (so it overruns by less than one step; a budget that allows fewer than
``AUTO_MIN_STEPS`` steps is kept, with a warning). A residual head, where one is trained,
learns the part of the NTK's diagonal block the features miss from the same JVPs. Under ``torch.distributed`` every
rank trains on its shard and the gradients are averaged (:mod:`fastlla.distributed`).

:class:`KernelTraining` is a mixin of :class:`fastlla.ScaLLA`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _ops, distributed
from .functional import batch_size, check_finite, concat_batches, to_device
from .projections import ProjectionSampler, stack_rows
from .surrogate import (
    LastLayerSurrogate,
    ResidualHead,
    check_surrogate_output,
    surrogate_features,
)

__all__ = ["KernelTraining"]

#: ``iterations="auto"``: steps timed before the budget is set; the fewest steps below which a
#: budget that allows no more is warned about (the budget is kept); the most steps.
AUTO_PROBE_STEPS, AUTO_MIN_STEPS, AUTO_MAX_STEPS = 10, 200, 20_000
#: Steps at which the ``"auto"`` horizon is (re-)estimated: the first steps run slower (warm-up,
#: allocator, lazy initialisation), so one early estimate alone under-fills the budget.
AUTO_CHECKPOINTS = (AUTO_PROBE_STEPS, 5 * AUTO_PROBE_STEPS)


class KernelTraining:
    """The kernel-matching stage of :meth:`fastlla.ScaLLA.fit` (see the module docstring)."""

    def _train_surrogate(
        self,
        train_loader: Iterable,
        context_loader: Iterable | None,
        iterations: int,
        n_projections: int,
        lr: float,
        distribution: str,
        progress_bar: bool,
    ) -> None:
        cfg = getattr(self, "_train_config", {})
        exact_block = self.surrogate if isinstance(self.surrogate, LastLayerSurrogate) else None
        # With the exact last-layer block only the learned features train, on the residual target.
        surrogate = exact_block.learned if exact_block is not None else self.surrogate
        params = [p for p in surrogate.parameters() if p.requires_grad]
        if not params:
            raise ValueError("fastlla: the surrogate has no trainable parameters to fit")
        sampler = ProjectionSampler(
            self.network, n_projections, distribution, distributed.rank_seed(self.seed)
        )
        optimizer = torch.optim.Adam(params, lr=lr)
        budget = cfg.get("time_budget")  # iterations="auto": resolved after AUTO_PROBE_STEPS
        horizon = [iterations]
        cosine = cfg.get("schedule", "cosine") == "cosine"

        def decay(t: int) -> float:
            if not cosine:
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(t, horizon[0]) / horizon[0]))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
        ema_decay = cfg.get("ema")
        averaged = [p.detach().clone() for p in params] if ema_decay else None
        callback, every = cfg.get("callback"), cfg.get("callback_every", 100)
        rhead, r_opt, r_sched = None, None, None
        if self.settings.residual_variance == "head":  # as resolved at fit (scalla_settings)
            rhead = self.residual_head = self._residual_head(self.n_outputs)
            r_opt = torch.optim.Adam(rhead.parameters(), lr=lr)
            r_sched = torch.optim.lr_scheduler.LambdaLR(r_opt, decay)
        train_loader = distributed.shard(train_loader)  # this rank's share (torch.distributed)
        context_loader = distributed.shard(context_loader)
        train_batches = _cycle(lambda: (x for x, _ in self._batches(train_loader)))
        context_batches = None
        if context_loader is not None:
            context_batches = _cycle(lambda: self._context_inputs(context_loader))
        self.history = []
        start, paused = time.perf_counter(), 0.0
        p0 = next(iter(self.network.params().values()))
        bar = tqdm(total=iterations, disable=not progress_bar, desc="ScaLLA kernel")
        for step in itertools.count():
            if step >= horizon[0]:
                break
            if budget is not None and step in AUTO_CHECKPOINTS:
                horizon[0] = self._auto_iterations(budget, step)
                bar.total = horizon[0]
                bar.refresh()
            bar.update(1)
            # Under torch.distributed a rank's failure in the step's local work (its batch, NaN
            # checks) is held and raised on every rank by the step's collectives.
            fault = distributed.Fault(f"fit (surrogate training, step {step})")
            with fault:
                x = next(train_batches)
                if cfg.get("augment") is not None:
                    x = cfg["augment"](x, step)
                n_train = batch_size(x)
                if context_batches is not None:
                    x = concat_batches(x, next(context_batches))
                tangents = sampler.tangents(step, p0.device, self.dtype)
                _, z = sampler.project(x, step, tangents)
                psi = None
                if exact_block is not None:
                    psi = exact_block.psi(x)
                    z = z - exact_block.head_jvp(tangents, psi, self.network.names)
                if not torch.isfinite(z).all():
                    raise ValueError("fastlla: the network's JVPs contain NaN or Inf")
                target = stack_rows(z)

                def learned_features() -> Tensor:
                    if exact_block is None:
                        return surrogate_features(surrogate, x)
                    return exact_block.learned_features(x, psi)

                phi = check_surrogate_output(learned_features(), x, self.n_outputs)
                rows = phi.permute(0, 2, 1).reshape(-1, phi.shape[1])
            if step == 0:  # the calibration is a collective: every rank must reach it healthy
                fault.agree()
                self._calibrate_scale(rows.detach(), target, surrogate)
            with fault:
                if fault.ok:  # (nothing to compute after a failure above)
                    if step == 0:
                        phi = learned_features()
                        rows = phi.permute(0, 2, 1).reshape(-1, phi.shape[1])
                    loss = _ops.kernel_matching_loss(rows, target, n_train * self.n_outputs)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
            distributed.average_gradients(params, fault.error, fault.what)
            optimizer.step()
            schedule.step()
            if rhead is not None:
                self._residual_head_step(rhead, r_opt, x, z, phi.detach(), step == 0)
                r_sched.step()
            if averaged is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(averaged, [p.detach() for p in params], 1.0 - ema_decay)
            self.history.append(
                {
                    "step": step,
                    "loss": float(loss.detach()),
                    "seconds": time.perf_counter() - start - paused,
                }
            )
            out_of_time = budget is not None and _past(self.history[-1]["seconds"], budget)
            if out_of_time:  # the budget is spent: this was the last step
                horizon[0] = step + 1
            if callback is not None and ((step + 1) % every == 0 or step + 1 == horizon[0]):
                t0 = time.perf_counter()
                fault = distributed.Fault(f"fit (callback after step {step + 1})")
                with fault, _swapped(params, averaged):
                    callback(step + 1, self)
                fault.agree()
                paused += time.perf_counter() - t0
        bar.close()
        if budget is not None and len(self.history) < AUTO_MIN_STEPS:
            warnings.warn(
                f"fastlla: time_budget={budget:g} s allowed only {len(self.history)} "
                f"kernel-matching steps (at {self.history[-1]['seconds'] / len(self.history):.3g}"
                f" s each; at least {AUTO_MIN_STEPS} are advised): the surrogate kernel may be "
                "poorly matched. Check kernel_fidelity, or raise time_budget",
                UserWarning,
                stacklevel=4,  # the caller of fit
            )
        if averaged is not None:
            with torch.no_grad():
                for p, a in zip(params, averaged):
                    p.copy_(a)

    def _auto_iterations(self, budget: float, step: int) -> int:
        """Horizon that spends the rest of ``budget`` at the speed of steps ``2..step`` (rank mean).

        The first two steps (warm-up) are left out of the speed estimate.
        """
        h = self.history
        elapsed = h[step - 1]["seconds"]
        per_step = (elapsed - h[1]["seconds"]) / max(step - 2, 1)
        total, ranks = distributed.sum_over_ranks(
            torch.tensor(per_step, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
        )
        per_step = max(float(total / ranks), 1e-6)
        steps = step + max(budget - elapsed, 0.0) / per_step
        return max(step + 1, min(AUTO_MAX_STEPS, int(steps)))

    def _residual_head_step(
        self, rhead: ResidualHead, opt: Any, x: Any, z: Tensor, phi: Tensor, first: bool
    ) -> None:
        """One step of the residual head on ``(1/S) Σ_s z_s z_sᵀ − g gᵀ`` per input."""
        fault = distributed.Fault("fit (residual head)")  # as in the surrogate's training step
        with fault:
            with torch.no_grad():
                kappa = torch.einsum("sbc,sbd->bcd", z, z) / z.shape[0]
                target = kappa - phi.mT @ phi
            R = rhead(x)
        if first:  # start at a tenth of the kernel's diagonal (the residual's scale is unknown)
            fault.agree()  # the scale is a collective: every rank must reach it healthy
            with torch.no_grad():
                num, den = distributed.sum_over_ranks(  # the same scale on every rank
                    torch.diagonal(kappa, dim1=1, dim2=2).sum(), R.square().sum()
                )
                ratio = 0.1 * num.clamp_min(1e-30) / den.clamp_min(1e-30)
                rhead.output_scale.mul_(ratio.sqrt())
        with fault:
            if fault.ok:
                if first:
                    R = rhead(x)
                loss = (R @ R.mT - target).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
        distributed.average_gradients(list(rhead.parameters()), fault.error, fault.what)
        opt.step()

    def _calibrate_scale(self, rows: Tensor, target: Tensor, surrogate: nn.Module) -> None:
        """Match the surrogate kernel's trace to the target's on the first batch."""
        scale = getattr(surrogate, "output_scale", None)
        if not isinstance(scale, Tensor):
            return
        num, den = distributed.sum_over_ranks(target.square().sum(), rows.square().sum())
        ratio = num / den.clamp_min(1e-30)
        if torch.isfinite(ratio) and ratio > 0:
            scale.mul_(ratio.sqrt().to(scale.dtype))

    def _context_inputs(self, loader: Iterable) -> Iterator[Any]:
        n = 0
        for batch in loader:
            if isinstance(batch, Mapping):  # a dict batch: every entry but the target is input
                batch = {k: v for k, v in batch.items() if k != self.dict_key_y}
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = to_device(self._model_input(x), self.device, self.input_dtype)
            check_finite("the inputs of context_loader", x)
            if batch_size(x) == 0:
                continue
            n += 1
            yield x
        if n == 0:
            raise ValueError("fastlla: context_loader yields no inputs")


@contextlib.contextmanager
def _swapped(params: list[Tensor], averaged: list[Tensor] | None) -> Iterator[None]:
    """Temporarily load the averaged weights into ``params`` (no-op without averaging)."""
    if averaged is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, a in zip(params, averaged):
            p.copy_(a)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _past(seconds: float, budget: float) -> bool:
    """Whether ``seconds`` of training reach ``budget`` — on every rank, if any rank's do (the
    ranks must stop at the same step)."""
    (over,) = distributed.sum_over_ranks(torch.tensor(float(seconds >= budget)))
    return bool(over > 0)


def _cycle(make: Any) -> Iterator[Any]:
    """Endless iteration over a re-creatable iterable (a new epoch each time it runs out)."""
    return itertools.chain.from_iterable(make() for _ in itertools.count())
