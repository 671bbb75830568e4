"""Data splits: shapes, stratification, determinism, standardisation, and OOD disjointness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine

from fastlla.apps.data import (
    CONTEXT_RECIPES,
    Dataset,
    load_diabetes_split,
    load_digits_ood,
    load_digits_split,
    load_tabular_split,
    make_gap_regression,
)


def _rows(x: torch.Tensor) -> set[bytes]:
    """Each row's exact bytes, for exact set comparisons between tensors."""
    flat = x.reshape(len(x), -1).contiguous().numpy()
    return {row.tobytes() for row in flat}


def _same(a: Dataset, b: Dataset) -> bool:
    names = ["x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "x_context", "x_ood",
             "x_grid", "y_grid"]  # fmt: skip
    for name in names:
        u, v = getattr(a, name), getattr(b, name)
        if (u is None) != (v is None) or (u is not None and not torch.equal(u, v)):
            return False
    return True


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits_split()


@pytest.fixture(scope="module")
def ood() -> Dataset:
    return load_digits_ood()


# ---------------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range(digits):
    sizes = [len(digits.x_train), len(digits.x_val), len(digits.x_test)]
    assert sizes == [1077, 360, 360] and sum(sizes) == 1797
    for x, y in [digits.tensors(s) for s in ("train", "val", "test")]:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and y.shape == (len(x),)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert digits.n_classes == 10 and digits.likelihood == "classification"
    assert digits.input_shape == (1, 8, 8) and digits.out_features == 10
    flat = load_digits_split(flat=True)
    assert flat.x_train.shape == (1077, 64)
    assert torch.equal(flat.x_train, digits.x_train.reshape(-1, 64))


def test_digits_split_partitions_the_data_exactly(digits):
    raw = load_digits()
    all_rows = _rows(torch.from_numpy((raw.data / 16.0).astype(np.float32)))
    parts = [_rows(digits.x_train), _rows(digits.x_val), _rows(digits.x_test)]
    assert sum(len(p) for p in parts) == len(all_rows) == 1797  # digits has no duplicate images
    assert set().union(*parts) == all_rows
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_digits_split_is_stratified(digits):
    overall = np.bincount(load_digits().target, minlength=10) / 1797
    for y in (digits.y_train, digits.y_val, digits.y_test):
        props = np.bincount(y.numpy(), minlength=10) / len(y)
        # stratification keeps every class within one sample of its overall share
        assert np.abs(props - overall).max() <= 1.0 / len(y) + 1e-12


def test_digits_deterministic_and_seed_dependent(digits):
    assert _same(digits, load_digits_split(seed=0))
    other = load_digits_split(seed=1)
    assert not torch.equal(other.x_train, digits.x_train)


def test_loader_batches_and_seeded_shuffle(digits):
    batches = list(digits.loader("val", batch_size=100))
    assert [len(b[0]) for b in batches] == [100, 100, 100, 60]
    assert torch.equal(torch.cat([b[0] for b in batches]), digits.x_val)
    assert torch.equal(torch.cat([b[1] for b in batches]), digits.y_val)

    def order(seed):
        return torch.cat([y for _, y in digits.loader("train", 256, shuffle=True, seed=seed)])

    torch.manual_seed(123)  # the global RNG must not matter
    a = order(0)
    torch.manual_seed(456)
    assert torch.equal(a, order(0))
    assert not torch.equal(a, order(1))
    assert torch.equal(a.sort().values, digits.y_train.sort().values)


def test_loader_bad_split(digits):
    with pytest.raises(ValueError, match="unknown split"):
        digits.loader("training")
    with pytest.raises(ValueError, match="no 'context'"):
        digits.loader("context")
    with pytest.raises(ValueError, match="batch_size"):
        digits.loader("train", batch_size=0)


# ------------------------------------------------------------------------------------- OOD


