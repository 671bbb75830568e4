"""Scaling in parameters: MLPs with P = 10³…10⁷ on flat digits, and the digits CNN.

For each (model, method): fit time and real peak memory, fitted-state bytes, and the latency of
the predictive for a batch of 256 (mean + covariance, and probit probabilities) beside the MAP
forward pass. A method whose predicted memory or time exceeds the caps is recorded with its
predicted need and not run.
"""

from __future__ import annotations

import pytest

import benchlib as bl

SECTION = "params"
CFG = bl.config()
CASES = [(m, k) for m in CFG["params"]["models"] for k in CFG["params"]["methods"]]
_SETTINGS: dict[str, bl.Setting] = {}


def setting(model_key: str, ds_flat, ds_img) -> bl.Setting:
    if model_key not in _SETTINGS:
        _SETTINGS.clear()  # keep one (possibly 40 MB) model alive at a time
        if model_key == "cnn":
            model, ds = bl.make_cnn(), ds_img
        else:
            model, ds = bl.make_mlp(float(model_key.split("-")[1])), ds_flat
        s = bl.Setting(
            model=model, n_data=len(ds.y_train), iterations=CFG["params"]["iterations"],
            n_features=CFG["params"]["n_features"],
        )  # fmt: skip
        s.extra.update(x=ds.x_train, y=ds.y_train, x_test=ds.x_test[: s.test_batch])
        _SETTINGS[model_key] = s
    return _SETTINGS[model_key]


@pytest.mark.parametrize("model_key,method_key", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_params(benchmark, budget, digits_flat, digits_img, model_key, method_key):
    s = setting(model_key, digits_flat, digits_img)
    method = bl.methods(s, [method_key])[0]
    benchmark.group = f"fit P≈{model_key}"
    row = {"section": SECTION, "model": model_key, "key": method_key}
    skip = CFG["params"].get("skip", {}).get(model_key, [])
    if method_key == "scalla" and not bl._ops.NATIVE_LOADED:
        skip = CFG["params"].get("skip_no_native", [])
        skip = ["scalla"] if model_key in skip else []
    if method_key in skip:
        bl.record({**row, "method": method.name, "family": method.family, "P": s.P,
                   "status": "not run in this mode",
                   "reason": "measured on the CNN (same P)" if bl._ops.NATIVE_LOADED
                   else "the reference ops take minutes at this P"})
        pytest.skip("not run in this mode")
    bl.run_case(benchmark, budget, SECTION, s, method, row)
