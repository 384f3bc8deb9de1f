"""Evaluation metrics over generated samples: task rewards as metrics and per-prompt diversity."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tmpo.metrics.diversity import cosine_diversity, lgmd


class RewardMetric:
    """Mean of a reward function over the eval samples, reported as ``{name: mean}``.

    E.g. GenEval accuracy (``GenEvalReward(mode="partial")``: the paper reports the fraction of
    criteria satisfied at evaluation), OCR accuracy (1 - NED) or a preference score.
    """

    def __init__(self, name: str, reward: Callable) -> None:
        self.name, self.reward = name, reward

    def per_image(self, samples: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        """The reward of every sample (float64); the metric is their mean."""
        scores, _ = self.reward(samples, prompts, metadata)
        scores = torch.as_tensor(scores, dtype=torch.float64)
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"metric {self.name}: the reward returned non-finite scores")
        return scores

    def __call__(self, samples: Tensor, latents: Tensor, prompts: list[str], metadata: list[dict], group_size: int) -> dict[str, float]:
        return {self.name: float(self.per_image(samples, prompts, metadata).mean())}


class PerPromptDiversity:
    """LGMD or cosine diversity among the images of each prompt, averaged over prompts (paper Sec. 5.1).

    Samples arrive ordered by prompt, ``group_size`` consecutive samples each.

    Args:
        kind: ``"lgmd"`` (on flattened latents: VAE latents for FLUX, pixels for the mini model) or
            ``"cosdiv"`` (on features of ``features``: DINOv2 for real models, a stand-in for mini).
        features: extractor ``samples -> [N, D]`` (required for cosdiv).
    """

    def __init__(self, kind: str, features: Callable[[Tensor], Tensor] | None = None, name: str | None = None) -> None:
        if kind not in ("lgmd", "cosdiv"):
            raise ValueError(f"kind must be 'lgmd' or 'cosdiv', got {kind!r}")
        if kind == "cosdiv" and features is None:
            raise ValueError("cosdiv needs a feature extractor (features=...)")
        self.kind, self.features, self.name = kind, features, name or kind

    def __call__(self, samples: Tensor, latents: Tensor, prompts: list[str], metadata: list[dict], group_size: int) -> dict[str, float]:
        if samples.shape[0] % group_size:
            raise ValueError(f"{samples.shape[0]} samples do not split into groups of {group_size}")
        feats = latents if self.kind == "lgmd" else self.features(samples)
        fn = lgmd if self.kind == "lgmd" else cosine_diversity
        values = [fn(g) for g in torch.split(feats, group_size)]
        return {self.name: float(torch.stack(values).mean())}
