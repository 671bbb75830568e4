"""``optimize_prior_precision``'s searches, call by call: the grid (default, sized, explicit),
ties, the score (log-space NLL or a user loss, with the link and sample count asked for), the
checks on the validation data, the progress bar, and the Adam path's prior structures.

Oracles: the predictive written out per grid value (``predictive_distribution`` at that ``δ``
and the link functions of :mod:`fastlla.predictive`), and losses that record what they see."""

from __future__ import annotations

import math
import os

import pytest
import torch

from fastlla import ExactLLA, ScaLLA
from fastlla.predictive import class_probabilities, log_class_probabilities
from test_laplace_compat import data, loader, model_for


def fitted(likelihood="classification", n_out=3):
    X, y = data(likelihood, n_out=n_out, N=24)
    la = ExactLLA(model_for(n_out=n_out), likelihood).fit(loader(X[:16], y[:16]))
    return la, X[16:], y[16:]


class Ranked:
    """A callable loss whose value is a fixed function of how often it was called: the grid
    value it picks tells which grid it was run over, in which order."""

    def __init__(self, value_of_call):
        self.value_of_call, self.calls = value_of_call, 0

    def __call__(self, *args):
        self.calls += 1
        return self.value_of_call(self.calls)

    def reset(self):  # a callable loss is not a metric: reset must never be called
        raise AssertionError("reset called on a callable loss")


def test_default_grid_is_21_values_from_1e_minus_4_to_1e4():
    la, Xv, yv = fitted()
    last = Ranked(lambda k: -k)  # every later value is better: the last grid value wins
    assert la.optimize_prior_precision("gridsearch", loader(Xv, yv), loss=last) == pytest.approx(
        1e4, rel=1e-12
    )
    assert last.calls == 21
    first = Ranked(lambda k: k)
    assert la.optimize_prior_precision("gridsearch", loader(Xv, yv), loss=first) == pytest.approx(
        1e-4, rel=1e-12
    )


def test_sized_grid_and_its_bounds():
    la, Xv, yv = fitted()
    second = Ranked(lambda k: abs(k - 2))
    got = la.optimize_prior_precision(
        "gridsearch", loader(Xv, yv), loss=second, grid_size=5, log_prior_prec_min=-2,
        log_prior_prec_max=2, log_prior_prec_base=2.0,
    )  # fmt: skip
    assert second.calls == 5 and got == pytest.approx(2.0**-1, rel=1e-12)
    with pytest.raises(ValueError, match="grid_size must be at least 1, got 0"):
        la.optimize_prior_precision("gridsearch", loader(Xv, yv), grid_size=0)
    with pytest.raises(ValueError, match="^fastlla: give either grid or grid_size, not both$"):
        la.optimize_prior_precision("gridsearch", loader(Xv, yv), grid=[1.0], grid_size=3)


def test_ties_keep_the_first_grid_value():
    la, Xv, yv = fitted()
    const = Ranked(lambda k: 1.0)
    assert la.optimize_prior_precision("gridsearch", loader(Xv, yv), grid=[3.0, 1.0, 2.0], loss=const) == 3.0
    # the NLL of a grid value repeated ties with itself exactly
    assert la.optimize_prior_precision("gridsearch", loader(Xv, yv), grid=[5.0, 5.0]) == 5.0


@pytest.mark.parametrize("link,n_samples", [("probit", 100), ("bridge", 100), ("mc", 7)])
def test_default_score_is_the_log_space_nll_sum_with_the_link_asked_for(link, n_samples):
    la, Xv, yv = fitted()
    grid = [0.01, 0.3, 3.0, 30.0, 300.0]

    def nll(delta):  # the oracle: the predictive at δ, scored in log space
        la.prior_precision = delta
        f, cov = la.predictive_distribution(Xv)
        logp = log_class_probabilities(f, cov, link, n_samples=n_samples)
        return -float(logp.gather(1, yv.view(-1, 1)).sum())

    expected = min(grid, key=nll)
    got = la.optimize_prior_precision(  # one batch: MC draws as in the oracle's one call
        "gridsearch", loader(Xv, yv, batch=len(Xv)), grid=grid, link_approx=link,
        n_samples=n_samples,
    )  # fmt: skip
    assert got == expected


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_loss_sees_the_predictive_of_each_grid_value(likelihood):
    """A callable gets the whole set's predictions; a metric gets them batch by batch, reset
    once per grid value; both are compared with the predictive written out at each ``δ``."""
    la, Xv, yv = fitted(likelihood)
    grid = [0.1, 10.0]
    seen_callable, seen_metric = [], []

    def record(*args):
        seen_callable.append([a.clone() for a in args])
        return 0.0

    class Metric:
        def __init__(self):
            self.resets, self.batches = 0, []

        def reset(self):
            self.resets += 1
            self.batches = []

        def update(self, *args):
            self.batches.append([a.clone() for a in args])

        def compute(self):
            seen_metric.append([torch.cat(c) for c in zip(*self.batches)])
            return torch.tensor(0.0)

    metric = Metric()
    kw = dict(grid=grid, link_approx="mc", n_samples=5)
    la.optimize_prior_precision("gridsearch", loader(Xv, yv, batch=3), loss=record, **kw)
    la.optimize_prior_precision("gridsearch", loader(Xv, yv, batch=3), loss=metric, **kw)
    assert metric.resets == len(grid)
    for delta, got_c, got_m in zip(grid, seen_callable, seen_metric):
        la.prior_precision = delta
        f, cov = la.predictive_distribution(Xv)
        if likelihood == "classification":
            expected = [torch.cat([
                class_probabilities(f[i : i + 3], cov[i : i + 3], "mc", n_samples=5)
                for i in range(0, len(Xv), 3)
            ]), yv]  # fmt: skip
        else:
            expected = [f, cov, yv]
        for got in (got_c, got_m):
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)


