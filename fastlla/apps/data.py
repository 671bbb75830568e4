"""Small data sets that ship with scikit-learn, split and shaped for the demo and the tests.

Nothing here downloads anything: digits and diabetes are bundled with scikit-learn, the gap
regression is synthetic. Every loader returns a :class:`Dataset` of float32 tensors (class labels
int64) with a fixed, seeded train/validation/test split, so two calls with the same arguments give
identical tensors.

Shapes
------
* digits: images ``(N, 1, 8, 8)`` in ``[0, 1]`` (``(N, 64)`` with ``flat=True``), labels ``(N,)``.
* diabetes: inputs ``(N, 10)``, targets ``(N, 1)``, both standardised with *training* statistics.
* gap regression: inputs ``(N, 1)``, targets ``(N, 1)``, plus a dense plotting grid.
* wine, breast cancer: inputs ``(N, 13)`` / ``(N, 30)`` standardised with training statistics,
  labels ``(N,)``.

The OOD variant of digits (:func:`load_digits_ood`) trains on a subset of the classes and holds the
rest out. Its OOD test images come from the test split only, and its context points (inputs a
surrogate kernel is taught to treat as unlike the data) never contain an OOD test image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "Dataset",
    "CONTEXT_RECIPES",
    "load_digits_split",
    "load_digits_ood",
    "load_tabular_split",
    "load_diabetes_split",
    "make_gap_regression",
]

_SPLITS = ("train", "val", "test")
_UNLABELLED = ("context", "ood", "grid")

#: Transformations used by ``load_digits_ood(context="transformed")``, applied round-robin.
CONTEXT_RECIPES = ("permuted", "inverted", "noise", "mixture")


@dataclass
class Dataset:
    """A fixed train/validation/test split of one data set.

    Attributes
    ----------
    x_train, x_val, x_test : Tensor
        Inputs, float32, ``(N_split, *input_shape)``.
    y_train, y_val, y_test : Tensor
        Targets: int64 class labels ``(N_split,)`` for classification, float32 ``(N_split, D)``
        for regression.
    n_classes : int or None
        Number of classes; ``None`` for regression.
    name : str
        Short name, for tables.
    x_context : Tensor or None
        Context inputs ``(N_context, *input_shape)`` (OOD split, or ``context=True``).
    x_ood : Tensor or None
        Out-of-distribution test inputs ``(N_ood, *input_shape)`` (OOD split only).
    x_grid, y_grid : Tensor or None
        Dense plotting grid ``(N_grid, 1)`` and its noise-free targets (1-D regression only).
    info : dict
        Everything else worth knowing (standardisation statistics, class maps, recipe, seed).
    """

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int | None = None
    name: str = ""
    x_context: Tensor | None = None
    x_ood: Tensor | None = None
    x_grid: Tensor | None = None
    y_grid: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def likelihood(self) -> str:
        """``"classification"`` when ``n_classes`` is set, else ``"regression"``."""
        return "classification" if self.n_classes is not None else "regression"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 8, 8)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def out_features(self) -> int:
        """Network output size: ``n_classes`` or the regression target dimension."""
        return self.n_classes if self.n_classes is not None else int(self.y_train.shape[1])

    def tensors(self, split: str) -> tuple[Tensor, ...]:
        """``(x, y)`` for ``"train"|"val"|"test"``; ``(x,)`` for ``"context"|"ood"|"grid"``."""
        if split in _SPLITS:
            return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        if split in _UNLABELLED:
            x = getattr(self, f"x_{split}")
            if x is None:
                raise ValueError(f"fastlla: data set {self.name!r} has no {split!r} inputs")
            return (x,)
        raise ValueError(
            f"fastlla: unknown split {split!r}; use one of {', '.join(_SPLITS + _UNLABELLED)}"
        )

    def loader(
        self, split: str, batch_size: int = 128, shuffle: bool = False, seed: int = 0
    ) -> DataLoader:
        """A :class:`~torch.utils.data.DataLoader` over one split.

        Parameters
        ----------
        split : str
            ``"train"``, ``"val"`` or ``"test"`` yield ``(x, y)`` batches; ``"context"``,
            ``"ood"`` and ``"grid"`` have no labels and yield 1-tuples ``(x,)``.
        batch_size : int
        shuffle : bool
            Reshuffle every epoch, from a generator seeded with ``seed`` (reproducible, and
            independent of the global RNG).
        seed : int
        """
        if int(batch_size) < 1:
            raise ValueError(f"fastlla: batch_size must be >= 1, got {batch_size}")
        generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
        return DataLoader(
            TensorDataset(*self.tensors(split)),
            batch_size=int(batch_size),
            shuffle=shuffle,
            generator=generator,
        )


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def _split_indices(
    labels: np.ndarray | None, n: int, seed: int, fractions: tuple[float, float] = (0.2, 0.2)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test row indices (60/20/20 by default), stratified by ``labels`` when given."""
    idx = np.arange(n)
    val_frac, test_frac = fractions
    rest, test = train_test_split(idx, test_size=test_frac, random_state=seed, stratify=labels)
    strat = labels[rest] if labels is not None else None
    # val_frac of the whole is val_frac / (1 - test_frac) of what is left.
    train, val = train_test_split(
        rest, test_size=val_frac / (1.0 - test_frac), random_state=seed, stratify=strat
    )
    return np.sort(train), np.sort(val), np.sort(test)


