"""Evaluation: ODE samples at the eval horizon on held-out prompts, the task reward and metrics.

The paper evaluates the task metric on the task's test prompts and preference/diversity metrics on
a separate prompt set (DrawBench); each such set is an :class:`EvalSuite`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tmpo.distributed import Processes
from tmpo.metrics.noise import eval_noise
from tmpo.metrics.task import RewardMetric
from tmpo.policies.base import FlowPolicy
from tmpo.prompts import PromptSource
from tmpo.samplers.sampler import sample_ode

Metric = Callable[..., dict[str, float]]


@dataclass
class EvalSuite:
    """A prompt set and the metrics computed on its samples.

    Metrics are ``metric(samples, latents, prompts, metadata, group_size) -> dict`` with samples
    ordered by prompt, ``group_size`` per prompt.
    """

    name: str
    prompts: PromptSource
    metrics: Sequence[Metric] = field(default_factory=list)
    max_prompts: int | None = None
    samples_per_prompt: int | None = None  # None: the evaluator's default


class Evaluator:
    """Samples each suite's test prompts with ``num_steps`` ODE steps and scores them.

    Args:
        prompts: the task's prompt source; its ``test()`` split is used (never training prompts).
        reward: the training reward, reported as ``reward`` on the task prompts.
        metrics: metrics on the task prompts.
        suites: further prompt sets with their own metrics (e.g. DrawBench-style preference/diversity).
        max_prompts: at most this many task test prompts (``None`` = all).
        samples_per_prompt: 10 in the paper.
        num_steps: eval horizon (28 in the paper).
        seed: fixed noise so evaluations at different steps are comparable.
        batch_size: samples integrated at once (``None`` = a suite's whole set; bound it at real scale).

    With several processes (:attr:`processes`, set by the loop) each samples and scores a contiguous block
    of the test prompts, from the initial noises the whole set draws; per-image scores, samples and latents
    are gathered back in prompt order, so every metric sees every sample exactly once, as one process would.
    """

    def __init__(
        self,
        prompts: PromptSource,
        reward: Callable,
        metrics: Sequence[Metric] = (),
        suites: Sequence[EvalSuite] = (),
        max_prompts: int | None = None,
        samples_per_prompt: int = 10,
        num_steps: int = 28,
        seed: int = 1234,
        progress: bool = False,
        batch_size: int | None = None,
    ) -> None:
        self.reward = reward
        self.suites = [EvalSuite("task", prompts, list(metrics), max_prompts), *suites]
        self.samples_per_prompt, self.num_steps, self.seed, self.progress = samples_per_prompt, num_steps, seed, progress
        self.batch_size = batch_size
        self.noise: dict[str, float] = {}  # of the last call, per metric name (see __call__)
        self.processes = Processes()  # several processes share the evaluation (set by the loop)

    def _run_suite(self, policy: FlowPolicy, suite: EvalSuite, with_reward: bool) -> dict[str, float]:
        test = suite.prompts.test()[: suite.max_prompts]
        if not test:
            raise ValueError(f"eval suite {suite.name!r}: the prompt source has no test prompts")
        n = suite.samples_per_prompt or self.samples_per_prompt
        texts = [t for t, _ in test]
        gen = torch.Generator().manual_seed(self.seed)
        dist = self.processes
        own, counts = dist.eval_part(len(test))  # this process's prompts (all of them when alone)
        rows = [k * n for k in counts]  # samples per process
        latents = sample_ode(policy, texts, n, self.num_steps, gen, progress=self.progress,
                             shard=own if dist.distributed else None, batch_size=self.batch_size)
        with torch.no_grad():
            samples = policy.decode(latents)
        all_texts = [t for t in texts for _ in range(n)]
        all_meta = [{**m, "group": g} for g, (_, m) in enumerate(test) for _ in range(n)]
        mine = slice(own.start * n, own.stop * n)  # this process's samples among all of them
        rep_texts, rep_meta = all_texts[mine], all_meta[mine]
        if any(not isinstance(m, RewardMetric) for m in suite.metrics):  # metrics of the whole set see every sample
            every_sample, every_latent = dist.gather_rows(samples, rows), dist.gather_rows(latents, rows)
        out: dict[str, float] = {}
        if with_reward:
            rewards, _ = self.reward(samples, rep_texts, rep_meta)
            rewards = dist.gather_rows(torch.as_tensor(rewards).float(), rows)
            out["reward"] = float(rewards.mean())
            self.noise["reward"] = eval_noise(rewards, n)
        for metric in suite.metrics:
            if isinstance(metric, RewardMetric):  # a mean over images: its spread over eval seeds is known
                scores = dist.gather_rows(torch.as_tensor(metric.per_image(samples, rep_texts, rep_meta)), rows)
                values = {metric.name: float(scores.mean())}
                self.noise[metric.name] = eval_noise(scores, n)
            else:  # a metric of the whole sample set (diversity): it sees every process's samples
                values = metric(every_sample, every_latent, all_texts, all_meta, n)
            for k, v in values.items():
                if k in out:
                    raise ValueError(f"eval metric name {k!r} is produced twice; rename one of the metrics")
                out[k] = v
        return out

    def __call__(self, policy: FlowPolicy) -> dict[str, float]:
        """The metrics of every suite; :attr:`noise` then holds each per-image-mean metric's standard
        deviation over eval seeds (:func:`tmpo.metrics.noise.eval_noise`)."""
        self.noise: dict[str, float] = {}
        out: dict[str, float] = {}
        for i, suite in enumerate(self.suites):
            res = self._run_suite(policy, suite, with_reward=i == 0)
            clash = set(res) & set(out)
            if clash:
                raise ValueError(f"eval suite {suite.name!r} repeats metric names {sorted(clash)}")
            out.update(res)
        return out
