"""Evaluation suites and per-prompt metrics on hand-made inputs."""

import math

import numpy as np
import pytest
import torch

from tmpo.evaluation import EvalSuite, Evaluator
from tmpo.metrics.features import FlattenFeatures
from tmpo.metrics.task import PerPromptDiversity, RewardMetric
from tmpo.prompts import ConstantPrompts, ListPrompts, WorldPrompts


def test_per_prompt_lgmd_averages_groups():
    # group 1: points 0 and (3, 4) in D = 2 -> log(5 / sqrt 2); group 2: 0 and (1, 0) -> log(1 / sqrt 2)
    lat = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    out = PerPromptDiversity("lgmd")(lat, lat, ["a", "a", "b", "b"], [{}] * 4, 2)
    assert out["lgmd"] == pytest.approx(0.5 * (math.log(5 / math.sqrt(2)) + math.log(1 / math.sqrt(2))))


def test_per_prompt_cosdiv_uses_the_feature_extractor():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    out = PerPromptDiversity("cosdiv", features=FlattenFeatures())(x, x, ["a"] * 4, [{}] * 4, 2)
    assert out["cosdiv"] == pytest.approx(0.5 * (1.0 + 0.0))
    with pytest.raises(ValueError, match="groups of 3"):
        PerPromptDiversity("lgmd")(x, x, ["a"] * 4, [{}] * 4, 3)
    with pytest.raises(ValueError, match="feature extractor"):
        PerPromptDiversity("cosdiv")


def test_reward_metric_mean_and_non_finite_error():
    m = RewardMetric("acc", lambda s, p, md: (torch.tensor([1.0, 0.0, 0.5]), {}))
    assert m(torch.zeros(3, 2), torch.zeros(3, 2), ["x"] * 3, [{}] * 3, 3) == {"acc": pytest.approx(0.5)}
    bad = RewardMetric("acc", lambda s, p, md: (torch.tensor([1.0, float("nan")]), {}))
    with pytest.raises(ValueError, match="non-finite"):
        bad(torch.zeros(2, 2), torch.zeros(2, 2), ["x"] * 2, [{}] * 2, 2)


def test_evaluator_runs_suites_and_rejects_duplicate_metric_names(toy_policy):
    reward = lambda s, p, md: (s[:, 0], {})  # noqa: E731
    first = RewardMetric("x_mean", reward)
    ev = Evaluator(ConstantPrompts(), reward, [first], [EvalSuite("other", ListPrompts(["a"], ["b", "c"]), [RewardMetric("y", reward)])],
                   samples_per_prompt=5, num_steps=4)
    out = ev(toy_policy)
    assert set(out) == {"reward", "x_mean", "y"} and out["reward"] == pytest.approx(out["x_mean"])
    clash = Evaluator(ConstantPrompts(), reward, [first], [EvalSuite("other", ConstantPrompts(), [first])], samples_per_prompt=2, num_steps=2)
    with pytest.raises(ValueError, match="repeats metric names"):
        clash(toy_policy)


def test_world_prompts_carry_metadata_and_keep_splits_apart():
    src = WorldPrompts("geneval")
    train = src.train(50, np.random.default_rng(0))
    assert all("tag" in m and "include" in m for _, m in train)
    assert not {t for t, _ in src.test()} & {t for t, _ in src._train}