def test_ood_in_distribution_labels_and_shapes(ood, digits):
    assert ood.n_classes == 5 and ood.info["out_classes"] == (5, 6, 7, 8, 9)
    for y in (ood.y_train, ood.y_val, ood.y_test):
        assert set(y.unique().tolist()) == {0, 1, 2, 3, 4}
    # the in-distribution train split is the base split's rows of classes 0..4
    assert torch.equal(ood.x_train, digits.x_train[digits.y_train < 5])
    assert torch.equal(ood.x_ood, digits.x_test[digits.y_test >= 5])
    assert ood.x_context.shape[1:] == (1, 8, 8) and ood.x_context.dtype == torch.float32
    assert len(ood.x_context) == len(ood.x_train)
    (x,) = next(iter(ood.loader("context", batch_size=7)))
    assert x.shape == (7, 1, 8, 8)


def test_ood_label_remap_follows_in_classes(digits):
    data = load_digits_ood(in_classes=(7, 3, 9))
    y_base = digits.y_train[(digits.y_train == 7) | (digits.y_train == 3) | (digits.y_train == 9)]
    expected = torch.tensor([-1, -1, -1, 1, -1, -1, -1, 0, -1, 2])[y_base]
    assert torch.equal(data.y_train, expected)
    assert set(data.info["y_ood_digit"].tolist()) == {0, 1, 2, 4, 5, 6, 8}


@pytest.mark.parametrize("context", ["transformed", "ood_train"])
def test_ood_context_never_contains_ood_test_images(context, digits):
    data = load_digits_ood(context=context)
    ood_rows = _rows(data.x_ood)
    assert len(ood_rows) == len(data.x_ood)
    assert not ood_rows & _rows(data.x_context)
    assert not ood_rows & _rows(data.x_train)
    assert not ood_rows & _rows(data.x_val)
    assert not ood_rows & _rows(data.x_test)
    # OOD test images are exactly the held-out classes' test images
    held_out = digits.x_test[digits.y_test >= 5]
    assert ood_rows == _rows(held_out)
    if context == "ood_train":
        assert _rows(data.x_context) == _rows(digits.x_train[digits.y_train >= 5])


def test_transformed_context_recipe(ood):
    x_in = ood.x_train.reshape(len(ood.x_train), -1)
    ctx = ood.x_context.reshape(len(ood.x_context), -1)
    in_rows = _rows(x_in)
    assert not _rows(ctx) & in_rows  # nothing is a copy of a training image
    assert float(ctx.min()) >= 0.0 and float(ctx.max()) <= 1.0
    sorted_in = {np.sort(r).tobytes() for r in x_in.numpy()}
    for i, kind in enumerate(CONTEXT_RECIPES):
        row = ctx[i].numpy()
        if kind == "permuted":  # same pixel values as some training image, new arrangement
            assert np.sort(row).tobytes() in sorted_in
        elif kind == "inverted":
            assert (1.0 - ctx[i]).numpy().tobytes() in in_rows
    # round-robin: each recipe gets a quarter
    assert len(ctx) // len(CONTEXT_RECIPES) >= 100


def test_ood_deterministic_and_n_context(ood):
    assert _same(ood, load_digits_ood())
    assert len(load_digits_ood(n_context=37).x_context) == 37
    small = load_digits_ood(context="ood_train", n_context=20)
    assert len(small.x_context) == 20
    again = load_digits_ood(context="ood_train", n_context=20)
    assert torch.equal(small.x_context, again.x_context)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"in_classes": (0, 0, 1)}, "distinct"), ({"in_classes": (0, 10)}, "distinct"),
     ({"in_classes": (3,)}, "2..9"), ({"context": "noise"}, "unknown context"),
     ({"n_context": 0}, "n_context")],
)  # fmt: skip
def test_ood_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_ood(**kwargs)


# ------------------------------------------------------------------------------ regression


