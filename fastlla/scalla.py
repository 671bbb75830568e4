"""ScaLLA: linearized Laplace through a surrogate neural kernel learned from JVPs.

``fit`` runs the method's steps, data flowing one way: read the network on the first batch
(outputs, output layer); resolve every ``"auto"`` option once, into the frozen record
:class:`~fastlla.scalla_settings.Settings` (:attr:`ScaLLA.settings`, saved in the state dict and
shown by ``repr``); build the surrogate it describes and fit the exact last-layer block's basis;
then

1. **Kernel matching** (:mod:`fastlla.kernel_training`). Each step draws a batch (half
   training, half context inputs when a context loader is given), ``S`` random tangents, and
   the projected JVPs ``Z`` of the network; the surrogate's features ``Φ`` are trained so
   ``ΦΦᵀ`` matches ``ZZᵀ`` (the fused
   ``fastlla::kernel_matching_loss``, with the train/context cross blocks of the target zeroed).
   Adam with a cosine decay to zero over the iteration budget.
2. **Posterior** (:mod:`fastlla.feature_posterior`). One pass over the training data
   accumulates the feature-space GGN ``H = Σ_n Φ_n Λ_n Φ_nᵀ`` (``fastlla::ggn_accumulate``) and
   the log-likelihood at ``θ*``; ``update`` absorbs new data without revisiting the old.

Prediction (:mod:`fastlla.feature_predictive`) costs one network forward, one surrogate forward
and ``O(M²C)`` per input; saving is in :mod:`fastlla.scalla_state`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .augment import mixup
from .export import Predictor
from .feature_posterior import FeaturePosteriorPass
from .feature_predictive import FeaturePredictive
from .kernel_training import AUTO_MAX_STEPS, KernelTraining
from .laplace import LaplaceBase
from .network_head import NetworkHead, find_head
from .posterior import FeaturePosterior
from .scalla_settings import (
    Settings,
    build_residual_head,
    build_surrogate,
    check_options,
    resolve,
)
from .scalla_state import SavedState
from .surrogate import (
    GatedSurrogate,
    LastLayerSurrogate,
    ResidualHead,
    check_surrogate_output,
    surrogate_features,
)

__all__ = ["ScaLLA"]

#: The augmentations ``fit(augment=...)`` names (:attr:`Settings.augment`).
AUGMENTATIONS = {"mixup": mixup}
#: What ``repr`` shows of :class:`Settings` for a user's surrogate.
SHOWN_FOR_USER = ("residual_variance", "augment")


class ScaLLA(
    KernelTraining, FeaturePosteriorPass, FeaturePredictive, SavedState, LaplaceBase
):
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
        batch (:func:`fastlla.network_head.find_head`): the last ``nn.Linear`` to run is its output
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
    explicit values are kept (:func:`fastlla.scalla_settings.resolve`). What every ``"auto"``
    (these and ``fit``'s ``augment``) became is recorded at ``fit`` in :attr:`settings`; the
    options themselves stay as given. The measurements behind the defaults below are in
    ``docs/design-history.md``.
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
        trainable, verified output layer, see ``model``).
    residual_variance : ``"auto"`` (default), ``"head"``, ``"jvp"`` or ``False``: add the
        residual prior variance ``(κ(x,x) − g(x)ᵀg(x))/δ`` — the NTK's block at ``x`` that no
        feature spans — to the predictive covariance (FITC-style). ``"head"`` trains a small
        :class:`~fastlla.surrogate.ResidualHead` beside the surrogate from the same JVPs (cheap
        at prediction); ``"jvp"`` estimates ``κ(x,x)`` at prediction from 64 JVPs per input
        batch (no training, 64 forward passes per prediction); ``"auto"`` is ``"head"`` for
        classification whenever the head could be trained (the model has a last ``nn.Linear``
        and ``fit`` ran kernel-matching steps), else off (regression: the head over-estimates
        the residual inside the data). ``r/δ`` is exact as ``δ`` grows and over-states the
        residual where the training data constrain it (small ``δ``, see
        ``docs/residual-variance.md``). It can be switched after ``fit`` by setting the
        attribute (``"head"`` needs a trained head).
    head_width : hidden units of the default surrogate's head (``0``: a linear head from the
        trunk's ``h`` penultimate features). A linear head makes every feature a linear map of
        those ``h`` units, which caps how well the kernel can be fitted even on noise-free
        targets; ``"auto"`` (default) adds a hidden layer of 512 units when ``h < 512``.
    gate : for a network ending ``z = Linear(u)``, ``f = W σ(z) + b`` the Jacobian of every
        parameter below the head is ``(W[c] ⊙ σ'(z))ᵀ ∂z/∂θ`` for class ``c``; ``True`` builds
        the learned features with that structure (:class:`~fastlla.surrogate.GatedSurrogate`:
        only the class-independent ``H(x) = (∂z/∂θ)Q`` is learned, from ``u``; the gate
        ``σ'(z)`` and ``W`` are the network's own, exact). It needs the full exact last-layer
        block and ``σ`` one of ReLU, LeakyReLU, Tanh, Sigmoid. ``"auto"`` (default): on
        wherever that holds on the first training batch and the map to ``H``
        (``(n_in + head_width)·h·M`` weights) stays under 8 million, else the plain
        surrogate. ``head_width`` is then the width of the
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
        self.residual_variance = residual_variance
        self.residual_head: ResidualHead | None = None
        self._auto_features = options["auto_features"]
        self._n_features_option = options["n_features"]
        self.n_features = options["n_features"]  # the total M once the surrogate is built
        self.head_width = head_width
        self.gate = gate
        self.surrogate = surrogate.eval() if surrogate is not None else None
        self.seed = options["seed"]
        #: What every ``"auto"`` became (:func:`fastlla.scalla_settings.resolve`), recorded at
        #: ``fit`` and restored by ``load_state_dict``; ``None`` before.
        self.settings: Settings | None = None
        self.posterior: FeaturePosterior | None = None
        self.history: list[dict[str, float]] = []
        self._head: NetworkHead | None = None  # read on the first training batch by fit

    def __repr__(self) -> str:
        settings = self.settings
        if settings is not None:  # what "auto" became
            shown = {k: repr(v) for k, v in settings.as_dict().items()}
            if settings.user_surrogate:
                shown = {"surrogate": "<user's>", **{k: shown[k] for k in SHOWN_FOR_USER}}
            if self.residual_mode != settings.residual_variance:  # switched after the fit
                shown["residual_mode"] = repr(self.residual_mode)
            built = ", ".join(f"{k}={v}" for k, v in shown.items())
        else:
            built = "surrogate=<user's>, " if self.surrogate is not None else (
                f"last_layer={self.last_layer!r}, gate={self.gate!r}, "
                f"head_width={self.head_width!r}, n_features={self.n_learned!r}, "
            )  # fmt: skip
            built += f"residual_variance={self.residual_variance!r}"
        state = "fitted" if self._fitted else "not fitted"
        return f"ScaLLA({self._likelihood_name!r}, {built}, seed={self.seed}, {state})"

    # ------------------------------------------------------------------ surrogate
    @property
    def head(self) -> NetworkHead:
        """How the network produces its output (:func:`fastlla.network_head.find_head`), read on
        the first training batch at ``fit``; before a fit, or for a state saved without it, the
        last registered ``nn.Linear`` (unverified)."""
        head = getattr(self, "_head", None)
        return head if head is not None else NetworkHead.registered(self.model)

    @property
    def last_layer_used(self) -> bool | int:
        """The exact last-layer block of the default surrogate (:attr:`settings`); the
        ``last_layer`` option before a fit and for a user's surrogate."""
        settings = self.settings
        if settings is None or settings.user_surrogate:
            return self.last_layer
        return settings.last_layer

    @property
    def gate_used(self) -> bool:
        """Whether the default surrogate's learned features are gated (:attr:`settings`)."""
        return self.settings is not None and bool(self.settings.gate)

    @property
    def n_learned(self) -> int:
        """The learned feature dimension of the default surrogate (:attr:`settings`); the
        ``n_features`` option (default 128) before a fit and for a user's surrogate."""
        settings = self.settings
        if settings is None or settings.user_surrogate:
            return self._n_features_option
        return settings.n_learned

    def _options(self) -> dict[str, Any]:
        """The keyword options as they are now (a user may have set the attributes), checked
        (:func:`fastlla.scalla_settings.check_options`)."""
        return check_options(
            None if self._auto_features else self._n_features_option, self.surrogate, self.seed,
            self.last_layer, self.residual_variance, self.head_width, self.gate,
        )  # fmt: skip

    def _resolve_settings(self, x0: Any, augment: Any, kernel_steps: bool) -> None:
        """Resolve every ``"auto"`` once into :attr:`settings`
        (:func:`fastlla.scalla_settings.resolve`) from the options, the network's output layer
        (:attr:`head`), the likelihood and the first batch ``x0``; a surrogate already there (a
        refit, a user's) keeps its record. A residual head an earlier fit left is kept only
        where the new settings use it."""
        head = self.head
        self.settings = resolve(
            self.model, head, self.n_outputs, self.likelihood, self._options(),
            surrogate=self.surrogate, built=self.settings, x0=x0, augment=augment,
            trains_head=kernel_steps or self.residual_head is not None,
        )  # fmt: skip
        if self.settings.residual_variance != "head":
            self.residual_head = None
        if self.surrogate is None and head.output_layer is None and head.feature_layer:
            warnings.warn(
                f"fastlla: the network's output is not the output of an nn.Linear: "
                f"{head.reason}. ScaLLA's default surrogate therefore assumes nothing about "
                "the output layer: no exact last-layer block, no gate and no residual head by "
                "default; its features are learned from the input of "
                f"{head.feature_layer!r}. Check "
                "kernel_fidelity, or pass surrogate=<nn.Module returning (B, M, C)>",
                UserWarning,
                stacklevel=4,  # the caller of fit
            )

    def _ensure_surrogate(self, n_outputs: int) -> nn.Module:
        """Build the default surrogate :attr:`settings` describe unless there is one
        (:func:`fastlla.scalla_settings.build_surrogate`: new weights from a generator seeded
        with ``seed``, the global RNG is not used)."""
        if self.surrogate is None:
            self.surrogate = build_surrogate(
                self.model, self.settings, self.head, n_outputs, self.network.n_params, self.seed
            )
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

        A gated surrogate's map to ``H`` is then distilled to a low rank on the training (and
        context) inputs, for a cheaper predictive, where that keeps its kernel within 1%
        (:meth:`fastlla.surrogate.GatedSurrogate.distil`); the posterior is formed on the
        distilled features.

        Parameters
        ----------
        train_loader : yields ``(x, y)``; its batch size is the kernel-matching batch ``B``.
        context_loader : optional; yields context inputs (or ``(x, ...)`` tuples whose first
            item is the input). Each step pairs a training batch with a context batch and zeroes
            the target's cross-covariances between them.
        iterations : kernel-matching steps (0 keeps the surrogate as it is), or ``"auto"``
            (default): time the first 10 steps and set the budget so training takes about
            ``time_budget`` seconds (at most 20,000 steps; the cosine decay follows the resolved
            budget); check the result with :meth:`kernel_fidelity`.
        n_projections : ``S``, random tangents per step.
        lr : initial Adam learning rate, decayed to zero by a cosine schedule.
        distribution : ``"rademacher"``, ``"gaussian"`` or ``"orthogonal"`` tangents.
        progress_bar : show a tqdm bar.
        callback : optional ``callback(step, la)``, called every ``callback_every`` steps and
            after the last (e.g. to record :meth:`kernel_fidelity` as training goes, as
            ``python -m fastlla fidelity`` does); its time is excluded
            from the ``seconds`` recorded in ``history``.
        callback_every : steps between callback calls.
        schedule : ``"cosine"`` (decay to zero over ``iterations``) or ``"constant"``.
        ema : optional decay of an exponential moving average of the surrogate's weights
            (e.g. 0.99), used in place of the final weights.
        augment : ``augment(x, step) -> x'`` applied to the kernel-matching inputs only (JVP
            targets need no labels; the posterior still uses ``train_loader``), ``"mixup"``
            (:func:`fastlla.augment.mixup`), ``None``, or ``"auto"`` (default): mixup for
            regression on tensor inputs (it teaches the surrogate the kernel between and around
            the data, where a regression is queried) and nothing for classification.
        time_budget : seconds of kernel matching for ``iterations="auto"`` (the time of
            ``callback`` excluded): training stops after the first step that ends at or past
            it, so it overruns by less than one step. Where that leaves fewer than 200 steps
            a ``UserWarning`` says so (the surrogate may be poorly matched).
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
            _check_fit_arguments(
                train_loader, context_loader, iterations, auto, augment, schedule, time_budget
            )
            self._reset()
            x0 = self._read_network(train_loader)  # 1. run the network once: outputs, head
            self._resolve_settings(x0, augment, auto or bool(iterations))  # 2. "auto" resolved
            self._prepare_surrogate(train_loader, x0)  # 3. the surrogate it describes
            self._train_config = {
                "n_projections": int(n_projections), "schedule": schedule, "ema": ema,
                "callback": callback, "callback_every": max(int(callback_every), 1),
                "augment": augment if self.settings.augment == "callable"
                else AUGMENTATIONS.get(self.settings.augment),
                "time_budget": float(time_budget) if auto else None,
            }  # fmt: skip
            settings = dict(
                iterations=iterations if auto else int(iterations), n_projections=n_projections,
                lr=lr, distribution=distribution, **self.settings.as_dict(),
            )  # fmt: skip
        distributed.check_fit_start(
            self, train_loader, context_loader, x0 if fault.ok else None,
            settings if fault.ok else {}, fault.error,
        )  # fmt: skip
        if auto or iterations:  # 4. kernel matching, the residual head trained beside it
            gated = getattr(self.surrogate, "learned", None)
            gated = gated if isinstance(gated, GatedSurrogate) else None
            if gated is not None:
                gated.undistil()  # the trained map is what trains
            self._train_surrogate(
                train_loader, context_loader, AUTO_MAX_STEPS if auto else int(iterations),
                n_projections, lr, distribution, progress_bar,
            )  # fmt: skip
            if gated is not None:  # 4b. its map to H distilled for the predictive's speed
                # on this rank's share (torch.distributed); every rank then uses rank 0's
                inputs = (x for x, _ in self._batches(distributed.shard(train_loader)))
                if context_loader is not None:
                    context = distributed.shard(context_loader)
                    inputs = itertools.chain(inputs, self._context_inputs(context))
                gated.distil(inputs)
                distributed.broadcast_module(gated)
                gated.use_rank(int(gated.distilled_rank))
        self._fit_posterior(train_loader, progress_bar)  # 5. the feature-space posterior

    def _read_network(self, train_loader: Iterable) -> Any:
        """Run the network on the first training batch: check its outputs and read its output
        layer (:func:`fastlla.network_head.find_head`); returns the batch's inputs."""
        x0, _ = next(iter(self._batches(train_loader)))
        f0 = self.network.output(x0)
        self._check_outputs(f0)
        self._check_network(x0, f0)
        self.n_outputs = f0.shape[-1]
        self._head = find_head(self.model, x0)
        return x0

    def _prepare_surrogate(self, train_loader: Iterable, x0: Any) -> None:
        """Build the default surrogate unless there is one (:meth:`_ensure_surrogate`), read its
        number of features and fit the exact last-layer block's basis on the training inputs."""
        surrogate = self._ensure_surrogate(self.n_outputs)
        surrogate.to(device=self.device)
        learned = getattr(surrogate, "learned", surrogate)
        if isinstance(learned, GatedSurrogate):  # its W is the network's: current at each fit
            with torch.no_grad():
                learned.head_weight.copy_(self.model.get_submodule(learned.head_name).weight)
        with torch.no_grad():
            self.n_features = self._surrogate_features(x0).shape[1]
        if isinstance(surrogate, LastLayerSurrogate):
            surrogate.fit_basis(x for x, _ in self._batches(train_loader))

    # ------------------------------------------------------------------ deployment
    def export(self, output: str = "auto", include_noise: bool = False) -> nn.Module:
        """A self-contained :class:`fastlla.export.Predictor` (model, surrogate, Cholesky factor).

        See :meth:`fastlla.export.Predictor.from_estimator` for ``output`` and ``include_noise``.
        """
        return Predictor.from_estimator(self, output=output, include_noise=include_noise)


def _check_fit_arguments(
    train_loader, context_loader, iterations, auto, augment, schedule, time_budget
) -> None:  # fmt: skip
    """Refuse the arguments of :meth:`ScaLLA.fit` that cannot work (before any data is read)."""
    for name, loader in (("train_loader", train_loader), ("context_loader", context_loader)):
        if isinstance(loader, Iterator):
            raise TypeError(
                f"fastlla: ScaLLA.fit reads {name} several times; pass a re-iterable "
                "loader (a DataLoader or a list of batches), not a one-shot iterator or "
                "generator"
            )
    if auto and iterations != "auto":
        raise ValueError(f"fastlla: iterations must be an int or 'auto', got {iterations!r}")
    if auto and not (time_budget > 0 and math.isfinite(time_budget)):
        raise ValueError(f"fastlla: time_budget must be positive, got {time_budget}")
    if not auto and int(iterations) < 0:
        raise ValueError(f"fastlla: iterations must be non-negative, got {iterations}")
    if not (augment is None or callable(augment) or augment in ("auto", "mixup")):
        raise ValueError(
            f"fastlla: augment must be 'auto', 'mixup', None or a callable, got {augment!r}"
        )
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"fastlla: schedule must be 'cosine' or 'constant', got {schedule!r}")
