"""EMA (paper App. D.3: decay 0.9 every 8 steps) and the cosine LR schedule (App. D.4), by hand.

Every evaluation and every saved model goes through the EMA, and every number of every table through
the schedule; a wrong decay, a wrong cadence or a schedule running the wrong way changes all of them
while every end-to-end run still "works". These tests pin the rules with hand-derived values.
"""

import json

import pytest
import torch
from torch import nn

from conftest import compose_run
from tmpo.ema import EMA
from tmpo.loop import TrainerConfig
from tmpo.run import build_trainer


def _ema(values, decay=0.9, every=1):
    p = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    return p, EMA([("w", p)], decay=decay, every=every)


# --- EMA unit rules ----------------------------------------------------------------------------------
def test_one_update_is_decay_times_old_plus_one_minus_decay_times_new():
    p, ema = _ema([1.0, -2.0], decay=0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 2.0]))
    assert ema.update(0) is True
    # 0.9 * [1, -2] + 0.1 * [3, 2] = [1.2, -1.6]
    assert ema.shadow["w"].tolist() == pytest.approx([1.2, -1.6], abs=1e-12)
    ema.update(1)  # 0.9 * [1.2, -1.6] + 0.1 * [3, 2] = [1.38, -1.24]
    assert ema.shadow["w"].tolist() == pytest.approx([1.38, -1.24], abs=1e-12)
    assert p.tolist() == [3.0, 2.0]  # the EMA never writes into the live parameters


def test_updates_only_after_every_eighth_step_and_nothing_happens_off_the_cadence():
    p, ema = _ema([0.0], decay=0.9, every=8)
    updated, expected = [], 0.0
    for step in range(24):
        with torch.no_grad():
            p.fill_(float(step))  # the parameter after optimizer step `step` (0-based)
        before = ema.shadow["w"].item()
        if ema.update(step):
            updated.append(step)
            expected = 0.9 * expected + 0.1 * step
        else:
            assert ema.shadow["w"].item() == before  # off the cadence: not touched at all
        assert ema.shadow["w"].item() == pytest.approx(expected, abs=1e-12)
    assert updated == [7, 15, 23]  # after the 8th, 16th and 24th optimizer steps
    # by hand: 0.1*7 = 0.7; 0.9*0.7 + 0.1*15 = 2.13; 0.9*2.13 + 0.1*23 = 4.217
    assert ema.shadow["w"].item() == pytest.approx(4.217, abs=1e-12)


def test_decay_zero_is_no_ema_the_shadow_is_the_live_weights_after_every_step_whatever_the_interval():
    p, ema = _ema([0.0], decay=0.0, every=2)  # MixGRPO (no EMA) under a scale that sets ema_every=2
    for step in range(5):  # an odd run length: an interval of 2 would leave the shadow one step behind
        with torch.no_grad():
            p.fill_(float(step + 1))
        assert ema.update(step) is True
        assert ema.shadow["w"].item() == step + 1


def test_applied_swaps_the_ema_weights_in_and_restores_the_live_ones_even_on_error():
    p, ema = _ema([1.0, 2.0], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 6.0]))
    ema.update(0)  # shadow = [2, 4]
    with ema.applied():
        assert p.tolist() == [2.0, 4.0]
    assert p.tolist() == [3.0, 6.0]
    with pytest.raises(RuntimeError, match="boom"), ema.applied():
        raise RuntimeError("boom")
    assert p.tolist() == [3.0, 6.0]


def test_ema_state_round_trips_as_a_copy():
    p, ema = _ema([1.0], decay=0.5)
    state = ema.state_dict()
    with torch.no_grad():
        p.fill_(3.0)
    ema.update(0)  # shadow 2.0; the saved state must not follow it
    assert state["w"].item() == 1.0
    fresh = EMA([("w", p)], decay=0.5)
    fresh.load_state_dict(state)
    assert fresh.shadow["w"].item() == 1.0
    with pytest.raises(ValueError, match="does not match"):
        fresh.load_state_dict({"other": torch.zeros(1)})


