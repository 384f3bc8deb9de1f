"""A 3x5 bitmap font for the mini world's signs (upper-case A-Z and digits 0-9).

Every glyph touches all four sides of its 3x5 cell, so the ink bounding box of a string is
exactly ``n`` glyph cells plus ``n - 1`` one-pixel gaps. The mini OCR reader relies on this to
recover the font scale and the glyph grid from ink alone. All glyph bitmaps are distinct and differ
in at least two pixels (checked in tests/test_world.py), so one flipped pixel cannot turn one
character into another.
"""

from __future__ import annotations

import numpy as np

GLYPH_W, GLYPH_H = 3, 5
GAP = 1  # blank font pixels between two glyphs

_GLYPH_ROWS: dict[str, tuple[str, str, str, str, str]] = {
    "A": (".#.", "#.#", "###", "#.#", "#.#"),
    "B": ("##.", "#.#", "##.", "#.#", "##."),
    "C": (".##", "#..", "#..", "#..", ".##"),
    "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "E": ("###", "#..", "##.", "#..", "###"),
    "F": ("###", "#..", "##.", "#..", "#.."),
    "G": (".##", "#..", "#.#", "#.#", ".##"),
    "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"),
    "J": ("..#", "..#", "..#", "#.#", ".#."),
    "K": ("#.#", "##.", "#..", "##.", "#.#"),
    "L": ("#..", "#..", "#..", "#..", "###"),
    "M": ("#.#", "###", "#.#", "#.#", "#.#"),
    "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "O": (".##", "#.#", "#.#", "#.#", "##."),
    "P": ("##.", "#.#", "##.", "#..", "#.."),
    "Q": (".#.", "#.#", "#.#", "##.", ".##"),
    "R": ("##.", "#.#", "##.", "#.#", "#.#"),
    "S": (".##", "#..", ".#.", "..#", "##."),
    "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"),
    "V": ("#.#", "#.#", "#.#", "#.#", ".#."),
    "W": ("#.#", "#.#", "#.#", "###", "#.#"),
    "X": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "Y": ("#.#", "#.#", ".#.", ".#.", ".#."),
    "Z": ("###", "..#", ".#.", "#..", "###"),
    "0": (".#.", "#.#", "#.#", "#.#", ".#."),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": (".#.", "#.#", "..#", ".#.", "###"),
    "3": ("##.", "..#", ".#.", "..#", "##."),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "##.", "..#", "##."),
    "6": (".##", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", ".#.", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "##."),
}

ALPHABET: str = "".join(_GLYPH_ROWS)  # "A..Z0..9", the characters the font can draw

GLYPHS: dict[str, np.ndarray] = {
    ch: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for ch, rows in _GLYPH_ROWS.items()
}


def text_grid_size(n_chars: int) -> tuple[int, int]:
    """(width, height) of a string of ``n_chars`` glyphs, in font pixels."""
    if n_chars < 1:
        raise ValueError(f"text must have at least one character, got {n_chars}")
    return n_chars * GLYPH_W + (n_chars - 1) * GAP, GLYPH_H


def text_bitmap(text: str, scale: int = 1) -> np.ndarray:
    """Ink mask ``[H, W]`` (bool) of ``text``, each font pixel drawn as a ``scale x scale`` block."""
    unknown = sorted(set(text) - set(ALPHABET))
    if unknown:
        raise ValueError(f"characters {unknown} are not in the font; allowed: {ALPHABET}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    width, height = text_grid_size(len(text))
    grid = np.zeros((height, width), dtype=bool)
    for i, ch in enumerate(text):
        x0 = i * (GLYPH_W + GAP)
        grid[:, x0 : x0 + GLYPH_W] = GLYPHS[ch]
    return np.kron(grid, np.ones((scale, scale), dtype=bool))
