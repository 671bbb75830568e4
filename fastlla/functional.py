"""A pre-trained network as a function of its trainable parameters.

:class:`NetworkFunction` wraps an ``nn.Module`` so that its output can be differentiated with
respect to the parameters that count for the Laplace approximation — those with
``requires_grad=True``, as in laplace-torch — while frozen parameters and buffers (BatchNorm
running statistics, in eval mode) stay constant. Inputs may be a tensor, a tuple of tensors
(passed as positional arguments) or a dict of tensors (passed as keyword arguments; the
estimators pass a dict as the one argument of a ``forward(self, data)``, laplace-torch's
convention, as the tuple ``(x,)``: :func:`takes_mapping`).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

from .forward_ad import explain_forward_ad_error, forward_ad_kernels, has_rnn

__all__ = ["NetworkFunction", "compute_dtype", "cast_inputs", "call_module", "batch_size", "slice_batch", "concat_batches", "to_device", "check_finite", "eval_standin"]

Inputs = Any  # Tensor | tuple[Tensor, ...] | Mapping[str, Tensor]


def _nested(x: Any) -> bool:
    return isinstance(x, (Mapping, tuple, list))


def _map_batch(fn: Any, x: Any) -> Any:
    """``fn`` applied to every tensor of a (nested) batch, the structure kept."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: _map_batch(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map_batch(fn, v) for v in x)
    return x


def _tensors(x: Any) -> Iterator[Tensor]:
    """The tensors of a (nested) batch, in order."""
    if isinstance(x, Tensor):
        yield x
    elif _nested(x):
        for v in x.values() if isinstance(x, Mapping) else x:
            yield from _tensors(v)


def batch_size(x: Inputs) -> int:
    """Number of inputs in a batch (the leading size of its first tensor)."""
    for v in _tensors(x):
        return v.shape[0]
    raise TypeError("fastlla: an input batch must contain at least one tensor")


def slice_batch(x: Inputs, start: int, stop: int) -> Inputs:
    """Inputs ``start:stop`` of a batch (every tensor sliced along its leading dimension)."""
    return _map_batch(lambda t: t[start:stop], x)


def concat_batches(a: Inputs, b: Inputs) -> Inputs:
    """Two batches of the same structure joined along the leading dimension."""
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, Mapping):
        return {k: concat_batches(v, b[k]) if _nested(v) or isinstance(v, Tensor) else v
                for k, v in a.items()}  # fmt: skip
    return type(a)(concat_batches(u, v) if _nested(u) or isinstance(u, Tensor) else u
                   for u, v in zip(a, b))  # fmt: skip


def to_device(x: Inputs, device: torch.device, dtype: torch.dtype | None = None) -> Inputs:
    """Move every tensor of a batch to ``device`` (floating tensors also to ``dtype``)."""

    def move(t):
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return _map_batch(move, x)