def test_validation_data_are_checked_and_named():
    la, Xv, yv = fitted()
    with pytest.raises(ValueError, match="val_loader must yield"):
        la.optimize_prior_precision("gridsearch", [Xv], grid=[1.0])
    with pytest.raises(ValueError, match="val_loader is empty"):
        la.optimize_prior_precision("gridsearch", [], grid=[1.0])
    bad = yv.clone()
    bad[0] = 3  # three classes: 3 is out of range
    for loss in (None, lambda p, y: 0.0):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\], got \[0, 3\]"):
            la.optimize_prior_precision("gridsearch", loader(Xv, bad), grid=[1.0], loss=loss)
    assert float(la.prior_precision) == 1.0  # refused searches leave δ as it was
    with pytest.raises(TypeError, match=r"^fastlla: loss must be a metric \(update/compute\) or a callable$"):
        la.optimize_prior_precision("gridsearch", loader(Xv, yv), grid=[1.0], loss=3)


@pytest.mark.parametrize("progress_bar", [False, True])
def test_progress_bar(progress_bar, capsys):
    la, Xv, yv = fitted()
    la.optimize_prior_precision(
        "gridsearch", loader(Xv, yv), grid=[1.0, 2.0], loss=lambda p, y: 0.0,
        progress_bar=progress_bar,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert ("gridsearch" in err and "2/2" in err) if progress_bar else err == ""


def test_layerwise_prior_needs_layers():
    X, y = data("classification", n_out=2, N=24)
    la = ScaLLA(model_for(), "classification", n_features=4, seed=0)
    la.fit(loader(X, y), iterations=2, progress_bar=False)
    with pytest.raises(ValueError, match="prior_structure='layerwise' does not apply to ScaLLA"):
        la.optimize_prior_precision("marglik", prior_structure="layerwise", n_steps=1)


def test_per_layer_init_is_kept_per_layer():
    """A per-layer ``init_prior_prec`` runs Adam per layer whatever ``prior_structure`` says,
    and ends at the evidence's per-layer maximiser (checked by its zero gradient)."""
    la, _, _ = fitted()
    got = la.optimize_prior_precision("marglik", init_prior_prec=torch.ones(4), n_steps=400, lr=0.1)
    assert got.shape == (4,)
    log_d = got.log().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_marginal_likelihood(log_d.exp()), log_d)
    assert float(grad.abs().max()) < 1e-3 * max(1.0, math.sqrt(float(got.square().sum())))


# --------------------------------------------------------------------------- defaults, warnings
def test_defaults_are_laplace_torchs_where_fastlla_does_not_document_its_own():
    """The keywords shared with laplace-torch default as there, except those fastlla documents
    as its own (``method`` is ``"init"``, or ``"gridsearch"`` with a validation set; the Adam
    settings ``n_steps``, ``lr``, ``init_prior_prec`` are marglik-only, so their defaults are
    ``None`` and laplace-torch's values apply under ``"marglik"``; ``prior_structure`` is
    ``"scalar"``; ``grid_size`` 21)."""
    import inspect

    laplace = pytest.importorskip("laplace")
    ours = inspect.signature(ExactLLA.optimize_prior_precision).parameters
    theirs = inspect.signature(laplace.baselaplace.BaseLaplace.optimize_prior_precision).parameters
    adam = ("n_steps", "lr", "init_prior_prec")
    own = {"prior_structure": "scalar", "grid_size": None, "pred_type": "glm", "method": None,
           **dict.fromkeys(adam)}  # fmt: skip
    for name, p in ours.items():
        if name in own:
            assert p.default == own[name], name
        elif name in theirs:
            default = getattr(theirs[name].default, "value", theirs[name].default)
            assert p.default == default, (name, p.default, default)
    assert ours["optimize_sigma_noise"].default is False
    la, _, _ = fitted()
    implicit = la.optimize_prior_precision("marglik", prior_structure="layerwise")
    explicit = la.optimize_prior_precision(
        "marglik", prior_structure="layerwise", **{k: theirs[k].default for k in adam}
    )
    assert torch.equal(implicit, explicit)


