"""Prompt files of the real-scale protocols (GenEval metadata, OCR, PickScore/HPDv2, DrawBench).

The prompt sets are not shipped in this repository (some are large, all have their own licences); the
README's "Reproducing the paper on GPUs" says where each comes from. Point ``$TMPO_DATA`` (default
``data/``) at a folder laid out as Flow-GRPO's ``dataset/`` folder: ``geneval/{train,test}_metadata.jsonl``,
``ocr/{train,test}.txt``, ``pickscore/{train,test}.txt``, ``drawbench/test.txt``.

Formats: ``.txt`` = one prompt per line; ``.jsonl`` = one record per line with a ``prompt`` string (the
rest of the record is the prompt's metadata, e.g. GenEval clauses).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tmpo.prompts import PromptSource


def read_prompt_file(path: str | Path) -> list[tuple[str, dict]]:
    """``[(prompt, metadata)]`` from a ``.txt`` or ``.jsonl`` file, with errors naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} not found; set $TMPO_DATA to the prompt-set folder (README: 'Reproducing the paper on GPUs')"
        )
    items: list[tuple[str, dict]] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{i} needs a 'prompt' string")
            items.append((record["prompt"], record))
        else:
            items.append((line.strip(), {"prompt": line.strip()}))
    if not items:
        raise ValueError(f"prompt file {path} holds no prompts")
    return items


class FilePrompts(PromptSource):
    """Train/test prompts read from files (``train`` may be None for evaluation-only sets such as DrawBench)."""

    def __init__(self, test: str, train: str | None = None) -> None:
        self._test = read_prompt_file(test)
        self._train = read_prompt_file(train) if train is not None else None

    def train(self, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
        if self._train is None:
            raise ValueError("this prompt source has no training split (train: null)")
        idx = rng.integers(0, len(self._train), size=n)
        return [self._train[i] for i in idx]

    def test(self) -> list[tuple[str, dict]]:
        return list(self._test)
