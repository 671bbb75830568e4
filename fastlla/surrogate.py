"""Surrogate networks ``g(x) ∈ R^{M×C}`` whose inner products learn the neural tangent kernel.

Any ``nn.Module`` mapping a batch to ``(B, M, C)`` can serve. :func:`find_head`
(:mod:`fastlla.network_head`) reads, by running the network on a batch, which ``nn.Linear``
produces its output (verified: ``f = W φ + b``) or, failing that, the last one it runs.
:func:`default_surrogate` builds one from the user's network: a copy of its trunk (everything
before its output layer, warm-started from the network's own weights, since the NTK is largely a
function of the network's own features) plus a new head to ``M·C`` outputs (linear, or with a
hidden layer of ``head_width`` units), times a scale set so the surrogate's kernel starts at the
NTK's magnitude (``√(P/M)`` before calibration on data).

Choosing ``M`` (``n_features``): the posterior lives in ``M`` dimensions, so it costs ``O(M²)``
memory and ``O(M³)`` once per fit; predictive cost is ``O(M²C)`` per input. The kernel error
of the learned surrogate is limited less by ``M`` than by the surrogate itself and the noise of
the projected targets (with a linear head every feature is a linear map of the trunk's
penultimate layer); the predictive variance keeps more of exact LLA's as ``M`` grows. 128 is
the default; use 256–512 when the predictive variance matters more than speed, and keep ``M``
well below ``N·C``. The measurements are in ``docs/design-history.md``.

By default (``ScaLLA(last_layer="auto")``) :class:`LastLayerSurrogate` adds, beside the ``M``
learned features, the *exact* features of the network's output layer — ``(h+1)·C`` of
them, or ``k·C`` for its top-``k`` principal input directions when that is over 1024 — so the
posterior has ``M + (h+1)·C`` features. The learned
ones then only fit the rest of the kernel. Where the network ends ``Linear → σ → Linear``
(``ScaLLA(gate="auto")``) the learned ones are a :class:`GatedSurrogate`: the Jacobian's class
structure below the head (the gate ``σ'(z)`` and the head's weights) is taken from the network
exactly and only a class-independent ``H(x)`` is learned. :class:`ResidualHead` learns the NTK's
diagonal block that the features miss, for the residual prior variance (``residual_variance``).
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from .functional import batch_size, call_module, cast_inputs, compute_dtype
from .network_head import (
    ACTIVATION_GRADIENTS,
    InputOf,
    NetworkHead,
    gated_structure,
    gated_structure_runs,
    last_linear,
    penultimate,
)

__all__ = [
    "Surrogate",
    "LastLayerSurrogate",
    "GatedSurrogate",
    "NetworkInput",
    "ResidualHead",
    "default_surrogate",
    "default_surrogate_size",
    "last_layer_surrogate",
    "check_surrogate_output",
    "surrogate_features",
    "seeded_linear",
]


#: :meth:`GatedSurrogate.distil`: the ranks tried (the largest is the buffers' size), the most
#: inputs read (and, of those, checked), and the largest relative change of the learned kernel
#: accepted.
DISTIL_RANKS = (8, 16, 24, 32, 40, 48, 56, 64)
DISTIL_MAX_RANK = DISTIL_RANKS[-1]
DISTIL_MAX_INPUTS, DISTIL_CHECK_INPUTS = 4096, 256
DISTIL_TOLERANCE = 0.01


def _same_key(a: tuple, b: tuple) -> bool:
    """Whether two cache keys hold the same tensors (identity) and equal other values."""
    return all(u is v if isinstance(u, Tensor) else u == v for u, v in zip(a, b, strict=True))


def seeded_linear(n_in: int, n_out: int, generator: torch.Generator | None = None) -> nn.Linear:
    """``nn.Linear(n_in, n_out)`` with PyTorch's default initialisation drawn from ``generator``
    (a CPU generator), leaving the global RNG untouched; ``None``: a plain ``nn.Linear``, which
    draws from the global RNG like any torch module.

    The draws are those ``nn.Linear`` makes after ``torch.manual_seed(s)`` when ``generator``
    is ``torch.Generator().manual_seed(s)``.
    """
    if generator is None:
        return nn.Linear(n_in, n_out)
    layer = nn.Linear(n_in, n_out, device="meta").to_empty(device="cpu")  # no RNG use
    with torch.no_grad():  # nn.Linear.reset_parameters, with the generator
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(n_in) if n_in > 0 else 0
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


class NetworkInput(nn.Module):
    """The input of the network's own module ``name`` as the network runs, flattened to
    ``(B, -1)``, without gradient: a surrogate trunk shared with the network (``shared_trunk``
    of :func:`default_surrogate` and :class:`GatedSurrogate`) — nothing of it is trained, and
    the predictive reads it from the network's pass it makes anyway
    (:func:`~fastlla.network_head.forward_with_inputs`). The network is not a submodule (it is
    neither trained nor saved). It reads the inputs as the network does (not cast)."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        model.get_submodule(name)  # AttributeError for a module the network does not have
        self._model = (model,)  # a tuple hides it from parameters() and state_dict()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        one = len(args) == 1 and isinstance(args[0], Tensor) and not kwargs
        x = args[0] if one else (kwargs or args)
        return penultimate(self._model[0], self.name, x, bias=False)


