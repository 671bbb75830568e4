"""The predictive's cheaper paths compute what the plain formulas compute: the gated surrogate's
features and gradients (one accumulated map to ``H``, one batched product) against the einsum of
its definition, the diagonal of the Kronecker-factored covariance read from ``kron_gram``
against the diagonal of the full covariance, and the probit read from the variances against
the probit of the full covariance — each in float64, to tolerances from ε and the sizes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastlla
from fastlla.posterior import FeaturePosterior, kron_gram
from fastlla.predictive import probit
from fastlla.surrogate import GatedSurrogate

from testing import eps_tolerance  # noqa: E402

D, h, C = 6, 12, 4


def gated_model(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 10), nn.Tanh(), nn.Linear(10, h), nn.ReLU(), nn.Linear(h, C))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.to(dtype).eval()


def reference_features(s: GatedSurrogate, x):
    """``g[m, c] = scale · Σ_j H[j, m] σ'(z_j) W[c, j]``, ``H = linear(u) + mlp(u)`` as defined."""
    model = s._model[0]
    with torch.no_grad():
        phi = model[:4](x)
    u = s.trunk(x).reshape(x.shape[0], -1)
    H = s.linear(u) + (s.mlp(u) if s.mlp is not None else 0)
    H = H.view(x.shape[0], s.hidden, s.n_features)
    gated = s.gate(phi)[:, None, :] * s.head_weight
    return torch.einsum("bjm,bcj->bmc", H, gated) * s.output_scale


@pytest.mark.parametrize("width", [0, 16])
def test_gated_features_and_gradients_match_their_definition(width):
    model = gated_model()
    s = GatedSurrogate(model, 7, C, width, generator=torch.Generator().manual_seed(1)).double()
    s.output_scale.fill_(1.7)
    x = torch.randn(9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = s(x)
    want = reference_features(s, x)
    assert got.shape == (9, 7, C)
    n = 10 + width + h  # terms accumulated into one feature
    tol = eps_tolerance(torch.float64, n)
    scale = float(want.detach().abs().max())
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)
    weights = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = [p for p in s.parameters() if p.requires_grad]
    g_got = torch.autograd.grad((got * weights).sum(), params)
    g_want = torch.autograd.grad((want * weights).sum(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max() + 1e-300))


