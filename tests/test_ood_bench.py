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