def _digits_arrays(flat: bool) -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # raw pixels are integers 0..16
    if not flat:
        x = x.reshape(-1, 1, 8, 8)
    return x, digits.target.astype(np.int64)


def load_digits_split(seed: int = 0, flat: bool = False, context: bool = False) -> Dataset:
    """scikit-learn's 8×8 digits, pixels in ``[0, 1]``, stratified 60/20/20 split.

    Parameters
    ----------
    seed : int
        ``random_state`` of the split (the default split is the one the demo reports).
    flat : bool
        Images as ``(N, 64)`` vectors instead of ``(N, 1, 8, 8)``.
    context : bool
        Also build ``x_context``: one transformed image (``CONTEXT_RECIPES``) per training
        image, as :func:`load_digits_ood` does, seeded by ``seed``.

    Returns
    -------
    Dataset
        1077 / 360 / 360 images, ``n_classes=10``.
    """
    x, y = _digits_arrays(flat)
    tr, va, te = _split_indices(y, len(y), seed)
    t = torch.from_numpy
    x_ctx = t(_transformed_context(x[tr], y[tr], len(tr), seed)) if context else None
    return Dataset(
        x_train=t(x[tr]), y_train=t(y[tr]),
        x_val=t(x[va]), y_val=t(y[va]),
        x_test=t(x[te]), y_test=t(y[te]),
        n_classes=10, name="digits", x_context=x_ctx,
        info={"seed": seed, "indices": {"train": tr, "val": va, "test": te}},
    )  # fmt: skip


