"""The mini world's vocabulary, scene description and rasteriser.

A scene is a plain background with a few flat-coloured shapes and, optionally, a sign that shows a
short string in the bitmap font of :mod:`tmpo.world.font`. Geometry is resolution independent:
positions and sizes are fractions of the image side (x to the right, y **down**, as in GenEval's
boxes), so one scene can be rendered at any size. Shapes are anti-aliased with a one-pixel
signed-distance ramp; the sign and its text are drawn on the pixel grid so that text stays crisp.

Every shape fills a square box ``[cx - r, cx + r] x [cy - r, cy + r]`` (``r`` = ``size`` field), so
the box of a rendered object is known exactly; the detector in :mod:`tmpo.rewards.mini_detector`
fits the same templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tmpo.world.font import ALPHABET, GAP, GLYPH_H, GLYPH_W, text_bitmap

RGB = tuple[float, float, float]

# Shapes are the world's "object classes" (GenEval's COCO names play this role).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")

# Object colours: a subset of GenEval's ten colour names, chosen far apart in RGB so that a colour
# label is unambiguous even on anti-aliased edges.
COLORS: dict[str, RGB] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.05),
    "purple": (0.60, 0.15, 0.75),
}

# Light, low-saturation backgrounds: far from every object colour and from the ink.
BACKGROUNDS: dict[str, RGB] = {
    "white": (0.97, 0.97, 0.97),
    "light gray": (0.82, 0.82, 0.82),
    "cream": (0.96, 0.92, 0.80),
    "pale blue": (0.84, 0.90, 0.97),
    "pale green": (0.86, 0.94, 0.86),
}

SIGN_BOARDS: dict[str, RGB] = {"white": (1.0, 1.0, 1.0), "pale yellow": (1.0, 0.97, 0.78)}
INKS: dict[str, RGB] = {"black": (0.05, 0.05, 0.05), "charcoal": (0.22, 0.22, 0.25)}

CROSS_ARM = 0.4  # half-width of a cross arm, as a fraction of the shape's half-extent


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``center`` = (x, y) and ``size`` (half-extent) are fractions of the image side."""

    shape: str
    color: str
    center: tuple[float, float]
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known: {tuple(COLORS)}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")

    def box(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) in image fractions."""
        (cx, cy), r = self.center, self.size
        return (cx - r, cy - r, cx + r, cy + r)


@dataclass(frozen=True)
class Sign:
    """A board with ``text`` centred on it; ``center`` is a fraction of the image side."""

    text: str
    center: tuple[float, float]
    board: str = "white"
    ink: str = "black"

    def __post_init__(self) -> None:
        if not self.text or set(self.text) - set(ALPHABET):
            raise ValueError(f"sign text {self.text!r} must be non-empty and use only {ALPHABET}")
        if self.board not in SIGN_BOARDS:
            raise ValueError(f"unknown sign board {self.board!r}; known: {tuple(SIGN_BOARDS)}")
        if self.ink not in INKS:
            raise ValueError(f"unknown ink {self.ink!r}; known: {tuple(INKS)}")


@dataclass(frozen=True)
class Scene:
    """Background name, shapes (drawn in order) and an optional sign."""

    objects: tuple[SceneObject, ...] = field(default_factory=tuple)
    background: str = "white"
    sign: Sign | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {tuple(BACKGROUNDS)}")
        object.__setattr__(self, "objects", tuple(self.objects))


def text_scale(size: int) -> int:
    """Font pixel size in image pixels: 2 at 32x32, 4 at 64x64 (a glyph stays ~1/16 of the image)."""
    return max(1, size // 16)


def sign_pixel_box(sign: Sign, size: int) -> tuple[int, int, int, int]:
    """Integer pixel box (x1, y1, x2, y2), end exclusive, of the sign board at render ``size``.

    The board is the text plus a margin of one font pixel, snapped to the pixel grid and clamped
    inside the image. Raises ValueError if the text cannot fit.
    """
    s = text_scale(size)
    n = len(sign.text)
    width = (n * GLYPH_W + (n - 1) * GAP + 2) * s
    height = (GLYPH_H + 2) * s
    if width > size or height > size:
        raise ValueError(f"sign text {sign.text!r} ({width}x{height} px) does not fit a {size}x{size} image")
    x1 = int(np.clip(round(sign.center[0] * size - width / 2), 0, size - width))
    y1 = int(np.clip(round(sign.center[1] * size - height / 2), 0, size - height))
    return x1, y1, x1 + width, y1 + height


def shape_signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of points offset (dx, dy) from a shape's centre.

    Polygon distances are the max over edge half-planes, which is exact along edges (all that the
    one-pixel anti-aliasing ramp needs) and only approximate near corners.
    """
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - r) / np.sqrt(2.0)
    if shape == "triangle":
        # Apex (0, -r), base corners (+-r, r): bottom edge plus two slanted edges with normals (+-2, -1)/sqrt5.
        slanted = (2.0 * np.abs(dx) - dy - r) / np.sqrt(5.0)
        return np.maximum(dy - r, slanted)
    if shape == "cross":
        arm = CROSS_ARM * r
        horizontal = np.maximum(np.abs(dx) - r, np.abs(dy) - arm)
        vertical = np.maximum(np.abs(dx) - arm, np.abs(dy) - r)
        return np.minimum(horizontal, vertical)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shape_coverage(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape (centre and half-extent in pixels) at pixel centres."""
    return np.clip(0.5 - shape_signed_distance(shape, xs - cx, ys - cy, r), 0.0, 1.0)


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Rasterise ``scene`` to an ``[size, size, 3]`` float32 image in [0, 1]."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[scene.background]
    if scene.sign is not None:
        x1, y1, x2, y2 = sign_pixel_box(scene.sign, size)
        image[y1:y2, x1:x2] = SIGN_BOARDS[scene.sign.board]
        s = text_scale(size)
        ink = text_bitmap(scene.sign.text, s)
        region = image[y1 + s : y1 + s + ink.shape[0], x1 + s : x1 + s + ink.shape[1]]
        region[ink] = INKS[scene.sign.ink]
    centres = np.arange(size, dtype=np.float64) + 0.5
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    for obj in scene.objects:
        alpha = shape_coverage(obj.shape, obj.center[0] * size, obj.center[1] * size, obj.size * size, xs, ys)
        alpha = alpha[..., None].astype(np.float32)
        image = image * (1.0 - alpha) + np.asarray(COLORS[obj.color], dtype=np.float32) * alpha
    return np.clip(image, 0.0, 1.0).astype(np.float32)
