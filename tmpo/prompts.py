"""Prompt sources: what the loop draws each iteration (train) and evaluates on (test)."""

from __future__ import annotations

import numpy as np


class PromptSource:
    """Interface: ``train(n, rng)`` draws n prompts uniformly; ``test()`` lists the held-out prompts.

    Each prompt is ``(text, metadata)``; metadata carries what task rewards need (e.g. GenEval clauses).
    """

    def train(self, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
        raise NotImplementedError

    def test(self) -> list[tuple[str, dict]]:
        raise NotImplementedError


class ConstantPrompts(PromptSource):
    """One fixed prompt (the unconditional toy): every group shares it."""

    def __init__(self, prompt: str = "toy", num_test: int = 1) -> None:
        self.prompt = prompt
        self.num_test = num_test

    def train(self, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
        return [(self.prompt, {})] * n

    def test(self) -> list[tuple[str, dict]]:
        return [(self.prompt, {})] * self.num_test


class ListPrompts(PromptSource):
    """Explicit train/test lists (each item a string or ``{"prompt": ..., **metadata}``)."""

    def __init__(self, train: list, test: list) -> None:
        self._train = [self._item(p) for p in train]
        self._test = [self._item(p) for p in test]
        if not self._train:
            raise ValueError("ListPrompts: the train prompt list is empty")

    @staticmethod
    def _item(p) -> tuple[str, dict]:
        if isinstance(p, str):
            return p, {}
        if isinstance(p, dict) and isinstance(p.get("prompt"), str):
            return p["prompt"], {k: v for k, v in p.items() if k != "prompt"}
        raise ValueError(f"prompt entries must be strings or dicts with a 'prompt' string, got {p!r}")

    def train(self, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
        idx = rng.integers(0, len(self._train), size=n)
        return [self._train[i] for i in idx]

    def test(self) -> list[tuple[str, dict]]:
        return list(self._test)


class WorldPrompts(PromptSource):
    """The mini world's committed prompt splits (``tmpo/world/prompts/<protocol>_{train,test}.jsonl``).

    Each prompt's metadata (GenEval clauses, OCR text) travels with it to the reward.
    """

    def __init__(self, protocol: str) -> None:
        from tmpo.world import load_prompts

        self.protocol = protocol
        self._train = [self._item(r) for r in load_prompts(protocol, "train")]
        self._test = [self._item(r) for r in load_prompts(protocol, "test")]

    @staticmethod
    def _item(record: dict) -> tuple[str, dict]:
        return record["prompt"], dict(record)

    def train(self, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
        idx = rng.integers(0, len(self._train), size=n)
        return [self._train[i] for i in idx]

    def test(self) -> list[tuple[str, dict]]:
        return list(self._test)
