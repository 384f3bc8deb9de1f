"""Samplers: rollout plans (tree, independent, windows) executed by one :class:`FlowSampler`."""

from tmpo.samplers.plans import DynamicTreePlan, IndependentPlan, Plan, RolloutPlan, StepPlan, tree_plan
from tmpo.samplers.rollout import Rollout
from tmpo.samplers.sampler import FlowSampler, edge_log_probs, recompute_means, sample_ode

__all__ = [
    "DynamicTreePlan", "FlowSampler", "IndependentPlan", "Plan", "Rollout", "RolloutPlan", "StepPlan",
    "edge_log_probs", "recompute_means", "sample_ode", "tree_plan",
]