#: Network dtypes whose outputs, Jacobians and linear algebra fastlla computes in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of fastlla's features and linear algebra for a network of ``dtype``: float32
    for float16/bfloat16 networks (which still run in their own dtype), else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def cast_inputs(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with their floating tensors (also inside tuples, lists and dicts)
    in ``dtype``: how a float32 surrogate reads the inputs of a half-precision network."""

    def cast(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v
        if isinstance(v, Mapping):
            return {k: cast(u) for k, u in v.items()}
        if isinstance(v, (tuple, list)):
            return type(v)(cast(u) for u in v)
        return v

    return cast(args), cast(kwargs)


def check_finite(name: str, x: Inputs) -> None:
    """Raise ``ValueError`` if any floating tensor of ``x`` holds NaN or Inf."""
    for v in _tensors(x):
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"fastlla: {name} contains NaN or Inf values")


def takes_mapping(module: nn.Module, x: Mapping) -> bool:
    """Whether ``module``'s forward takes the dict batch ``x`` as its one argument
    (laplace-torch's convention, ``forward(self, data)``) rather than as keyword arguments
    (``forward(self, input_ids, ...)``): decided by binding ``x`` to the forward's signature —
    as keywords first; as one positional argument where only that binds. The estimators then
    pass such a batch as the one-element tuple ``(x,)``."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(**x)
        return False
    except TypeError:
        pass
    try:
        signature.bind(x)
        return True
    except TypeError:
        return False


def call_module(module: Any, x: Inputs) -> Any:
    """``module(x)``, ``module(*x)`` or ``module(**x)`` for a tensor, tuple or dict batch."""
    if isinstance(x, Tensor):
        return module(x)
    if isinstance(x, Mapping):
        return module(**x)
    return module(*x)


def _call(module: nn.Module, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
    module = _private_copy(module)
    if isinstance(x, Tensor):
        return functional_call(module, params, (x,))
    if isinstance(x, Mapping):
        return functional_call(module, params, (), dict(x))
    return functional_call(module, params, tuple(x))


def _outputs(out: Any) -> Tensor:
    """``out`` if the model returned a tensor; else a ``TypeError`` saying what to return."""
    if isinstance(out, Tensor):
        return out
    hint = (
        " (Hugging Face models return a ModelOutput: wrap the model in a module whose forward "
        "returns `model(**batch).logits`)"
        if hasattr(out, "logits")
        else ""
    )
    raise TypeError(
        f"fastlla: the model must return a tensor of outputs (B, C), got {type(out).__name__}; "
        f"wrap it in a module that returns the outputs (logits for classification){hint}"
    )


def _private_copy(module: nn.Module) -> nn.Module:
    """``module``'s tree rebuilt from new module objects that hold the same tensors, every one
    in eval mode (the user's modules keep their own ``training`` flags).

    ``functional_call`` swaps the tensors it is given into the module it runs for the length of
    the call; on the user's module every other thread running it meanwhile would compute with
    them (and with the transforms' wrapped tensors). Each call swaps them into its own copy: only
    the per-module dicts are new (a module registered twice stays one object, so tied weights
    stay tied); tensors, hooks and other attributes are shared. Eval mode: fastlla's
    linearisation is of the network as it predicts, so a network left in train mode by its user
    neither updates its BatchNorm running statistics nor draws dropout masks (from the global
    RNG) when fastlla runs it.
    """
    copies: dict[int, nn.Module] = {}

    def copy_of(m: nn.Module) -> nn.Module:
        if id(m) not in copies:
            clone = copies[id(m)] = object.__new__(type(m))
            clone.__dict__.update(m.__dict__)
            clone.__dict__["training"] = False
            clone.__dict__["_parameters"] = type(m._parameters)(m._parameters)
            clone.__dict__["_buffers"] = type(m._buffers)(m._buffers)
            clone.__dict__["_modules"] = type(m._modules)(
                (k, None if c is None else copy_of(c)) for k, c in m._modules.items()
            )
        return copies[id(m)]

    return copy_of(module)


def eval_standin(module: nn.Module) -> nn.Module:
    """``module`` itself when it and all its submodules are in eval mode, else a stand-in that
    runs in eval mode (:func:`_private_copy`): how fastlla runs the user's network, which it
    never changes — not its ``training`` flags, not its buffers (BatchNorm's running
    statistics), and it draws no dropout masks from the global RNG."""
    if not any(m.training for m in module.modules()):
        return module
    return _private_copy(module)


#: PyTorch's forward-mode AD level is process-global (``torch.autograd.forward_ad``): JVPs of two
#: threads at once fail ("no level exists"), so fastlla runs its JVPs one at a time.
_FORWARD_AD_LOCK = threading.RLock()


class NetworkFunction:
    """``f(x; θ)`` as a pure function of the trainable parameters ``θ`` of ``model``.

    Parameters
    ----------
    model : the pre-trained network; its output must be ``(B, C)`` (or ``(B,)`` for one
        output, treated as ``C = 1``). It is put in eval mode by the estimators.
    names : optional subset of the trainable parameters' names (the others are held fixed,
        like frozen ones); default: every parameter with ``requires_grad=True``.
    """

    def __init__(self, model: nn.Module, names: list[str] | None = None):
        self.model = model
        named = list(model.named_parameters())
        trainable = [n for n, p in named if p.requires_grad]
        if names is not None:
            unknown = [n for n in names if n not in trainable]
            if unknown:
                raise ValueError(f"fastlla: {unknown} are not trainable parameters of the model")
            trainable = [n for n in trainable if n in set(names)]  # the model's own order
        self.names = trainable
        if not self.names:
            raise ValueError(
                "fastlla: the model has no trainable parameters (requires_grad=True); "
                "the Laplace approximation needs at least one"
            )
        chosen = set(self.names)
        self.frozen = {n: p.detach() for n, p in named if n not in chosen}
        self.shapes = [p.shape for n, p in named if n in chosen]
        self.numels = [p.numel() for n, p in named if n in chosen]
        self.n_params = sum(self.numels)
        first = next(p for n, p in named if n in chosen)
        #: outputs, JVPs and Jacobians come in this dtype (float32 for a half-precision network)
        self.out_dtype = compute_dtype(first.dtype)
        self._has_rnn = has_rnn(model)  # JVPs then need oneDNN/cuDNN off (forward_ad_kernels)

    # ------------------------------------------------------------------ parameters
    def params(self) -> dict[str, Tensor]:
        """The current trainable parameters, detached."""
        current = dict(self.model.named_parameters())
        return {n: current[n].detach() for n in self.names}

    def flat_params(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.params().values()])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``flat`` (``(..., P)``) into per-parameter views of shape ``(..., *shape)``."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.numels, dim=-1)
        return {n: t.reshape(*lead, *s) for n, t, s in zip(self.names, pieces, self.shapes)}

    # ------------------------------------------------------------------ evaluation
    def __call__(self, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
        """``f(x; params)`` as ``(B, C)``."""
        buffers = dict(self.model.named_buffers())
        out = _outputs(_call(self.model, {**buffers, **self.frozen, **params}, x)).to(self.out_dtype)
        return out.unsqueeze(-1) if out.dim() == 1 else out

    def output(self, x: Inputs) -> Tensor:
        """``f(x; θ*)`` as ``(B, C)``, no grad: the module itself runs (the same parameters as
        ``self(self.params(), x)``, without ``functional_call``'s re-binding cost)."""
        with torch.no_grad():
            out = _outputs(call_module(eval_standin(self.model), x))
        if out.is_floating_point():
            out = out.to(self.out_dtype)
        return out.unsqueeze(-1) if out.dim() == 1 else out

    def jvp(self, x: Inputs, tangents: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Batched Jacobian–vector products.

        ``tangents`` maps each parameter name to ``(S, *shape)``. Returns the output ``f(x)``
        (``(B, C)``) and ``z[s] = J(x) v_s`` stacked as ``(S, B, C)``; ``vmap`` batches the ``S``
        forward-mode passes into one. Runs under :func:`fastlla.forward_ad.forward_ad_kernels`
        (kernels with forward-mode AD; the global flags are restored after). Raises
        ``NotImplementedError`` naming the operation and module when a layer has no
        forward-mode derivative.
        """
        params = self.params()
        tangents = {n: t.to(params[n].dtype) for n, t in tangents.items()}  # half networks

        def one(t):
            return jvp(lambda p: self(p, x), (params,), (t,))

        with _FORWARD_AD_LOCK, forward_ad_kernels(rnn=self._has_rnn):
            try:
                out, z = vmap(one, out_dims=(None, 0))(dict(tangents))
            except RuntimeError as err:
                # Diagnose on one input and one tangent (hooks only now, never on the hot path).
                x1 = slice_batch(x, 0, 1)
                t1 = {n: t[0] for n, t in tangents.items()}
                rerun = lambda: jvp(lambda p: self(p, x1), (params,), (t1,))  # noqa: E731
                clear = explain_forward_ad_error(err, self.model, rerun)
                if clear is None:
                    raise
                raise clear from err
        return out, z

    def jacobian(self, x: Inputs) -> Tensor:
        """Full Jacobian ``J(x)`` of shape ``(B, C, P)`` (reverse mode; small models only)."""
        params = self.params()
        jac = jacrev(lambda p: self(p, x))(params)  # name -> (B, C, *shape)
        B, C = next(iter(jac.values())).shape[:2]
        return torch.cat([jac[n].reshape(B, C, -1) for n in self.names], dim=-1).to(self.out_dtype)
