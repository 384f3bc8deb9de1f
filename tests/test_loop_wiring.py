"""The loop passes its config where it belongs: AdamW's hyper-parameters, and one reproducible random
stream per (run seed, step) for prompts and rollout noise, so resumes replay and seeds differ."""

import pytest
import torch

from conftest import compose_run
from tmpo.run import build_trainer

SMALL = ["trainer.total_steps=2", "trainer.prompts_per_step=1", "trainer.eval_base=false", "eval.samples_per_prompt=10"]


def test_optimizer_is_adamw_with_the_configured_hyper_parameters(tmp_path):
    trainer = build_trainer(compose_run(SMALL + ["trainer.lr=2e-4", "trainer.weight_decay=0.03", "trainer.adam_beta1=0.8",
                                                 "trainer.adam_beta2=0.95"], tmp_path))
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    group = trainer.optimizer.param_groups[0]
    assert (group["initial_lr"], group["weight_decay"], group["betas"]) == (2e-4, 0.03, (0.8, 0.95))
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for _, p in trainer.policy.trainable_named_parameters()}


def _random_streams(tmp_path, seed: int, steps=(0, 1)) -> list[tuple[float, int]]:
    """For each step: the prompt source's first draw and the rollout generator's seed."""
    trainer = build_trainer(compose_run(SMALL + [f"trainer.seed={seed}"], tmp_path / f"s{seed}"))
    seen: list[tuple[float, int]] = []
    prompt_draws: list[float] = []
    original_train, original_rollout = trainer.prompts.train, trainer.sampler.rollout

    def recording_train(n, rng):
        prompt_draws.append(float(rng.random()))
        return original_train(n, rng)

    def recording_rollout(policy, texts, meta, step, total, generator):
        seen.append((prompt_draws[-1], generator.initial_seed()))
        return original_rollout(policy, texts, meta, step, total, generator)

    trainer.prompts.train, trainer.sampler.rollout = recording_train, recording_rollout
    for step in steps:
        trainer.train_step(step)
    return seen


def test_each_step_and_each_seed_draws_its_own_prompts_and_noise_reproducibly(tmp_path):
    a = _random_streams(tmp_path, seed=0)
    assert a[0][0] != a[1][0] and a[0][1] != a[1][1]  # step 1 does not replay step 0's prompts or noise
    b = _random_streams(tmp_path, seed=1)
    assert all(x[0] != y[0] and x[1] != y[1] for x, y in zip(a, b))  # another seed: other prompts and noise
    assert _random_streams(tmp_path / "again", seed=0, steps=(1,)) == a[1:]  # step 1 alone replays exactly (resume)


@pytest.mark.parametrize("key", ["trainer.ema_decay=1.0", "trainer.ema_every=0"])
def test_invalid_ema_settings_are_clear_errors(tmp_path, key):
    with pytest.raises(ValueError, match="EMA"):
        build_trainer(compose_run(SMALL + [key], tmp_path))

