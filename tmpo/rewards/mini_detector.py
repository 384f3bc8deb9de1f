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
   :mod:`tmpo.world.render`, over a small grid of centres and sizes around the component's box.
   The class is the best template; the confidence is its soft IoU
   ``sum(min(a, t)) / sum(max(a, t))``, which is ~1 for a clean shape and drops for blobs, merged
   shapes or noise (so GenEval's 0.3 / 0.9 thresholds act as on a real detector).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from tmpo.rewards.geneval import Detection
from tmpo.world.render import COLORS, SHAPES, shape_coverage

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


class MiniDetector:
    """Detects the world's shapes; ``detect(image) -> list[Detection]`` (boxes in pixels).

    Args:
        colors: palette name -> RGB; the detection's ``color`` is one of these names.
        max_residual: largest RGB distance between a pixel and its best background/colour mix for
            the pixel to count as that colour.
        min_radius: smallest half-extent accepted, as a fraction of the image side (the world's
            shapes are at least 5/32); smaller components are noise.
        search: offsets (pixels) tried around the component's centre and half-extent when fitting.
    """

    classes: tuple[str, ...] = SHAPES

    def __init__(
        self,
        colors: Mapping[str, tuple[float, float, float]] = COLORS,
        max_residual: float = 0.2,
        min_radius: float = 2.5 / 32,
        search: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5),
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
            components, n = ndimage.label(labels == k, structure=_EIGHT_NEIGHBOURS)
            for index, region in enumerate(ndimage.find_objects(components), start=1):
                fit = self._fit(alpha[..., k], components == index, labels, region, image.shape[0])
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
        """Best (shape, box, soft IoU) for one component, or None if it is too small."""
        ys, xs = region
        x1, x2, y1, y2 = xs.start, xs.stop, ys.start, ys.stop
        r0 = max(x2 - x1, y2 - y1) / 2
        if r0 < self.min_radius * size:
            return None
        # Window: the component's box plus a 1-px rim for its anti-aliased edge. Pixels claimed by
        # another component are zeroed so a neighbour cannot leak into this one's opacity map.
        wy1, wy2, wx1, wx2 = max(y1 - 1, 0), min(y2 + 1, size), max(x1 - 1, 0), min(x2 + 1, alpha.shape[1])
        window = alpha[wy1:wy2, wx1:wx2] * ~((labels[wy1:wy2, wx1:wx2] >= 0) & ~member[wy1:wy2, wx1:wx2])
        gy, gx = np.meshgrid(np.arange(wy1, wy2) + 0.5, np.arange(wx1, wx2) + 0.5, indexing="ij")
        dcx, dcy, dr = np.meshgrid(self.search, self.search, 1.5 * self.search, indexing="ij")
        cx = ((x1 + x2) / 2 + dcx).reshape(-1, 1, 1)
        cy = ((y1 + y2) / 2 + dcy).reshape(-1, 1, 1)
        r = (r0 + dr).reshape(-1, 1, 1)
        best: tuple[float, str, int] = (-1.0, "", 0)
        for shape in SHAPES:
            templates = shape_coverage(shape, cx, cy, r, gx, gy)  # [V, h, w]
            iou = np.minimum(templates, window).sum((1, 2)) / np.maximum(templates, window).sum((1, 2))
            i = int(np.argmax(iou))
            if iou[i] > best[0]:
                best = (float(iou[i]), shape, i)
        score, shape, i = best
        c_x, c_y, rad = float(cx.flat[i]), float(cy.flat[i]), float(r.flat[i])
        return shape, (c_x - rad, c_y - rad, c_x + rad, c_y + rad), score
