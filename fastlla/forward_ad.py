"""Forward-mode AD (JVPs) through standard layers: the kernels it needs, and clear errors.

Some of PyTorch's fused kernels have no forward-mode derivative: the fast path of
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (``_transformer_encoder_layer_fwd``,
``_native_multi_head_attention``), the fused kernels of ``F.scaled_dot_product_attention``
(flash, memory-efficient, cuDNN) and the oneDNN / cuDNN RNN kernels (``mkldnn_rnn_layer``,
``_cudnn_rnn``). Each has an equivalent composite implementation that does.
:func:`forward_ad_kernels` selects those for the duration of a JVP, and
:func:`explain_forward_ad_error` turns the error of an operation that still has no forward-mode
derivative into one that names it, the module it ran in and what to do.

The switches are process-global in PyTorch. The context counts its users under a lock: the
first one in sets them, the last one out restores what it found, so nested and concurrent
users never restore them under each other. Other threads running a network at that moment also
get the composite kernels — numerically equivalent, possibly slower (oneDNN / cuDNN stay on
unless the network has an RNN).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["forward_ad_kernels", "has_rnn", "unsupported_op", "explain_forward_ad_error"]

# SDPA backends other than math, as torch._C names them (those this torch build knows).
_SDPA_FUSED = [
    n
    for n in ("flash", "mem_efficient", "cudnn", "overrideable", "fa3")
    if hasattr(torch._C, f"_get_{n}_sdp_enabled") and hasattr(torch._C, f"_set_sdp_use_{n}")
]

_lock = threading.Lock()
_users = {"attention": 0, "rnn": 0}
_saved: dict[str, Any] = {}


def _get_attention() -> tuple:
    return (
        torch.backends.mha.get_fastpath_enabled(),
        torch._C._get_math_sdp_enabled(),
        tuple(getattr(torch._C, f"_get_{n}_sdp_enabled")() for n in _SDPA_FUSED),
    )


def _set_attention(state: tuple) -> None:
    fastpath, math_sdp, fused = state
    torch.backends.mha.set_fastpath_enabled(fastpath)
    torch._C._set_sdp_use_math(math_sdp)
    for n, on in zip(_SDPA_FUSED, fused):
        getattr(torch._C, f"_set_sdp_use_{n}")(on)


def _get_rnn() -> tuple:
    return torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_enabled()


def _set_rnn(state: tuple) -> None:
    torch._C._set_mkldnn_enabled(state[0])
    torch._C._set_cudnn_enabled(state[1])


_GROUPS = {
    # MHA/Transformer fast path off; SDPA: math only.
    "attention": (_get_attention, _set_attention, (False, True, (False,) * len(_SDPA_FUSED))),
    # oneDNN (CPU) and cuDNN (GPU) off: their RNN kernels have no forward AD; convolutions keep
    # working through the native kernels (slower), so this group is used for RNNs only.
    "rnn": (_get_rnn, _set_rnn, (False, False)),
}


def has_rnn(module: nn.Module) -> bool:
    """Whether ``module`` contains an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``."""
    return any(isinstance(m, nn.RNNBase) for m in module.modules())


@contextlib.contextmanager
def forward_ad_kernels(rnn: bool = True) -> Iterator[None]:
    """Run the enclosed forward-mode AD with kernels that support it; restore the flags after.

    Inside, the ``nn.MultiheadAttention`` / ``nn.Transformer*`` fast path is off and
    ``F.scaled_dot_product_attention`` uses its math backend only; with ``rnn`` (default) oneDNN
    and cuDNN are off too (their RNN kernels lack forward AD, but turning them off also slows
    convolutions, so pass ``rnn=has_rnn(model)``). The results are the same up to rounding.

    Re-entrant and thread-safe: the first user in sets the flags, the last one out restores the
    values it found. While any thread is inside, every thread of the process sees these flags.
    """
    groups = ["attention", "rnn"] if rnn else ["attention"]
    with _lock:
        for g in groups:
            if _users[g] == 0:
                get, put, wanted = _GROUPS[g]
                _saved[g] = get()
                put(wanted)
            _users[g] += 1
    try:
        yield
    finally:
        with _lock:
            for g in groups:
                _users[g] -= 1
                if _users[g] == 0:
                    _GROUPS[g][1](_saved.pop(g))


_PATTERNS = (
    (re.compile(r"forward AD with (\S+?) that does not support it"), None),
    (re.compile(r"jvp function for custom autograd\.Function"), "a custom autograd.Function"),
    (re.compile(r"autograd\.Function with functorch transforms"), "a custom autograd.Function"),
)


def unsupported_op(err: BaseException) -> str | None:
    """The operation named by a "no forward-mode derivative" error, or ``None`` for other errors."""
    if not isinstance(err, RuntimeError):  # NotImplementedError is a RuntimeError
        return None
    text = str(err)
    for pattern, name in _PATTERNS:
        m = pattern.search(text)
        if m:
            return name or m.group(1)
    return None


def explain_forward_ad_error(
    err: BaseException, model: nn.Module, rerun: Callable[[], Any] | None = None
) -> NotImplementedError | None:
    """A clear error for ``err`` if it says an operation has no forward-mode derivative.

    ``rerun`` (optional) repeats a small JVP that fails the same way; it runs once with
    temporary forward hooks on ``model``'s submodules to find the innermost module the failing
    operation ran in (the hooks are removed before returning). Returns ``None`` for any other
    error, which the caller then re-raises unchanged.
    """
    op = unsupported_op(err)
    if op is None:
        return None
    where = _locate(model, rerun) if rerun is not None else None
    place = f" in module '{where[0]}' ({where[1]})" if where else ""
    return NotImplementedError(
        f"fastlla: PyTorch has no forward-mode derivative (JVP) for {op}{place}, so ScaLLA "
        "cannot compute its training targets through this network (fastlla already switches "
        "to the math attention kernels and, for RNNs, off oneDNN/cuDNN while it takes JVPs). "
        "Use fastlla.ExactLLA (reverse mode only) for this network, or build that layer from "
        f"operations with forward-mode AD, and please report it. PyTorch said: {err}"
    )


def _locate(model: nn.Module, rerun: Callable[[], Any]) -> tuple[str, str] | None:
    """(name, type) of the innermost module running when ``rerun`` fails, or ``None``."""
    stack: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    handles = []

    def enter(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append((name or "<model>", type(module).__name__))

        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
        try:
            rerun()
        except RuntimeError as err:
            if unsupported_op(err) is not None and stack:
                failed.append(stack[-1])
    finally:
        for h in handles:
            h.remove()
    return failed[0] if failed else None
