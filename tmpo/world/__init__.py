"""The mini world: a procedurally generated RGB image world with GenEval-style captions.

* :mod:`tmpo.world.render` -- vocabulary (shapes, colours, backgrounds), :class:`Scene`, :func:`render`.
* :mod:`tmpo.world.font` -- the 3x5 bitmap font used on signs.
* :mod:`tmpo.world.captions` -- caption templates with metadata, and scenes sampled to fit them.
* :mod:`tmpo.world.make_prompts` -- the committed prompt splits and :func:`load_prompts`.
"""

from tmpo.world.captions import (
    ALL_TAGS,
    GENEVAL_TAGS,
    RELATIONS,
    sample_random_prompt,
    sample_random_scene,
    sample_scene_for_prompt,
)
from tmpo.world.render import BACKGROUNDS, COLORS, SHAPES, Scene, SceneObject, Sign, render

__all__ = [
    "ALL_TAGS",
    "BACKGROUNDS",
    "COLORS",
    "GENEVAL_TAGS",
    "PROTOCOLS",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "Scene",
    "SceneObject",
    "Sign",
    "load_prompts",
    "render",
    "sample_random_prompt",
    "sample_random_scene",
    "sample_scene_for_prompt",
]


def __getattr__(name: str):
    # Lazy, so that `python -m tmpo.world.make_prompts` does not import its own module twice.
    if name in ("PROTOCOLS", "SPLITS", "load_prompts"):
        from tmpo.world import make_prompts

        return getattr(make_prompts, name)
    raise AttributeError(f"module 'tmpo.world' has no attribute {name!r}")
