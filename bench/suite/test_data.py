"""Scaling in data: fit time and peak memory versus the number of training points N.

The digits CNN on N = the training split replicated (copies carry small pixel noise). ScaLLA's
kernel matching is a fixed number of steps (independent of N); its posterior is one pass over
the data. ExactLLA's function-space form grows with (N·C)².
"""

from __future__ import annotations

import pytest

import benchlib as bl

SECTION = "data"
CFG = bl.config()["data"]
CASES = [(n, k) for k in CFG["methods"] for n in CFG["n"]]  # ScaLLA first
_MODEL: list = []


@pytest.mark.parametrize("n,method_key", CASES, ids=[f"N{n}-{k}" for n, k in CASES])
def test_data(benchmark, budget, digits_img, n, method_key):
    if not _MODEL:
        _MODEL.append(bl.make_cnn())
    x, y = bl.replicate(digits_img.x_train, digits_img.y_train, n)
    s = bl.Setting(model=_MODEL[0], n_data=n, iterations=CFG["iterations"],
                   n_features=CFG["n_features"])  # fmt: skip
    s.extra.update(x=x, y=y, x_test=digits_img.x_test[: s.test_batch])
    method = bl.methods(s, [method_key])[0]
    benchmark.group = f"fit N={n}"
    row = {"section": SECTION, "model": "cnn", "key": method_key}
    bl.run_case(benchmark, budget, SECTION, s, method, row)
