"""The GRPO objective's advantage options reach the z-score: per-group or global std, biased or unbiased
(Flow-GRPO's numpy std vs MixGRPO's torch.std), hand-derived on two groups of different spread."""

import math

import pytest
import torch

from tmpo.objectives import GRPOObjective

REWARDS = torch.tensor([[0.0, 2.0], [0.0, 4.0]], dtype=torch.float64)  # group means 1 and 2


def test_per_group_std_by_default():
    # biased stds 1 and 2: both groups become (-1, 1)
    a = GRPOObjective(std_eps=0.0).leaf_advantages(REWARDS)
    assert a.flatten().tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])


def test_global_std_option():
    # centred (-1, 1), (-2, 2) over the std of all four rewards: sqrt(mean((r - 1.5)^2)) = sqrt(11/4)
    a = GRPOObjective(std_eps=0.0, global_std=True).leaf_advantages(REWARDS)
    s = math.sqrt(11 / 4)
    assert a.flatten().tolist() == pytest.approx([-1 / s, 1 / s, -2 / s, 2 / s])


def test_unbiased_std_option():
    # K - 1 = 1 denominator: stds sqrt(2) and 2 sqrt(2)
    a = GRPOObjective(std_eps=0.0, unbiased_std=True).leaf_advantages(REWARDS)
    r2 = math.sqrt(2)
    assert a.flatten().tolist() == pytest.approx([-1 / r2, 1 / r2, -1 / r2, 1 / r2])
