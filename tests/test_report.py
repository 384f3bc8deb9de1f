"""The end of a run: the evaluation's noise (checked against real re-runs with other eval seeds), the
printed table, what was evaluated on short runs (the EMA trap), and group-readable result files."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from conftest import compose_run
from tmpo.checkpoint import save_atomic, write_json_atomic, write_text_atomic
from tmpo.metrics.noise import eval_noise
from tmpo.report import evaluated_sentence, format_table, table_metrics
from tmpo.run import build_trainer, train


# --- the eval noise ------------------------------------------------------------------------------
def test_eval_noise_by_hand():
    # prompt 1: scores 1, 0 -> variance 0.5; prompt 2: 1, 1 -> 0. sd = sqrt((0.5 + 0) / 2) / 2 = 0.25
    assert eval_noise(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2) == pytest.approx(0.25, abs=1e-12)
    # one prompt, scores 0, 3, 6: variance 9, n = 3 -> sd = sqrt(9 / 3) = 1.7320508
    assert eval_noise(torch.tensor([0.0, 3.0, 6.0]), 3) == pytest.approx(3 ** 0.5, abs=1e-12)
    assert eval_noise(torch.tensor([1.0, 2.0]), 1) != eval_noise(torch.tensor([1.0, 2.0]), 1)  # nan: no spread to read
    with pytest.raises(ValueError, match="do not split"):
        eval_noise(torch.zeros(5), 2)


def test_eval_noise_matches_the_spread_of_real_reruns_with_other_eval_seeds(tmp_path):
    """The toy's evaluation re-run at 30 eval seeds: the sd of its reward over those runs is what one
    evaluation's ``noise/reward`` estimates (a sd estimated from 30 values is within ~25% of the truth)."""
    trainer = build_trainer(compose_run(["eval.samples_per_prompt=100", "trainer.eval_base=false"], tmp_path))
    rewards, noises = [], []
    for seed in range(30):
        trainer.evaluator.seed = seed
        metrics = trainer.evaluate()
        rewards.append(metrics["reward"])
        noises.append(metrics["noise/reward"])
    spread = torch.tensor(rewards).std().item()
    estimate = torch.tensor(noises).mean().item()
    assert 0.7 < estimate / spread < 1.4, (estimate, spread)
    assert "noise/modes_covered" not in metrics  # not a mean over images: no noise claimed


# --- the table -------------------------------------------------------------------------------------
SUMMARY = {
    "reward": 0.40, "geneval": 0.55, "lgmd": -0.61, "occ_A": 0.2, "official/counting": 0.1,
    "base/reward": 0.35, "base/geneval": 0.50, "base/lgmd": -0.63, "noise/reward": 0.01, "noise/geneval": 0.0125,
    "iter_time_s": 1.5, "steps": 120.0, "eval_weights": "ema", "ema_updates": 15, "ema_initial_share": 0.9 ** 15,
    "method": "tmpo", "seed": 0,
}


def test_table_lists_each_metric_with_base_trained_change_and_noise(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    text = format_table(SUMMARY, tmp_path, "tmpo on mini", ema_decay=0.9, ema_every=8)
    lines = text.splitlines()
    assert lines[0] == "tmpo on mini"
    assert table_metrics(SUMMARY) == ["reward", "geneval", "lgmd"]  # labels, occupancies, per-tag rows left out
    row = next(ln for ln in lines if ln.startswith("geneval "))
    assert row.split() == ["geneval", "0.5", "0.55", "+0.05", "0.0125"]
    assert next(ln for ln in lines if ln.startswith("lgmd ")).split()[-1] == "-"  # noise unknown
    assert "reward changed by +0.05 = +5.0 x its eval noise" in text
    assert "the EMA weights (decay 0.9 every 8 iterations): 15 updates; 21% of it is still the untrained model" in text
    assert "iteration time: 1.50 s" in text
    assert f"run directory: {tmp_path.resolve()}  (summary.json)" in text


def test_evaluated_sentence_for_live_weights():
    text = evaluated_sentence({"eval_weights": "live", "ema_updates": 0, "steps": 5.0}, 0.9, 8)
    assert text == ("the live weights: the EMA (decay 0.9 every 8 iterations) had no update in 5 iterations, "
                    "so it still equals the untrained model")


# --- the EMA trap ----------------------------------------------------------------------------------
def _run_recording_eval(tmp_path, steps):
    trainer = build_trainer(compose_run([f"trainer.total_steps={steps}", "trainer.ema_every=8", "trainer.eval_base=false",
                                         "trainer.checkpoint_every=0"], tmp_path))
    seen = []
    trainer.evaluator = lambda policy: seen.append(policy.trainable_state()) or {"reward": 0.0}
    summary = trainer.run()
    return trainer, seen[-1], summary


def test_a_run_shorter_than_ema_every_evaluates_its_live_weights_and_says_so(tmp_path):
    trainer, evaluated, summary = _run_recording_eval(tmp_path, 5)
    initial = trainer.initial_state
    for name, live in trainer.policy.trainable_named_parameters():
        assert torch.equal(evaluated[name], live.detach())  # the trained weights, not the EMA ...
        assert not torch.equal(evaluated[name], initial[name].to(live.device))  # ... which still equals the start
        assert torch.equal(trainer.ema.shadow[name], initial[name].to(live.device))
    assert summary["eval_weights"] == "live" and summary["ema_updates"] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["eval_weights"] == "live"


def test_once_the_ema_has_updated_the_ema_is_evaluated(tmp_path):
    trainer, evaluated, summary = _run_recording_eval(tmp_path, 9)  # one update, after iteration 8
    for name, shadow in trainer.ema.shadow.items():
        assert torch.equal(evaluated[name], shadow)
    assert summary["eval_weights"] == "ema" and summary["ema_updates"] == 1
    assert summary["ema_initial_share"] == pytest.approx(0.9)


def test_a_short_toy_run_no_longer_reports_the_base_model_as_trained(tmp_path):
    """The issue's symptom: a 5-iteration toy run reported ``reward`` equal to ``base/reward`` to 5 digits."""
    summary = train(compose_run(["trainer.total_steps=5", "eval.samples_per_prompt=500", "trainer.lr=1e-2"], tmp_path))
    assert summary["eval_weights"] == "live"
    assert abs(summary["reward"] - summary["base/reward"]) > 1e-4
    assert (tmp_path / "samples.png").stat().st_size > 10_000  # the 2-D toy's samples: a scatter per model


# --- file modes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writers_follow_the_umask_like_open_does(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        paths = [save_atomic({"x": torch.zeros(1)}, tmp_path / "a.pt"), write_json_atomic({"a": 1}, tmp_path / "b.json"),
                 write_text_atomic("x", tmp_path / "c.txt")]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.json", "c.txt"]  # no temporaries left
