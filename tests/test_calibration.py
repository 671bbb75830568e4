"""``python -m fastlla calibration`` (issue 15's table) on tiny settings: every metric of a row is
recomputed with numpy from the row's own predictions, the MAP row from the network itself, and
ExactLLA's rows against an explicit-Jacobian function-space LLA (its δ the evidence's maximiser,
its validation δ the grid's best, its predictive the same)."""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

pytest.importorskip("sklearn")

from fastlla.apps import calibration as cal  # noqa: E402

def run(name, epochs):
    cfg = cal.CalibrationConfig(datasets=(name,), weight_decays=(1e-4,), iterations=10,
                                epochs=epochs)  # fmt: skip
    log = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cal, "_laplace_torch_available", lambda: False)  # the rows without it
        rows = cal.run_calibration(cfg, log=log.append)
    return cfg, rows, log


@pytest.fixture(scope="module")
def wine():
    return run("wine", epochs=5)


@pytest.fixture(scope="module")
def gap():
    return run("gap", epochs=30)


def kaiming_isotropic(model):
    """``P / Σ E[θ²]`` of PyTorch's default ``nn.Linear`` init (``U(±1/√fan_in)`` for weights
    and biases: ``E[θ²] = 1/(3·fan_in)``); the measured one is a mean of ≥ 4096 draws per
    tensor, within 7% (five standard errors)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    P = sum(p.numel() for m in layers for p in m.parameters())
    return P / sum(p.numel() / (3 * m.in_features) for m in layers for p in m.parameters())


def numpy_scores(probs, y, n_bins=15):
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    onehot = np.eye(p.shape[1])[y]
    conf, pred = p.max(1), p.argmax(1)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = sum(abs(((pred == y) - conf)[bins == b].sum()) for b in range(n_bins)) / len(y)
    return {
        "nll": -np.log(p[np.arange(len(y)), y]).mean(),
        "brier": ((p - onehot) ** 2).sum(1).mean(),
        "acc": (pred == y).mean(),
        "ece": ece,
    }


def function_space(model, x_train, x_test):
    """``K_XX`` (NC, NC), ``K_xX`` (n, C, NC), ``K_xx`` (n, C, C), ``f_X``, ``f_x`` from explicit
    Jacobians of every parameter (float64)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def jac(x):
        J = jacrev(lambda p: functional_call(model, p, (x,)))(params)
        return torch.cat([j.reshape(*j.shape[:2], -1) for j in J.values()], -1)

    with torch.no_grad():
        fX, fx = model(x_train), model(x_test)
    JX, Jx = jac(x_train), jac(x_test)
    N, C, P = JX.shape
    JXf = JX.reshape(N * C, P)
    return JXf @ JXf.T, Jx @ JXf.T, Jx @ Jx.mT, fX, fx


