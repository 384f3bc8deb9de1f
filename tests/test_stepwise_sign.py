"""Step-wise (detailed) balance, Table 2's ablation: the sign and value of its per-edge advantage.

On a two-level binary tree with hand-chosen rewards and rollout log-probs, ``A_e = log q_e - log p_e``
(q: sibling softmax of the subtree flow, p: sibling softmax of the old log-probs) is 0 where p
already equals q, positive on the edge q favours more than p, negative on its sibling, and the loss
pushes log-probs in that direction.
"""

import math

import pytest
import torch

from tmpo.objectives import Minibatch, StepwiseBalanceObjective
from tmpo.samplers.rollout import Rollout

# root (parent 0) -> a, b (edges 0, 1, step 1); a (parent 1) -> l0, l1 (edges 2, 3); b (parent 2) -> l2, l3 (edges 4, 5)
EDGE_PARENT = torch.tensor([0, 0, 1, 1, 2, 2])
PATH = torch.tensor([[1, 0, 1, 0, 0, 0], [1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 1]], dtype=torch.float32)


def two_level_tree(edge_log_prob_old: list[float]) -> Rollout:
    """A one-prompt rollout with the tree above in a 1-D latent (only the structure and log-probs matter)."""
    return Rollout(
        prompts=["toy"], metadata=[{}], cond=None, leaves=torch.zeros(4, 1), group=torch.zeros(4, dtype=torch.long), group_size=4,
        parent_x=torch.zeros(3, 1), parent_sigma=torch.tensor([0.8, 0.6, 0.6]), parent_sigma_next=torch.tensor([0.6, 0.4, 0.4]),
        parent_step=torch.tensor([1, 2, 2]), parent_group=torch.zeros(3, dtype=torch.long), parent_mean_old=torch.zeros(3, 1),
        parent_std=torch.ones(3), parent_is_prior=torch.zeros(3, dtype=torch.bool), edge_parent=EDGE_PARENT,
        edge_x_next=torch.zeros(6, 1), edge_log_prob_old=torch.tensor(edge_log_prob_old), path=PATH, eta=0.7, noise="sde", nfe=3,
    )


# beta = 1, R = (log 3, 0, 0, 0): leaf flows exp(R) = 3, 1, 1, 1; F(a) = mean(3, 1) = 2, F(b) = 1, so
# q(root -> a, b) = (2/3, 1/3), q(a -> l0, l1) = (3/4, 1/4), q(b -> l2, l3) = (1/2, 1/2).
# Old log-probs: (log 2, 0) at the root -> p = (2/3, 1/3) = q; (0, 0) at a -> p = (1/2, 1/2); (0, 0) at b.
REWARDS = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0])
LOG_P_OLD = [math.log(2.0), 0.0, 0.0, 0.0, 0.0, 0.0]
EXPECTED = [0.0, 0.0, math.log(1.5), math.log(0.5), 0.0, 0.0]  # log(3/4 / 1/2), log(1/4 / 1/2)


def test_edge_advantage_is_zero_where_p_equals_q_and_signed_where_q_favours_an_edge():
    obj = StepwiseBalanceObjective(beta_start=1.0, beta_end=1.0, kl_coef=0.0)
    prep = obj.prepare(two_level_tree(LOG_P_OLD), REWARDS, step=0)
    assert prep.edge_adv.tolist() == pytest.approx(EXPECTED, abs=1e-6)
    assert prep.edge_adv[2] > 0 > prep.edge_adv[3]  # l0 has the higher reward: its edge is credited


def test_edge_advantage_uses_the_warmed_up_beta():
    # beta warms up 0.5 -> 2 over 4 steps: at step 4 beta = 2, and rewards halved give the same flows
    obj = StepwiseBalanceObjective(beta_start=0.5, beta_end=2.0, beta_warmup_steps=4, kl_coef=0.0)
    prep = obj.prepare(two_level_tree(LOG_P_OLD), REWARDS / 2, step=4)
    assert float(prep.stats["beta"]) == 2.0
    assert prep.edge_adv.tolist() == pytest.approx(EXPECTED, abs=1e-6)


def test_all_zero_when_the_old_policy_already_matches_the_flow():
    # p = q at every parent: (log 2, 0), (log 3, 0), (0, 0)
    prep = StepwiseBalanceObjective(beta_start=1.0, beta_end=1.0).prepare(
        two_level_tree([math.log(2.0), 0.0, math.log(3.0), 0.0, 0.0, 0.0]), REWARDS, step=0)
    assert prep.edge_adv.abs().max().item() < 1e-6


def test_loss_gradient_raises_the_log_prob_of_the_credited_edge():
    """On-policy (ratio 1, no clipping) the loss is -mean_e A_e r_e over the 6 trainable edges, so
    dL/dlog pi_e = -A_e / 6: minimising raises l0's edge, lowers l1's, leaves the balanced ones alone."""
    obj = StepwiseBalanceObjective(beta_start=1.0, beta_end=1.0, kl_coef=0.0)
    rollout = two_level_tree(LOG_P_OLD)
    prep = obj.prepare(rollout, REWARDS, step=0)
    mb = Minibatch.of_groups(rollout, torch.tensor([0]))
    log_prob = rollout.edge_log_prob_old.clone().requires_grad_(True)
    loss, _ = obj.loss(mb, log_prob, torch.zeros(6), prep)
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([-a / 6 for a in EXPECTED], abs=1e-6)
    assert loss.item() == pytest.approx(-sum(EXPECTED) / 6, abs=1e-6)
