"""OCR reward: 1 - normalised edit distance between the prompt's quoted text and the text read.

The TMPO paper reports "OCR accuracy (1 - NED)" (Sec. 5.1). We define
``NED(a, b) = Levenshtein(a, b) / max(len(a), len(b))`` with ``NED("", "") = 0``, so the reward is
in [0, 1]. Flow-GRPO's own OCR reward differs slightly: it lower-cases and strips spaces and divides
the (clipped) distance by the *target* length; for equal-length strings the two agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')  # straight or curly double quotes


@runtime_checkable
class TextReader(Protocol):
    """Anything that reads the text shown in an ``[H, W, 3]`` float image in [0, 1]."""

    def read(self, image: np.ndarray) -> str: ...


def levenshtein(a: str, b: str) -> int:
    """Minimum number of single-character insertions, deletions and substitutions turning a into b."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def normalized_edit_distance(a: str, b: str) -> float:
    """``levenshtein(a, b) / max(len(a), len(b))`` in [0, 1]; 0 for two empty strings, 1 if one is empty."""
    longest = max(len(a), len(b))
    return 0.0 if longest == 0 else levenshtein(a, b) / longest


def parse_ocr_prompt(prompt: str) -> str:
    """The first quoted string of ``prompt``, e.g. ``a sign that reads "K7Q"`` -> ``K7Q``."""
    match = _QUOTED.search(prompt)
    if match is None:
        raise ValueError(f'OCR prompt {prompt!r} has no quoted text; expected e.g. a sign that reads "K7Q"')
    text = match.group(1) if match.group(1) is not None else match.group(2)
    if not text:
        raise ValueError(f"OCR prompt {prompt!r} quotes an empty string")
    return text


class OCRReward:
    """``reward(images [N,3,H,W] in [0,1], prompts, metadata) -> (1 - NED as Tensor[N], info)``.

    The target is the quoted text of each prompt. If a metadata record carries ``text`` it must
    agree with the prompt (a mismatch means prompts and metadata were paired wrongly).
    ``info`` holds ``target`` and ``recognized`` strings and ``ned`` (Tensor[N]).
    """

    def __init__(self, reader: TextReader) -> None:
        if not callable(getattr(reader, "read", None)):
            raise ValueError(f"reader {reader!r} has no read(image) method")
        self.reader = reader

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        n = images.shape[0]
        metadata = [None] * n if metadata is None else metadata
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"got {n} images, {len(prompts)} prompts and {len(metadata)} metadata records")
        targets = [parse_ocr_prompt(p) for p in prompts]
        for target, record, prompt in zip(targets, metadata, prompts):
            if record is not None and "text" in record and record["text"] != target:
                raise ValueError(f"metadata text {record['text']!r} does not match the prompt {prompt!r}")
        arrays = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        recognized = [self.reader.read(image) for image in arrays]
        ned = torch.tensor([normalized_edit_distance(t, r) for t, r in zip(targets, recognized)], dtype=torch.float32)
        return 1.0 - ned, {"target": targets, "recognized": recognized, "ned": ned}