def test_classification_rows_match_numpy_and_an_explicit_lla(wine):
    cfg, rows, log = wine
    assert "note: laplace-torch is not installed; its rows are left out" in log
    assert [(r.method, r.workflow) for r in rows] == [
        ("MAP", "network"), ("ExactLLA", "default"), ("ExactLLA", "marglik"),
        ("ExactLLA", "validation δ"), ("ScaLLA", "default"), ("ScaLLA", "marglik"),
        ("ScaLLA", "validation δ"),
    ]  # fmt: skip
    ds = cal.load_dataset("wine")
    y = ds.y_test.numpy()
    for r in rows:  # every metric is that of the row's own probabilities
        ref = numpy_scores(r.predictions["probs"], y)
        for key, value in ref.items():
            assert r.metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (r, key)

    # MAP: the network's own softmax (trained again from the same seed: deterministic)
    model = cal.train_network("wine", ds, 1e-4, cfg.seed, cfg.epochs)
    with torch.no_grad():
        logits = model(ds.x_test).double().numpy()
    p_map = np.exp(logits - logits.max(1, keepdims=True))
    p_map /= p_map.sum(1, keepdims=True)
    np.testing.assert_allclose(rows[0].predictions["probs"].numpy(), p_map, rtol=1e-5, atol=1e-7)
    for key, value in numpy_scores(p_map, y).items():
        assert rows[0].metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

    # ExactLLA against a function-space LLA from explicit Jacobians (GGN of all weights)
    model = model.double()
    KXX, KxX, Kxx, fX, fx = function_space(model, ds.x_train.double(), ds.x_test.double())
    N, C = fX.shape
    pX = torch.softmax(fX, -1)
    Lam = torch.diag_embed(pX) - pX[:, :, None] * pX[:, None, :]
    e, V = torch.linalg.eigh(Lam)
    R = torch.block_diag(*((V * e.clamp_min(0).sqrt()[:, None, :]) @ V.mT))  # Λ^{1/2}
    A = R @ KXX @ R
    theta2 = sum(float(p.detach().square().sum()) for p in model.parameters())
    loglik = float(torch.log_softmax(fX, -1).gather(1, ds.y_train[:, None]).sum())
    lam = torch.linalg.eigvalsh(A).clamp_min(0)

    def evidence(d):  # log p(D|θ*) − ½δ‖θ*‖² − ½ log det(I + ĴĴᵀ/δ)
        return loglik - 0.5 * d * theta2 - 0.5 * float(torch.log1p(lam / d).sum())

    def predictive(d, Kxx_, KxX_, fx_):
        KR = (KxX_ @ R).reshape(-1, N * C)  # (n·C, NC)
        sol = torch.linalg.solve(A + d * torch.eye(N * C, dtype=A.dtype), KR.T)
        cov = (Kxx_ - (KR @ sol).reshape(len(fx_), C, len(fx_), C).diagonal(dim1=0, dim2=2)
               .permute(2, 0, 1)) / d  # fmt: skip
        var = cov.diagonal(dim1=1, dim2=2)
        return torch.softmax(fx_ / torch.sqrt(1 + math.pi / 8 * var), -1)

    default, marglik, validation = rows[1], rows[2], rows[3]
    # default: the initialisation prior, P / Σ E[θ²] with Kaiming-uniform's E[θ²] = 1/(3·fan_in)
    assert default.delta == pytest.approx(kaiming_isotropic(model), rel=0.07)
    d = marglik.delta
    assert evidence(d) >= max(evidence(d * 1.01), evidence(d / 1.01)) - 1e-9 * abs(evidence(d))
    for r in (default, marglik):
        np.testing.assert_allclose(r.predictions["probs"].numpy(),
                                   predictive(r.delta, Kxx, KxX, fx).numpy(), rtol=1e-6, atol=1e-9)  # fmt: skip
    # validation δ: the grid's value of least validation NLL of the same predictive
    _, KvX, Kvv, _, fv = function_space(model, ds.x_train.double(), ds.x_val.double())
    val_nll = [numpy_scores(predictive(g, Kvv, KvX, fv), ds.y_val.numpy())["nll"] for g in cfg.grid]
    assert validation.delta == pytest.approx(cfg.grid[int(np.argmin(val_nll))], rel=1e-12)
    np.testing.assert_allclose(validation.predictions["probs"].numpy(),
                               predictive(validation.delta, Kxx, KxX, fx).numpy(),
                               rtol=1e-6, atol=1e-9)  # fmt: skip

    # the bar: exactly the failed criteria, on the default rows only
    for r in rows:
        if r.workflow != "default":
            assert r.bar is None
            continue
        expected = [name for name, failed in (
            ("NLL>MAP", r.metrics["nll"] > rows[0].metrics["nll"]),
            ("ECE>MAP+0.01", r.metrics["ece"] > rows[0].metrics["ece"] + 0.01)) if failed]
        assert r.bar == expected
    table = cal.format_markdown(rows)
    assert table.count("\n| wine | 0.0001 |") == len(rows)
    assert f"{rows[1].metrics['nll']:.4f}" in table