# --- the loop's use of the EMA -----------------------------------------------------------------------
LOOP = ["trainer.prompts_per_step=1", "eval.samples_per_prompt=20", "trainer.eval_base=false", "trainer.checkpoint_every=0"]


def _trajectory_of_params(trainer):
    """Wrap ``train_step`` to record the trainable parameters after every step (index 0 = initial)."""
    record = [{n: p.detach().clone() for n, p in trainer.policy.trainable_named_parameters()}]
    original = trainer.train_step

    def step_and_record(step):
        out = original(step)
        record.append({n: p.detach().clone() for n, p in trainer.policy.trainable_named_parameters()})
        return out

    trainer.train_step = step_and_record
    return record


def test_loop_updates_the_ema_after_every_ema_every_th_step_and_evaluates_with_it(tmp_path):
    overrides = LOOP + ["trainer.total_steps=5", "trainer.ema_every=2", "trainer.ema_decay=0.5"]
    trainer = build_trainer(compose_run(overrides, tmp_path))
    theta = _trajectory_of_params(trainer)
    seen_at_eval = []
    trainer.evaluator = lambda policy: seen_at_eval.append(policy.trainable_state()) or {"reward": 0.0}
    trainer.run()
    assert len(theta) == 6 and len(seen_at_eval) == 1
    for n, live in trainer.policy.trainable_named_parameters():
        # updates after steps 2 and 4 (1-based), none after 1, 3, 5:
        expected = 0.5 * (0.5 * theta[0][n] + 0.5 * theta[2][n]) + 0.5 * theta[4][n]
        torch.testing.assert_close(trainer.ema.shadow[n], expected, rtol=0, atol=1e-7)
        assert not torch.allclose(theta[5][n], theta[4][n], rtol=0, atol=1e-6)  # the policy did move after step 4
        torch.testing.assert_close(seen_at_eval[0][n], trainer.ema.shadow[n], rtol=0, atol=0)  # eval saw the EMA
        assert torch.equal(live.detach(), theta[5][n])  # ... and the live weights came back afterwards
    saved = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)
    for n in trainer.ema.shadow:
        assert torch.equal(saved["ema"][n], trainer.ema.shadow[n])


# --- LR schedule -------------------------------------------------------------------------------------
def _logged_lrs(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/lr"] for r in rows if "train/lr" in r]


def test_cosine_lr_starts_at_lr_never_rises_and_ends_at_the_floor(tmp_path):
    lr = 1e-3
    cosine = ["trainer.lr_schedule=cosine"] if hasattr(TrainerConfig, "lr_schedule") else []
    overrides = LOOP + cosine + ["trainer.total_steps=4", f"trainer.lr={lr}", "trainer.lr_min_ratio=0.1"]
    trainer = build_trainer(compose_run(overrides, tmp_path))
    trainer.run()
    lrs = _logged_lrs(tmp_path)
    # lr * (0.1 + 0.9 * (1 + cos(pi s / 4)) / 2) for s = 0..3, by hand:
    # s = 1: 0.1 + 0.45 * (1 + 0.7071068) = 0.8681981; s = 2: 0.55; s = 3: 0.1 + 0.45 * 0.2928932 = 0.2318019
    assert lrs == pytest.approx([lr, 0.8681981 * lr, 0.55 * lr, 0.2318019 * lr], rel=1e-6)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr, rel=1e-9)  # the floor at the run's end


@pytest.mark.skipif(not hasattr(TrainerConfig, "lr_schedule"), reason="trainer.lr_schedule not in this version")
def test_constant_lr_schedule_keeps_the_lr(tmp_path):
    overrides = LOOP + ["trainer.total_steps=3", "trainer.lr=2e-4", "trainer.lr_schedule=constant"]
    trainer = build_trainer(compose_run(overrides, tmp_path))
    trainer.run()
    assert _logged_lrs(tmp_path) == [2e-4] * 3