class Surrogate(nn.Module):
    """``g(x) = output_scale · head(trunk(x))`` reshaped to ``(B, M, C)``.

    ``head_width = 0``: a linear head; ``w > 0``: ``Linear(n_hidden → w) · ReLU · Linear(w → M·C)``.
    The head's initial weights come from ``generator`` (the global RNG when ``None``).
    """

    def __init__(
        self, trunk: nn.Module, n_hidden: int, n_features: int, n_outputs: int, head_width: int = 0,
        generator: torch.Generator | None = None,
    ):  # fmt: skip
        super().__init__()
        self.trunk = trunk
        self.n_features, self.n_outputs = n_features, n_outputs
        self.head_width = int(head_width)
        if self.head_width < 0:
            raise ValueError(f"fastlla: head_width must be >= 0, got {head_width}")
        out = n_features * n_outputs
        self.head = (
            seeded_linear(n_hidden, out, generator)
            if self.head_width == 0
            else nn.Sequential(
                seeded_linear(n_hidden, self.head_width, generator),
                nn.ReLU(),
                seeded_linear(self.head_width, out, generator),
            )
        )
        self.register_buffer("output_scale", torch.tensor(1.0))
        self._whitened_head: tuple | None = None  # (key, weight, bias) of whitened_features

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.features_from(self._trunk_output(*args, **kwargs))

    def _trunk_output(self, *args: Any, **kwargs: Any) -> Tensor:
        """The trunk's output on the inputs."""
        if not isinstance(self.trunk, NetworkInput):  # the network's own reads them as given
            args, kwargs = cast_inputs(args, kwargs, self.output_scale.dtype)  # half networks
        return self.trunk(*args, **kwargs)

    @torch.no_grad()
    def whitened_features(self, h: Tensor, inv_t: Tensor) -> Tensor:
        """``L⁻¹ g`` (B, M, C, laid out class-major) from the trunk's output ``h`` for
        ``inv_t = L⁻ᵀ`` (M, M), no gradient: the whitening of the posterior's predictive
        variance folded into the head's last layer (its weights and bias whitened once per
        ``inv_t`` and layer, cached), so the whitened features cost what ``g`` costs
        (:meth:`FeaturePosterior.variance <fastlla.posterior.FeaturePosterior.variance>`,
        ``whitened=True``)."""
        h = h.reshape(h.shape[0], -1).to(self.output_scale.dtype)
        last = self.head if isinstance(self.head, nn.Linear) else self.head[-1]
        if not isinstance(self.head, nn.Linear):
            h = self.head[:-1](h)
        key = (inv_t, last.weight, last.weight._version, last.bias, last.bias._version)
        cached = self._whitened_head  # a local read first: threads may each fill the cache
        if cached is None or not _same_key(cached[0], key):
            M, C = self.n_features, self.n_outputs
            inv = inv_t.mT
            weight = torch.einsum("im,mcw->ciw", inv, last.weight.view(M, C, -1))
            bias = torch.einsum("im,mc->ci", inv, last.bias.view(M, C))
            cached = self._whitened_head = (key, weight.reshape(C * M, -1).mT, bias.reshape(-1))
        _, weight_t, bias = cached
        out = torch.addmm(bias, h, weight_t) * self.output_scale
        return out.view(h.shape[0], self.n_outputs, self.n_features).mT

    def features_from(self, h: Tensor) -> Tensor:
        """``g`` (B, M, C) from the trunk's output ``h`` (B, ...)."""
        h = h.reshape(h.shape[0], -1).to(self.output_scale.dtype)
        out = self.head(h) * self.output_scale
        return out.view(h.shape[0], self.n_features, self.n_outputs)