def _transformed_context(x_in: np.ndarray, y_in: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Context images that leave the data manifold, built from in-distribution training images.

    Recipe (``CONTEXT_RECIPES``, applied round-robin so each gets about ``n/4`` images), each from
    an in-distribution training image drawn with replacement:

    * ``permuted``: the image's 64 pixels shuffled by a fresh random permutation (same intensity
      histogram, no stroke structure);
    * ``inverted``: ``1 - x`` (dark strokes on a bright background);
    * ``noise``: i.i.d. ``U(0, 1)`` pixels (not built from an image at all);
    * ``mixture``: the pixel-wise average of two images of *different* classes (a ghost of two
      digits).

    All randomness comes from ``numpy.random.default_rng(seed)``.
    """
    rng = np.random.default_rng(seed)
    shape = x_in.shape[1:]
    flat = x_in.reshape(len(x_in), -1)
    d = flat.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    src = rng.integers(0, len(flat), size=n)
    for i in range(n):
        kind = CONTEXT_RECIPES[i % len(CONTEXT_RECIPES)]
        img = flat[src[i]]
        if kind == "permuted":
            out[i] = img[rng.permutation(d)]
        elif kind == "inverted":
            out[i] = 1.0 - img
        elif kind == "noise":
            out[i] = rng.random(d, dtype=np.float32)
        else:
            # a partner from another class, so the blend is not just a blurred copy
            others = np.flatnonzero(y_in != y_in[src[i]])
            out[i] = 0.5 * (img + flat[others[rng.integers(len(others))]])
    return out.reshape((n, *shape))


def load_digits_ood(
    seed: int = 0,
    in_classes: Sequence[int] = (0, 1, 2, 3, 4),
    context: str = "transformed",
    n_context: int | None = None,
    flat: bool = False,
) -> Dataset:
    """Digits with some classes held out as out-of-distribution (OOD) data.

    The split is the one of :func:`load_digits_split` (same ``seed``); then

    * in-distribution train/val/test = the rows of ``in_classes`` in each split, labels remapped
      to ``0..k-1`` in the order of ``in_classes``;
    * ``x_ood`` = the held-out classes' images of the *test* split only;
    * ``x_context`` never contains an OOD test image:

      - ``context="transformed"``: images built from in-distribution *training* images by the
        transformations of ``CONTEXT_RECIPES`` (see ``_transformed_context``), seeded by ``seed``;
      - ``context="ood_train"``: the held-out classes' images of the *training* split (disjoint
        from ``x_ood`` by construction; an optimistic setting, since context and OOD test share
        classes).

    Parameters
    ----------
    seed : int
    in_classes : sequence of int
        Digits kept as in-distribution (at least 2, at most 9, distinct, in ``0..9``).
    context : {"transformed", "ood_train"}
    n_context : int, optional
        Number of context points. Default: the number of in-distribution training images for
        ``"transformed"``; all held-out training images for ``"ood_train"`` (a seeded random
        subset when given and smaller).
    flat : bool
        ``(N, 64)`` instead of ``(N, 1, 8, 8)``.

    Returns
    -------
    Dataset
        ``n_classes = len(in_classes)``, with ``x_context`` and ``x_ood`` set; ``info`` records
        ``in_classes``, ``out_classes``, ``context``, the recipe and the OOD images' true digits
        (``y_ood_digit``).
    """
    in_classes = tuple(int(c) for c in in_classes)
    if len(set(in_classes)) != len(in_classes) or not all(0 <= c <= 9 for c in in_classes):
        raise ValueError(f"fastlla: in_classes must be distinct digits 0..9, got {in_classes}")
    if not 2 <= len(in_classes) <= 9:
        raise ValueError(f"fastlla: need 2..9 in_classes, got {len(in_classes)}")
    if context not in ("transformed", "ood_train"):
        raise ValueError(
            f"fastlla: unknown context {context!r}; use 'transformed' or 'ood_train'"
        )
    if n_context is not None and int(n_context) < 1:
        raise ValueError(f"fastlla: n_context must be >= 1, got {n_context}")

    base = load_digits_split(seed=seed, flat=flat)
    out_classes = tuple(c for c in range(10) if c not in in_classes)
    remap = torch.full((10,), -1, dtype=torch.int64)
    remap[list(in_classes)] = torch.arange(len(in_classes))
    is_in = torch.zeros(10, dtype=torch.bool)
    is_in[list(in_classes)] = True

    def keep_in(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        m = is_in[y]
        return x[m].clone(), remap[y[m]]

    x_tr, y_tr = keep_in(base.x_train, base.y_train)
    x_va, y_va = keep_in(base.x_val, base.y_val)
    x_te, y_te = keep_in(base.x_test, base.y_test)
    ood_mask = ~is_in[base.y_test]
    x_ood = base.x_test[ood_mask].clone()

    if context == "transformed":
        n = len(x_tr) if n_context is None else int(n_context)
        # labels only pick mixture partners of a different class
        x_ctx = torch.from_numpy(_transformed_context(x_tr.numpy(), y_tr.numpy(), n, seed))
        recipe = CONTEXT_RECIPES
    else:
        pool = base.x_train[~is_in[base.y_train]]
        if n_context is not None and int(n_context) < len(pool):
            rng = np.random.default_rng(seed)
            pool = pool[torch.from_numpy(np.sort(rng.permutation(len(pool))[: int(n_context)]))]
        x_ctx = pool.clone()
        recipe = ("ood_train",)

    return Dataset(
        x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va, x_test=x_te, y_test=y_te,
        n_classes=len(in_classes), name=f"digits-ood[{''.join(map(str, in_classes))}]",
        x_context=x_ctx, x_ood=x_ood,
        info={
            "seed": seed, "in_classes": in_classes, "out_classes": out_classes,
            "context": context, "recipe": recipe, "y_ood_digit": base.y_test[ood_mask].clone(),
        },
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# tabular classification
# --------------------------------------------------------------------------------------------

_TABULAR = {"wine": load_wine, "breast_cancer": load_breast_cancer}


def load_tabular_split(name: str, seed: int = 0) -> Dataset:
    """scikit-learn's wine (178 × 13, 3 classes) or breast cancer (569 × 30, 2 classes),
    stratified 60/20/20 split, inputs standardised with the *training* split's statistics
    (``info["x_mean"]``, ``info["x_std"]``).

    Parameters
    ----------
    name : {"wine", "breast_cancer"}
    seed : int
        ``random_state`` of the split.

    Returns
    -------
    Dataset
        wine 106 / 36 / 36 rows, breast cancer 341 / 114 / 114; ``x`` float32 ``(N, D)``,
        ``y`` int64 ``(N,)``.

    Raises
    ------
    ValueError
        Unknown ``name``.
    """
    if name not in _TABULAR:
        raise ValueError(
            f"fastlla: unknown tabular data set {name!r}; use one of {sorted(_TABULAR)}"
        )
    raw = _TABULAR[name]()
    x, y = raw.data.astype(np.float64), raw.target.astype(np.int64)
    tr, va, te = _split_indices(y, len(y), seed)
    x_mean, x_std = x[tr].mean(0), x[tr].std(0)
    xs = torch.from_numpy(((x - x_mean) / x_std).astype(np.float32))
    t = torch.from_numpy
    return Dataset(
        x_train=xs[tr], y_train=t(y[tr]), x_val=xs[va], y_val=t(y[va]),
        x_test=xs[te], y_test=t(y[te]), n_classes=int(y.max()) + 1, name=name,
        info={"seed": seed, "x_mean": x_mean, "x_std": x_std},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------------------------


def load_diabetes_split(seed: int = 0) -> Dataset:
    """scikit-learn's diabetes regression (442 × 10), 60/20/20 split, standardised.

    Inputs and targets are standardised with the *training* split's mean and standard deviation
    (stored in ``info`` as ``x_mean, x_std, y_mean, y_std``, to map predictions back with
    ``y * y_std + y_mean``), so the validation and test splits are only approximately standard.

    Returns
    -------
    Dataset
        264 / 89 / 89 rows; ``x`` ``(N, 10)``, ``y`` ``(N, 1)``, ``n_classes=None``.
    """
    raw = load_diabetes()
    x = raw.data.astype(np.float64)
    y = raw.target.astype(np.float64)[:, None]
    tr, va, te = _split_indices(None, len(y), seed)
    x_mean, x_std = x[tr].mean(0), x[tr].std(0)
    y_mean, y_std = y[tr].mean(0), y[tr].std(0)

    def f32(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.float32))

    xs, ys = (x - x_mean) / x_std, (y - y_mean) / y_std
    return Dataset(
        x_train=f32(xs[tr]), y_train=f32(ys[tr]),
        x_val=f32(xs[va]), y_val=f32(ys[va]),
        x_test=f32(xs[te]), y_test=f32(ys[te]),
        name="diabetes",
        info={"seed": seed, "x_mean": f32(x_mean), "x_std": f32(x_std),
              "y_mean": f32(y_mean), "y_std": f32(y_std)},
    )  # fmt: skip


def make_gap_regression(
    n: int = 200,
    seed: int = 0,
    noise_std: float = 0.1,
    n_grid: int = 500,
    grid: tuple[float, float] = (-5.0, 5.0),
) -> Dataset:
    """1-D regression with a gap in the inputs, for plotting predictive bands.

    ``x ~ U([-3, -1] ∪ [1, 3])`` (each interval equally likely), ``y = sin(2x) + noise_std · ε``,
    ``ε ~ N(0, 1)``. A well-calibrated posterior is confident on the two intervals and grows
    uncertain in the gap ``(-1, 1)`` and outside ``[-3, 3]``.

    Parameters
    ----------
    n : int
        Training points; validation and test get ``max(n // 4, 1)`` fresh points each, from the
        same distribution.
    seed : int
        Seeds ``numpy.random.default_rng``.
    noise_std : float
        Observation noise (also in ``info["noise_std"]``).
    n_grid : int
        Points of the evenly spaced plotting grid over ``grid``.
    grid : (float, float)

    Returns
    -------
    Dataset
        ``x`` ``(N, 1)``, ``y`` ``(N, 1)``; ``x_grid`` ``(n_grid, 1)`` with noise-free
        ``y_grid = sin(2 x_grid)``.
    """
    if int(n) < 1 or int(n_grid) < 2:
        raise ValueError(f"fastlla: need n >= 1 and n_grid >= 2, got n={n}, n_grid={n_grid}")
    if not (noise_std >= 0 and math.isfinite(noise_std)):
        raise ValueError(f"fastlla: noise_std must be finite and >= 0, got {noise_std}")
    rng = np.random.default_rng(seed)

    def draw(m: int) -> tuple[Tensor, Tensor]:
        side = rng.choice([-1.0, 1.0], size=m)
        x = side * rng.uniform(1.0, 3.0, size=m)
        y = np.sin(2.0 * x) + noise_std * rng.standard_normal(m)
        return (torch.from_numpy(x.astype(np.float32)[:, None]),
                torch.from_numpy(y.astype(np.float32)[:, None]))  # fmt: skip

    n_hold = max(int(n) // 4, 1)
    x_tr, y_tr = draw(int(n))
    x_va, y_va = draw(n_hold)
    x_te, y_te = draw(n_hold)
    x_grid = torch.linspace(grid[0], grid[1], int(n_grid), dtype=torch.float32)[:, None]
    return Dataset(
        x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va, x_test=x_te, y_test=y_te,
        name="gap-regression", x_grid=x_grid, y_grid=torch.sin(2.0 * x_grid),
        info={"seed": seed, "noise_std": float(noise_std), "support": ((-3.0, -1.0), (1.0, 3.0))},
    )  # fmt: skip
