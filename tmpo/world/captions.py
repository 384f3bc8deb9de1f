"""Captions with GenEval-style metadata, and random scenes that satisfy them.

Caption templates follow GenEval's ``prompts/create_prompts.py`` word for word, with the world's
shapes as the object classes (``shared/specs/geneval-rules.md`` §1 gives the metadata layout):

===============  ==========================================  =========================================
tag              caption                                     include / exclude
===============  ==========================================  =========================================
single_object    a photo of a circle                         [{circle, 1}]
two_object       a photo of a circle and a square            [{circle, 1}, {square, 1}]
counting         a photo of three squares                    [{square, 3}] / exclude [{square, 4}]
colors           a photo of a red circle                     [{circle, 1, red}]
position         a photo of a circle left of a square        [{square, 1}, {circle, 1, [left of, 0]}]
color_attr       a photo of a red circle and a blue square   [{circle, 1, red}, {square, 1, blue}]
===============  ==========================================  =========================================

Two more kinds exist for the other protocols: ``ocr`` (``a sign that reads "K7Q"``, metadata
``{"tag": "ocr", "text": "K7Q"}``) and ``preference`` (a plain description such as ``a red circle
and two blue squares on a cream background``, with the objects and background in the metadata).

Deviation from GenEval: counting uses 2 or 3 objects (GenEval: 2-4), because four shapes of the
world's minimum size crowd a 32x32 image.

:func:`sample_scene_for_prompt` draws one of the many scenes that fit a metadata record: the
included objects exactly (colours random where not given), random sizes and positions, a random
background, and nothing else, so that every ground-truth image is correct under GenEval's strict
rules. Positions are chosen so that a stated relation holds with a safety margin (see
:func:`_relation_holds`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tmpo.world.font import ALPHABET
from tmpo.world.render import BACKGROUNDS, COLORS, INKS, SHAPES, SIGN_BOARDS, Scene, SceneObject, Sign, sign_pixel_box

GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
ALL_TAGS: tuple[str, ...] = GENEVAL_TAGS + ("ocr", "preference")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNTS: tuple[int, ...] = (2, 3)  # counting prompts
TEXT_LENGTH = 3  # characters on a sign
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

# Layout constants in pixels at the reference resolution (the ``size`` argument, default 32).
_RADIUS_RANGE = {1: (5.0, 8.0), 2: (5.0, 7.0), 3: (5.0, 6.0)}  # half-extent by number of shapes
_CROWDED_RADIUS = (4.0, 5.0)  # four or more shapes
_GAP = 2.0  # min. empty pixels between two shapes' boxes (keeps connected components apart)
_EDGE = 1.0  # min. empty pixels between a shape and the image border
_MAX_TRIES = 200  # layouts restarted from scratch
_TRIES_PER_SHAPE = 30  # positions tried for one shape before the layout restarts


# ---------------------------------------------------------------------------------------------
# Caption templates (GenEval wording)
# ---------------------------------------------------------------------------------------------


def with_article(word: str) -> str:
    """'a circle', 'an orange circle' (GenEval's ``with_article``)."""
    return f"an {word}" if word[0].lower() in "aeiou" else f"a {word}"


def plural(noun: str) -> str:
    """English plural of a class name: 'circle' -> 'circles', 'cross' -> 'crosses'."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def single_object(cls: str) -> dict[str, Any]:
    """'a photo of a circle'."""
    return {
        "tag": "single_object",
        "include": [{"class": cls, "count": 1}],
        "prompt": f"a photo of {with_article(cls)}",
    }


def two_object(cls_a: str, cls_b: str) -> dict[str, Any]:
    """'a photo of a circle and a square' (A != B)."""
    if cls_a == cls_b:
        raise ValueError(f"two_object needs two different classes, got {cls_a!r} twice")
    return {
        "tag": "two_object",
        "include": [{"class": cls_a, "count": 1}, {"class": cls_b, "count": 1}],
        "prompt": f"a photo of {with_article(cls_a)} and {with_article(cls_b)}",
    }


def counting(cls: str, n: int) -> dict[str, Any]:
    """'a photo of three squares': exactly ``n`` (include n, exclude n + 1)."""
    if n not in NUMBER_WORDS or n < 2:
        raise ValueError(f"counting needs 2 <= n <= {max(NUMBER_WORDS)}, got {n}")
    return {
        "tag": "counting",
        "include": [{"class": cls, "count": n}],
        "exclude": [{"class": cls, "count": n + 1}],
        "prompt": f"a photo of {NUMBER_WORDS[n]} {plural(cls)}",
    }


def colors(cls: str, color: str) -> dict[str, Any]:
    """'a photo of a red circle'."""
    return {
        "tag": "colors",
        "include": [{"class": cls, "count": 1, "color": color}],
        "prompt": f"a photo of {with_article(color)} {cls}",
    }


def position(cls_a: str, relation: str, cls_b: str) -> dict[str, Any]:
    """'a photo of a circle left of a square': A (subject, clause 1) relative to B (reference, clause 0)."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; known: {RELATIONS}")
    if cls_a == cls_b:
        raise ValueError(f"position needs two different classes, got {cls_a!r} twice")
    return {
        "tag": "position",
        "include": [{"class": cls_b, "count": 1}, {"class": cls_a, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of {with_article(cls_a)} {relation} {with_article(cls_b)}",
    }


def color_attr(cls_a: str, color_a: str, cls_b: str, color_b: str) -> dict[str, Any]:
    """'a photo of a red circle and a blue square' (A != B, colours differ)."""
    if cls_a == cls_b or color_a == color_b:
        raise ValueError(f"color_attr needs different classes and colours, got {cls_a}/{color_a}, {cls_b}/{color_b}")
    return {
        "tag": "color_attr",
        "include": [{"class": cls_a, "count": 1, "color": color_a}, {"class": cls_b, "count": 1, "color": color_b}],
        "prompt": f"a photo of {with_article(color_a)} {cls_a} and {with_article(color_b)} {cls_b}",
    }


def ocr(text: str) -> dict[str, Any]:
    """'a sign that reads "K7Q"'."""
    if not text or set(text) - set(ALPHABET):
        raise ValueError(f"OCR text {text!r} must be non-empty and use only {ALPHABET}")
    return {"tag": "ocr", "text": text, "prompt": f'a sign that reads "{text}"'}


def preference(groups: Sequence[tuple[str, str, int]], background: str) -> dict[str, Any]:
    """'a red circle and two blue squares on a cream background' from (class, colour, count) groups."""
    if not groups:
        raise ValueError("a preference caption needs at least one object group")
    phrases = []
    for cls, color, count in groups:
        phrases.append(with_article(f"{color} {cls}") if count == 1 else f"{NUMBER_WORDS[count]} {color} {plural(cls)}")
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return {
        "tag": "preference",
        "objects": [{"class": c, "color": col, "count": n} for c, col, n in groups],
        "background": background,
        "prompt": f"{listed} on {with_article(background)} background",
    }


def enumerate_geneval(tag: str) -> list[dict[str, Any]]:
    """Every distinct GenEval-style record of ``tag`` in this world's vocabulary (fixed order)."""
    shapes, cols = SHAPES, tuple(COLORS)
    pairs = [(a, b) for a in shapes for b in shapes if a != b]
    if tag == "single_object":
        return [single_object(a) for a in shapes]
    if tag == "two_object":
        return [two_object(a, b) for a, b in pairs]
    if tag == "counting":
        return [counting(a, n) for a in shapes for n in COUNTS]
    if tag == "colors":
        return [colors(a, c) for a in shapes for c in cols]
    if tag == "position":
        return [position(a, rel, b) for a, b in pairs for rel in RELATIONS]
    if tag == "color_attr":
        return [color_attr(a, ca, b, cb) for a, b in pairs for ca in cols for cb in cols if ca != cb]
    raise ValueError(f"unknown GenEval tag {tag!r}; known: {GENEVAL_TAGS}")


def random_text(rng: np.random.Generator, length: int = TEXT_LENGTH) -> str:
    """A uniformly random string over the font's alphabet."""
    return "".join(rng.choice(list(ALPHABET), size=length))


def sample_random_prompt(rng: np.random.Generator, tags: Sequence[str] = ALL_TAGS) -> dict[str, Any]:
    """A random caption + metadata of a tag drawn uniformly from ``tags`` (for pretraining data)."""
    tag = str(rng.choice(list(tags)))
    if tag in GENEVAL_TAGS:
        options = enumerate_geneval(tag)
        return options[int(rng.integers(len(options)))]
    if tag == "ocr":
        return ocr(random_text(rng))
    if tag == "preference":
        return random_preference(rng)
    raise ValueError(f"unknown tag {tag!r}; known: {ALL_TAGS}")


def random_preference(rng: np.random.Generator) -> dict[str, Any]:
    """A random scene description: 1-2 groups, at most 3 shapes, distinct (class, colour) groups."""
    n_groups = int(rng.integers(1, 3))
    groups: list[tuple[str, str, int]] = []
    while len(groups) < n_groups:
        cls, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
        if any(g[0] == cls and g[1] == color for g in groups):
            continue
        room = 3 - sum(g[2] for g in groups) - (n_groups - len(groups) - 1)
        groups.append((cls, color, int(rng.integers(1, room + 1))))
    return preference(groups, str(rng.choice(list(BACKGROUNDS))))


# ---------------------------------------------------------------------------------------------
# Scenes for a metadata record
# ---------------------------------------------------------------------------------------------


def _relation_holds(subject: np.ndarray, reference: np.ndarray, relation: str) -> bool:
    """Sufficient condition, with margin, for GenEval's ``relation`` between two boxes.

    Requires the boxes to be apart by ``_GAP`` pixels along the relation's axis and the cross-axis
    offset to be at most 0.75 of the main-axis offset. With ``o`` the centre offset this gives
    ``|o_main| - 0.1 (sum of extents) >= 0.8 |o_main|`` and ``||o|| <= 1.25 |o_main|``, so the
    normalised GenEval component is at least 0.64 > 0.5: a pixel of detector jitter cannot flip it.
    """
    sub_c = (subject[:2] + subject[2:]) / 2
    ref_c = (reference[:2] + reference[2:]) / 2
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
    main = (sub_c[axis] - ref_c[axis]) * sign
    cross = abs(sub_c[1 - axis] - ref_c[1 - axis])
    if sign > 0:
        apart = subject[axis] - reference[axis + 2]
    else:
        apart = reference[axis] - subject[axis + 2]
    return apart >= _GAP and cross <= 0.75 * main


def _boxes_apart(a: np.ndarray, b: np.ndarray) -> bool:
    """True if two boxes are separated by at least ``_GAP`` pixels along x or y."""
    return bool(max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= _GAP)


def _place_shapes(
    specs: Sequence[tuple[str, str]],
    relations: Sequence[tuple[int, int, str]],
    rng: np.random.Generator,
    size: int,
    obstacles: Sequence[np.ndarray] = (),
    tries: int = _MAX_TRIES,
) -> list[SceneObject] | None:
    """Sample sizes and centres for shapes ``specs`` = [(shape, colour)], or None if nothing fits.

    Shapes are placed one at a time (each with a few tries against those already placed; a dead
    end restarts the layout). ``relations`` holds (subject index, reference index, relation)
    constraints; ``obstacles`` are pixel boxes (e.g. a sign) that the shapes must keep clear of.
    """
    n = len(specs)
    lo, hi = _RADIUS_RANGE.get(n, _CROWDED_RADIUS)
    for _ in range(tries):
        boxes: list[np.ndarray] = []
        for k in range(n):
            for _ in range(_TRIES_PER_SHAPE):
                r = rng.uniform(lo, hi)
                c = rng.uniform(r + _EDGE, size - r - _EDGE, size=2)
                box = np.concatenate([c - r, c + r])
                placed = boxes + [box]
                if all(_boxes_apart(box, other) for other in list(boxes) + list(obstacles)) and all(
                    _relation_holds(placed[i], placed[j], rel) for i, j, rel in relations if max(i, j) <= k
                ):
                    boxes.append(box)
                    break
            else:
                break  # dead end: the shapes placed so far leave no room, restart the layout
        if len(boxes) == n:
            objects = []
            for (shape, color), (x1, y1, x2, y2) in zip(specs, (box.tolist() for box in boxes)):
                centre = ((x1 + x2) / 2 / size, (y1 + y2) / 2 / size)
                objects.append(SceneObject(shape, color, centre, (x2 - x1) / 2 / size))
            return objects
    return None


def _specs_for_include(
    metadata: dict[str, Any], rng: np.random.Generator
) -> tuple[list[tuple[str, str]], list[tuple[int, int, str]]]:
    """Shapes and relation constraints that satisfy a GenEval record's include clauses exactly."""
    specs: list[tuple[str, str]] = []
    groups: list[list[int]] = []
    relations: list[tuple[int, int, str]] = []
    for clause in metadata.get("include", []):
        cls = clause["class"]
        if cls not in SHAPES:
            raise ValueError(f"class {cls!r} in {metadata.get('prompt')!r} is not a shape of this world {SHAPES}")
        members = []
        for _ in range(int(clause["count"])):
            color = clause.get("color") or str(rng.choice(list(COLORS)))
            members.append(len(specs))
            specs.append((cls, color))
        if "position" in clause:
            rel, ref = clause["position"]
            relations += [(i, j, rel) for i in members for j in groups[ref]]
        groups.append(members)
    if not specs:
        raise ValueError(f"metadata {metadata!r} includes no objects")
    return specs, relations


def sample_scene_for_prompt(metadata: dict[str, Any], rng: np.random.Generator, size: int = 32) -> Scene:
    """A random scene that satisfies ``metadata`` (any tag of :data:`ALL_TAGS`).

    ``size`` is the resolution whose pixel grid the layout constraints refer to (gaps, sign
    footprint); the scene itself can be rendered at any size.
    """
    tag = metadata.get("tag")
    background = str(rng.choice(list(BACKGROUNDS)))
    if tag in GENEVAL_TAGS:
        specs, relations = _specs_for_include(metadata, rng)
        objects = _place_shapes(specs, relations, rng, size)
    elif tag == "preference":
        background = metadata["background"]
        specs = [(g["class"], g["color"]) for g in metadata["objects"] for _ in range(int(g["count"]))]
        objects = _place_shapes(specs, (), rng, size)
    elif tag == "ocr":
        return _sample_sign_scene(metadata["text"], rng, size)
    else:
        raise ValueError(f"metadata tag {tag!r} is not one of {ALL_TAGS}")
    if objects is None:
        raise RuntimeError(f"could not lay out {metadata.get('prompt')!r} in a {size}x{size} image")
    order = rng.permutation(len(objects))  # drawing order carries no meaning
    return Scene(tuple(objects[i] for i in order), background)


def _sample_sign_scene(text: str, rng: np.random.Generator, size: int) -> Scene:
    """A sign showing ``text`` at a random position, plus up to two distractor shapes if they fit."""
    board = str(rng.choice(list(SIGN_BOARDS)))
    # A board of the same colour as the background would be invisible: skip that background.
    backgrounds = [b for b in BACKGROUNDS if b != board]
    background = str(rng.choice(backgrounds))
    ink = str(rng.choice(list(INKS)))
    probe = Sign(text, (0.5, 0.5), board, ink)
    x1, y1, x2, y2 = sign_pixel_box(probe, size)
    w, h = x2 - x1, y2 - y1
    cx = rng.uniform(w / 2 + min(_EDGE, (size - w) / 2), size - w / 2 - min(_EDGE, (size - w) / 2))
    cy = rng.uniform(h / 2 + min(_EDGE, (size - h) / 2), size - h / 2 - min(_EDGE, (size - h) / 2))
    sign = Sign(text, (float(cx / size), float(cy / size)), board, ink)
    sign_box = np.asarray(sign_pixel_box(sign, size), dtype=np.float64)
    for n in range(int(rng.integers(0, 3)), 0, -1):
        specs = [(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))) for _ in range(n)]
        objects = _place_shapes(specs, (), rng, size, obstacles=[sign_box], tries=20)
        if objects is not None:
            return Scene(tuple(objects), background, sign)
    return Scene((), background, sign)


def sample_random_scene(
    rng: np.random.Generator, size: int = 32, tags: Sequence[str] = ALL_TAGS
) -> tuple[Scene, dict[str, Any]]:
    """A (scene, metadata) pair for pretraining; ``metadata["prompt"]`` is the caption."""
    metadata = sample_random_prompt(rng, tags)
    return sample_scene_for_prompt(metadata, rng, size), metadata
