"""Exact resume for every method: N steps straight == N/2 steps, preemption, resume, N/2 steps, bit for bit.

Compared: trainable parameters, the reference policy (its saved weights and its velocity), the EMA,
the optimizer state, the scheduler, the objective's state and every logged training number. GARDO runs
with forced reference resets (one before the checkpoint), so a checkpoint without the reference would
resume against the base model and diverge; with its uncertainty gate (a toy auxiliary reward) the risk
compensator's state is exercised too.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR, compose_run
from reliability.rel_helpers import assert_same
from tmpo.run import build_trainer

METHODS = sorted(p.stem for p in Path(CONF_DIR, "method").glob("*.yaml"))  # every method, present and future
GARDO_RESETS = ["objective.reset_every=1", "objective.kl_thres=1e9"]  # a reset every second iteration, KL-independent
TOY_AUX = "objective.aux_rewards={aux:{_target_:tmpo.rewards.gmm.GMMModeReward,reward_width:0.5}}"
VARIANTS = {m: [f"method={m}"] for m in METHODS}
VARIANTS.update({
    "tmpo-detailed_balance": ["method=tmpo", "ablation=detailed_balance"],
    "gardo-resets": ["method=gardo", *GARDO_RESETS],
    "gardo-resets-gate": ["method=gardo", *GARDO_RESETS, "objective.kl_gate=uncertainty", TOY_AUX],
    "gardo-resets-lora": ["method=gardo", *GARDO_RESETS, "model.lora={r:2,alpha:4,target_modules:[fc1,fc2]}"],
})
TOTAL, CUT = 6, 3
SMALL = [f"trainer.total_steps={TOTAL}", "trainer.prompts_per_step=2", "trainer.minibatches=2", "trainer.ema_every=2",
         "trainer.eval_base=false", "eval.samples_per_prompt=20"]
PROBE = (torch.linspace(-2, 2, 14).view(7, 2), torch.linspace(0.1, 0.9, 7))  # points and noise levels


def build(overrides: list[str], run_dir: Path):
    """A trainer as a fresh process builds it (LoRA's start weights come from torch's global generator)."""
    torch.manual_seed(0)
    return build_trainer(compose_run(overrides, run_dir))


def reference_velocity(policy) -> torch.Tensor:
    cond = policy.encode_prompts(["toy"])
    with torch.no_grad(), policy.reference():
        return policy.velocity(PROBE[0], PROBE[1], cond, torch.zeros(7, dtype=torch.long))


def train_rows(run_dir: Path) -> list[dict]:
    """Logged training rows without wall-clock timings."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "iter_time_s"} for r in rows if "train/loss" in r]


def preempted_run(overrides: list[str], run_dir: Path):
    """Run with a checkpoint every CUT steps and kill the job while it computes step CUT + 1."""
    trainer = build(overrides + [f"trainer.checkpoint_every={CUT}"], run_dir)
    resets = []
    original_reset, original_step = trainer.policy.reset_reference, trainer.train_step

    def counted_reset():
        resets.append(trainer.step)
        original_reset()

    def killed_at_cut(step):
        if step == CUT:
            raise KeyboardInterrupt("preempted")
        return original_step(step)

    trainer.policy.reset_reference, trainer.train_step = counted_reset, killed_at_cut
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    return trainer, resets


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_resume_is_bit_exact(tmp_path, name):
    overrides = VARIANTS[name] + SMALL
    straight = build(overrides + ["trainer.checkpoint_every=0"], tmp_path / "straight")
    straight.run()

    killed, resets = preempted_run(overrides, tmp_path / "resumed")
    if "resets" in name:
        assert resets and max(resets) < CUT, f"no reference reset before the checkpoint: {resets}"
        base = build(overrides, tmp_path / "fresh").policy
        assert not torch.equal(reference_velocity(killed.policy), reference_velocity(base)), "reference left at the base model"
    # the checkpoint alone restores the state the killed job had (reference policy included)
    loaded = build(overrides + ["resume=auto"], tmp_path / "resumed")
    loaded.load(tmp_path / "resumed")
    assert loaded.step == CUT
    assert torch.equal(reference_velocity(loaded.policy), reference_velocity(killed.policy)), "reference not restored"
    assert_same(loaded.objective.state_dict(), killed.objective.state_dict(), "objective@cut")
    assert_same(loaded.ema.state_dict(), killed.ema.state_dict(), "ema@cut")

    resumed = build(overrides + [f"trainer.checkpoint_every={CUT}", "resume=auto"], tmp_path / "resumed")
    resumed.run(resume=tmp_path / "resumed")
    assert resumed.step == straight.step == TOTAL
    assert_same(resumed.policy.trainable_state(), straight.policy.trainable_state(), "policy")
    assert_same(resumed.policy.reference_state(), straight.policy.reference_state(), "policy_reference")
    assert torch.equal(reference_velocity(resumed.policy), reference_velocity(straight.policy)), "reference velocity"
    assert_same(resumed.ema.state_dict(), straight.ema.state_dict(), "ema")
    assert_same(resumed.optimizer.state_dict(), straight.optimizer.state_dict(), "optimizer")
    assert_same(resumed.scheduler.state_dict(), straight.scheduler.state_dict(), "scheduler")
    assert_same(resumed.objective.state_dict(), straight.objective.state_dict(), "objective")
    assert_same(train_rows(tmp_path / "resumed"), train_rows(tmp_path / "straight"), "metrics.jsonl")
    if "resets" in name:  # the run after the checkpoint trained against a reset reference, not the base model
        assert straight.policy.reference_state() is not None