class LastLayerSurrogate(nn.Module):
    """Learned features beside the *exact* Jacobian block of the network's last linear layer.

    For ``f(x) = W φ(x) + b`` the parameters ``(W, b)`` contribute exactly
    ``κ_last(x, x') = (ψ(x)ᵀψ(x')) I_C`` to the NTK, ``ψ = [φ; 1]`` (``h + 1`` values), so the
    features ``ψ(x) ⊗ I_C`` reproduce that block with no error and no training. With a
    ``rank`` ``k < h + 1`` only ``ψ``'s top-``k`` principal directions ``U`` (from the training
    inputs, :meth:`fit_basis`) are kept, ``(Uᵀψ) ⊗ I_C``; the dropped part
    ``((I − UUᵀ)ψ)ᵀ(...)`` joins the learned features' target.

    Output ``(B, M + k·C, C)``: first the ``M`` learned features (``learned``, any
    :class:`Surrogate`), then the ``k·C`` exact ones. During training only ``learned`` runs, on
    the residual target ``z − V UUᵀψ(x)`` (``V`` the tangent's head components), which is the
    JVP of the rest of the network plus the dropped head directions — no head noise.

    Parameters
    ----------
    learned : the learned-feature surrogate.
    model : the pre-trained network (read, never trained; not a submodule, so it is not saved).
    head_name : qualified name of its output layer (an ``nn.Linear``, :func:`find_head`).
    rank : ``k``; ``None`` keeps all ``h + 1`` directions.
    pooled : the output layer runs per position and the network pools its outputs
        (:class:`NetworkHead`): ``ψ`` is read from the network with the layer removed.
    """

    def __init__(
        self, learned: nn.Module, model: nn.Module, head_name: str, rank: int | None = None,
        pooled: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.pooled = bool(pooled)  # ψ read with the head removed (NetworkHead.pooled)
        head = model.get_submodule(head_name)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"fastlla: {head_name!r} is not an nn.Linear")
        self.learned = learned
        self._model = (model,)  # a tuple hides it from parameters() and state_dict()
        self.head_name = head_name
        self.has_bias = head.bias is not None
        width = head.in_features + int(self.has_bias)
        k = width if rank is None else int(rank)
        if not 1 <= k <= width:
            raise ValueError(f"fastlla: last-layer rank must be in [1, {width}], got {rank}")
        w = head.weight
        self.register_buffer(
            "basis", torch.eye(width, dtype=compute_dtype(w.dtype), device=w.device)[:, :k]
        )
        self.n_learned = int(getattr(learned, "n_features", 0))
        self.n_outputs = head.out_features
        self.rank = k

    @property
    def n_exact(self) -> int:
        return self.rank * self.n_outputs

    @property
    def full_rank(self) -> bool:
        return self.rank == self.basis.shape[0]

    def psi(self, x: Any) -> Tensor:
        """``ψ(x) = [φ(x); 1]`` (B, h+1) of the network itself (no gradient)."""
        psi = penultimate(self._model[0], self.head_name, x, self.has_bias, self.pooled)
        return psi.to(self.basis.dtype)

    def coefficients(self, psi: Tensor) -> Tensor:
        """``a = Uᵀψ`` (B, k): the exact features are ``a ⊗ I_C``."""
        return psi.to(self.basis.dtype) @ self.basis

    def exact_features(self, x: Any, psi: Tensor | None = None) -> Tensor:
        """``(Uᵀψ(x)) ⊗ I_C`` as (B, k·C, C)."""
        a = self.coefficients(self.psi(x) if psi is None else psi)  # (B, k)
        eye = torch.eye(self.n_outputs, dtype=a.dtype, device=a.device)
        B = a.shape[0]
        return (a[:, :, None, None] * eye).reshape(B, self.rank * self.n_outputs, self.n_outputs)

    def learned_features(self, x: Any, psi: Tensor, u: Tensor | None = None) -> Tensor:
        """The learned features (B, M, C) of the batch ``x``, given its ``ψ(x)`` (which a
        :class:`GatedSurrogate` reads instead of running the network again) and, for a gated
        surrogate, optionally the output ``u`` of its trunk (with ``shared_trunk``: the
        network's input of the gated layer, read in the same pass as ``ψ``,
        :func:`~fastlla.network_head.forward_with_inputs`)."""
        if isinstance(self.learned, GatedSurrogate):
            phi = psi[:, : psi.shape[1] - int(self.has_bias)]
            if u is not None:
                return self.learned.features_from(phi, u)
            return call_module(functools.partial(self.learned.features, phi), x)
        if u is not None and isinstance(self.learned, Surrogate):
            return self.learned.features_from(u)
        return call_module(self.learned, x)

    @property
    def whitens(self) -> bool:
        """Whether :meth:`whitened_learned_features` applies: learned features of a
        :class:`Surrogate`, or of a :class:`GatedSurrogate` with a distilled map (those classes
        themselves: a subclass may compute its features otherwise)."""
        learned = self.learned
        return type(learned) is Surrogate or (
            type(learned) is GatedSurrogate and learned.distilled
        )

    def whitened_learned_features(
        self, x: Any, psi: Tensor, u: Tensor | None, inv_t: Tensor
    ) -> Tensor:
        """The learned features whitened by the posterior, ``L⁻¹ g`` (B, M, C) for
        ``inv_t = L⁻ᵀ``, computed as cheaply as ``g`` (the whitening folded into the last map:
        :meth:`Surrogate.whitened_features`, :meth:`GatedSurrogate.whitened_features`); ``u``
        the trunk's output when read already (a shared trunk). Needs :attr:`whitens`."""
        learned = self.learned
        if u is None:
            u = call_module(learned._trunk_output, x)
        if isinstance(learned, GatedSurrogate):
            return learned.whitened_features(psi[:, : psi.shape[1] - int(self.has_bias)], u, inv_t)
        return learned.whitened_features(u, inv_t)

    @property
    def shared_trunk_input(self) -> str | None:
        """The network module whose input is the learned features' trunk output when that is
        the network's own (a :class:`NetworkInput`, ``shared_trunk``), else ``None``."""
        trunk = getattr(self.learned, "trunk", None)
        if isinstance(trunk, NetworkInput):
            return trunk.name
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        one = len(args) == 1 and isinstance(args[0], Tensor) and not kwargs
        x = args[0] if one else (kwargs or args)
        psi = self.psi(x)
        learned = self.learned_features(x, psi)
        return torch.cat([learned, self.exact_features(x, psi).to(learned.dtype)], dim=1)

    @torch.no_grad()
    def fit_basis(self, batches: Any) -> None:
        """Top-``k`` principal directions of ``ψ`` over the training inputs (identity if full)."""
        if self.full_rank:
            return
        gram = None
        for x in batches:
            p = self.psi(x).double()
            gram = p.mT @ p if gram is None else gram + p.mT @ p
        _, vecs = torch.linalg.eigh(gram)
        self.basis.copy_(vecs.flip(1)[:, : self.rank].to(self.basis.dtype))

    def head_jvp(self, tangents: dict[str, Tensor], psi: Tensor, network_names: Any) -> Tensor:
        """``V UUᵀψ`` (S, B, C): the part of the JVPs the exact block already carries."""
        w = tangents[f"{self.head_name}.weight"]  # (S, C, h)
        if self.has_bias:
            w = torch.cat([w, tangents[f"{self.head_name}.bias"].unsqueeze(-1)], dim=-1)
        kept = (psi @ self.basis) @ self.basis.mT if not self.full_rank else psi
        return torch.einsum("sch,bh->sbc", w, kept.to(w.dtype))

    def residual_diagonal(self, psi: Tensor) -> Tensor:
        """``‖(I − UUᵀ)ψ‖²`` (B,): the dropped last-layer prior variance per output."""
        if self.full_rank:
            return psi.new_zeros(psi.shape[0])
        return (psi - (psi @ self.basis) @ self.basis.mT).square().sum(-1)


