"""Shared fixtures and helpers of the op tests: devices, dtypes, tolerances, inputs.

Tests take ``device`` and ``dtype`` as fixtures (``cpu``, plus ``cuda`` when a GPU is present;
float32 and float64), so every op is checked on every backend the machine has.

How tolerances are chosen
-------------------------
Two computations of one quantity by different paths (a kernel against its reference, a
factorisation against an explicit inverse, BLAS with and without AVX-512) agree only up to
rounding, and rounding depends on the CPU, the BLAS build and the summation order. So:

* Exact equality (``rtol=0, atol=0``, ``torch.equal``) only where the *same* computation is
  repeated: determinism, thread safety, a value that must be left untouched, a documented alias.
* Otherwise the tolerance is ``eps_tolerance(dtype, n, cond)`` = ``safety · n · cond · ε`` with
  ``ε`` the dtype's machine epsilon, ``n`` the length of the longest accumulation (or the matrix
  order of a factorisation) and ``cond`` the condition number of the problem (1 for
  products and sums of non-negative terms); ``atol`` is that same relative tolerance times the
  largest entry of the expected value (``assert_close`` does this), never 0.
* ``tolerance(dtype)`` is the fixed shorthand for results of a few hundred accumulated products.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import fastlla._ops as ops

__all__ = [
    "single_thread",
    "DEVICES",
    "DTYPES",
    "NATIVE",
    "device",
    "dtype",
    "tolerance",
    "eps_tolerance",
    "assert_close",
    "strided",
    "random_factor",
    "make",
    "TwoInput",
    "take",
    "n_inputs",
    "call_model",
    "oracle_jacobian",
]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]
NATIVE = ops.NATIVE_LOADED


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for results of a few hundred accumulated products."""
    return 2e-4 if dtype == torch.float32 else 1e-10


def single_thread():
    """Fixture body: one intra-op torch thread for the test, the caller's count restored after
    (serial and threaded calls then run the same kernels; small models train faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def eps_tolerance(dtype: torch.dtype, n: int = 1, cond: float = 1.0, safety: float = 8.0) -> float:
    """Relative tolerance ``safety · n · cond · ε(dtype)`` for two paths to one quantity: ``n``
    accumulated terms (or the order of a factorised matrix), condition number ``cond``."""
    return safety * max(n, 1) * max(cond, 1.0) * torch.finfo(dtype).eps


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Equal up to the dtype's tolerance, relative to the largest entry of ``expected``."""
    rtol = tolerance(dtype) * scale
    atol = rtol * max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-30)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol)


def strided(t: Tensor) -> Tensor:
    """A non-contiguous tensor equal to ``t`` (every other element of a wider buffer)."""
    if t.dim() == 0:
        return t
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    view = buf[..., 1::2]
    view.copy_(t)
    assert t.numel() == 0 or t.shape[-1] <= 1 or not view.is_contiguous()
    return view


def make(*shape: int, dtype: torch.dtype, device: str, seed: int = 0, scale: float = 1.0) -> Tensor:
    """Reproducible standard-normal input (generated on the CPU, then moved)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)


def random_factor(m: int, dtype: torch.dtype, device: str, seed: int = 0) -> Tensor:
    """Lower Cholesky factor of a well-conditioned SPD ``m × m`` matrix (A = XXᵀ/m + I)."""
    x = make(m, m, dtype=torch.float64, device="cpu", seed=seed)
    a = x @ x.T / max(m, 1) + torch.eye(m, dtype=torch.float64)
    return torch.linalg.cholesky(a).to(device, dtype)


class TwoInput(nn.Module):
    """A forward taking two tensors (positional from a tuple, keyword from a dict)."""

    def __init__(self, n_out: int = 3):
        super().__init__()
        self.la = nn.Linear(3, 4)
        self.lb = nn.Linear(2, 4, bias=False)
        self.head = nn.Linear(4, n_out)

    def forward(self, a, b):
        return self.head(torch.tanh(self.la(a) + self.lb(b)))


# Oracle helpers, deliberately independent of fastlla.functional: input i of a batch (tensor,
# tuple or dict) and the number of inputs.
def take(x, i):
    if isinstance(x, torch.Tensor):
        return x[i : i + 1]
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return tuple(v[i : i + 1] for v in x)


def n_inputs(x):
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    return next(iter(x.values() if isinstance(x, dict) else x)).shape[0]


def call_model(model, x):
    """``model(x)``, ``model(**x)`` or ``model(*x)`` for a tensor, dict or tuple batch."""
    if isinstance(x, torch.Tensor):
        return model(x)
    return model(**x) if isinstance(x, dict) else model(*x)


def oracle_jacobian(model, x) -> Tensor:
    """(N, C, P): one ``autograd.grad`` call per input and output, over the trainable parameters
    in the model's own order — the independent oracle of every Jacobian and JVP test."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(n_inputs(x)):
        with torch.enable_grad():
            out = call_model(model, take(x, i)).reshape(-1)
            per_output = []
            for c in range(out.numel()):
                grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
                flat = [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
                per_output.append(torch.cat(flat))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)
