"""Exact linearized Laplace with explicit Jacobians — the oracle for small models.

Two equivalent forms, chosen by the cheaper size (``form="auto"``):

* **weight space** (``P ≤ N·C``): ``G = Σ_n J_nᵀ Λ_n J_n`` (``P×P``), posterior precision
  ``sG + δI``, ``Σ(x) = J(x) (sG + δI)⁻¹ J(x)ᵀ`` — the feature posterior with ``Φ = Jᵀ``.
* **function space** (``P > N·C``): with ``Ĵ_n = R_nᵀ J_n`` (``R_n R_nᵀ = Λ_n``) stacked into
  ``Ĵ`` (``NC×P``) and ``K = ĴĴᵀ``, Woodbury gives
  ``Σ(x) = (J(x)J(x)ᵀ − s·J(x)Ĵᵀ (δI + sK)⁻¹ ĴJ(x)ᵀ) / δ``, and ``G`` and ``K`` share
  their non-zero eigenvalues.

Jacobians are computed with ``torch.func`` over chunks of ``chunk_size`` inputs, so memory is
``O(chunk_size·C·P)`` beyond the ``P×P`` or ``NC×P`` matrices the chosen form stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _ops
from .exact_predictive import JacobianPredictive
from .fit_state import _state_int, _state_tensor
from .functional import NetworkFunction, batch_size, call_module, slice_batch
from .laplace import LaplaceBase
from .network_head import tapped_network
from .posterior import FeaturePosterior
from .predictive import Likelihood, softmax_hessian_factor

__all__ = ["ExactLLA", "softmax_hessian_factor"]


SUBSETS = ("all", "last_layer", "subnetwork")


class ExactLLA(JacobianPredictive, LaplaceBase):
    """Full-Jacobian linearized Laplace approximation (small models).

    The leading parameters are laplace-torch's ``FullLaplace``'s, in its order (see
    :class:`fastlla.laplace.LaplaceBase`); a per-layer or per-parameter ``prior_precision``
    gives a diagonal prior in the posterior and the evidence. The rest are keyword-only.

    Parameters
    ----------
    form : ``"auto"`` (the smaller of ``P`` and ``N·C``), ``"weight"`` or ``"function"``.
    chunk_size : inputs per Jacobian computation.
    subset_of_weights : the parameters the posterior is over: ``"all"`` (every parameter with
        ``requires_grad``; default), ``"last_layer"`` (the weight and bias of the last
        ``nn.Linear`` with parameters that the forward pass runs, found on the first training
        batch, or named by ``last_layer_name``; laplace-torch's last-layer Laplace with a full
        Hessian) or ``"subnetwork"`` (the entries ``subnetwork_indices`` of
        ``parameters_to_vector(model.parameters())``, as laplace-torch's ``SubnetLaplace``).
        The other parameters stay at their values; ``n_params`` counts the chosen ones.
    subnetwork_indices : 1-D integer tensor of distinct indices (``"subnetwork"`` only); every
        chosen entry must belong to a parameter with ``requires_grad``.
    last_layer_name : the module name of the last layer (``"last_layer"`` only).
    """

    _curvature_source = "ExactLLA computes the exact GGN from full Jacobians"
    _supports_reward_modeling = True

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
        form: str = "auto",
        chunk_size: int = 32,
        subset_of_weights: str = "all",
        subnetwork_indices: Tensor | None = None,
        last_layer_name: str | None = None,
    ):
        if form not in ("auto", "weight", "function"):
            raise ValueError(f"fastlla: form must be 'auto', 'weight' or 'function', got {form!r}")
        if chunk_size < 1:
            raise ValueError(f"fastlla: chunk_size must be at least 1, got {chunk_size}")
        if subset_of_weights not in SUBSETS:
            raise ValueError(
                f"fastlla: subset_of_weights must be one of {SUBSETS}, got {subset_of_weights!r}"
            )
        if (subnetwork_indices is not None) != (subset_of_weights == "subnetwork"):
            raise ValueError(
                "fastlla: subnetwork_indices go with subset_of_weights='subnetwork' (and it "
                "needs them)"
            )
        if last_layer_name is not None and subset_of_weights != "last_layer":
            raise ValueError("fastlla: last_layer_name goes with subset_of_weights='last_layer'")
        self.subset_of_weights = subset_of_weights
        self.last_layer_name = last_layer_name
        self._subnetwork_indices = subnetwork_indices
        self._columns: Tensor | None = None  # "subnetwork": the chosen entries of the network's θ
        self._pending_last_layer = False  # "last_layer" not yet located (the first fit does)
        super().__init__(
            model, likelihood, sigma_noise, prior_precision, prior_mean, temperature,
            enable_backprop, dict_key_x, dict_key_y, backend, backend_kwargs, asdl_fisher_kwargs,
        )  # fmt: skip
        self.form = form
        self.chunk_size = int(chunk_size)
        self.posterior: FeaturePosterior | None = None  # weight space
        self._jhat: Tensor | None = None  # function space: Ĵ (NC, P)
        self._kernel_eigvals: Tensor | None = None
        self._kernel_chol: tuple[tuple[float, float], Tensor] | None = None
        self._diag_chol: tuple[Tensor, float, Tensor] | None = None  # diagonal prior's factor

    # ------------------------------------------------------------------ parameters
    def _make_network(self, model: nn.Module) -> NetworkFunction:
        if self.subset_of_weights == "last_layer":
            if self.last_layer_name is None:
                self._pending_last_layer = True
                return NetworkFunction(model)
            return _linear_network(model, self.last_layer_name)
        if self.subset_of_weights == "subnetwork":
            network, self._columns = _subnetwork(model, self._subnetwork_indices)
            return network
        return NetworkFunction(model)

    def _locate_last_layer(self, x: Any) -> None:
        """Restrict the posterior to the last ``nn.Linear`` the forward pass of ``x`` runs."""
        name = _last_linear_called(self.model, x)
        network = _linear_network(self.model, name)
        old = self.network
        self.network = network
        try:  # a per-layer / per-parameter δ given before the layer was known must fit it
            if self._prior_precision.numel() != 1:
                self._check_prior_structure(self._prior_precision)
        except ValueError:
            self.network = old
            raise
        self.last_layer_name = name
        self._pending_last_layer = False

    def _theta(self) -> Tensor:
        return self._posterior_entries(self.network.flat_params())

    def _posterior_entries(self, flat: Tensor) -> Tensor:
        return flat if self._columns is None else flat[self._columns.to(flat.device)]

    def _n_layers(self) -> int | None:
        return None if self._columns is not None else len(self.network.names)

    def _check_prior_structure(self, delta: Tensor) -> None:
        if self._pending_last_layer:
            return  # checked once the first fit has located the last layer
        n, P, L = delta.numel(), self.n_params, self._n_layers()
        if n != P and n != L:
            layers = f"one per parameter tensor ({L}) or " if L is not None else ""
            raise ValueError(
                f"fastlla: prior_precision has {n} values; ExactLLA takes a scalar, "
                f"{layers}one per parameter ({P})"
            )

    def _expand_prior(self, delta: Tensor) -> Tensor:
        self._check_prior_structure(delta)
        if delta.numel() == self.n_params:
            return delta
        sizes = torch.tensor(self.network.numels, device=delta.device)
        return torch.repeat_interleave(delta, sizes)

    @property
    def n_params(self) -> int:
        return self.network.n_params if self._columns is None else int(self._columns.numel())

    # ------------------------------------------------------------------ Jacobians
    def _jacobians(self, x: Any) -> Tensor:
        """``J(x)`` as (B, C, P), computed ``chunk_size`` inputs at a time."""
        n = batch_size(x)
        chunks = [
            self.network.jacobian(slice_batch(x, a, min(a + self.chunk_size, n)))
            for a in range(0, n, self.chunk_size)
        ]
        J = torch.cat(chunks) if chunks else torch.empty(0)
        return J if self._columns is None or not chunks else J[..., self._columns]

    def _resolve_form(self, loader: Iterable) -> str:
        if self.form != "auto":
            return self.form
        if isinstance(loader, Iterator):  # choosing the form reads the data before fitting does
            raise TypeError(
                "fastlla: form='auto' needs a re-iterable train_loader (a DataLoader or a list "
                "of batches), not a one-shot iterator; pass form='weight' or 'function'"
            )
        try:
            n = len(loader.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            n = sum(batch_size(x) for x, _ in self._batches(loader))
        f = self.network.output(next(iter(self._batches(loader)))[0])
        return "weight" if self.n_params <= n * f.shape[-1] else "function"

    def _check_memory(self, form: str, loader: Iterable) -> None:
        """Refuse, before any work, a fit whose matrices cannot fit in the memory available."""
        P, item = self.n_params, torch.empty((), dtype=self.dtype).element_size()
        one_shot = isinstance(loader, Iterator)  # its batches cannot be read twice
        if one_shot and form == "function":
            return  # N is unknown until the fit has read the data
        C = 1  # a lower bound where the loader cannot be peeked at
        if not one_shot:
            x0 = next(iter(self._batches(loader)))[0]
            C = self.network.output(slice_batch(x0, 0, 1)).shape[-1]
        jac = self.chunk_size * C * P  # one chunk of Jacobians
        if form == "weight":  # G and its Cholesky factor, P × P each
            need = (2 * P * P + jac) * item
        else:  # Ĵ (NC × P), the kernel and its Cholesky factor, NC × NC each
            try:
                n = len(loader.dataset)  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                n = sum(batch_size(x) for x, _ in self._batches(loader))
            need = (n * C * P + 2 * (n * C) ** 2 + jac) * item
        have = available_memory(self.device)
        if have is not None and need > have:
            raise MemoryError(
                f"fastlla: ExactLLA's {form}-space fit needs about {need / 2**30:.1f} GiB "
                f"(P = {P:,} parameters, {C} outputs, {self.dtype}) but only "
                f"{have / 2**30:.1f} GiB is available on {self.device}; use fastlla.ScaLLA, "
                "whose memory does not grow with P, or a subset of the weights "
                "(subset_of_weights='last_layer' or 'subnetwork')"
            )

    # ------------------------------------------------------------------ fitting
    def fit(
        self, train_loader: Iterable, override: bool = True, progress_bar: bool = False
    ) -> ExactLLA:
        """Accumulate the exact GGN (or NTK Gram) over ``train_loader``.

        ``override=False`` (laplace-torch's online accumulation) adds the loader's data to an
        earlier fit — the GGN (or ``Ĵ``'s rows), the log-likelihood and ``n_data`` grow, in the
        earlier fit's form — which equals one fit over all the data; the model must be unchanged
        since that fit (fastlla's posterior belongs to one ``θ*``; laplace-torch also
        accumulates across a retrained model). Without an earlier fit it is a plain fit.

        Everything is computed before anything is stored: a fit that fails (an empty loader,
        NaN outputs in a later batch, ...) leaves the estimator, an earlier fit included, as it
        was.
        """
        accumulate = not override and self._fitted
        if accumulate:
            self._check_fitted()  # raises if the model changed since the earlier fit
            form = self.fitted_form
        else:
            if self._pending_last_layer:
                self._locate_last_layer(next(iter(self._batches(train_loader)))[0])
            form = self._resolve_form(train_loader)
            self._check_memory(form, train_loader)
        P = self.n_params
        G = torch.zeros(P, P, dtype=self.dtype, device=self.device) if form == "weight" else None
        classification = self.likelihood is Likelihood.CLASSIFICATION
        rows, n_data, stat = [], 0, 0.0
        n_outputs = self.n_outputs if accumulate else None
        for x, y in tqdm(self._batches(train_loader), disable=not progress_bar, desc="ExactLLA"):
            f = self.network.output(x)
            self._check_outputs(f, y, n_outputs)
            if n_data == 0:  # the first batch
                self._check_network(x, f)
            n_outputs = f.shape[-1]
            stat += self._loglik_term(f, y)
            n_data += f.shape[0]
            J = self._jacobians(x)
            if form == "weight":
                _ops.ggn_accumulate(G, J.mT.contiguous(), f if classification else None)
            else:
                Jhat = softmax_hessian_factor(f).mT @ J if classification else J
                rows.append(Jhat.reshape(-1, P))
        if accumulate:
            if form == "weight":
                G += self.posterior.H
            else:
                rows.insert(0, self._jhat)
            n_data, stat = n_data + self.n_data, stat + self._loglik_stat
        posterior = FeaturePosterior(G) if form == "weight" else None
        jhat = None if form == "weight" else torch.cat(rows)
        self._commit(
            form, posterior, jhat, n_outputs=n_outputs, n_data=n_data, _loglik_stat=stat,
            _param_norm2=float(self._theta().double().square().sum()),
        )  # fmt: skip
        return self

    def _commit(
        self, form: str, posterior: FeaturePosterior | None, jhat: Tensor | None, **base: Any
    ) -> None:
        """Store a complete fit (or loaded state); nothing here can fail part-way."""
        kernel = None
        if jhat is not None:
            K = jhat @ jhat.mT
            kernel = 0.5 * (K + K.mT)
        self.__dict__.update(base)
        self.fitted_form, self.posterior, self._jhat = form, posterior, jhat
        self._diag_chol = None
        if kernel is not None:
            self._kernel = kernel
        self._kernel_eigvals = None
        self._kernel_chol = None
        self._mark_fitted()

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict[str, Any]:
        self._check_fitted()
        state = self._base_state()
        state.update(form=self.fitted_form, chunk_size=self.chunk_size)
        state.update(subset_of_weights=self.subset_of_weights, last_layer_name=self.last_layer_name)
        if self.posterior is not None:
            state["H"] = self.posterior.H
        else:
            state["jhat"] = self._jhat
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a fitted estimator; the model must be the one it was fitted on.

        Every entry is checked (keys, types, counts, finiteness, and ``H`` (P, P) or ``jhat``
        (N·C, P) against the model and the counts) before anything changes: a refused state
        leaves the estimator as it was.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"fastlla: state_dict must be a dict, got {type(state).__name__}")
        subset = state.get("subset_of_weights", "all")
        if subset != self.subset_of_weights:
            raise ValueError(
                f"fastlla: state_dict is for subset_of_weights={subset!r}, this estimator is "
                f"{self.subset_of_weights!r}"
            )
        saved = (self.network, self.last_layer_name, self._pending_last_layer, self._param_norm2)
        try:
            saved_layer = state.get("last_layer_name")
            if self._pending_last_layer and saved_layer is not None:
                self.network = _linear_network(self.model, saved_layer)
                self.last_layer_name, self._pending_last_layer = saved_layer, False
                self._param_norm2 = float(self._theta().double().square().sum())
            elif saved_layer != self.last_layer_name:
                raise ValueError(
                    f"fastlla: state_dict is for the last layer {saved_layer!r}, this estimator's "
                    f"is {self.last_layer_name!r}"
                )
            base = self._validated_base_state(
                state, ("form", "chunk_size"), ("H", "jhat", "subset_of_weights", "last_layer_name")
            )
            form = state["form"]
            if form not in ("weight", "function"):
                raise ValueError(f"fastlla: state_dict['form'] must be 'weight' or 'function', got {form!r}")
            chunk_size = _state_int(state, "chunk_size", minimum=1)
            key = "H" if form == "weight" else "jhat"
            other = "jhat" if form == "weight" else "H"
            if key not in state or other in state:
                raise ValueError(
                    f"fastlla: a {form}-space state_dict holds {key!r} (and not {other!r})"
                )
            P = self.n_params
            shape = (P, P) if form == "weight" else (base["n_data"] * base["n_outputs"], P)
            value = _state_tensor(state, key, shape).to(self.device, self.dtype)
            posterior = jhat = None
            if form == "weight":
                if not torch.allclose(value, value.mT, rtol=1e-4, atol=1e-6 * float(value.abs().max())):
                    raise ValueError("fastlla: state_dict['H'] is not symmetric")
                posterior = FeaturePosterior(value)
            else:
                jhat = value
        except Exception:  # a refused state leaves the estimator as it was
            self.network, self.last_layer_name, self._pending_last_layer, self._param_norm2 = saved
            raise
        self.chunk_size = chunk_size
        self._commit(form, posterior, jhat, **base)


# --------------------------------------------------------------------------- subsets of weights
def _linear_network(model: nn.Module, name: str) -> NetworkFunction:
    """The network as a function of the weight and bias of its ``nn.Linear`` ``name``."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"fastlla: the model has no module {name!r}") from None
    if not isinstance(layer, nn.Linear):
        raise ValueError(
            f"fastlla: the last layer {name!r} is a {type(layer).__name__}, not an nn.Linear; "
            "last-layer Laplace needs a linear last layer (or use subset_of_weights='all')"
        )
    names = [f"{name}.{p}" for p, t in layer.named_parameters(recurse=False)]
    if not all(t.requires_grad for t in layer.parameters(recurse=False)):
        raise ValueError(f"fastlla: the last layer {name!r} has parameters without requires_grad")
    return NetworkFunction(model, names)


def _last_linear_called(model: nn.Module, x: Any) -> str:
    """Name of the last module with parameters that the forward pass of ``x`` completes
    (laplace-torch's ``FeatureExtractor`` choice), read from a tapped stand-in of the model
    (:func:`~fastlla.network_head.tapped_network`): no hooks are put on the user's module."""
    if next(model.children(), None) is None:  # the model is a single layer
        if next(model.parameters(recurse=False), None) is None:
            raise ValueError("fastlla: no module with parameters ran in the forward pass")
        return ""
    names = [
        n for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None
    ]  # fmt: skip
    calls: list[tuple[str, Any, Any]] = []
    tapped, _ = tapped_network(model, names, calls)
    with torch.no_grad():
        call_module(tapped, x)
    if not calls:
        raise ValueError("fastlla: no module with parameters ran in the forward pass")
    return calls[-1][0]


def _subnetwork(model: nn.Module, indices: Any) -> tuple[NetworkFunction, Tensor]:
    """The network over the parameters that ``indices`` (into ``parameters_to_vector(
    model.parameters())``) touch, and the positions of the indices in its flat vector."""
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.numel() == 0 or (
        indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool
    ):
        raise ValueError("fastlla: subnetwork_indices must be a non-empty 1-D integer tensor")
    idx = indices.detach().cpu().long()
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    if int(idx.min()) < 0 or int(idx.max()) >= total:
        raise ValueError(f"fastlla: subnetwork_indices must lie in [0, {total - 1}]")
    if idx.unique().numel() != idx.numel():
        raise ValueError("fastlla: subnetwork_indices must not repeat an index")
    starts = torch.tensor([0] + [p.numel() for _, p in named]).cumsum(0)
    owner = torch.searchsorted(starts, idx, right=True) - 1  # parameter of each index
    chosen = sorted(set(owner.tolist()))
    frozen = [named[i][0] for i in chosen if not named[i][1].requires_grad]
    if frozen:
        raise ValueError(f"fastlla: subnetwork_indices select entries of frozen parameters {frozen}")
    network = NetworkFunction(model, [named[i][0] for i in chosen])
    # offset of each chosen parameter in the restricted flat vector
    offset, local = {}, 0
    for i in chosen:
        offset[i] = local
        local += named[i][1].numel()
    columns = torch.tensor(
        [offset[o] + int(j - starts[o]) for o, j in zip(owner.tolist(), idx.tolist())],
        device=next(model.parameters()).device,
    )
    return network, columns


def available_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation can take on ``device`` (``None`` where unknown): free GPU memory,
    or the host's available memory bounded by the process's address-space limit."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            have = soft if have is None else min(have, soft)
    except (ImportError, ValueError, OSError):
        pass
    return have