def test_marglik_warns_about_a_val_loader_from_the_callers_line():
    la, Xv, yv = fitted()
    with pytest.warns(UserWarning, match=r"val_loader is ignored by method='marglik' \(did you mean "
                      r"method='gridsearch'\?\)") as record:  # fmt: skip
        la.optimize_prior_precision("marglik", loader(Xv, yv))
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampoline adds a frame
        assert record[0].filename == __file__  # stacklevel: the user's call, not fastlla's
    with pytest.raises(ValueError, match="^fastlla: method='gridsearch' needs a val_loader$"):
        la.optimize_prior_precision("gridsearch")


def test_grid_values_are_checked_by_name_and_a_grid_of_one_is_allowed():
    la, Xv, yv = fitted()
    with pytest.raises(ValueError, match=r"^fastlla: grid value must be positive and finite, got -1.0$"):
        la.optimize_prior_precision("gridsearch", loader(Xv, yv), grid=[1.0, -1.0])
    assert la.optimize_prior_precision("gridsearch", loader(Xv, yv), grid_size=1) == pytest.approx(1e-4)


# --------------------------------------------------------------------------- marglik
def test_marglik_maximiser_matches_the_oracle_evidence_in_float64():
    """The 1-D optimiser finds the written-out evidence's maximiser to ~1e-6 in log δ (a float32
    evidence would move it by ~1e-3)."""
    from scipy.optimize import minimize_scalar

    from test_laplace_compat import Oracle

    X, y = data("classification", n_out=3, N=24)
    model = model_for(n_out=3)
    la = ExactLLA(model, "classification").fit(loader(X, y))
    oracle = Oracle(model, "classification", X, y)
    res = minimize_scalar(lambda t: -oracle.marglik(math.exp(t)), bounds=(-12, 12), method="bounded",
                          options={"xatol": 1e-10})  # fmt: skip
    got = la.optimize_prior_precision("marglik")
    assert type(got) is float  # a scalar prior comes back as a number (laplace-torch: a tensor)
    assert abs(math.log(got) - res.x) < 1e-5
    with pytest.raises(ValueError, match="^fastlla: unknown method 'adam'; use 'marglik', 'init' or 'gridsearch'$"):
        la.optimize_prior_precision("adam")


def test_marglik_search_bounds_and_sigma_only_when_asked():
    """δ is searched over [e⁻¹², e¹²] and σ over [e⁻⁸, e⁶] (documented): a network with zero
    weights fitting zero targets exactly pushes both to their bounds. σ moves only with
    ``optimize_sigma_noise`` and only for regression."""
    model = model_for()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    X = data("regression")[0]
    la = ExactLLA(model, "regression", sigma_noise=0.5).fit(loader(X, torch.zeros(len(X), 2, dtype=X.dtype)))
    la.optimize_prior_precision("marglik")
    assert float(la.sigma_noise) == 0.5
    assert math.log(float(la.prior_precision)) == pytest.approx(12.0, abs=1e-6)
    la.optimize_prior_precision("marglik", optimize_sigma_noise=True)
    assert math.log(float(la.sigma_noise)) == pytest.approx(-8.0, abs=1e-6)
    for structure in ("layerwise", "diag"):  # the Adam path: σ fixed unless asked
        la.sigma_noise = 0.5
        la.optimize_prior_precision("marglik", prior_structure=structure, n_steps=3)
        assert float(la.sigma_noise) == 0.5


def test_adam_path_tunes_sigma_to_the_evidences_stationary_point(capsys):
    X, y = data("regression", N=24)
    la = ExactLLA(model_for(), "regression", sigma_noise=1.0).fit(loader(X, y))
    la.optimize_prior_precision("marglik", prior_structure="layerwise", optimize_sigma_noise=True,
                                n_steps=600, lr=0.05, progress_bar=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "marglik" in err and "600/600" in err
    log_d = la.prior_precision.log().clone().requires_grad_(True)
    log_s = la.sigma_noise.log().clone().requires_grad_(True)
    grads = torch.autograd.grad(la.log_marginal_likelihood(log_d.exp(), log_s.exp()), (log_d, log_s))
    assert float(grads[1].abs()) < 1e-2 and float(grads[0].abs().max()) < 1e-2


@pytest.mark.parametrize("peak", [-11.99, -3.3, 0.0, 7.1, 11.99])
def test_maximise_1d_finds_a_peak_anywhere_in_the_interval(peak):
    from fastlla.evidence import _maximise_1d

    got = _maximise_1d(lambda t: -((t - peak) ** 2) - 0.1 * (t - peak) ** 4, -12.0, 12.0)
    assert abs(got - peak) < 1e-7