class GatedSurrogate(nn.Module):
    """Learned features with the class structure of the network's Jacobian below its head.

    For a network ending ``z = Linear(u)``, ``f = W σ(z) + b`` (elementwise ``σ``), the Jacobian
    row of output ``c`` for every parameter ``θ`` below the head is ``(W[c] ⊙ σ'(z))ᵀ ∂z/∂θ``.
    So the features of those parameters are ``g[m, c] = Σ_j H[j, m] σ'(z_j) W[c, j]`` with
    ``H(x) = (∂z/∂θ) Q`` (``h × M``) shared by all classes. Only ``H`` is learned — the gate
    ``σ'(z)`` (from the network's own activations ``φ = σ(z)``) and ``W`` are exact — from
    ``u``, the input of the layer computing ``z``: a linear map (the layer's own weights enter
    ``∂z/∂θ`` linearly in ``u``) plus an MLP of ``width`` hidden units. ``u`` comes from a
    trainable copy of the network's trunk (warm-started) or, with ``shared_trunk=True``, from
    the network itself (its own input of that layer, not trained): the predictive then reads
    ``u`` from the network's pass it makes anyway (:meth:`LastLayerSurrogate.learned_features`)
    and runs no trunk of its own.

    It carries no last-layer features: use it inside :class:`LastLayerSurrogate` at full rank,
    which provides the head's block exactly (``ScaLLA(gate="auto")``; its measured gain is in
    ``docs/design-history.md``).

    ``forward(x)`` reads ``φ`` by running the network (:func:`penultimate`); callers that already
    have ``φ`` (the exact block, the exported predictor) use :meth:`features` and save a pass.
    The initial weights of the map to ``H`` come from ``generator`` (the global RNG when ``None``).

    The map to ``H`` has ``h·M`` outputs, so it costs far more than the network it explains;
    after training, :meth:`distil` replaces it by its rank-``r`` form over the training inputs
    (``ScaLLA.fit`` does so), which the predictive then uses (:meth:`undistil` goes back to the
    trained map, which is what trains).
    """

    def __init__(
        self, model: nn.Module, n_features: int, n_outputs: int, width: int = 512,
        structure: tuple[str, str, str] | None = None, generator: torch.Generator | None = None,
        shared_trunk: bool = False,
    ):  # fmt: skip
        super().__init__()
        structure = structure or gated_structure(model)
        if structure is None:
            raise ValueError(
                "fastlla: a gated surrogate needs a model ending nn.Linear → activation → "
                f"nn.Linear, the activation one of {[t.__name__ for t in ACTIVATION_GRADIENTS]}"
            )
        if n_features < 1 or width < 0:
            raise ValueError(f"fastlla: need n_features >= 1 and width >= 0, got {n_features}, {width}")
        linear, act, head = (model.get_submodule(n) for n in structure)
        if head.out_features != n_outputs:
            raise ValueError(f"fastlla: the head has {head.out_features} outputs, expected {n_outputs}")
        self._model = (model,)  # a tuple hides it from parameters() and state_dict()
        self.structure, self.head_name = tuple(structure), structure[2]
        self.activation = copy.deepcopy(act)
        self.register_buffer("head_weight", head.weight.detach().clone())
        # u, the input of `linear`: from a trainable copy of the trunk, or the network's own
        self.trunk = (
            NetworkInput(model, structure[0]) if shared_trunk
            else trainable_copy_without(model, structure)
        )  # fmt: skip
        n_in, h = linear.in_features, linear.out_features
        self.n_features, self.n_outputs, self.hidden = n_features, n_outputs, h
        self.head_width = width  # the MLP's width, saved as Surrogate's head_width is
        self.linear = seeded_linear(n_in, h * n_features, generator)
        self.mlp = (
            nn.Sequential(
                seeded_linear(n_in, width, generator),
                nn.ReLU(),
                seeded_linear(width, h * n_features, generator),
            )
            if width
            else None
        )
        self.register_buffer("output_scale", torch.tensor(1.0))
        # the distilled map to H (:meth:`distil`): rank 0 until distilled; fixed shapes, so a
        # state_dict has the same keys and shapes whatever the rank
        n_maps = n_in + width
        self.register_buffer("distilled_rank", torch.tensor(0))
        self._rank = 0
        self.register_buffer("distilled_mean", torch.zeros(h * n_features))
        self.register_buffer("distilled_basis", torch.zeros(h * n_features, DISTIL_MAX_RANK))
        self.register_buffer("distilled_coef", torch.zeros(DISTIL_MAX_RANK, n_maps))
        self.register_buffer("distilled_offset", torch.zeros(DISTIL_MAX_RANK))
        self._whitened_map: tuple | None = None  # (key, mean, basis) of whitened_features
        w = head.weight
        self.to(device=w.device, dtype=compute_dtype(w.dtype))

    def gate(self, phi: Tensor) -> Tensor:
        """``σ'(z)`` (B, h) from the network's penultimate activations ``φ = σ(z)``."""
        return ACTIVATION_GRADIENTS[type(self.activation)](self.activation, phi.detach())

    def hidden_features(self, u: Tensor) -> Tensor:
        """``H`` (B, h, M) from ``u`` (B, n_in): the learned, class-independent part,
        ``linear(u) + mlp(u)`` accumulated into one output (the two biases added once) — or,
        once distilled (:meth:`distil`), its rank-``r`` form ``H̄ + B (A r(u) + a)``."""
        r = self._rank  # a Python int (mirrors the buffer): no data-dependent branch to trace
        if r:
            a = self._distilled_coefficients(u)
            H = torch.addmm(self.distilled_mean, a, self.distilled_basis[:, :r].mT)
        elif self.mlp is None:
            H = self.linear(u)
        else:
            first, act, last = self.mlp
            H = torch.addmm(self.linear.bias + last.bias, u, self.linear.weight.mT)
            H = H.addmm_(act(first(u)), last.weight.mT)
        return H.view(u.shape[0], self.hidden, self.n_features)

    def _distilled_coefficients(self, u: Tensor) -> Tensor:
        """``A r(u) + a`` (B, r): the coordinates of ``vec H − H̄`` in the distilled basis."""
        r = self._rank
        coef, n_in = self.distilled_coef[:r], u.shape[1]
        a = torch.addmm(self.distilled_offset[:r], u, coef[:, :n_in].mT)
        if self.mlp is not None:
            a = a.addmm_(self.mlp[1](self.mlp[0](u)), coef[:, n_in:].mT)
        return a

    @torch.no_grad()
    def whitened_features(self, phi: Tensor, u: Tensor, inv_t: Tensor) -> Tensor:
        """``L⁻¹ g`` (B, M, C) for ``inv_t = L⁻ᵀ`` (M, M), ``g`` the features of
        :meth:`features_from` (no gradient): the whitening of the posterior's predictive variance
        (:meth:`FeaturePosterior.variance <fastlla.posterior.FeaturePosterior.variance>`,
        ``whitened=True``) folded into the distilled map — ``H L⁻ᵀ = H̄ L⁻ᵀ + Σ_r a_r B_r L⁻ᵀ``,
        its mean and basis whitened once per ``inv_t`` and map (cached) — so the whitened
        features cost what ``g`` costs. Needs a distilled map (:meth:`distil`); ``ValueError``
        otherwise."""
        r = self._rank
        if not r:
            raise ValueError("fastlla: whitened features need a distilled map to H (distil)")
        u = u.reshape(u.shape[0], -1).to(self.output_scale.dtype)
        key = (inv_t, self.distilled_basis, self.distilled_basis._version, self.distilled_mean,
               self.distilled_mean._version, r)  # fmt: skip
        cached = self._whitened_map  # a local read first: threads may each fill the cache
        if cached is None or not _same_key(cached[0], key):
            h, M = self.hidden, self.n_features
            basis = self.distilled_basis[:, :r].reshape(h, M, r)
            basis = torch.einsum("jmr,mi->jir", basis, inv_t).reshape(h * M, r)
            mean = (self.distilled_mean.view(h, M) @ inv_t).reshape(h * M)
            cached = self._whitened_map = (key, mean, basis.mT.contiguous())
        _, mean, basis_t = cached
        H = torch.addmm(mean, self._distilled_coefficients(u), basis_t)
        return self._gated(H.view(u.shape[0], self.hidden, self.n_features), phi)

    def _map_inputs(self, u: Tensor) -> Tensor:
        """``r(u) = [u; ReLU(first(u))]`` (B, n_in + width): ``H`` is affine in it."""
        return u if self.mlp is None else torch.cat([u, self.mlp[1](self.mlp[0](u))], dim=1)

    def _map(self) -> tuple[Tensor, Tensor]:
        """``(P, b)`` with ``vec H = P r(u) + b`` for the trained (undistilled) map."""
        if self.mlp is None:
            return self.linear.weight, self.linear.bias
        last = self.mlp[2]
        return torch.cat([self.linear.weight, last.weight], dim=1), self.linear.bias + last.bias

    #: state_dict entries a state saved before distillation existed lacks (it loads undistilled)
    optional_state = ("distilled_rank", "distilled_mean", "distilled_basis", "distilled_coef",
                      "distilled_offset")  # fmt: skip

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        absent = [k for k in self.optional_state if prefix + k not in state_dict]
        rank = state_dict.get(prefix + "distilled_rank")
        if rank is not None and not (
            isinstance(rank, Tensor) and rank.numel() == 1 and 0 <= int(rank) <= DISTIL_MAX_RANK
        ):
            error_msgs.append(f"{prefix}distilled_rank must be an integer in [0, {DISTIL_MAX_RANK}]")
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if absent:
            missing_keys[:] = [k for k in missing_keys if k not in {prefix + a for a in absent}]
            self.undistil()
        self._rank = int(self.distilled_rank)

    @property
    def distilled(self) -> bool:
        """Whether the distilled map to ``H`` is in use (:meth:`distil`)."""
        return self._rank > 0

    def undistil(self) -> None:
        """Back to the trained map to ``H`` (what kernel matching trains)."""
        self.use_rank(0)

    def use_rank(self, r: int) -> None:
        """Use the first ``r`` distilled directions (``0``: the trained map)."""
        self.distilled_rank.fill_(int(r))
        self._rank = int(r)

    @torch.no_grad()
    def distil(self, batches: Any, tolerance: float = DISTIL_TOLERANCE) -> int:
        """Replace the map to ``H`` by its best rank-``r`` form on the inputs ``batches``
        (an iterable of input batches, read until ``DISTIL_MAX_INPUTS`` inputs), for the
        predictive's speed: ``vec H ≈ H̄ + B Bᵀ(P (r(u) − r̄))``, ``B`` the top ``r`` principal
        directions of ``vec H`` over those inputs (``H̄`` its mean). ``r`` is the smallest of
        ``DISTIL_RANKS`` whose learned kernel ``g gᵀ`` over the first ``DISTIL_CHECK_INPUTS``
        inputs differs from the trained one by at most ``tolerance`` times the Frobenius norm
        of the surrogate's whole kernel there (these features and the exact last-layer block
        ``[φ; 1] ⊗ I_C`` of :class:`LastLayerSurrogate`): by the triangle inequality the
        relative kernel error (``ScaLLA.kernel_fidelity``) on those inputs then moves by at
        most about ``tolerance``. Where no rank does, or the inputs are fewer than ``2r``, the
        map is left as trained (rank 0). Returns ``r``.
        """
        self.undistil()
        maps, checks, n = [], [], 0
        model = self._model[0]
        for x in batches:
            phi = penultimate(model, self.head_name, x, bias=False)
            u = call_module(self._trunk_output, x)
            maps.append(self._map_inputs(u).double())
            if n < DISTIL_CHECK_INPUTS:
                checks.append((phi, u))
            n += u.shape[0]
            if n >= DISTIL_MAX_INPUTS:
                break
        if not maps:
            return 0
        R = torch.cat(maps)
        P, b = (t.double() for t in self._map())
        r_bar = R.mean(0)
        # principal directions of vec H = P r + b over the inputs: from the small Gram of Z
        Z = torch.linalg.qr(R - r_bar, mode="r").R @ P.mT  # (≤ n_maps, h·M), ZᵀZ = cov · n
        evals, evecs = torch.linalg.eigh(Z @ Z.mT)
        evals, evecs = evals.flip(0), evecs.flip(1)
        phi, u = (torch.cat(t)[:DISTIL_CHECK_INPUTS] for t in zip(*checks))
        full = self._gated(self.hidden_features(u), phi).double()
        full_gram = full.permute(0, 2, 1).reshape(-1, full.shape[1])
        reference = full_gram.mT @ full_gram
        # the surrogate's whole kernel: these features beside the exact block ψ ⊗ I_C
        psi = phi.reshape(phi.shape[0], -1).double()
        if model.get_submodule(self.head_name).bias is not None:
            psi = torch.cat([psi, psi.new_ones(psi.shape[0], 1)], dim=1)
        whole = (
            reference.square().sum()
            + 2 * torch.einsum("bmc,bd->cmd", full, psi).square().sum()
            + self.n_outputs * (psi.mT @ psi).square().sum()
        ).sqrt()
        dtype = self.distilled_basis.dtype
        for r in DISTIL_RANKS:
            if 2 * r > R.shape[0] or r > Z.shape[0] or evals[r - 1] <= 0:
                break
            basis = (Z.mT @ evecs[:, :r]) / evals[:r].sqrt()  # (h·M, r), orthonormal columns
            coef = basis.mT @ P
            self.distilled_basis[:, :r] = basis.to(dtype)
            self.distilled_coef[:r] = coef.to(dtype)
            self.distilled_offset[:r] = (-(coef @ r_bar)).to(dtype)
            self.distilled_mean.copy_((P @ r_bar + b).to(dtype))
            self.use_rank(r)
            rows = self._gated(self.hidden_features(u), phi).double()
            rows = rows.permute(0, 2, 1).reshape(-1, rows.shape[1])
            ours, cross = rows.mT @ rows, full_gram.mT @ rows
            change2 = reference.square().sum() - 2 * cross.square().sum() + ours.square().sum()
            if change2.clamp_min(0).sqrt() <= tolerance * whole:
                return r
        self.undistil()
        return 0

    def _trunk_output(self, *args: Any, **kwargs: Any) -> Tensor:
        """``u`` (B, n_in): the trunk's output on the inputs, flattened (with
        ``shared_trunk``: the network's own input of the gated layer, no gradient)."""
        if not isinstance(self.trunk, NetworkInput):  # the network's own reads them as given
            args, kwargs = cast_inputs(args, kwargs, self.output_scale.dtype)  # half networks
        u = self.trunk(*args, **kwargs)
        return u.reshape(u.shape[0], -1).to(self.output_scale.dtype)

    def features_from(self, phi: Tensor, u: Tensor) -> Tensor:
        """``g`` (B, M, C) from ``φ`` (B, h) and the trunk's output ``u`` (B, n_in)."""
        u = u.reshape(u.shape[0], -1).to(self.output_scale.dtype)
        return self._gated(self.hidden_features(u), phi)

    def _gated(self, H: Tensor, phi: Tensor) -> Tensor:
        """``g`` (B, M, C) from ``H`` (B, h, M) and ``φ`` (B, h)."""
        gate = self.gate(phi.reshape(H.shape[0], -1)).to(H.dtype) * self.output_scale
        return torch.bmm(gate[:, None, :] * self.head_weight, H).mT

    def features(self, phi: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``g(x)`` (B, M, C) given ``φ(x)`` (B, h), the input of the network's head:
        ``g[m, c] = s Σ_j H[j, m] σ'(z_j) W[c, j]`` (``s`` the output scale), one batched product
        ``(s σ'(z) ⊙ W) H`` (B, C, M) read transposed."""
        return self._gated(self.hidden_features(self._trunk_output(*args, **kwargs)), phi)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        one = len(args) == 1 and isinstance(args[0], Tensor) and not kwargs
        x = args[0] if one else (kwargs or args)
        phi = penultimate(self._model[0], self.head_name, x, bias=False)
        return self.features(phi, *args, **kwargs)

    def check(self, x: Any) -> bool:
        """Whether, on the batch ``x``, the network's head reads the activation's output and the
        activation reads the gated layer's output — the structure the features assume
        (:func:`~fastlla.network_head.gated_structure_runs`)."""
        return gated_structure_runs(self._model[0], self.structure, x)


class ResidualHead(nn.Module):
    """``R(x) ∈ R^{C×C}`` with ``R Rᵀ ≈ κ(x, x) − g(x)ᵀg(x)``: the NTK's diagonal block the
    surrogate's features miss, for the residual prior variance ``R Rᵀ/δ`` (FITC-style).

    A small MLP on the network's own penultimate features ``[φ(x); 1]``: the input of its
    ``nn.Linear`` ``head_name`` (:func:`penultimate`; default: the last registered one), the
    verified output layer of :func:`find_head` (``output_layer=True``) or, where there is none,
    its ``feature_layer`` (``output_layer=False``: an exported predictor then reads that input
    with :class:`InputOf` rather than from the network with the layer removed; ``n_inputs``:
    the number of values of that input per example, flattened, when it is not ``(B, h)``).
    Trained beside the surrogate from the same JVPs: the per-input target ``(1/S) Σ_s z_s z_sᵀ − g gᵀ`` is unbiased for the residual block, so the
    squared error's gradient is unbiased too. Initial weights from
    ``generator`` (global RNG if ``None``).
    """

    def __init__(
        self, model: nn.Module, n_outputs: int, hidden: int = 128,
        generator: torch.Generator | None = None, head_name: str | None = None,
        output_layer: bool = True, pooled: bool = False, n_inputs: int | None = None,
    ):  # fmt: skip
        super().__init__()
        self.pooled = bool(pooled)
        name = head_name if head_name is not None else last_linear(model)[0]
        linear = model.get_submodule(name)
        self.output_layer = bool(output_layer)  # whether `name` gives the network's output
        self._model = (model,)
        self.head_name = name
        self.has_bias = linear.bias is not None
        width = (linear.in_features if n_inputs is None else int(n_inputs)) + int(self.has_bias)
        self.n_outputs = n_outputs
        self.net = nn.Sequential(
            seeded_linear(width, hidden, generator),
            nn.ReLU(),
            seeded_linear(hidden, n_outputs * n_outputs, generator),
        )
        self.register_buffer("output_scale", torch.tensor(1.0))
        w = linear.weight
        self.to(device=w.device, dtype=compute_dtype(w.dtype))

    def forward(self, x: Any, psi: Tensor | None = None) -> Tensor:
        """The factor ``R(x)`` (B, C, C)."""
        if psi is None:
            psi = penultimate(self._model[0], self.head_name, x, self.has_bias, self.pooled)
        C = self.n_outputs
        return self.net(psi.to(self.output_scale.dtype)).view(-1, C, C) * self.output_scale


def trainable_copy_without(model: nn.Module, names: Any) -> nn.Module:
    """A copy of ``model`` (warm start, every parameter trainable) with the modules ``names``
    replaced by the identity."""
    trunk = copy.deepcopy(model)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        setattr(trunk.get_submodule(parent_name) if parent_name else trunk, attr, nn.Identity())
    for p in trunk.parameters():
        p.requires_grad_(True)
    return trunk


def default_surrogate(
    model: nn.Module, n_features: int, n_outputs: int, n_params: int, head_width: int = 0,
    generator: torch.Generator | None = None, head: NetworkHead | None = None,
    shared_trunk: bool = False,
) -> Surrogate:
    """The trunk of ``model`` (copied, trainable; with ``shared_trunk`` the network's own, not
    trained: :class:`NetworkInput`) plus a head to ``n_features × n_outputs`` (linear, or with
    one hidden layer of ``head_width`` units), initialised from ``generator`` (the global RNG
    when ``None``).

    ``head`` (:func:`find_head`; default :meth:`NetworkHead.registered`): with a verified output
    layer the trunk is the network with that layer replaced by the identity; without one, the
    fallback: the input of its ``feature_layer`` in a trainable copy of the whole network
    (:class:`InputOf`). Raises ``ValueError`` when there is neither.
    """
    if n_features < 1:
        raise ValueError(f"fastlla: n_features must be at least 1, got {n_features}")
    head = head or NetworkHead.registered(model)
    if head.output_layer == "" or (head.output_layer is None and not head.feature_layer):
        raise ValueError(
            "fastlla: cannot build a default surrogate for this model ("
            + (head.reason or "it is a single nn.Linear")
            + "); pass surrogate=<nn.Module returning (B, M, C)>"
        )
    if shared_trunk and (head.output_layer is None or head.pooled):
        raise ValueError(
            "fastlla: shared_trunk needs a verified output layer that is not pooled"
        )
    if shared_trunk:
        trunk = NetworkInput(model, head.output_layer)
        width = model.get_submodule(head.output_layer).in_features
    elif head.output_layer is not None:
        trunk = trainable_copy_without(model, [head.output_layer])
        width = model.get_submodule(head.output_layer).in_features
    else:
        trunk = InputOf(trainable_copy_without(model, []), head.feature_layer)
        width = head.feature_width
    surrogate = Surrogate(trunk, width, n_features, n_outputs, head_width, generator)
    p0 = next(model.parameters())
    surrogate = surrogate.to(device=p0.device, dtype=compute_dtype(p0.dtype)).eval()
    surrogate.output_scale.fill_(math.sqrt(n_params / n_features))
    return surrogate


def default_surrogate_size(
    model: nn.Module, head: NetworkHead, n_features: int, n_outputs: int, head_width: int,
    gated: bool = False,
) -> int:
    """The number of parameters :func:`default_surrogate` (or, ``gated``, the
    :class:`GatedSurrogate` of :func:`last_layer_surrogate`) would have, without building it."""
    own = {id(p): p.numel() for p in model.parameters()}
    if gated:
        dropped = head.gate
    else:
        dropped = (head.output_layer,) if head.output_layer is not None else ()
    for name in dropped:
        for p in model.get_submodule(name).parameters():
            own.pop(id(p), None)
    trunk = sum(own.values())
    if gated:
        linear = model.get_submodule(head.gate[0])
        n_in, h = linear.in_features, linear.out_features
        mlp = (n_in + 1) * head_width + (head_width + 1) * h * n_features if head_width else 0
        return trunk + (n_in + 1) * h * n_features + mlp
    width = (
        model.get_submodule(head.output_layer).in_features
        if head.output_layer is not None else head.feature_width
    )  # fmt: skip
    out = n_features * n_outputs
    if head_width == 0:
        return trunk + (width + 1) * out
    return trunk + (width + 1) * head_width + (head_width + 1) * out


def last_layer_surrogate(
    model: nn.Module, n_features: int, n_outputs: int, n_params: int, rank: int | None = None,
    head_width: int = 0, gated: bool = False, generator: torch.Generator | None = None,
    head: NetworkHead | None = None, shared_trunk: bool = False,
) -> LastLayerSurrogate:
    """:func:`default_surrogate` (or, with ``gated``, a :class:`GatedSurrogate` with an MLP of
    ``head_width`` units; either reads the network's own trunk with ``shared_trunk``) for the
    learned features plus the exact last-layer block of the verified output layer of ``head``
    (:func:`find_head`; default :meth:`NetworkHead.registered`); new weights drawn from
    ``generator`` (the global RNG when ``None``)."""
    head = head or NetworkHead.registered(model)
    if head.output_layer is None:
        raise ValueError(
            f"fastlla: the exact last-layer block needs an output layer: {head.reason}; pass "
            "last_layer=False"
        )
    name = head.output_layer
    linear = model.get_submodule(name)
    trainable = linear.weight.requires_grad and (linear.bias is None or linear.bias.requires_grad)
    if not trainable:
        raise ValueError(
            "fastlla: the exact last-layer block needs the last nn.Linear's parameters to be "
            "trainable (requires_grad); pass last_layer=False"
        )
    if gated and rank is not None:
        raise ValueError("fastlla: a gated surrogate needs the full exact last-layer block (rank None)")
    if gated:
        learned = GatedSurrogate(
            model, n_features, n_outputs, head_width, structure=head.gate, generator=generator,
            shared_trunk=shared_trunk,
        )
        learned.output_scale.fill_(math.sqrt(n_params / n_features))
    else:
        learned = default_surrogate(
            model, n_features, n_outputs, n_params, head_width, generator, head, shared_trunk
        )
    out = LastLayerSurrogate(learned, model, name, rank, pooled=head.pooled)
    return out.to(device=linear.weight.device, dtype=compute_dtype(linear.weight.dtype)).eval()


def check_surrogate_output(
    out: Any, x: Any, n_outputs: int, n_features: int | None = None, finite: bool = True
) -> Tensor:
    """Validate that a surrogate returned ``(B, M, C)`` (finite, unless ``finite=False``: a
    caller that checks what it computes from them instead) values for the batch ``x``."""
    B = batch_size(x)
    if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[0] != B or out.shape[2] != n_outputs:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"fastlla: the surrogate must return (B, M, C) = ({B}, M, {n_outputs}), got {shape}"
        )
    if n_features is not None and out.shape[1] != n_features:
        raise ValueError(
            f"fastlla: the surrogate returned M = {out.shape[1]} features, expected {n_features}"
        )
    if finite and not torch.isfinite(out).all():
        raise ValueError("fastlla: the surrogate's output contains NaN or Inf")
    return out


def surrogate_features(surrogate: nn.Module, x: Any) -> Tensor:
    """``g(x)`` through the input convention of :func:`fastlla.functional.call_module`."""
    return call_module(surrogate, x)
