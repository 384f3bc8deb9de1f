"""The mini world's text reader: find the ink, infer the glyph grid, match glyph templates.

Ink is any dark, unsaturated pixel (max channel below ~0.5): the signs' black or charcoal text.
Object colours, backgrounds and sign boards all have a bright channel, so they are never ink.
Every glyph of :mod:`tmpo.world.font` touches all four sides of its 3x5 cell, so the bounding box
of the ink is ``5`` font pixels high and ``4 n - 1`` font pixels wide for ``n`` characters; this
gives the font scale and the number of characters. Each glyph cell is then averaged into a 3x5
grid of ink fractions and matched to the nearest font glyph (L1 distance).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from tmpo.world.font import GAP, GLYPH_H, GLYPH_W, GLYPHS

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


class MiniTextReader:
    """Reads the bitmap-font text of a mini-world sign; ``read(image) -> str`` ("" if no ink).

    Args:
        ink_level: max-channel value at which a pixel counts as half ink; darkness ramps linearly
            from 1 at ``ink_level - 0.1`` to 0 at ``ink_level + 0.1``.
        min_component: ink components smaller than this many pixels are ignored as specks.
    """

    def __init__(self, ink_level: float = 0.4, min_component: int = 2) -> None:
        self.ink_level = ink_level
        self.min_component = min_component
        self._chars = list(GLYPHS)
        self._templates = np.stack([GLYPHS[c].astype(np.float64) for c in self._chars])  # [C, 5, 3]

    def ink(self, image: np.ndarray) -> np.ndarray:
        """Soft ink map ``[H, W]`` in [0, 1]."""
        image = np.asarray(image, dtype=np.float64)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be [H, W, 3], got {image.shape}")
        return np.clip((self.ink_level + 0.1 - image.max(-1)) / 0.2, 0.0, 1.0)

    def read(self, image: np.ndarray) -> str:
        """The recognised string, upper-case A-Z0-9."""
        darkness = self.ink(image)
        mask = darkness > 0.5
        components, n = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
        if n == 0:
            return ""
        sizes = ndimage.sum(mask, components, index=np.arange(1, n + 1))
        mask &= np.isin(components, 1 + np.flatnonzero(sizes >= self.min_component))
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            return ""
        y1, y2, x1, x2 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        pixel_h = (y2 - y1) / GLYPH_H  # image pixels per font pixel
        advance = GLYPH_W + GAP
        n_chars = max(1, round(((x2 - x1) / pixel_h + GAP) / advance))
        pixel_w = (x2 - x1) / (n_chars * advance - GAP)
        centres_y = np.arange(y1, y2) + 0.5
        centres_x = np.arange(x1, x2) + 0.5
        # Font-pixel row / column of every image pixel in the box (columns include the gaps).
        font_row = np.minimum(((centres_y - y1) / pixel_h).astype(int), GLYPH_H - 1)
        font_col = np.minimum(((centres_x - x1) / pixel_w).astype(int), n_chars * advance - GAP - 1)
        box = darkness[y1:y2, x1:x2]
        cells = np.zeros((GLYPH_H, n_chars * advance))
        counts = np.zeros_like(cells)
        np.add.at(cells, (font_row[:, None], font_col[None, :]), box)
        np.add.at(counts, (font_row[:, None], font_col[None, :]), 1.0)
        grid = cells / np.maximum(counts, 1.0)  # [5, n * 4]: mean ink per font pixel
        text = []
        for i in range(n_chars):
            glyph = grid[:, i * advance : i * advance + GLYPH_W]
            distances = np.abs(self._templates - glyph).sum((1, 2))
            text.append(self._chars[int(np.argmin(distances))])
        return "".join(text)
