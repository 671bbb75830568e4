"""ScaLLA: linearized Laplace through a surrogate neural kernel learned from JVPs.

``fit`` runs in two stages, data flowing one way:

1. **Kernel matching.** Each step draws a batch (half training, half context inputs when a
   context loader is given), ``S`` random tangents, and the projected JVPs ``Z`` of the network;
   the surrogate's features ``Φ`` are trained so ``ΦΦᵀ`` matches ``ZZᵀ`` (the fused
   ``fastlla::kernel_matching_loss``, with the train/context cross blocks of the target zeroed).
   Adam with a cosine decay to zero over the iteration budget.
2. **Posterior.** One pass over the training data accumulates the feature-space GGN
   ``H = Σ_n Φ_n Λ_n Φ_nᵀ`` (``fastlla::ggn_accumulate``) and the log-likelihood at ``θ*``.

Prediction costs one network forward, one surrogate forward and ``O(M²C)`` per input.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _ops, distributed
from .augment import mixup
from .export import Predictor
from .functional import (
    batch_size,
    check_finite,
    concat_batches,
    slice_batch,
    to_device,
)
from .laplace import LaplaceBase, _state_int, _state_tensor, check_module_state
from .posterior import FeaturePosterior, compress_factor
from .predictive import Likelihood, softmax_hessian_factor
from .projections import ProjectionSampler, stack_rows
from .scalla_settings import (
    Settings,
    build_residual_head,
    build_surrogate,
    check_options,
    resolve,
    resolve_residual_variance,
)
from .surrogate import (
    GatedSurrogate,
    LastLayerSurrogate,
    ResidualHead,
    Surrogate,
    check_surrogate_output,
    NetworkHead,
    find_head,
    forward_with_penultimate,
    surrogate_features,
)

__all__ = ["ScaLLA"]


@dataclass
class PredictiveFeatures:
    """What the predictive covariance needs about a batch of test inputs.

    ``phi``: the features ``g(x)`` (B, M, C) — only the ``m`` learned ones when ``kron`` is set;
    ``kron``: ``a = Uᵀψ(x)`` (B, k), the exact last-layer features ``a ⊗ I_C`` in factored form;
    ``residual``: the residual prior block ``κ(x,x) − g(x)ᵀg(x)`` (B, C, C), or ``None``.
    """

    phi: Tensor
    kron: Tensor | None = None
    residual: Tensor | None = None


#: ``iterations="auto"``: steps timed before the budget is set, and its bounds.
AUTO_PROBE_STEPS, AUTO_MIN_STEPS, AUTO_MAX_STEPS = 10, 200, 20_000
#: Steps at which the ``"auto"`` horizon is (re-)estimated: the first steps run slower (warm-up,
#: allocator, lazy initialisation), so one early estimate alone under-fills the budget.
AUTO_CHECKPOINTS = (AUTO_PROBE_STEPS, 5 * AUTO_PROBE_STEPS)


class ScaLLA(LaplaceBase):
    """Scalable linearized Laplace approximation via a surrogate neural kernel.

    The leading parameters are laplace-torch's ``BaseLaplace``'s, in its order (see
    :class:`fastlla.laplace.LaplaceBase`); ``prior_precision`` must be a scalar (the posterior
    is over the surrogate's features, not the parameters). ScaLLA's own options are
    keyword-only. laplace-torch's posterior properties (``n_params``, ``mean``,
    ``posterior_precision``, ...) describe that ``M``-dimensional posterior over the weights
    ``w`` of ``f(x) + g(x)ᵀw``; there are no weight samples (``sample`` raises), and
    ``pred_type="nn"`` draws the linearized network's outputs instead.

    Parameters
    ----------
    model : pre-trained network returning ``(B, C)``; only ``requires_grad`` parameters count.
        float32 or float64, or float16/bfloat16 (run in that dtype; outputs, JVPs, features
        and all linear algebra in float32; not exportable); per-token ``(B, T, C)``
        outputs are refused at ``fit`` (wrap the model to return the last token's or pooled
        outputs). ``fit`` reads how it computes its output by running it on the first training
        batch (:func:`fastlla.surrogate.find_head`): the last ``nn.Linear`` to run is its output
        layer only if it runs once on ``(B, h)`` inputs ``φ`` and the output equals ``W φ + b``
        to float tolerance — or, for a per-token head whose outputs the network takes at the
        last token or averages, ``W ψ + b`` with ``ψ`` the network's output with the head
        replaced by the identity. Otherwise (logits transformed after it, a fixed extra logit, a
        head applied twice) the default surrogate falls back, with a ``UserWarning``, to learned
        features of the input of the last ``nn.Linear`` the network runs — no exact last-layer
        block, no gate, and no residual head unless asked for; a network that runs no
        ``nn.Linear``, or a per-token head pooled otherwise, needs ``surrogate=``.
    likelihood : ``"classification"`` or ``"regression"``.
    sigma_noise, prior_precision, prior_mean, temperature, enable_backprop, dict_key_x,
        dict_key_y, backend, backend_kwargs, asdl_fisher_kwargs : as in
        :class:`fastlla.laplace.LaplaceBase`.
    n_features : ``M``, the surrogate's learned feature dimension (see :mod:`fastlla.surrogate`
        on choosing it). Ignored when ``surrogate`` is given (its output fixes ``M``). Default
        ``None``: 128, lowered where the size rule below needs it.

    Size rule of the default surrogate: at most ``max(100·P, 8·10⁶)`` parameters (``P`` the
    network's). Where the choices below would exceed it, ``gate="auto"`` drops the gate, then
    ``head_width="auto"`` the hidden head layer, then a default ``n_features`` is lowered to fit;
    explicit values are kept. The digits CNN's default (4.0M parameters, 350× its 11.5k) and the
    demo MLPs' (1.8M) are under the floor, so unchanged; a decoder with ``C = 1024`` outputs and
    67k parameters gets a linear head and ``M = 120`` (8.0M) instead of 67M parameters.
    surrogate : any ``nn.Module`` returning ``(B, M, C)``; default: the model's trunk plus a new
        head (:func:`fastlla.surrogate.default_surrogate`).
    seed : seeds the surrogate's head, the tangents and the context batches.
    last_layer : the network's last ``nn.Linear`` contributes ``(ψ(x)ᵀψ(x'))·I_C`` to the NTK
        exactly (``ψ = [φ; 1]``, its input and a one): ``True`` puts those ``(h+1)·C`` features
        beside the ``n_features`` learned ones (:class:`~fastlla.surrogate.LastLayerSurrogate`),
        and the learned ones train on the rest of the JVP only — no head noise; an ``int`` ``k``
        keeps ``ψ``'s top-``k`` principal directions (``k·C`` features); ``False`` learns it all.
        ``"auto"`` (default): ``True`` when ``(h+1)·C ≤ 1024``, else the largest ``k`` with
        ``k·C ≤ 1024`` (off when ``C > 512``, for a user's ``surrogate`` or a model without a
        trainable, verified output layer, see ``model``). On the digits CNN at equal cost it
        lowered the held-out kernel error from 0.197 to 0.175; with context points the bias then acts on the learned
        part only, and still gave the better OOD AUROC (``bench/fidelity/RESULTS.md``).
    residual_variance : ``"auto"`` (default), ``"head"``, ``"jvp"`` or ``False``: add the
        residual prior variance ``(κ(x,x) − g(x)ᵀg(x))/δ`` — the NTK's block at ``x`` that no
        feature spans — to the predictive covariance (FITC-style). ``"head"`` trains a small
        :class:`~fastlla.surrogate.ResidualHead` beside the surrogate from the same JVPs (cheap
        at prediction); ``"jvp"`` estimates ``κ(x,x)`` at prediction from 64 JVPs per input
        batch (no training, 64 forward passes per prediction); ``"auto"`` is ``"head"`` for
        classification whenever the head could be trained (the model has a last ``nn.Linear``
        and ``fit`` ran kernel-matching steps), else off — on the 1-D gap regression with the
        marglik δ = 0.23 the head over-estimated the residual inside the data (test NLL 1.06
        against exact LLA's −0.88; −0.88 without it), so regression leaves it off.
        On the digits OOD CNN at the same δ it brought ScaLLA's mean predictive variance from
        0.84–0.94 of exact LLA's to 0.98–1.01 and its test NLL from 2–12% to within 1% of exact
        LLA's (``bench/fidelity/RESULTS.md``). It can be switched after ``fit`` by setting the
        attribute (``"head"`` needs a trained head).
    head_width : hidden units of the default surrogate's head (``0``: a linear head from the
        trunk's ``h`` penultimate features). A linear head makes every feature a linear map of
        those ``h`` units (48 on the digits CNN), which caps how well the kernel can be fitted
        even on noise-free targets; ``"auto"`` (default) adds a hidden layer of 512 units when
        ``h < 512``. On the digits CNN it lowered the held-out kernel error at equal wall
        time from 0.150 to 0.134 (3 min) and reached 0.132 vs 0.140 in 6 min
        (``bench/fidelity/RESULTS.md``).
    gate : for a network ending ``z = Linear(u)``, ``f = W σ(z) + b`` the Jacobian of every
        parameter below the head is ``(W[c] ⊙ σ'(z))ᵀ ∂z/∂θ`` for class ``c``; ``True`` builds
        the learned features with that structure (:class:`~fastlla.surrogate.GatedSurrogate`:
        only the class-independent ``H(x) = (∂z/∂θ)Q`` is learned, from ``u``; the gate
        ``σ'(z)`` and ``W`` are the network's own, exact). It needs the full exact last-layer
        block and ``σ`` one of ReLU, LeakyReLU, Tanh, Sigmoid. ``"auto"`` (default): on
        wherever that holds on the first training batch and the map to ``H``
        (``(n_in + head_width)·h·M`` weights) stays under 8 million, else the plain surrogate. On the digits CNN it lowered the
        held-out kernel error at equal wall time (~6 min) from 0.129 to 0.083 (noise-free targets:
        0.102 → 0.065; ``bench/fidelity/RESULTS.md``). ``head_width`` is then the width of the
        MLP that computes ``H``. The structure is read by running the network: the output
        layer's input must be the very tensor an activation returned, whose input is the very
        tensor an ``nn.Linear`` returned, each run once.
    """

    _curvature_source = "ScaLLA computes the GGN of its surrogate's features"

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: Any = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        *,
        n_features: int | None = None,
        surrogate: nn.Module | None = None,
        seed: int = 0,
        last_layer: bool | int | str = "auto",
        residual_variance: bool | str = "auto",
        head_width: int | str = "auto",
        gate: bool | str = "auto",
    ):
        super().__init__(
            model, likelihood, sigma_noise, prior_precision, prior_mean, temperature,
            enable_backprop, dict_key_x, dict_key_y, backend, backend_kwargs, asdl_fisher_kwargs,
        )  # fmt: skip
        options = check_options(
            n_features, surrogate, seed, last_layer, residual_variance, head_width, gate
        )
        self.last_layer = last_layer
        self.residual_variance = resolve_residual_variance(residual_variance, self.likelihood)
        self.residual_head: ResidualHead | None = None
        self._auto_features = options["auto_features"]
        self.n_features = options["n_features"]
        self.n_learned = options["n_features"]  # learned features; n_features becomes the total
        self.head_width = head_width
        self.gate = gate
        self.surrogate = surrogate.eval() if surrogate is not None else None
        self.seed = options["seed"]
        #: What the default surrogate was built with (``"auto"`` resolved); ``None`` before it
        #: is built and for a user's ``surrogate``.
        self.settings: Settings | None = None
        self.posterior: FeaturePosterior | None = None
        self.history: list[dict[str, float]] = []
        self._head: NetworkHead | None = None  # read on the first training batch by fit

    # ------------------------------------------------------------------ surrogate
    @property
    def head(self) -> NetworkHead:
        """How the network produces its output (:func:`fastlla.surrogate.find_head`), read on
        the first training batch at ``fit``; before a fit, or for a state saved without it, the
        last registered ``nn.Linear`` (unverified)."""
        head = getattr(self, "_head", None)
        return head if head is not None else NetworkHead.registered(self.model)

    def _verified_head(self) -> bool:
        """Whether the network has a verified output layer (:attr:`head`)."""
        try:
            return self.head.output_layer is not None
        except ValueError:  # no nn.Linear at all
            return False

    def _resolve_augment(self, augment: Any, x0: Any) -> Any:
        """The augmentation ``fit(augment=...)`` means for this model and data (or ``None``)."""
        if augment == "mixup":
            return mixup
        if isinstance(augment, str):  # "auto" (fit checked the value)
            tensor = isinstance(x0, Tensor) and x0.is_floating_point()
            return mixup if tensor and self.likelihood is Likelihood.REGRESSION else None
        return augment

    @property
    def last_layer_used(self) -> bool | int:
        """The exact last-layer block of the default surrogate (:attr:`settings`); the
        ``last_layer`` option for a user's surrogate."""
        return self.settings.last_layer if self.settings is not None else self.last_layer

    @property
    def gate_used(self) -> bool:
        """Whether the default surrogate's learned features are gated (:attr:`settings`)."""
        return self.settings is not None and self.settings.gate

    def _ensure_surrogate(self, n_outputs: int, context: bool = False, x0: Any = None) -> nn.Module:
        """Build the default surrogate unless there is one: the options are resolved once, from
        :attr:`head`, into :attr:`settings` (:mod:`fastlla.scalla_settings`); ``x0`` (a batch)
        confirms the gated structure on data. New weights come from a generator seeded with
        ``seed`` (the global RNG is not used)."""
        if self.surrogate is None:
            head = self.head
            settings = resolve(
                self.model, head, n_outputs, last_layer=self.last_layer, gate=self.gate,
                head_width=self.head_width, n_features=self.n_learned,
                auto_features=self._auto_features,
            )  # fmt: skip
            if head.output_layer is None and head.feature_layer:
                warnings.warn(
                    f"fastlla: the network's output is not the output of an nn.Linear: "
                    f"{head.reason}. ScaLLA's default surrogate therefore assumes nothing about "
                    "the output layer: no exact last-layer block, no gate and no residual head by "
                    "default; its features are learned from the input of "
                    f"{head.feature_layer!r}. Check "
                    "kernel_fidelity, or pass surrogate=<nn.Module returning (B, M, C)>",
                    UserWarning,
                    stacklevel=4,
                )
            self.surrogate, self.settings = build_surrogate(
                self.model, settings, head, n_outputs, self.network.n_params, self.seed, x0,
                self.gate,
            )  # fmt: skip
            self.n_learned = self.settings.n_learned
        return self.surrogate

    def _residual_head(self, n_outputs: int) -> ResidualHead:
        """A new residual head (:func:`fastlla.scalla_settings.build_residual_head`)."""
        return build_residual_head(self.model, self.head, n_outputs, self.seed)

    def _surrogate_features(self, x: Any) -> Tensor:
        phi = surrogate_features(self.surrogate, x)
        return check_surrogate_output(phi, x, self.n_outputs)

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        train_loader: Iterable,
        context_loader: Iterable | None = None,
        iterations: int | str = "auto",
        n_projections: int = 8,
        lr: float = 1e-3,
        distribution: str = "rademacher",
        progress_bar: bool = True,
        callback: Any = None,
        callback_every: int = 100,
        schedule: str = "cosine",
        ema: float | None = None,
        augment: Any = "auto",
        time_budget: float = 120.0,
        override: bool = True,
    ) -> ScaLLA:
        """Train the surrogate kernel on JVPs, then form the feature-space posterior.

        Parameters
        ----------
        train_loader : yields ``(x, y)``; its batch size is the kernel-matching batch ``B``.
        context_loader : optional; yields context inputs (or ``(x, ...)`` tuples whose first
            item is the input). Each step pairs a training batch with a context batch and zeroes
            the target's cross-covariances between them.
        iterations : kernel-matching steps (0 keeps the surrogate as it is), or ``"auto"``
            (default): time the first 10 steps and set the budget so training takes about
            ``time_budget`` seconds (at least 200, at most 20,000 steps; the cosine decay
            follows the resolved budget). The held-out kernel error falls slowly but steadily
            with the number of steps (``bench/fidelity/RESULTS.md``), so a wall-clock budget is
            the honest knob; check the result with :meth:`kernel_fidelity`.
        n_projections : ``S``, random tangents per step.
        lr : initial Adam learning rate, decayed to zero by a cosine schedule.
        distribution : ``"rademacher"``, ``"gaussian"`` or ``"orthogonal"`` tangents.
        progress_bar : show a tqdm bar.
        callback : optional ``callback(step, la)``, called every ``callback_every`` steps and
            after the last (e.g. :class:`fastlla.apps.fidelity.FidelityCurve`); its time is excluded
            from the ``seconds`` recorded in ``history``.
        callback_every : steps between callback calls.
        schedule : ``"cosine"`` (decay to zero over ``iterations``) or ``"constant"``.
        ema : optional decay of an exponential moving average of the surrogate's weights
            (e.g. 0.99), used in place of the final weights.
        augment : ``augment(x, step) -> x'`` applied to the kernel-matching inputs only (JVP
            targets need no labels; the posterior still uses ``train_loader``), ``"mixup"``
            (:func:`fastlla.augment.mixup`), ``None``, or ``"auto"`` (default): mixup for
            regression on tensor inputs — it teaches the surrogate the kernel between and around
            the data, where a regression is queried (1-D gap regression: mean predictive std in
            the gap 0.38 → 0.85, exact LLA 1.29; diabetes unchanged) — and nothing for
            classification (mixed images worsened the digits kernel error).
        time_budget : seconds of kernel matching for ``iterations="auto"``.
        override : laplace-torch's: ``False`` adds ``train_loader``'s data to an earlier fit
            without retraining the surrogate — :meth:`update` (a plain fit without one).

        ``train_loader`` (and ``context_loader``) are read several times, so they must be
        re-iterable (a ``DataLoader``, a list of batches), not one-shot iterators. A fit that
        fails part-way (an empty loader, NaN in a later batch, an interrupt, ...) leaves the
        estimator as it was, an earlier fit and its surrogate's weights included. The surrogate's
        new weights and tangents come from private generators seeded by ``seed``: the global
        torch RNG is untouched (a ``DataLoader`` without ``generator=`` draws its own seed from
        it, as it does whenever it is iterated).
        """
        if isinstance(context_loader, bool):  # laplace-torch's fit(train_loader, override)
            raise TypeError(
                "fastlla: ScaLLA.fit's second argument is context_loader; pass override="
            )
        if not override and self._fitted:
            return self.update(train_loader, progress_bar)
        auto = isinstance(iterations, str)
        with self._all_or_nothing(self.surrogate):  # trained in place: restored on failure
            self._fit(
                train_loader, context_loader, iterations, auto, n_projections, lr, distribution,
                progress_bar, callback, callback_every, schedule, ema, augment, time_budget,
            )  # fmt: skip
        return self

    def _fit(
        self, train_loader, context_loader, iterations, auto, n_projections, lr, distribution,
        progress_bar, callback, callback_every, schedule, ema, augment, time_budget,
    ) -> None:  # fmt: skip
        # Under torch.distributed a rank's failure here (bad arguments, a NaN in its first batch)
        # is held and raised on every rank by the collective check_fit_start.
        fault = distributed.Fault("fit")
        with fault:
            for name, loader in (("train_loader", train_loader), ("context_loader", context_loader)):
                if isinstance(loader, Iterator):
                    raise TypeError(
                        f"fastlla: ScaLLA.fit reads {name} several times; pass a re-iterable "
                        "loader (a DataLoader or a list of batches), not a one-shot iterator or "
                        "generator"
                    )
            if auto and iterations != "auto":
                raise ValueError(
                    f"fastlla: iterations must be an int or 'auto', got {iterations!r}"
                )
            if auto and not (time_budget > 0 and math.isfinite(time_budget)):
                raise ValueError(f"fastlla: time_budget must be positive, got {time_budget}")
            if not auto and int(iterations) < 0:
                raise ValueError(f"fastlla: iterations must be non-negative, got {iterations}")
            if not (augment is None or callable(augment) or augment in ("auto", "mixup")):
                raise ValueError(
                    f"fastlla: augment must be 'auto', 'mixup', None or a callable, got {augment!r}"
                )
            if schedule not in ("cosine", "constant"):
                raise ValueError(
                    f"fastlla: schedule must be 'cosine' or 'constant', got {schedule!r}"
                )
            self._reset()
            x0, _ = next(iter(self._batches(train_loader)))
            f0 = self.network.output(x0)
            self._check_outputs(f0)
            self._check_network(x0, f0)
            self.n_outputs = f0.shape[-1]
            self._head = find_head(self.model, x0)
            surrogate = self._ensure_surrogate(self.n_outputs, context_loader is not None, x0)
            surrogate.to(device=self.device)
            learned = getattr(surrogate, "learned", surrogate)
            if isinstance(learned, GatedSurrogate):  # its W is the network's: current at each fit
                with torch.no_grad():
                    learned.head_weight.copy_(self.model.get_submodule(learned.head_name).weight)
            with torch.no_grad():
                self.n_features = self._surrogate_features(x0).shape[1]
            if isinstance(surrogate, LastLayerSurrogate):
                surrogate.fit_basis(x for x, _ in self._batches(train_loader))
            self._train_config = {
                "n_projections": int(n_projections), "schedule": schedule, "ema": ema,
                "callback": callback, "callback_every": max(int(callback_every), 1),
                "augment": self._resolve_augment(augment, x0),
                "time_budget": float(time_budget) if auto else None,
            }  # fmt: skip
            settings = dict(
                iterations=iterations if auto else int(iterations), n_projections=n_projections,
                lr=lr, distribution=distribution,
            )  # fmt: skip
        distributed.check_fit_start(
            self, train_loader, context_loader, x0 if fault.ok else None,
            settings if fault.ok else {}, fault.error,
        )  # fmt: skip
        if auto or iterations:
            self._train_surrogate(
                train_loader, context_loader, AUTO_MAX_STEPS if auto else int(iterations),
                n_projections, lr, distribution, progress_bar,
            )  # fmt: skip
        self._fit_posterior(train_loader, progress_bar)

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
        classification = self.likelihood is Likelihood.CLASSIFICATION
        mode = self.residual_variance
        if mode == "head" or (mode == "auto" and classification and self._verified_head()):
            try:
                rhead = self.residual_head = self._residual_head(self.n_outputs)
            except ValueError:  # no nn.Linear to read penultimate features from
                if self.residual_variance == "head":
                    raise
        if rhead is not None:
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
            if callback is not None and ((step + 1) % every == 0 or step + 1 == horizon[0]):
                t0 = time.perf_counter()
                fault = distributed.Fault(f"fit (callback after step {step + 1})")
                with fault, _swapped(params, averaged):
                    callback(step + 1, self)
                fault.agree()
                paused += time.perf_counter() - t0
        bar.close()
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
        return max(step + 1, min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, int(steps))))

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

    def _residual_block(
        self, x: Any, phi: Tensor, mode: str, n_projections: int = 64, psi: Tensor | None = None
    ) -> Tensor:
        """``κ(x, x) − g(x)ᵀg(x)`` (B, C, C), made positive semi-definite.

        ``"head"`` reads the learned :class:`~fastlla.surrogate.ResidualHead`; ``"jvp"``
        estimates ``κ(x, x)`` from ``n_projections`` Rademacher JVPs (unbiased; in chunks of 16).
        With the exact last-layer block only the learned part's residual remains.
        """
        exact_block = self.surrogate if isinstance(self.surrogate, LastLayerSurrogate) else None
        if mode == "head":
            if self.residual_head is None:
                raise RuntimeError(
                    "fastlla: residual_variance='head' needs a fit with that option "
                    "(the head is trained beside the surrogate)"
                )
            R = self.residual_head(x, psi)
            return R @ R.mT
        if mode != "jvp":
            raise ValueError(
                f"fastlla: residual_variance must be False, 'jvp' or 'head', got {mode!r}"
            )
        g = phi[:, : exact_block.n_learned] if exact_block is not None else phi
        p0 = next(iter(self.network.params().values()))
        if exact_block is not None and psi is None:
            psi = exact_block.psi(x)
        kappa, done = 0.0, 0
        while done < n_projections:
            n = min(16, n_projections - done)
            sampler = ProjectionSampler(self.network, n, "rademacher", self.seed + 7919 + done)
            tangents = sampler.tangents(0, p0.device, self.dtype)
            _, z = sampler.project(x, 0, tangents)
            if exact_block is not None:
                z = z - exact_block.head_jvp(tangents, psi, self.network.names)
            kappa = kappa + torch.einsum("sbc,sbd->bcd", z, z)
            done += n
        r = kappa / n_projections - g.mT @ g
        evals, evecs = torch.linalg.eigh(0.5 * (r + r.mT))
        return (evecs * evals.clamp_min(0.0).unsqueeze(-2)) @ evecs.mT

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

    def _fit_posterior(self, loader: Iterable, progress_bar: bool = False) -> None:
        M = self.n_features
        H = torch.zeros(M, M, dtype=self.dtype, device=self.device)
        classification = self.likelihood is Likelihood.CLASSIFICATION
        shard = distributed.shard(loader, "posterior")  # this rank's share (torch.distributed)
        fault = distributed.Fault("fit (posterior)")  # raised on every rank by the all-reduce
        with fault, torch.no_grad():
            for x, y in tqdm(self._batches(shard), disable=not progress_bar, desc="ScaLLA GGN"):
                f = self.network.output(x)
                self._accumulate_loglik(f, y)
                phi = self._surrogate_features(x)
                _ops.ggn_accumulate(H, phi.contiguous(), f if classification else None)
        distributed.all_reduce_posterior(self, H, fault.error, fault.what)
        self.posterior = FeaturePosterior(H)
        self._mark_fitted()

    # ------------------------------------------------------------------ streaming updates
    def update(self, loader: Iterable, progress_bar: bool = False) -> ScaLLA:
        """Absorb new data into the fitted posterior without refactorising or revisiting old data.

        Each batch contributes the factor ``W_n = Φ_n R_n`` (``R_n R_nᵀ = Λ_n``); ``H`` grows
        by ``WWᵀ`` and the cached Cholesky factor is updated in ``O(M²k)``
        (``fastlla::cholesky_update``), the log-likelihood statistics and ``n_data`` grow by the
        new data's. The surrogate is not retrained. The result equals a fit over old and new data
        with the same surrogate; :meth:`optimize_prior_precision` may be called again after it.

        Every batch is read and checked (inputs, targets against the likelihood, the number of
        outputs and features) before anything changes: a refused update leaves the estimator as
        it was. Under ``torch.distributed`` the loader is sharded as in :meth:`fit` and every rank
        absorbs all ranks' data.
        """
        self._check_fitted()
        error, W, stat, count = None, None, 0.0, 0
        try:
            shard = distributed.shard(loader, "posterior")
            W, stat, count = self._update_terms(shard, progress_bar)
        except (ValueError, TypeError, RuntimeError) as err:
            error = err
        distributed.agree(error, "update")  # every rank refuses if one does
        W = compress_factor(distributed.gather_columns(W))
        stat_t, count_t = distributed.sum_over_ranks(
            torch.tensor(stat, dtype=torch.float64), torch.tensor(float(count), dtype=torch.float64)
        )
        if int(count_t) == 0:
            raise ValueError("fastlla: the update loader is empty")
        self.posterior.update(W)
        self._loglik_stat += float(stat_t)
        self.n_data += int(round(float(count_t)))
        return self

    def _update_terms(self, loader: Iterable, progress_bar: bool) -> tuple[Tensor, float, int]:
        """``W`` (M, ≤ M columns), the log-likelihood statistic and the count of ``loader``."""
        classification = self.likelihood is Likelihood.CLASSIFICATION
        M, blocks, stat, count = self.n_features, [], 0.0, 0
        W = torch.zeros(M, 0, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for batch in tqdm(loader, disable=not progress_bar, desc="ScaLLA update"):
                checked = list(self._batches([batch], "loader", allow_empty=True))
                if not checked:  # a batch of no inputs
                    continue
                ((x, y),) = checked
                f = self.network.output(x)
                self._check_outputs(f, y)
                stat += self._loglik_term(f, y)
                count += f.shape[0]
                phi = check_surrogate_output(
                    surrogate_features(self.surrogate, x), x, self.n_outputs, M
                )
                if classification:
                    phi = phi @ softmax_hessian_factor(f)
                blocks.append(phi.permute(1, 0, 2).reshape(M, -1))
                if sum(b.shape[1] for b in blocks) > 2 * M:
                    W = compress_factor(torch.cat([W, *blocks], dim=1))
                    blocks = []
        return compress_factor(torch.cat([W, *blocks], dim=1)), stat, count

    # ------------------------------------------------------------------ deployment
    def export(self, output: str = "auto", include_noise: bool = False) -> nn.Module:
        """A self-contained :class:`fastlla.export.Predictor` (model, surrogate, Cholesky factor).

        See :meth:`fastlla.export.Predictor.from_estimator` for ``output`` and ``include_noise``.
        """
        return Predictor.from_estimator(self, output=output, include_noise=include_noise)

    # ------------------------------------------------------------------ hooks
    def _eigvals(self) -> Tensor:
        return self.posterior.eigvals

    @property
    def residual_mode(self) -> str | bool:
        """The residual-variance correction in force: ``"head"``, ``"jvp"`` or ``False``."""
        mode = self.residual_variance
        if mode == "auto":
            return "head" if self.residual_head is not None else False
        return mode or False

    def _outputs_and_features(self, x: Any) -> tuple[Tensor, PredictiveFeatures]:
        """``f(x)`` and :class:`PredictiveFeatures`; the network runs once, also yielding ``ψ(x)``
        for the exact last-layer block and the residual head."""
        mode = self.residual_mode
        exact = self.surrogate if isinstance(self.surrogate, LastLayerSurrogate) else None
        head_name = exact.head_name if exact is not None else None
        pooled = exact is not None and exact.pooled
        if mode == "head" and self.residual_head is not None:
            head_name = self.residual_head.head_name
            pooled = self.residual_head.pooled
        with torch.no_grad():
            if head_name is None:
                f, psi = self.network.output(x), None
            else:
                bias = exact.has_bias if exact is not None else self.residual_head.has_bias
                f, psi = forward_with_penultimate(
                    self.model, head_name, x, bias, head_is_output=exact is not None,
                    pooled=pooled,
                )  # fmt: skip
                f = f.to(self.dtype).unsqueeze(-1) if f.dim() == 1 else f.to(self.dtype)
            # finiteness is checked on the covariance (B·C² values, not B·M·C): NaN/Inf propagate
            if exact is None:
                phi = check_surrogate_output(
                    surrogate_features(self.surrogate, x), x, self.n_outputs, finite=False
                )
                feats = PredictiveFeatures(phi)
            else:
                learned = check_surrogate_output(
                    exact.learned_features(x, psi), x, self.n_outputs, exact.n_learned,
                    finite=False,
                )
                feats = PredictiveFeatures(learned, kron=exact.coefficients(psi))
            if mode:
                feats.residual = self._residual_block(x, feats.phi, mode, psi=psi)
        return f, feats

    def _features(self, x: Any) -> PredictiveFeatures:
        return self._outputs_and_features(x)[1]

    def _covariance_from_features(
        self, features: PredictiveFeatures, prior_precision: float, data_scale: float
    ) -> Tensor:
        """``g(x)ᵀ A⁻¹ g(x)``, plus the residual prior variance ``r(x)/δ`` when it is on."""
        cov = self.posterior.covariance(features.phi, prior_precision, data_scale, features.kron)
        if features.residual is not None:
            cov = cov + features.residual.to(cov.dtype) / prior_precision
        if not torch.isfinite(cov).all():
            if not torch.isfinite(features.phi).all():
                raise ValueError("fastlla: the surrogate's output contains NaN or Inf")
            raise ValueError(
                "fastlla: the predictive covariance contains NaN or Inf (check the network's "
                "penultimate features and the prior precision)"
            )
        return cov

    # ------------------------------------------------------------------ laplace-torch's API
    @property
    def n_params(self) -> int:
        """``M``: the posterior is over the weights ``w`` of ``f(x) + g(x)ᵀw`` (the surrogate's
        features), not the network's parameters."""
        return self.n_features

    def _dense_features(self, features: PredictiveFeatures) -> Tensor:
        """All ``M`` features (B, M, C), the exact last-layer block ``a ⊗ I_C`` written out."""
        if features.kron is None:
            return features.phi
        B, _, C = features.phi.shape
        eye = torch.eye(C, dtype=features.phi.dtype, device=features.phi.device)
        exact = (features.kron.to(eye.dtype)[:, :, None, None] * eye).reshape(B, -1, C)
        return torch.cat([features.phi, exact], dim=1)

    def _outputs_and_variance(self, x: Any, delta: Any, scale: float) -> tuple[Tensor, Tensor]:
        f, feats = self._outputs_and_features(x)
        var = self.posterior.variance(feats.phi, delta, scale, feats.kron)
        if feats.residual is not None:  # the residual block is formed per input (its diagonal kept)
            var = var + torch.diagonal(feats.residual, dim1=-2, dim2=-1).to(var.dtype) / delta
        return f, var

    def _outputs_and_joint_covariance(
        self, x: Any, delta: Any, scale: float
    ) -> tuple[Tensor, Tensor]:
        """The joint covariance of the feature posterior; the residual-variance correction,
        per input, enters its diagonal blocks only (FITC: no residual covariance across inputs)."""
        f, feats = self._outputs_and_features(x)
        phi = self._dense_features(feats)
        B, M, C = phi.shape
        cov = self.posterior.covariance(phi.permute(1, 0, 2).reshape(1, M, B * C), delta, scale)[0]
        if feats.residual is not None:
            cov = cov + torch.block_diag(*feats.residual.to(cov.dtype)) / delta
        return f, cov

    def _jacobians_and_outputs(self, x: Any) -> tuple[Tensor, Tensor]:
        f, feats = self._outputs_and_features(x)
        return self._dense_features(feats).mT, f

    # ------------------------------------------------------------------ diagnostics
    def kernel_fidelity(
        self, x: Any, method: str = "auto", n_projections: int = 64, seed: int = 12345,
        chunk_size: int = 32,
    ) -> float:
        """Relative kernel error ``‖ΦΦᵀ − κ‖_F / ‖κ‖_F`` on the inputs ``x``.

        ``"exact"`` forms the NTK Gram from explicit Jacobians (small models); ``"jvp"``
        estimates it without Jacobians: ``⟨Q, κ⟩ = E‖Φᵀ z‖²`` and ``‖κ‖²_F = E[(z_sᵀ z_t)²]`` for
        independent projections ``s ≠ t``. ``"auto"`` is exact when ``B·C·P ≤ 5·10⁷``.
        """
        if self.surrogate is None or self.n_outputs is None:
            raise RuntimeError("fastlla: call ScaLLA.fit(train_loader) first")
        x = to_device(self._model_input(x), self.device, self.input_dtype)
        check_finite("the inputs", x)
        with torch.no_grad():
            phi = self._surrogate_features(x).double()
        rows = phi.permute(0, 2, 1).reshape(-1, phi.shape[1])
        B = batch_size(x)
        if method == "auto":
            method = "exact" if B * self.n_outputs * self.network.n_params <= 5e7 else "jvp"
        if method == "exact":
            J = torch.cat(
                [
                    self.network.jacobian(slice_batch(x, a, min(a + chunk_size, B)))
                    for a in range(0, B, chunk_size)
                ]
            ).double()
            J = J.reshape(-1, J.shape[-1])
            kappa = J @ J.mT
            return float(torch.linalg.norm(rows @ rows.mT - kappa) / torch.linalg.norm(kappa))
        if method != "jvp":
            raise ValueError(f"fastlla: method must be 'auto', 'exact' or 'jvp', got {method!r}")
        if n_projections < 2:
            raise ValueError("fastlla: the JVP estimate needs n_projections >= 2")
        sampler = ProjectionSampler(self.network, n_projections, "rademacher", seed)
        _, z = sampler.project(x, 0)
        Z = z.double().reshape(n_projections, -1)  # (S, R)
        q_norm2 = (rows.mT @ rows).square().sum()
        q_kappa = (Z @ rows).square().sum(dim=1).mean()
        pair = (Z @ Z.mT).square()
        off = ~torch.eye(n_projections, dtype=torch.bool, device=pair.device)
        k_norm2 = pair[off].mean()
        err2 = (q_norm2 - 2 * q_kappa + k_norm2).clamp_min(0.0)
        return float(torch.sqrt(err2 / k_norm2))

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to predict: hyper-parameters, surrogate weights and ``H``."""
        self._check_fitted()
        state = self._base_state()
        state.update(
            n_features=self.n_features,
            n_learned=self.n_learned,
            last_layer=self.last_layer_used,
            head_width=getattr(
                getattr(self.surrogate, "learned", self.surrogate), "head_width", 0
            ),
            gate=isinstance(getattr(self.surrogate, "learned", None), GatedSurrogate),
            seed=self.seed,
            head=None if self._head is None else dataclasses.asdict(self._head),
            surrogate=self.surrogate.state_dict(),
            residual_head=None if self.residual_head is None else self.residual_head.state_dict(),
            H=self.posterior.H,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a fitted estimator; the model must be the one it was fitted on.

        Every entry is checked before anything changes — keys, types, counts, finiteness, the
        surrogate's and residual head's weights (keys and shapes) and ``H`` against the
        surrogate's number of features — so a refused state (a clear error naming the key)
        leaves the estimator as it was. Without a surrogate, the default one is built as
        ``fit`` builds it (from a generator seeded by the saved ``seed``) and loaded.
        """
        base = self._validated_base_state(
            state, ("n_features", "seed", "surrogate", "H"),
            ("n_learned", "last_layer", "head_width", "gate", "residual_head", "head"),
        )  # fmt: skip
        n_features = _state_int(state, "n_features", minimum=1)
        n_learned = _state_int(state, "n_learned", minimum=0) if "n_learned" in state else n_features
        if n_learned > n_features:
            raise ValueError(
                f"fastlla: state_dict['n_learned'] = {n_learned} exceeds n_features = {n_features}"
            )
        last_layer = state.get("last_layer", self.last_layer)
        if last_layer != "auto" and not isinstance(last_layer, (bool, int)):
            raise TypeError(f"fastlla: state_dict['last_layer'] must be a bool or int, got {last_layer!r}")
        head_width = _state_int(state, "head_width", minimum=0) if "head_width" in state else 0
        gate = state.get("gate", False)
        if not isinstance(gate, bool):
            raise TypeError(f"fastlla: state_dict['gate'] must be a bool, got {gate!r}")
        # the surrogate (built as fit builds it, if there is none) is prepared on a shallow copy
        # of the estimator and committed only once everything checked out
        new = copy.copy(self)
        new.__dict__.update(
            base, n_features=n_features, n_learned=n_learned, last_layer=last_layer,
            head_width=head_width, gate=gate, seed=_state_int(state, "seed"),
            _head=_state_head(state), _auto_features=False,
        )  # fmt: skip
        try:
            surrogate = new._ensure_surrogate(base["n_outputs"])
        except ValueError as err:
            raise ValueError(
                "fastlla: cannot build the surrogate state_dict describes (n_outputs="
                f"{base['n_outputs']}, last_layer={last_layer!r}, gate={gate}, head_width="
                f"{head_width}) for this model: {err}"
            ) from err
        check_module_state(surrogate, state["surrogate"], "state_dict['surrogate']")
        built_outputs = getattr(surrogate, "n_outputs", base["n_outputs"])
        if built_outputs != base["n_outputs"]:
            raise ValueError(
                f"fastlla: state_dict['n_outputs'] = {base['n_outputs']}, but the surrogate has "
                f"{built_outputs} outputs"
            )
        built_features = _surrogate_n_features(surrogate)
        if built_features is not None and built_features != n_features:
            raise ValueError(
                f"fastlla: state_dict['n_features'] = {n_features}, but the surrogate returns "
                f"{built_features} features"
            )
        H = _state_tensor(state, "H", (n_features, n_features)).to(self.device, self.dtype)
        if not torch.allclose(H, H.mT, rtol=1e-4, atol=1e-6 * float(H.abs().max())):
            raise ValueError("fastlla: state_dict['H'] is not symmetric")
        rhead = None
        if state.get("residual_head") is not None:
            rhead = new._residual_head(base["n_outputs"])
            check_module_state(rhead, state["residual_head"], "state_dict['residual_head']")
            rhead.load_state_dict(state["residual_head"])
        posterior = FeaturePosterior(H)
        with self._all_or_nothing(surrogate):  # loaded in place: checked above, cannot fail
            surrogate.load_state_dict(state["surrogate"])
            self.__dict__.update(new.__dict__)
            self.residual_head, self.posterior = rhead, posterior
            self._mark_fitted()


def _state_head(state: dict[str, Any]) -> NetworkHead | None:
    """The :class:`~fastlla.surrogate.NetworkHead` a state saved (``None``: saved without one)."""
    saved = state.get("head")
    if saved is None:
        return None
    fields = {f.name for f in dataclasses.fields(NetworkHead)}
    if not isinstance(saved, Mapping) or set(saved) != fields:
        raise ValueError(
            f"fastlla: state_dict['head'] must be a dict with the keys {sorted(fields)}"
        )
    gate = saved["gate"]
    return NetworkHead(**{**saved, "gate": None if gate is None else tuple(gate)})


def _surrogate_n_features(surrogate: nn.Module) -> int | None:
    """The number ``M`` of features a surrogate returns, where it says (``None`` otherwise)."""
    if isinstance(surrogate, LastLayerSurrogate):
        return surrogate.n_learned + surrogate.n_exact
    n = getattr(surrogate, "n_features", None)
    return n if isinstance(n, int) else None


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


def _cycle(make: Any) -> Iterator[Any]:
    """Endless iteration over a re-creatable iterable (a new epoch each time it runs out)."""
    return itertools.chain.from_iterable(make() for _ in itertools.count())
