"""Objectives: advantages, clipped surrogates, Softmax-TB (TMPO) and GRPO."""

from tmpo.objectives.advantages import group_zscore, linear_warmup, softmax_tb_advantage, uniform_policy_advantage
from tmpo.objectives.base import Minibatch, Objective, Prepared
from tmpo.objectives.grpo import GRPOObjective
from tmpo.objectives.ppo import clip_fraction, clipped_surrogate
from tmpo.objectives.softmax_tb import SoftmaxTBObjective

__all__ = [
    "GRPOObjective", "Minibatch", "Objective", "Prepared", "SoftmaxTBObjective", "clip_fraction",
    "clipped_surrogate", "group_zscore", "linear_warmup", "softmax_tb_advantage", "uniform_policy_advantage",
]
from tmpo.objectives.stepwise_balance import StepwiseBalanceObjective  # noqa: E402

__all__ += ["StepwiseBalanceObjective"]
