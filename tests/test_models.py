"""Models (features/head convention, sizes) and the MAP trainer (quality, determinism, errors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastlla.apps.data import load_diabetes_split, load_digits_split, make_gap_regression
from fastlla.apps.models import MLP, DigitsCNN, train_map
from testing import single_thread


one_thread = pytest.fixture(autouse=True)(single_thread)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


# ---------------------------------------------------------------------------------- models


def test_digits_cnn_parameter_count():
    """``sum(p.numel())`` of ``DigitsCNN()`` is 11,482:
    conv 1→16 (160) + conv 16→32 (4,640) + linear 128→48 (6,192) + head 48→10 (490)."""
    model = DigitsCNN()
    assert _n_params(model) == 160 + 4640 + 6192 + 490 == 11482
    assert _n_params(model.head) == 490


@pytest.mark.parametrize(
    "model,x",
    [(DigitsCNN(), torch.rand(5, 1, 8, 8)),
     (DigitsCNN(n_classes=3, hidden=7), torch.rand(2, 1, 8, 8)),
     (MLP(4, 2), torch.randn(6, 4)),
     (MLP(4, 3, hidden=(8, 5), activation=nn.ReLU), torch.randn(6, 4)),
     (MLP(64, 10, hidden=()), torch.rand(3, 1, 8, 8))],
)  # fmt: skip
def test_features_head_convention(model, x):
    model.eval()
    out = model(x)
    h = model.features(x)
    assert isinstance(model.head, nn.Linear)
    assert h.shape == (len(x), model.head.in_features)
    assert out.shape == (len(x), model.head.out_features)
    assert torch.equal(out, model.head(h))


def test_digits_cnn_accepts_flat_and_rejects_other_shapes():
    model = DigitsCNN().eval()
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model(x), model(x.reshape(4, 64)))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.rand(4, 3, 8, 8))


def test_model_bad_sizes():
    with pytest.raises(ValueError):
        MLP(0, 1)
    with pytest.raises(ValueError):
        MLP(3, 1, hidden=(4, 0))
    with pytest.raises(ValueError):
        DigitsCNN(n_classes=0)


# ------------------------------------------------------------------------------- train_map


def test_train_map_digits_cnn_accuracy():
    """Defaults reach ≥ 0.95 test accuracy (0.975 here; about 4 s of CPU time on 1 thread).
    Speed is a benchmark's business, not a unit test's: no timing is asserted."""
    data = load_digits_split()
    torch.manual_seed(0)
    model = DigitsCNN()
    train_map(model, data.loader("train", batch_size=64, shuffle=True), "classification")
    assert not model.training
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).double().mean())
    assert acc >= 0.95


def test_train_map_mlp_gap_regression():
    data = make_gap_regression()
    torch.manual_seed(0)
    model = train_map(MLP(1, 1), data.loader("train", 32, shuffle=True), "regression")
    # noise_std is 0.1: a good fit has test RMSE near 0.1 (0.136 with the defaults)
    assert _mse(model, data.x_test, data.y_test) ** 0.5 < 0.2


def test_train_map_mlp_diabetes_with_validation():
    data = load_diabetes_split()
    torch.manual_seed(0)
    model = train_map(
        MLP(10, 1), data.loader("train", 32, shuffle=True), "regression", epochs=100,
        val_loader=data.loader("val"),
    )  # fmt: skip
    # ordinary least squares reaches RMSE 0.744 (standard units) on this split; the mean, ~0.92
    assert _mse(model, data.x_test, data.y_test) ** 0.5 < 0.85


def test_val_loader_restores_best_epoch():
    data = load_diabetes_split()

    def fit(val):
        torch.manual_seed(0)
        return train_map(
            MLP(10, 1), data.loader("train", 32, shuffle=True), "regression", epochs=40,
            val_loader=data.loader("val") if val else None,
        )  # fmt: skip

    last, best = fit(False), fit(True)
    # the same trajectory: the best epoch's validation loss can only be lower than the last's
    assert _mse(best, data.x_val, data.y_val) < _mse(last, data.x_val, data.y_val)


def test_train_map_deterministic_and_rng_neutral():
    data = make_gap_regression(n=64)

    def fit(seed):
        torch.manual_seed(1)
        model = MLP(1, 1, hidden=(16,))
        # shuffles with the global RNG, which train_map seeds
        loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=16, shuffle=True)
        torch.manual_seed(99)
        state = torch.get_rng_state()
        train_map(model, loader, "regression", epochs=5, seed=seed)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a = fit(0)
    assert torch.equal(a, fit(0))
    assert not torch.equal(a, fit(1))


def test_train_map_progress_bar_runs():
    data = make_gap_regression(n=16)
    model = train_map(
        MLP(1, 1, hidden=(4,)), data.loader("train", 8), "regression", epochs=2,
        val_loader=data.loader("val"), progress_bar=True,
    )  # fmt: skip
    assert not model.training


# ------------------------------------------------------------------------------ bad inputs


def _xy(n=8, classes=3):
    return torch.randn(n, 4), torch.randint(0, classes, (n,))


def test_train_map_bad_inputs():
    x, y = _xy()
    good = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(ValueError, match="unknown likelihood"):
        train_map(MLP(4, 3), good, "poisson")
    with pytest.raises(ValueError, match="empty"):
        train_map(MLP(4, 3), DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4))
    with pytest.raises(ValueError, match="empty"):
        train_map(MLP(4, 3), [])
    with pytest.raises(ValueError, match="val_loader is empty"):
        train_map(MLP(4, 3), good, epochs=1, val_loader=[])
    with pytest.raises(ValueError, match="labels"):
        train_map(MLP(4, 2), good)  # labels up to 2 for 2 outputs
    with pytest.raises(ValueError, match="integer labels"):
        train_map(MLP(4, 3), DataLoader(TensorDataset(x, y.float()), batch_size=4))
    with pytest.raises(ValueError, match="must match outputs"):
        train_map(MLP(4, 1), DataLoader(TensorDataset(x, torch.randn(8)), batch_size=4),
                  "regression")  # fmt: skip
    with pytest.raises(ValueError, match="epochs"):
        train_map(MLP(4, 3), good, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        train_map(MLP(4, 3), good, lr=0.0)
    frozen = MLP(4, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_map(frozen, good)
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_map(MLP(4, 3), DataLoader(TensorDataset(bad_x, y), batch_size=4))
