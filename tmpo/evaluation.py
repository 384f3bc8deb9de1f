"""Evaluation: ODE samples at the eval horizon on held-out prompts, reward and metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tmpo.policies.base import FlowPolicy
from tmpo.prompts import PromptSource
from tmpo.samplers.sampler import sample_ode

Metric = Callable[..., dict[str, float]]


class Evaluator:
    """Samples ``samples_per_prompt`` images per test prompt with ``num_steps`` ODE steps and scores them.

    Args:
        prompts: the prompt source; its ``test()`` split is used (never the training prompts).
        max_prompts: evaluate on at most this many test prompts (``None`` = all).
        samples_per_prompt: 10 in the paper.
        num_steps: eval horizon (28 in the paper).
        metrics: callables ``metric(samples, latents, prompts, metadata) -> dict``.
        seed: fixed noise so evaluations at different steps are comparable.
    """

    def __init__(
        self,
        prompts: PromptSource,
        reward: Callable,
        metrics: Sequence[Metric] = (),
        max_prompts: int | None = None,
        samples_per_prompt: int = 10,
        num_steps: int = 28,
        seed: int = 1234,
        progress: bool = False,
    ) -> None:
        self.prompts, self.reward, self.metrics = prompts, reward, list(metrics)
        self.max_prompts, self.samples_per_prompt = max_prompts, samples_per_prompt
        self.num_steps, self.seed, self.progress = num_steps, seed, progress

    def __call__(self, policy: FlowPolicy) -> dict[str, float]:
        test = self.prompts.test()[: self.max_prompts]
        if not test:
            raise ValueError("the prompt source has no test prompts to evaluate on")
        texts = [t for t, _ in test]
        gen = torch.Generator().manual_seed(self.seed)
        latents = sample_ode(policy, texts, self.samples_per_prompt, self.num_steps, gen, progress=self.progress)
        with torch.no_grad():
            samples = policy.decode(latents)
        rep_texts = [t for t in texts for _ in range(self.samples_per_prompt)]
        rep_meta = [m for _, m in test for _ in range(self.samples_per_prompt)]
        rewards, _ = self.reward(samples, rep_texts, rep_meta)
        out = {"reward": float(rewards.float().mean())}
        for metric in self.metrics:
            out.update(metric(samples, latents, rep_texts, rep_meta))
        return out
