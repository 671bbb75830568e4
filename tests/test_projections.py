"""Random tangents and batched JVPs against an autograd Jacobian oracle.

``J`` is built row by row with ``torch.autograd.grad`` (float64); each tangent returned by the
sampler is flattened here, in the model's own parameter order, and ``J @ v`` is the oracle for
the sampler's JVP. The Monte-Carlo Gram ``mean_s z zᵀ`` is checked against ``J Jᵀ`` with a
tolerance derived from the per-entry sample variance of the estimator.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastlla.functional import NetworkFunction
from testing import TwoInput, call_model, eps_tolerance, n_inputs, oracle_jacobian
from fastlla.projections import ProjectionSampler, stack_rows

DT = torch.float64

# torch's forward-mode AD scripts its JVP decompositions on first use (a torch-internal warning).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class MLP(nn.Module):
    def __init__(self, n_out=3):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, n_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class FrozenBN(nn.Module):
    def __init__(self, n_out=3):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, n_out)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(4))
            self.bn.running_var.copy_(torch.rand(4) + 0.5)
            self.bn.weight.copy_(1.0 + 0.3 * torch.randn(4))
        self.fc2.bias.requires_grad_(False)  # frozen: the last parameter
        self.fc1.weight.requires_grad_(False)  # frozen: the first parameter

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def make(kind, input_kind="tensor", n=4, seed=0):
    torch.manual_seed(seed)
    model = {"mlp": MLP, "frozen_bn": FrozenBN, "two_input": TwoInput}[kind]().to(DT).eval()
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(n, 3, generator=g, dtype=DT)
    if kind != "two_input":
        return model, a
    b = torch.randn(n, 2, generator=g, dtype=DT)
    return model, ((a, b) if input_kind == "tuple" else {"a": a, "b": b})


def trainable_named(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flatten_tangents(model, tangents):
    """(S, P) in the model's own trainable-parameter order (independent of fastlla's)."""
    named = trainable_named(model)
    assert set(tangents) == {n for n, _ in named}
    S = next(iter(tangents.values())).shape[0]
    for n, p in named:
        assert tangents[n].shape == (S, *p.shape)
    return torch.cat([tangents[n].reshape(S, -1) for n, _ in named], dim=1)


MODELS = [("mlp", "tensor"), ("frozen_bn", "tensor"), ("two_input", "tuple"), ("two_input", "dict")]


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("kind,input_kind", MODELS)
def test_jvp_equals_jacobian_times_tangent(kind, input_kind, distribution):
    model, x = make(kind, input_kind)
    net = NetworkFunction(model)
    sampler = ProjectionSampler(net, n_projections=5, distribution=distribution, seed=3)
    J = oracle_jacobian(model, x)
    for step in (0, 7):
        V = flatten_tangents(model, sampler.tangents(step, torch.device("cpu"), DT))
        f, z = sampler.project(x, step)
        with torch.no_grad():
            torch.testing.assert_close(f, call_model(model, x), rtol=1e-13, atol=1e-13)
        assert z.shape == (5, n_inputs(x), 3)
        ref = torch.einsum("bcp,sp->sbc", J, V)
        torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-12)
        # Tangents enter: a zero J component would not distinguish them, this does.
        assert not torch.allclose(z[0], z[1])


def test_network_jvp_with_fixed_tangent_and_jacobian():
    model, x = make("frozen_bn")
    net = NetworkFunction(model)
    J = oracle_jacobian(model, x)
    g = torch.Generator().manual_seed(5)
    V = torch.randn(2, net.n_params, generator=g, dtype=DT)
    f, z = net.jvp(x, net.unflatten(V))
    torch.testing.assert_close(z, torch.einsum("bcp,sp->sbc", J, V), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net.jacobian(x), J, rtol=1e-10, atol=1e-12)


def test_frozen_parameters_and_buffers_excluded():
    model, x = make("frozen_bn")
    net = NetworkFunction(model)
    names = {n for n, _ in trainable_named(model)}
    assert set(net.names) == names
    assert "fc1.weight" not in names and "fc2.bias" not in names
    assert net.n_params == sum(p.numel() for _, p in trainable_named(model))
    tangents = ProjectionSampler(net, 3).tangents(0, torch.device("cpu"), DT)
    assert set(tangents) == names
    # Frozen parameters and running statistics still shape the output (held constant).
    out = net.output(x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-13, atol=1e-13)
        model.fc2.bias.add_(1.0)
        torch.testing.assert_close(net.output(x), model(x), rtol=1e-13, atol=1e-13)


def test_tangents_regenerate_from_seed_and_step():
    model, _ = make("mlp")
    net = NetworkFunction(model)
    cpu = torch.device("cpu")
    for dist in ("rademacher", "gaussian"):
        a = ProjectionSampler(net, 4, dist, seed=11)
        b = ProjectionSampler(net, 4, dist, seed=11)
        c = ProjectionSampler(net, 4, dist, seed=12)
        t0 = flatten_tangents(model, a.tangents(5, cpu, DT))
        assert torch.equal(t0, flatten_tangents(model, b.tangents(5, cpu, DT)))
        assert torch.equal(t0, flatten_tangents(model, a.tangents(5, cpu, DT)))
        assert not torch.equal(t0, flatten_tangents(model, a.tangents(6, cpu, DT)))
        assert not torch.equal(t0, flatten_tangents(model, c.tangents(5, cpu, DT)))
        # The S tangents of one step differ from one another.
        assert len({tuple(row.tolist()) for row in t0}) == 4
        # float32 tangents are the float64 ones rounded (same stream).
        t32 = flatten_tangents(model, a.tangents(5, cpu, torch.float32))
        torch.testing.assert_close(t32.double(), t0, rtol=1e-6, atol=1e-6)


def test_rademacher_entries_and_gaussian_moments():
    model, _ = make("mlp")
    net = NetworkFunction(model)
    cpu = torch.device("cpu")
    r = flatten_tangents(model, ProjectionSampler(net, 200, "rademacher", 1).tangents(0, cpu, DT))
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    n = r.numel()
    assert abs(float(r.mean())) < 5 / math.sqrt(n)
    g = flatten_tangents(model, ProjectionSampler(net, 200, "gaussian", 1).tangents(0, cpu, DT))
    assert abs(float(g.mean())) < 5 / math.sqrt(n)
    # Var of the sample variance of N(0,1) is 2/n; kurtosis 3 (a Rademacher has 1).
    assert abs(float(g.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((g**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    # Entries are uncorrelated across parameters: E[v vᵀ] = I.
    for t in (r, g):
        cov = t.T @ t / t.shape[0]
        off = cov - torch.diag(torch.diagonal(cov))
        assert float(off.abs().max()) < 5 / math.sqrt(t.shape[0]) * 1.5


def test_bad_sampler_arguments():
    net = NetworkFunction(make("mlp")[0])
    with pytest.raises(ValueError):
        ProjectionSampler(net, 0)
    with pytest.raises(ValueError):
        ProjectionSampler(net, 2, distribution="uniform")


def test_stack_rows_layout():
    z = torch.randn(4, 3, 2, dtype=DT)
    Z = stack_rows(z)
    assert Z.shape == (6, 4)
    for s in range(4):
        for b in range(3):
            for c in range(2):
                assert Z[b * 2 + c, s] == z[s, b, c] / 2.0
    # K̂ = Z Zᵀ = mean_s z_s z_sᵀ over the stacked rows.
    flat = z.reshape(4, 6)
    expected = flat.T @ flat / 4
    tol = eps_tolerance(expected.dtype, n=4)  # 4-term sums in different orders
    torch.testing.assert_close(Z @ Z.T, expected, rtol=tol, atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize(
    "kind,input_kind,distribution",
    [
        ("frozen_bn", "tensor", "rademacher"),
        ("frozen_bn", "tensor", "gaussian"),
        ("two_input", "dict", "rademacher"),
    ],
)
def test_mean_outer_product_converges_to_ntk_gram(kind, input_kind, distribution):
    model, x = make(kind, input_kind, n=3)
    net = NetworkFunction(model)
    S, steps = 256, 8
    sampler = ProjectionSampler(net, n_projections=S, distribution=distribution, seed=2)
    J = oracle_jacobian(model, x)
    B, C, P = J.shape
    Jf = J.reshape(B * C, P)
    target = Jf @ Jf.T  # (BC, BC) NTK Gram
    outer = []
    for step in range(steps):
        _, z = sampler.project(x, step)
        zf = z.reshape(S, B * C)  # row b·C + c
        outer.append(zf[:, :, None] * zf[:, None, :])
    outer = torch.cat(outer)  # (n, BC, BC): i.i.d. unbiased draws of the Gram
    n = outer.shape[0]
    mean = outer.mean(0)
    sd = outer.std(0)
    t = (mean - target) / (sd / math.sqrt(n))
    assert float(t.abs().max()) < 5.0, float(t.abs().max())
    # Aggregate: the mean squared standardised error is ≈ 1 for an unbiased estimator.
    assert float(t.square().mean()) < 3.0
    # The check is sharp enough to catch a 25% scale error.
    t_wrong = (mean - 1.25 * target) / (sd / math.sqrt(n))
    assert float(t_wrong.abs().max()) > 5.0

    # The sample variance matches the theory of each distribution:
    # Gaussian  Var[(Jv)_i (Jv)_j] = (J_i·J_j)² + ‖J_i‖²‖J_j‖²,
    # Rademacher subtracts 2 Σ_k J_ik² J_jk² (the lower-variance choice).
    var_theory = target.square() + torch.outer(torch.diagonal(target), torch.diagonal(target))
    if distribution == "rademacher":
        var_theory = var_theory - 2 * (Jf.square() @ Jf.square().T)
    ratio = float(sd.square().sum() / var_theory.sum())
    assert abs(ratio - 1) < 0.15, ratio
