"""Another C++ extension calls fastlla ops through the dispatcher, without linking against fastlla.

``tests/cpp_caller/caller.cpp`` is built with ``torch.utils.cpp_extension.load`` (cached under
``build/cpp_caller`` of the repository, so only the first run pays the compile) and defines
``torch.ops.fastlla_caller.*`` ops that forward to ``fastlla::kernel_matching_loss`` (looked up
with ``findSchemaOrThrow``) and ``fastlla::predictive_covariance`` (through ``csrc/fastlla.h``).
Dispatcher lookup works whichever backend registered the ops — the compiled library, or the
Python definitions under ``FASTLLA_DISABLE_NATIVE=1`` — so the test runs in both modes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fastlla import _ops, reference

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def caller():
    from torch.utils import cpp_extension

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the caller extension")
    version = torch.__version__.replace("+", "_").replace(".", "_")
    build = ROOT / "build" / f"cpp_caller_{version}"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="fastlla_cpp_caller",
        sources=[str(HERE / "cpp_caller" / "caller.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O1"],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.fastlla_caller


def test_ops_are_found_by_name(caller):
    assert caller.has_op("kernel_matching_loss")
    assert caller.has_op("predictive_covariance")
    assert not caller.has_op("no_such_op")


@pytest.mark.parametrize("n_train", [12, 7])
def test_loss_through_the_dispatcher(caller, n_train):
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(12, 3, generator=g, dtype=torch.float64)
    got = caller.loss(phi, z, n_train)
    (grad_got,) = torch.autograd.grad(got, phi)  # fastlla's autograd formula, called from C++
    want = _ops.kernel_matching_loss(phi, z, n_train)
    (grad_want,) = torch.autograd.grad(want, phi)
    assert torch.equal(got, want) and torch.equal(grad_got, grad_want)
    oracle = reference.kernel_matching_loss(phi.detach(), z, n_train)
    assert torch.allclose(got.detach(), oracle, rtol=1e-12)


def test_covariance_through_the_public_header(caller):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6, 6, generator=g)
    L = torch.linalg.cholesky(A @ A.mT + 6 * torch.eye(6))
    phi = torch.randn(4, 6, 3, generator=g)
    got = caller.covariance(L, phi)
    assert torch.equal(got, _ops.predictive_covariance(L, phi))
    assert torch.allclose(got, reference.predictive_covariance(L, phi), rtol=1e-5, atol=1e-6)


def test_errors_cross_the_extension_boundary(caller):
    phi = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="fastlla::kernel_matching_loss"):
        caller.loss(phi, torch.randn(5, 2), 6)
    with pytest.raises(RuntimeError, match="fastlla::predictive_covariance"):
        caller.covariance(torch.eye(3), torch.randn(2, 4, 3))
