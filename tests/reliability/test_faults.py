"""Faults named honestly: divergence is reported as the policy's non-finite samples (with the iteration and
the prompts) and the last good state is checkpointed; a non-finite eval reward is an error; advantages
with no signal (zero spread, every value at the clamp) are warned about with their numbers."""

import logging
from types import SimpleNamespace

import pytest
import torch

from conftest import compose_run
from rel_helpers import checkpoint, rows
from tmpo.faults import NonFiniteError, degenerate_advantages, eval_fault, rollout_fault
from tmpo.run import build_trainer

SMALL = ["trainer.total_steps=6", "trainer.prompts_per_step=2", "eval.samples_per_prompt=30", "trainer.ema_every=1"]


def _rollout(leaves, edge_lp, prompts=("a red cube", "two cats")):
    """The fields of a Rollout that the check reads: 2 groups of 3 leaves, one stored edge per leaf."""
    k = 3
    return SimpleNamespace(leaves=leaves, group=torch.arange(2).repeat_interleave(k), prompts=list(prompts),
                           edge_log_prob_old=edge_lp, edge_parent=torch.arange(6), parent_group=torch.arange(2).repeat_interleave(k))


def test_rollout_fault_names_samples_before_log_probs_with_iteration_and_prompts():
    ok = _rollout(torch.zeros(6, 2), torch.zeros(6))
    assert rollout_fault(ok, iteration=4) is None
    leaves = torch.zeros(6, 2)
    leaves[4, 1] = float("nan")  # a leaf of group 1
    lp = torch.zeros(6)
    lp[0] = float("inf")  # and a log-prob of group 0: the samples are named first
    msg = rollout_fault(_rollout(leaves, lp), iteration=4)
    assert msg.startswith("the policy diverged at iteration 4: 1 of 6 samples") and "'two cats'" in msg and "'a red cube'" not in msg
    msg = rollout_fault(_rollout(torch.zeros(6, 2), lp), iteration=4)
    assert "1 of 6 log-probs of the sampled transitions" in msg and "'a red cube'" in msg


def test_divergence_is_named_as_the_policy_and_the_last_good_state_is_checkpointed(tmp_path):
    # one optimizer step per rollout, so the blow-up shows in the next rollout (with two, in the update's
    # second step: test_a_non_finite_gradient_...)
    trainer = build_trainer(compose_run([*SMALL, "trainer.lr=1e6", "trainer.minibatches=1", "trainer.checkpoint_every=0"], tmp_path))
    with pytest.raises(NonFiniteError, match=r"the policy diverged at iteration (\d+): .* samples .* prompt\(s\) 'toy'.*"
                                             r"last good state .* is checkpointed") as err:
        trainer.run()
    assert "reward" not in str(err.value).split("--")[0]
    ck = checkpoint(tmp_path)
    diverged_at = int(str(err.value).split("iteration ")[1].split(":")[0])
    assert ck["step"] == diverged_at - 2  # the state whose own rollout (iteration diverged_at - 1) was finite
    assert all(torch.isfinite(v).all() for v in ck["policy"].values())
    assert len(rows(tmp_path)) >= ck["metrics_rows"]


def test_a_non_finite_reward_on_finite_samples_checkpoints_the_state_it_came_from(tmp_path):
    trainer = build_trainer(compose_run([*SMALL, "trainer.checkpoint_every=0"], tmp_path))
    reward = trainer.reward

    def broken_at_iteration_3(samples, prompts, meta):
        r, info = reward(samples, prompts, meta)
        return (r * float("nan") if trainer.step == 2 else r), info

    trainer.reward = broken_at_iteration_3
    with pytest.raises(NonFiniteError, match=r"reward returned non-finite values .* at iteration 3, on finite samples"):
        trainer.run()
    assert checkpoint(tmp_path)["step"] == 2  # iteration 3 changed nothing before the reward: state after 2 is good


def test_a_non_finite_gradient_checkpoints_the_state_before_the_update(tmp_path, monkeypatch):
    import tmpo.loop

    trainer = build_trainer(compose_run([*SMALL, "trainer.checkpoint_every=0"], tmp_path))
    original = tmpo.loop.policy_update

    def update_blows_up_at_3(policy, *args, **kw):
        if trainer.step == 2:
            with torch.no_grad():
                trainer.params[0].add_(float("nan"))  # a partial update already applied ...
            raise FloatingPointError("non-finite gradient norm (nan)")  # ... then the update fails
        return original(policy, *args, **kw)

    monkeypatch.setattr(tmpo.loop, "policy_update", update_blows_up_at_3)
    with pytest.raises(FloatingPointError, match=r"iteration 3: non-finite gradient norm .*\(after iteration 2"):
        trainer.run()
    ck = checkpoint(tmp_path)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["policy"].values())


def test_a_non_finite_eval_reward_is_an_error_and_no_summary_is_written(tmp_path):
    trainer = build_trainer(compose_run(SMALL, tmp_path))
    evaluator = trainer.evaluator
    trainer.evaluator = lambda policy: {**evaluator(policy), "reward": float("nan")} if trainer.step else evaluator(policy)
    with pytest.raises(NonFiniteError, match=r"evaluation returned non-finite reward=nan.* \(after iteration 6\)"):
        trainer.run()
    assert not (tmp_path / "summary.json").exists()
    error, others = eval_fault({"reward": 1.0, "lgmd": float("inf")})
    assert error is None and others == ["lgmd"]  # other metrics: warned about, not fatal


def test_degenerate_advantages_are_warned_about_with_their_numbers(tmp_path, caplog):
    trainer = build_trainer(compose_run(["method=flow_grpo", *SMALL, "trainer.total_steps=2"], tmp_path))
    reward = trainer.reward
    trainer.reward = lambda s, p, m: (torch.full((s.shape[0],), 3e38), reward(s, p, m)[1])  # finite, no spread
    with caplog.at_level(logging.WARNING):
        trainer.run()
    warned = [r.getMessage() for r in caplog.records if "degenerate advantages" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("iteration 1: degenerate advantages: std 0")
    assert "mean -5, every value at the clamp objective.adv_clip=5" in warned[0]  # 27 x 3e38 overflow to inf
    assert "reward mean inf" in warned[0]


def test_degenerate_advantages_rule_by_hand():
    row = {"train/adv_mean": -5.0, "train/adv_std": 0.0, "train/reward_mean": 3e38, "train/reward_std": 0.0}
    msg = degenerate_advantages(row, adv_clip=5.0)
    assert "every value at the clamp objective.adv_clip=5" in msg
    assert degenerate_advantages({**row, "train/adv_mean": 0.0, "train/adv_std": 0.9}, adv_clip=5.0) is None
    assert degenerate_advantages({"train/adv_mean": float("nan"), "train/adv_std": float("nan")}, None) is None
