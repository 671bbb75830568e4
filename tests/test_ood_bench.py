"""The offline OOD benchmark's pieces: glyph rendering, FPR at 95% TPR, corruptions, contexts."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from fastlla.apps.glyphs import LETTERS, SYMBOLS, render_glyphs
from fastlla.apps.ood_bench import far_ood, feature_outlier_context, fpr_at_tpr, symbol_context


def test_glyphs_are_8x8_coverage_images_with_holes():
    x = render_glyphs(["O", "#", "-"], fonts=["DejaVuSans-Bold.ttf"])
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    o = x[0, 0]
    assert float(o[3:5, 3:5].max()) < 0.05 and float(o[3:5, 1:3].max()) > 0.5  # the hole is empty
    assert float(x[2, 0, :2].sum()) == 0  # a dash leaves the top rows empty
    assert torch.equal(x, render_glyphs(["O", "#", "-"], fonts=["DejaVuSans-Bold.ttf"]))
    assert not set(LETTERS) & set(SYMBOLS) and not any(c.isdigit() for c in LETTERS + SYMBOLS)
    with pytest.raises(ValueError, match="no outline"):
        render_glyphs([" "], fonts=["DejaVuSans.ttf"])
    with pytest.raises(ValueError, match="ships no font"):
        render_glyphs(["A"], fonts=["NoSuchFont.ttf"])


def test_fpr_at_95_tpr_by_hand():
    s_in = np.arange(100.0)  # in-distribution scores 0..99
    s_out = np.arange(20.0) + 90.5  # OOD: 90.5..109.5; 95% of them (19) lie above 91
    # the lowest threshold that flags 19 of the 20 OOD scores is 91.5: in-distribution 92..99 flagged
    assert fpr_at_tpr(s_in, s_out) == pytest.approx(8 / 100)
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(100), np.ones(20)], np.r_[s_in, s_out])
    assert fpr_at_tpr(s_in, s_out, tpr=1.0) == fpr[np.argmax(tpr >= 1.0)] == pytest.approx(9 / 100)  # 91..99


def test_far_ood_and_contexts():
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    far = far_ood(x)
    assert far.shape == (12, 1, 8, 8) and 0 <= float(far.min()) and float(far.max()) <= 1
    assert torch.equal(far[6:, ..., :4, 4:], x[..., :4, :4])  # top-left quadrant moved right
    ctx = symbol_context(300)
    assert ctx.shape == (300, 1, 8, 8) and not torch.equal(ctx[0], ctx[len(SYMBOLS) * 8])

    class Net(torch.nn.Module):
        def features(self, x):
            return x.flatten(1)[:, :3]

    pool = torch.zeros(10, 1, 8, 8)
    pool[7, 0, 0, :3] = 5.0  # far from the training features in every direction
    got = feature_outlier_context(Net(), torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(1)), pool, 1)
    assert torch.equal(got[0], pool[7])


# --------------------------------------------------------------------------- the peers' adapters


def _tiny_cnn(n_classes=3):
    from fastlla.apps.models import DigitsCNN

    torch.manual_seed(0)  # the conftest restores the global RNG
    return DigitsCNN(n_classes=n_classes, channels=(2, 3), hidden=4).double()


@pytest.mark.parametrize("subset", ["last_layer", "all"])
def test_laplace_torch_gaussian_against_explicit_jacobians(subset):
    """laplace-torch's logit Gaussian as the benchmark reads it: equal to its own
    ``_glm_predictive_distribution``, to ``J P⁻¹ Jᵀ`` from ``torch.func.jacrev`` Jacobians and its
    dense Kronecker posterior precision, and ``J diag(1/δ) Jᵀ`` for the prior (float64); the
    entropy kind of those moments is the entropy of its own probit predictive."""
    laplace = pytest.importorskip("laplace")
    from torch.func import functional_call, jacrev
    from torch.utils.data import DataLoader, TensorDataset

    from fastlla.apps.ood_bench import laplace_torch_gaussian, laplace_torch_jacobians
    from fastlla.ood import gaussian_ood_scores
    from testing import eps_tolerance

    model = _tiny_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    la = laplace.Laplace(model, "classification", subset_of_weights=subset, hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=8))
    la.prior_precision = 0.7
    xs = torch.rand(5, 1, 8, 8, generator=g, dtype=torch.float64)
    f, cov, prior = laplace_torch_gaussian(la, *laplace_torch_jacobians(la, xs, chunk=2))  # 3 chunks
    f_ref, cov_ref = la._glm_predictive_distribution(xs)
    assert torch.equal(f, f_ref) and torch.allclose(cov, cov_ref, rtol=1e-12, atol=0)

    names = [n for n, _ in model.named_parameters()]
    if subset == "last_layer":
        names = [n for n in names if n.startswith("head.")]  # the layer laplace-torch found
        assert torch.equal(la.model.last_layer.weight, model.head.weight)  # its (deep) copy
    params = {n: p.detach() for n, p in model.named_parameters()}

    def out(sub):
        return functional_call(model, {**params, **sub}, (xs,))

    jac = jacrev(out)({n: params[n] for n in names})
    J = torch.cat([jac[n].reshape(5, 3, -1) for n in names], -1)  # (B, C, P) in parameter order
    P = la.posterior_precision.to_matrix()
    cov_oracle = J @ torch.linalg.solve(P, J.mT)
    tol = eps_tolerance(torch.float64, P.shape[0], float(torch.linalg.cond(P)))
    assert (cov - cov_oracle).abs().max() <= tol * cov_oracle.abs().max()
    assert torch.allclose(prior, J @ J.mT / 0.7, rtol=1e-12, atol=0)

    H = gaussian_ood_scores(f, cov, ("entropy",))["entropy"]
    p = la(xs, pred_type="glm", link_approx="probit")
    assert torch.allclose(H, -(p * p.log()).sum(-1), rtol=1e-10, atol=0)


def test_authors_context_fit_zeroes_the_cross_blocks():
    """The benchmark's authors' row is their ScaLLA with the training×context kernel blocks zeroed:
    the same surrogate as their ``fit`` with ``zero_crossed_variances=True`` (their loaders,
    lr 5e-5, weight decay 0), not the one without; its Gaussian is their predictive's diagonal
    blocks and ``Φᵀ Φ / δ`` for the prior."""
    from fastlla.apps import ood_bench as B

    A = B._authors_module()
    if A is None:
        pytest.skip("bench/suite/authors.py is not in this checkout")
    model = _tiny_cnn().float()
    g = torch.Generator().manual_seed(2)
    x, xc = torch.rand(20, 1, 8, 8, generator=g), torch.rand(20, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    la = B.authors_context_fit(model, x, y, xc, iterations=4, seed=3, n_features=6)

    def direct(zero):
        s = A.authors_surrogate(model, 6, x[:5], seed=3)
        ref = A.AuthorsScaLLA(model, s, "classification", seed=3)
        ref.fit(4, A.authors_loader(x, y, 5, 3), A.authors_loader(xc, None, 5, 4),
                zero_crossed_variances=zero, weight_decay=0.0, lr=5e-5,
                optimize_hyper_parameters=False)  # fmt: skip
        return ref

    zeroed, crossed = direct(True), direct(False)
    ours = la.feature_model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in zeroed.feature_model.state_dict().items())
    assert not all(torch.equal(ours[k], v) for k, v in crossed.feature_model.state_dict().items())
    assert la.steps == 4 and float(la.prior_precision) == 1.0

    la.prior_precision = 0.5
    xs = torch.rand(3, 1, 8, 8, generator=g)
    f, cov, prior = B.authors_gaussian(la, xs)
    f_ref, full = la.predict(xs)
    assert torch.equal(f, f_ref)
    for b in range(3):
        assert torch.allclose(cov[b], full[b, b], rtol=1e-5, atol=1e-7)
        phi = la.feature_model(xs[b : b + 1])[0].detach()  # (M, C)
        assert torch.allclose(prior[b], phi.T @ phi / 0.5, rtol=1e-5, atol=1e-7)
