"""8×8 glyph images rendered offline from the fonts that ship with matplotlib.

The images are made the way scikit-learn's digits were (UCI "optdigits": 32×32 bitmaps, the
count of ink pixels in each 4×4 block): each glyph's outline (``matplotlib.textpath.TextPath``)
is scaled to fit a 6×6-pixel box centred in the 8×8 frame (aspect kept), sampled on a 32×32
grid of points (inside the outline or not, by the even-odd rule over its closed contours) and averaged over 4×4 blocks, so a pixel is the
fraction of its area covered by ink, in ``[0, 1]`` like :func:`fastlla.apps.data.load_digits_split`.
No randomness, nothing downloaded: the fonts are files of the matplotlib package.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["FONTS", "LETTERS", "SYMBOLS", "render_glyphs"]

#: matplotlib's bundled TrueType fonts used by default (regular and bold, sans, serif, mono)
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
)  # fmt: skip
#: Latin letters, upper and lower case, without those that look like digits (O, o, l, I, S, s,
#: Z, z, B, g, q, b: 0, 1, 5, 2, 8, 9, 6)
LETTERS = tuple(c for c in string.ascii_letters if c not in "OolISsZzBgqb")
#: printable symbols that are neither letters nor digits
SYMBOLS = tuple("#$%&@+=?!<>*/\\[]{}()^~|;:")


def _font_path(name: str) -> str:
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)
    if not os.path.exists(path):
        raise ValueError(f"fastlla: matplotlib ships no font {name!r} (looked for {path})")
    return path


def render_glyphs(chars: Sequence[str], fonts: Sequence[str] = FONTS, box: float = 6.0) -> Tensor:
    """Every character of ``chars`` in every font of ``fonts`` as an 8×8 image.

    Parameters
    ----------
    chars : single characters.
    fonts : file names of matplotlib's bundled fonts (``mpl-data/fonts/ttf``).
    box : the side, in pixels, of the square the glyph is scaled into (its longer side fills it).

    Returns
    -------
    Tensor (len(chars)·len(fonts), 1, 8, 8), float32 in ``[0, 1]``, font-major order.
    Glyphs without an outline (a space) are refused with ``ValueError``.
    """
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath

    centres = (np.arange(32) + 0.5) / 4.0  # sample points in pixel units, 4 per pixel
    gx, gy = np.meshgrid(centres, centres)
    points = np.stack([gx.ravel(), 8.0 - gy.ravel()], axis=1)  # image rows go down
    images = []
    for font in fonts:
        prop = FontProperties(fname=_font_path(font))
        for ch in chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(f"fastlla: glyphs are single characters, got {ch!r}")
            path = None if ch.isspace() else TextPath((0, 0), ch, size=1.0, prop=prop)
            if path is None or len(path.vertices) == 0:
                raise ValueError(f"fastlla: the character {ch!r} has no outline in {font}")
            ext = path.get_extents()  # honours the path codes (a CLOSEPOLY vertex is no point)
            lo, hi = np.array([ext.x0, ext.y0]), np.array([ext.x1, ext.y1])
            scale = box / max(float((hi - lo).max()), 1e-12)
            shift = 4.0 - scale * (lo + hi) / 2.0
            placed = path.transformed(_affine(scale, shift))
            inside = np.zeros(len(points), dtype=bool)
            for polygon in placed.to_polygons():  # even-odd rule: holes (O, A, 8) stay empty
                inside ^= Path(polygon).contains_points(points)
            inside = inside.reshape(32, 32).astype(np.float32)
            images.append(inside.reshape(8, 4, 8, 4).mean(axis=(1, 3)))
    return torch.from_numpy(np.stack(images)[:, None])


def _affine(scale: float, shift: np.ndarray):
    from matplotlib.transforms import Affine2D

    return Affine2D().scale(scale).translate(float(shift[0]), float(shift[1]))
