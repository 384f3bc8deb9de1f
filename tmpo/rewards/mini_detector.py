"""The mini world's object detector: colour segmentation plus shape-template fitting.

Pipeline for one ``[H, W, 3]`` image in [0, 1]:

1. Background colour = per-channel median of the border pixels (shapes and signs keep off the
   border, so the border is background).
2. Per pixel and palette colour ``c``: the opacity ``a`` that best explains the pixel as
   ``background + a (c - background)`` and the residual of that fit. This models anti-aliased
   edges exactly, so an edge pixel is not mistaken for a different colour. A pixel belongs to the
   colour with the smallest residual if ``a > 0.5`` and the residual is small; sign boards (pale,
   ``a`` ~ 0) and ink (large residual for every colour) belong to none.
3. Connected components (8-neighbourhood) per colour; one component = one candidate object.
4. Each candidate's soft opacity map is compared with every shape template of
   :mod:`tmpo.world.render`. Under each shape hypothesis the centroid and the total opacity give
   the centre and size (exact on a clean render); a small grid around them absorbs noise.
   The class is the best template; the confidence is its soft IoU
   ``sum(min(a, t)) / sum(max(a, t))``, which is ~1 for a clean shape and drops for blobs, merged
   shapes or noise (so GenEval's 0.3 / 0.9 thresholds act as on a real detector).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from tmpo.rewards.geneval import Detection
from tmpo.world.render import COLORS, CROSS_ARM, SHAPES, shape_coverage

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)
# Area of each shape in units of r^2 (r = half-extent); the cross has arms of half-width CROSS_ARM * r.
_AREA_PER_R2 = {
    "circle": np.pi,
    "square": 4.0,
    "triangle": 2.0,
    "diamond": 2.0,
    "cross": 8.0 * CROSS_ARM - 4.0 * CROSS_ARM**2,
}


class MiniDetector:
    """Detects the world's shapes; ``detect(image) -> list[Detection]`` (boxes in pixels).

    Args:
        colors: palette name -> RGB; the detection's ``color`` is one of these names.
        max_residual: largest RGB distance between a pixel and its best background/colour mix for
            the pixel to count as that colour.
        min_radius: smallest half-extent accepted, as a fraction of the image side (the world's
            shapes are at least 5/32); smaller components are noise.
        search: offsets (pixels) tried around the moment estimate of the centre when fitting; the
            half-extent is scaled by ``1 + offset / 5`` over the same values.
    """

    classes: tuple[str, ...] = SHAPES

    def __init__(
        self,
        colors: Mapping[str, tuple[float, float, float]] = COLORS,
        max_residual: float = 0.2,
        min_radius: float = 2.5 / 32,
        search: tuple[float, ...] = (-0.3, -0.15, 0.0, 0.15, 0.3),
    ) -> None:
        self.color_names = tuple(colors)
        self.palette = np.asarray([colors[c] for c in self.color_names], dtype=np.float64)  # [K, 3]
        self.max_residual = max_residual
        self.min_radius = min_radius
        self.search = np.asarray(search, dtype=np.float64)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Detections of every shape-like colour component in ``image`` ``[H, W, 3]`` in [0, 1]."""
        image = np.asarray(image, dtype=np.float64)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be [H, W, 3], got {image.shape}")
        labels, alpha = self.segment(image)
        detections = []
        for k, name in enumerate(self.color_names):
            components, _ = ndimage.label(labels == k, structure=_EIGHT_NEIGHBOURS)
            for index, region in enumerate(ndimage.find_objects(components), start=1):
                fit = self._fit(alpha[..., k], components == index, labels, region, max(image.shape[:2]))
                if fit is not None:
                    shape, box, score = fit
                    detections.append(Detection(shape, box, score, name))
        return detections

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel colour index (-1 = none) ``[H, W]`` and opacity per colour ``[H, W, K]``."""
        border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
        background = np.median(border, axis=0)
        offset = image - background  # [H, W, 3]
        direction = self.palette - background  # [K, 3]
        alpha = np.clip(offset @ direction.T / np.maximum((direction**2).sum(-1), 1e-6), 0.0, 1.0)  # [H, W, K]
        residual = np.linalg.norm(offset[..., None, :] - alpha[..., None] * direction, axis=-1)  # [H, W, K]
        valid = (alpha > 0.5) & (residual < self.max_residual)
        best = np.argmin(np.where(valid, residual, np.inf), axis=-1)
        labels = np.where(valid.any(-1), best, -1)
        return labels, alpha

    def _fit(
        self, alpha: np.ndarray, member: np.ndarray, labels: np.ndarray, region: tuple[slice, slice], size: int
    ) -> tuple[str, tuple[float, float, float, float], float] | None:
        """Best (shape, box, soft IoU) for one component, or None if it is too small.

        ``size`` is the image side, against which ``min_radius`` is measured.
        """
        ys, xs = region
        x1, x2, y1, y2 = xs.start, xs.stop, ys.start, ys.stop
        r0 = max(x2 - x1, y2 - y1) / 2
        if r0 < self.min_radius * size:
            return None
        # Window: the component's box plus a 1-px rim for its anti-aliased edge. Pixels claimed by
        # another component are zeroed so a neighbour cannot leak into this one's opacity map.
        wy1, wy2, wx1, wx2 = max(y1 - 1, 0), min(y2 + 1, alpha.shape[0]), max(x1 - 1, 0), min(x2 + 1, alpha.shape[1])
        window = alpha[wy1:wy2, wx1:wx2] * ~((labels[wy1:wy2, wx1:wx2] >= 0) & ~member[wy1:wy2, wx1:wx2])
        gy, gx = np.meshgrid(np.arange(wy1, wy2) + 0.5, np.arange(wx1, wx2) + 0.5, indexing="ij")
        mass = window.sum()
        mx, my = (window * gx).sum() / mass, (window * gy).sum() / mass
        best: tuple[float, str, np.ndarray] = (-1.0, "", np.zeros(3))
        for shape in SHAPES:
            # Moment estimate for this shape hypothesis (exact on a clean render), refined on a grid.
            r_hat = np.sqrt(mass / _AREA_PER_R2[shape])
            # A triangle's centroid sits r/3 below its box centre; the other shapes are symmetric.
            cy_hat = my - r_hat / 3 if shape == "triangle" else my
            grid = np.meshgrid(mx + self.search, cy_hat + self.search, r_hat * (1 + self.search / 5), indexing="ij")
            params = np.stack(grid, -1).reshape(-1, 3)  # [V, (cx, cy, r)]
            cx, cy, r = (params[:, j, None, None] for j in range(3))
            templates = shape_coverage(shape, cx, cy, r, gx, gy)  # [V, h, w]
            iou = np.minimum(templates, window).sum((1, 2)) / np.maximum(templates, window).sum((1, 2))
            i = int(np.argmax(iou))
            if iou[i] > best[0]:
                best = (float(iou[i]), shape, params[i])
        score, shape, (c_x, c_y, rad) = best
        return shape, (float(c_x - rad), float(c_y - rad), float(c_x + rad), float(c_y + rad)), score
