"""Scaling in features: ScaLLA's fit time, peak memory, state and latency versus M.

The digits CNN, the training split, a fixed number of kernel-matching steps.
"""

from __future__ import annotations

import pytest

import benchlib as bl

SECTION = "features"
CFG = bl.config()["features"]
_MODEL: list = []


@pytest.mark.parametrize("m", CFG["m"], ids=[f"M{m}" for m in CFG["m"]])
def test_features(benchmark, budget, digits_img, m):
    if not _MODEL:
        _MODEL.append(bl.make_cnn())
    s = bl.Setting(model=_MODEL[0], n_data=len(digits_img.y_train), iterations=CFG["iterations"],
                   n_features=m)  # fmt: skip
    s.extra.update(x=digits_img.x_train, y=digits_img.y_train,
                   x_test=digits_img.x_test[: s.test_batch])  # fmt: skip
    method = bl.ScaLLAMethod(s)
    benchmark.group = "fit vs M"
    row = {"section": SECTION, "model": "cnn", "key": "scalla", "M": m}
    bl.run_case(benchmark, budget, SECTION, s, method, row)