def test_diabetes_standardised_with_train_statistics():
    data = load_diabetes_split()
    assert [len(data.x_train), len(data.x_val), len(data.x_test)] == [264, 89, 89]
    assert data.x_train.shape[1] == 10 and data.y_train.shape == (264, 1)
    assert data.n_classes is None and data.likelihood == "regression" and data.out_features == 1
    for t in (data.x_train, data.y_train):
        assert t.dtype == torch.float32
        assert t.double().mean(0).abs().max() < 1e-5
        assert (t.double().std(0, unbiased=False) - 1).abs().max() < 1e-5
    # undoing the standardisation recovers sklearn's raw data, row for row
    raw = load_diabetes()
    info = data.info
    y_back = data.y_test * info["y_std"] + info["y_mean"]
    x_back = data.x_test * info["x_std"] + info["x_mean"]
    test_idx = np.array([
        int(np.argmin(np.abs(raw.data - row).sum(1))) for row in x_back.double().numpy()
    ])  # fmt: skip
    assert np.allclose(raw.data[test_idx], x_back.numpy(), atol=1e-6)
    assert np.allclose(raw.target[test_idx], y_back[:, 0].numpy(), rtol=1e-5)
    assert _same(data, load_diabetes_split())


@pytest.mark.parametrize("name, loader, sizes", [
    ("wine", load_wine, [106, 36, 36]), ("breast_cancer", load_breast_cancer, [341, 114, 114]),
])  # fmt: skip
def test_tabular_split_stratified_and_standardised_with_train_statistics(name, loader, sizes):
    data = load_tabular_split(name)
    raw = loader()
    assert [len(data.x_train), len(data.x_val), len(data.x_test)] == sizes
    assert data.n_classes == len(np.unique(raw.target)) and data.likelihood == "classification"
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.x_train.double().mean(0).abs().max() < 1e-5
    assert (data.x_train.double().std(0, unbiased=False) - 1).abs().max() < 1e-5
    # every row of sklearn's data in exactly one split, with its label
    back = torch.cat([data.x_train, data.x_val, data.x_test]).double().numpy()
    back = back * data.info["x_std"] + data.info["x_mean"]
    labels = torch.cat([data.y_train, data.y_val, data.y_test]).numpy()
    order = [int(np.argmin(np.abs(raw.data - row).sum(1))) for row in back]
    assert sorted(order) == list(range(len(raw.target)))
    assert np.allclose(raw.data[order], back, rtol=1e-5, atol=1e-4)
    assert (raw.target[order] == labels).all()
    # stratified: class shares of train and test within one sample of the whole's
    for split in (data.y_train, data.y_test):
        share = np.bincount(split.numpy(), minlength=data.n_classes) / len(split)
        assert np.abs(share - np.bincount(raw.target) / len(raw.target)).max() <= 1 / len(split)
    assert _same(data, load_tabular_split(name))
    with pytest.raises(ValueError, match="unknown tabular data set 'iris'"):
        load_tabular_split("iris")


def test_gap_regression():
    data = make_gap_regression(n=200, seed=0)
    assert data.x_train.shape == (200, 1) and data.y_train.shape == (200, 1)
    assert data.x_val.shape == (50, 1) and data.x_test.shape == (50, 1)
    for x in (data.x_train, data.x_val, data.x_test):
        a = x.abs()
        assert bool(((a >= 1) & (a <= 3)).all())  # nothing in the gap (-1, 1)
    assert bool((data.x_train < 0).any()) and bool((data.x_train > 0).any())
    resid = data.y_train - torch.sin(2 * data.x_train)
    assert 0.07 < float(resid.std()) < 0.13  # noise_std 0.1
    assert data.x_grid.shape == (500, 1)
    assert float(data.x_grid.min()) == -5.0 and float(data.x_grid.max()) == 5.0
    assert torch.allclose(data.y_grid, torch.sin(2 * data.x_grid))
    assert _same(data, make_gap_regression(n=200, seed=0))
    assert not torch.equal(data.x_train, make_gap_regression(n=200, seed=1).x_train)
    (x,) = next(iter(data.loader("grid", batch_size=64)))
    assert x.shape == (64, 1)
    with pytest.raises(ValueError):
        make_gap_regression(n=0)
    with pytest.raises(ValueError):
        make_gap_regression(noise_std=float("nan"))