def random_posterior(M, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(M, 3 * M, dtype=torch.float64, generator=g)
    return FeaturePosterior(F @ F.mT / M)


@pytest.mark.parametrize("k", [1, 5])
def test_kron_diagonal_from_the_gram_is_the_diagonal_of_the_covariance(k):
    m, B = 6, 11
    M = m + k * C
    post = random_posterior(M)
    g = torch.Generator().manual_seed(4)
    phi = torch.randn(B, m, C, dtype=torch.float64, generator=g)
    a = torch.randn(B, k, dtype=torch.float64, generator=g)
    full = post.covariance(phi, 0.7, 1.3, a)
    var = post.variance(phi, 0.7, 1.3, a)
    assert post._kron_gram is not None  # the gram path ran
    eye = torch.eye(C, dtype=a.dtype)
    dense = torch.cat([phi, (a[:, :, None, None] * eye).reshape(B, k * C, C)], dim=1)
    A = post.precision(0.7, 1.3)
    reference = torch.diagonal(dense.mT @ torch.linalg.solve(A, dense), dim1=1, dim2=2)
    cond = float(torch.linalg.cond(A))
    tol = eps_tolerance(torch.float64, M, cond)
    torch.testing.assert_close(var, torch.diagonal(full, dim1=1, dim2=2), rtol=tol, atol=tol * float(reference.max()))
    torch.testing.assert_close(var, reference, rtol=tol, atol=tol * float(reference.max()))
    Q = kron_gram(post._kron_factors(0.7, 1.3, m, C)[0], C)
    assert Q.shape == (k, C * k)
    torch.testing.assert_close(Q.view(k, C, k), Q.view(k, C, k).permute(2, 1, 0))  # Q_c symmetric


@pytest.mark.parametrize("kind", ["ScaLLA", "ExactLLA"])
def test_probit_from_the_variances_is_the_probit_of_the_covariance(kind):
    model = gated_model()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, D, dtype=torch.float64, generator=g)
    y = model(X).argmax(-1)
    batches = [(X[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    if kind == "ScaLLA":
        la = fastlla.ScaLLA(model, "classification", n_features=8, head_width=8)
        la.fit(batches, iterations=5, progress_bar=False)
        assert la.gate_used and la.last_layer_used is True and la.residual_mode == "head"
    else:
        la = fastlla.ExactLLA(model, "classification").fit(batches)
    x = X[:7] + 0.1
    mean, cov = la.predictive_distribution(x)
    got = la(x)
    want = probit(mean, cov)
    tol = eps_tolerance(torch.float64, la.n_params)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert not torch.equal(want, torch.softmax(mean, -1))  # the variances matter
    mean_d, var = la.predictive_distribution(x, diagonal_output=True)
    torch.testing.assert_close(var, torch.diagonal(cov, dim1=1, dim2=2), rtol=tol, atol=tol * float(var.max()))


def test_an_infinite_variance_is_refused_on_the_variance_path():
    model = gated_model()
    X = torch.randn(20, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    batches = [(X, model(X).argmax(-1))]
    la = fastlla.ScaLLA(model, "classification", n_features=4, head_width=4)
    la.fit(batches, iterations=2, progress_bar=False)
    with torch.no_grad():
        la.surrogate.learned.output_scale.fill_(math.inf)
    with pytest.raises(ValueError, match="NaN or Inf"):
        la(X[:3])
    with pytest.raises(ValueError, match="NaN or Inf"):
        la.predictive_distribution(X[:3], diagonal_output=True)


# --------------------------------------------------------------------------- distillation
def low_rank_gated(rank, width=16, M=12, seed=0):
    """A gated surrogate whose map to ``H`` has rank ``rank`` on its inputs ``r(u)``."""
    model = gated_model(seed=seed)
    s = GatedSurrogate(model, M, C, width, generator=torch.Generator().manual_seed(seed + 1))
    s = s.double()
    g = torch.Generator().manual_seed(seed + 2)
    P, _ = s._map()
    low = torch.randn(P.shape[0], rank, dtype=P.dtype, generator=g) @ torch.randn(
        rank, P.shape[1], dtype=P.dtype, generator=g
    ) / P.shape[1]
    with torch.no_grad():
        s.linear.weight.copy_(low[:, : s.linear.in_features])
        if width:
            s.mlp[2].weight.copy_(low[:, s.linear.in_features :])
    return model, s


def input_batches(n=400, batch=50, seed=7):
    X = torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return [X[i : i + batch] for i in range(0, n, batch)]


@pytest.mark.parametrize("width", [0, 16])
def test_distilling_a_low_rank_map_keeps_the_features(width):
    """A map of rank 5 is distilled at rank 8 (the smallest tried) with the same features, on
    the inputs it was distilled on and on others (the map's range is all of ``H``'s)."""
    _, s = low_rank_gated(5, width)
    batches = input_batches()
    x = torch.randn(30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 3
    full = s(x)
    assert s.distil(batches) == 8 and int(s.distilled_rank) == 8
    got = s(x)
    tol = eps_tolerance(torch.float64, s._map()[0].shape[1], 1e3)
    torch.testing.assert_close(got, full, rtol=tol, atol=tol * float(full.abs().max()))
    s.undistil()
    assert torch.equal(s(x), full)


def test_a_map_no_small_rank_reproduces_stays_as_trained():
    _, s = low_rank_gated(25, width=16)  # inputs r(u): 10 + 16 = 26 values
    batches = input_batches()
    x = batches[0]
    full = s(x)
    assert s.distil(batches, tolerance=1e-6) == 0 and int(s.distilled_rank) == 0
    assert torch.equal(s(x), full)
    rank = s.distil(batches, tolerance=0.5)  # a loose tolerance: a rank that meets it
    assert rank in (8, 16)
    g, ref = s(x).permute(0, 2, 1).reshape(-1, 12), full.permute(0, 2, 1).reshape(-1, 12)
    change = torch.linalg.norm(g @ g.mT - ref @ ref.mT) / torch.linalg.norm(ref @ ref.mT)
    assert change <= 0.5
    if rank == 16:  # rank 8 did not meet it
        s.use_rank(8)
        g = s(x).permute(0, 2, 1).reshape(-1, 12)
        assert torch.linalg.norm(g @ g.mT - ref @ ref.mT) / torch.linalg.norm(ref @ ref.mT) > 0.5


def test_scalla_distils_after_training_and_saves_it():
    """``fit`` trains the full map (undistilled at the start of a refit), distils it, and fits
    the posterior on the distilled features; a state round trip keeps the rank, and a state
    saved before distillation existed loads undistilled."""
    model, s = low_rank_gated(3)
    X = torch.cat(input_batches())
    batches = [(X[i : i + 50], model(X[i : i + 50]).argmax(-1)) for i in range(0, 400, 50)]
    la = fastlla.ScaLLA(model, "classification", n_features=12, head_width=16, seed=3)
    ranks = []
    train = la._train_surrogate

    def recording(*args, **kwargs):
        learned = la.surrogate.learned
        ranks.append(int(learned.distilled_rank))
        with torch.no_grad():  # a low-rank trained map, so that it distils
            learned.linear.weight.copy_(s.linear.weight)
            learned.mlp[2].weight.copy_(s.mlp[2].weight)
            learned.mlp[2].weight.requires_grad_(False)
            learned.linear.weight.requires_grad_(False)
        return train(*args, **kwargs)

    la._train_surrogate = recording
    la.fit(batches, iterations=2, progress_bar=False)
    learned = la.surrogate.learned
    assert int(learned.distilled_rank) == 8 and ranks == [0]
    la.fit(batches, iterations=2, progress_bar=False)
    assert ranks == [0, 0]  # trained undistilled
    x = X[:9] + 0.3
    state = la.state_dict()
    fresh = fastlla.ScaLLA(model, "classification", n_features=12, head_width=16)
    fresh.load_state_dict(state)
    assert int(fresh.surrogate.learned.distilled_rank) == 8
    assert torch.equal(fresh(x), la(x))
    older = dict(state, surrogate={k: v for k, v in state["surrogate"].items() if "distilled" not in k})
    old = fastlla.ScaLLA(model, "classification", n_features=12, head_width=16)
    old.load_state_dict(older)
    assert int(old.surrogate.learned.distilled_rank) == 0
    bad = dict(state, surrogate=dict(state["surrogate"], **{"learned.distilled_rank": torch.tensor(65)}))
    with pytest.raises((ValueError, RuntimeError), match="distilled_rank"):
        fastlla.ScaLLA(model, "classification", n_features=12, head_width=16).load_state_dict(bad)
    predictor = la.export()
    torch.testing.assert_close(predictor(x), la(x), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- fused variance
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 5])
def test_kron_variance_of_class_major_features_is_the_dense_diagonal(k, dtype):
    """Features laid out class-major (as the gated surrogate returns them) take the one-product
    path (whitened ``T_l``, ``L_ll⁻ᵀ``); its variances equal the diagonal of the dense
    ``Φᵀ A⁻¹ Φ`` computed in float64, to ε(dtype) × M × cond(A)."""
    m, B = 6, 11
    M = m + k * C
    post = random_posterior(M)
    g = torch.Generator().manual_seed(9)
    phi64 = torch.randn(B, C, m, dtype=torch.float64, generator=g).mT  # class-major (B, m, C)
    a64 = torch.randn(B, k, dtype=torch.float64, generator=g)
    eye = torch.eye(C, dtype=torch.float64)
    dense = torch.cat([phi64, (a64[:, :, None, None] * eye).reshape(B, k * C, C)], dim=1)
    A = post.precision(0.7, 1.3)
    reference = torch.diagonal(dense.mT @ torch.linalg.solve(A, dense), dim1=1, dim2=2)
    post = FeaturePosterior(post.H.to(dtype))
    phi, a = phi64.to(dtype), a64.to(dtype)
    assert phi.mT.is_contiguous()
    var = post.variance(phi, 0.7, 1.3, a)
    assert var.dtype == dtype and post._kron_gram is not None and len(post._kron_gram) == 4
    tol = eps_tolerance(dtype, M, float(torch.linalg.cond(A)))
    scale = float(reference.max())
    torch.testing.assert_close(var.double(), reference, rtol=tol, atol=tol * scale)
    # the feature-major layout (the fused op) gives the same variances
    var_fm = post.variance(phi.contiguous(), 0.7, 1.3, a)
    torch.testing.assert_close(var_fm.double(), reference, rtol=tol, atol=tol * scale)
    # an update invalidates the cached factors: the variances follow the new posterior
    W = torch.randn(M, 2, dtype=torch.float64, generator=g)
    post.update(W.to(dtype))
    A2 = A + 1.3 * W @ W.mT
    reference2 = torch.diagonal(dense.mT @ torch.linalg.solve(A2, dense), dim1=1, dim2=2)
    tol2 = eps_tolerance(dtype, M, float(torch.linalg.cond(A2)))
    torch.testing.assert_close(
        post.variance(phi, 0.7, 1.3, a).double(), reference2, rtol=tol2, atol=tol2 * scale
    )


# --------------------------------------------------------------------------- shared trunk
def count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("gated", [True, False])
def test_a_shared_trunk_is_an_untrained_copy_read_in_the_networks_pass(gated):
    """``shared_trunk=True`` reads the network's own trunk: its features equal those of the
    default surrogate with an untrained trunk copy and the same head (float64, ε × terms), only
    the head trains, and the predictive runs the network once per call (the trunk's input read
    in the same pass), with the probabilities of the dense features ``g`` (the surrogate's own
    forward, separate passes) and ``A⁻¹`` solved in float64."""
    from fastlla.network_head import find_head
    from fastlla.surrogate import last_layer_surrogate

    model = gated_model()
    g = torch.Generator().manual_seed(10)
    X = torch.randn(60, D, dtype=torch.float64, generator=g)
    batches = [(X[i : i + 20], model(X[i : i + 20]).argmax(-1)) for i in range(0, 60, 20)]
    head = find_head(model, X[:20])
    n_params = sum(p.numel() for p in model.parameters())

    def build(shared):
        return last_layer_surrogate(
            model, 6, C, n_params, head_width=8, gated=gated, head=head,
            generator=torch.Generator().manual_seed(1), shared_trunk=shared,
        ).double()  # fmt: skip

    shared, copied = build(True), build(False)
    assert shared.shared_trunk_input == (head.gate[0] if gated else head.output_layer)
    assert copied.shared_trunk_input is None
    assert not any("trunk" in n for n, _ in shared.named_parameters())
    x = X[:9] + 0.5
    with torch.no_grad():
        want, got = copied(x), shared(x)
    tol = eps_tolerance(torch.float64, 10 + 8 + h)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    la = fastlla.ScaLLA(model, "classification", surrogate=shared)
    la.fit(batches, iterations=5, progress_bar=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    first = count_calls(model[0])
    probs = la(x)
    assert first == [x.shape[0]]  # one network pass
    with torch.no_grad():
        phi = la._surrogate_features(x).double()  # LastLayerSurrogate.forward: separate passes
        f = model(x)
    A = la.posterior.precision(la._delta(), la.data_scale)
    var = torch.diagonal(phi.mT @ torch.linalg.solve(A, phi), dim1=1, dim2=2)
    var = var + la.residual_head(x).square().sum(-1) / la._delta()
    want = probit(f, var)
    tol = eps_tolerance(torch.float64, la.n_features, float(torch.linalg.cond(A)))
    torch.testing.assert_close(probs, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["distilled", "plain"])
def test_whitened_features_give_the_variances_of_the_dense_features(kind):
    """The variances come from features whitened inside the last map (the distilled gated map,
    or a plain surrogate's last layer): equal to the diagonal of the full covariance (features
    not whitened) and of the dense ``Φᵀ A⁻¹ Φ`` solved in float64, also after the prior
    precision changes and after the map changes in place (the cached whitened map follows)."""
    model, s = low_rank_gated(3)
    X = torch.cat(input_batches())
    batches = [(X[i : i + 50], model(X[i : i + 50]).argmax(-1)) for i in range(0, 400, 50)]
    gated = kind == "distilled"
    la = fastlla.ScaLLA(model, "classification", n_features=12, head_width=16, seed=3, gate=gated)
    train = la._train_surrogate

    def low_rank(*args, **kwargs):
        learned = la.surrogate.learned
        with torch.no_grad():
            learned.linear.weight.copy_(s.linear.weight)
            learned.mlp[2].weight.copy_(s.mlp[2].weight)
            learned.mlp[2].weight.requires_grad_(False)
            learned.linear.weight.requires_grad_(False)
        return train(*args, **kwargs)

    if gated:
        la._train_surrogate = low_rank
    la.fit(batches, iterations=2, progress_bar=False)
    learned = la.surrogate.learned
    assert la.surrogate.whitens and (learned.distilled if gated else la.gate_used is False)
    x = X[:9] + 0.3

    def check():
        delta, scale = la._delta(), la.data_scale
        _, feats = la._outputs_and_features(x, diagonal_residual=True, whiten=(delta, scale))
        assert feats.whitened
        _, var = la.predictive_distribution(x, diagonal_output=True)
        _, cov = la.predictive_distribution(x)
        with torch.no_grad():
            phi = la._surrogate_features(x).double()
            residual = la.residual_head(x).square().sum(-1) / delta
        A = la.posterior.precision(delta, scale)
        dense = torch.diagonal(phi.mT @ torch.linalg.solve(A, phi), dim1=1, dim2=2) + residual
        tol = eps_tolerance(torch.float64, la.n_features, float(torch.linalg.cond(A)))
        atol = tol * float(dense.max())
        torch.testing.assert_close(var, torch.diagonal(cov, dim1=1, dim2=2), rtol=tol, atol=atol)
        torch.testing.assert_close(var, dense, rtol=tol, atol=atol)
        return var

    first = check()
    la.prior_precision = 7.0
    assert not torch.allclose(check(), first)
    cache = learned._whitened_map if gated else learned._whitened_head
    before = cache[1].clone()
    with torch.no_grad():  # the map changed in place: distilled again on other inputs, or scaled
        if gated:
            learned.distil([b * 2 for b in input_batches(seed=11)])
        else:
            learned.head[-1].weight.mul_(1.5)
    check()
    cache = learned._whitened_map if gated else learned._whitened_head
    assert not torch.equal(cache[1], before)