def test_regression_rows_match_numpy_and_an_explicit_lla(gap):
    cfg, rows, _ = gap
    ds = cal.load_dataset("gap")
    y = ds.y_test.double().numpy()
    model = cal.train_network("gap", ds, 1e-4, cfg.seed, cfg.epochs)
    with torch.no_grad():
        f_train, f_test = model(ds.x_train).double(), model(ds.x_test).double().numpy()
    sigma_map = float((f_train - ds.y_train.double()).square().mean().sqrt())
    assert rows[0].sigma == pytest.approx(sigma_map, rel=1e-5)
    for r in rows:
        mean, var = (r.predictions[k].double().numpy() for k in ("mean", "var"))
        np.testing.assert_allclose(mean, f_test, rtol=1e-5, atol=1e-6)  # the linearisation point
        v = var + r.sigma**2
        nll = (0.5 * np.log(2 * np.pi * v) + (y - mean) ** 2 / (2 * v)).mean()
        assert r.metrics["nll"] == pytest.approx(nll, rel=1e-10), r
        assert r.metrics["rmse"] == pytest.approx(np.sqrt(((y - mean) ** 2).mean()), rel=1e-10)
        assert math.isfinite(r.metrics["nll_gap"]) and math.isfinite(r.metrics["nll_outside"])
    assert np.all(rows[0].predictions["var"].numpy() == 0)

    # ExactLLA: the default workflow's δ is the initialisation prior's, its σ maximises the
    # evidence at that δ; marglik maximises it in both; the variance is the function-space GP's
    default, exact = rows[1], rows[2]
    assert (default.method, default.workflow, exact.workflow) == ("ExactLLA", "default", "marglik")
    assert default.delta == pytest.approx(kaiming_isotropic(model), rel=0.07)
    model = model.double()
    KXX, KxX, Kxx, _, _ = function_space(model, ds.x_train.double(), ds.x_test.double())
    d, s2 = exact.delta, exact.sigma**2
    N = len(KXX)
    sol = torch.linalg.solve(KXX + d * s2 * torch.eye(N, dtype=KXX.dtype), KxX[:, 0].T)
    var = (Kxx[:, 0, 0] - (KxX[:, 0] * sol.T).sum(1)) / d
    np.testing.assert_allclose(exact.predictions["var"][:, 0].numpy(), var.numpy(), rtol=1e-6)
    lam = torch.linalg.eigvalsh(KXX).clamp_min(0)
    theta2 = sum(float(p.detach().square().sum()) for p in model.parameters())
    resid2 = float((f_train - ds.y_train.double()).square().sum())

    def evidence(d, s2):
        return (-0.5 * resid2 / s2 - 0.5 * N * math.log(2 * math.pi * s2) - 0.5 * d * theta2
                - 0.5 * float(torch.log1p(lam / (d * s2)).sum()))  # fmt: skip

    best = evidence(d, s2)
    for dd, ss in ((d * 1.01, s2), (d / 1.01, s2), (d, s2 * 1.01), (d, s2 / 1.01)):
        assert best >= evidence(dd, ss) - 1e-9 * abs(best)
    d0, s0 = default.delta, default.sigma**2
    assert evidence(d0, s0) >= max(evidence(d0, s0 * 1.01), evidence(d0, s0 / 1.01)) - 1e-9 * abs(evidence(d0, s0))
    assert rows[3].sigma == default.sigma and rows[3].delta in cfg.grid


def test_command_line_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    cal.add_arguments(parser)
    quick = cal.config_from_args(parser.parse_args(["--quick"]))
    assert (tuple(quick.datasets), tuple(quick.weight_decays), quick.iterations) == (
        cal.QUICK, (1e-4,), 50)
    args = parser.parse_args(["--datasets", "wine,digits", "--weight-decay", "0", "--iterations", "7"])
    cfg = cal.config_from_args(args)
    assert (tuple(cfg.datasets), tuple(cfg.weight_decays), cfg.iterations) == (
        ("wine", "digits"), (0.0,), 7)
    assert cal._command(args) == (
        "python -m fastlla calibration --datasets wine,digits --weight-decay 0 --seed 0 "
        "--iterations 7")
    with pytest.raises(ValueError, match="unknown data sets"):
        cal.run_calibration(cal.CalibrationConfig(datasets=("mnist",)))
