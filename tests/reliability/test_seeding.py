"""Reproducible seeds: every random number a run uses follows trainer.seed, so two runs of the same config
are bit-identical (every method, toy and mini), whatever ran before them in the process, and in two
separate processes; a different seed gives a different run."""

from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR, compose_run
from rel_helpers import TOY, assert_same, assert_same_training_state, checkpoint, cli, train_rows
from tmpo.run import build_trainer, compose_config

METHODS = sorted(p.stem for p in Path(CONF_DIR, "method").glob("*.yaml"))
TOY_RUN = ["trainer.total_steps=2", "trainer.prompts_per_step=1", "eval.samples_per_prompt=30", "trainer.ema_every=1"]


def _run(overrides: list[str], run_dir: Path) -> dict:
    torch.rand(7)  # whatever ran before in this process must not matter
    build_trainer(compose_run(overrides, run_dir) if "model=mini" not in overrides
                  else compose_config([f"run_dir={run_dir}", "logger=none", "trainer.progress=false", *overrides])).run()
    return checkpoint(run_dir)


@pytest.mark.parametrize("method", METHODS)
def test_two_toy_runs_with_the_same_seed_are_bit_identical(tmp_path, method):
    overrides = [f"method={method}", *TOY_RUN, "model.lora={r:2,alpha:4,target_modules:[fc1,fc2]}"]
    a, b = _run(overrides, tmp_path / "a"), _run(overrides, tmp_path / "b")
    assert_same_training_state(a, b)
    assert_same(train_rows(tmp_path / "a"), train_rows(tmp_path / "b"))
    c = _run([*overrides, "trainer.seed=1"], tmp_path / "c")
    assert any(not torch.equal(a["policy"][k], c["policy"][k]) for k in a["policy"])


@pytest.fixture(scope="module")
def tiny_mini_checkpoint(tmp_path_factory) -> Path:
    """A random-weight mini DiT saved like a published one, so the run loads weights and adds a fresh LoRA
    from the global generator: the path that made two seeded mini runs differ at step 1."""
    from tmpo.policies import mini_pretrain
    from tmpo.policies.mini import MiniConfig

    path = tmp_path_factory.mktemp("mini") / "dit.pt"
    torch.manual_seed(123)
    cfg = MiniConfig(arch="dit", width=32, depth=1, heads=2, text_layers=1)
    torch.save(mini_pretrain.published_state(mini_pretrain.Bundle(cfg), cfg, {}), path)
    return path


def _mini(method: str, ckpt: Path) -> list[str]:
    return [f"method={method}", "model=mini", "reward=pickscore", f"model.checkpoint={ckpt}", "trainer.total_steps=2",
            "trainer.prompts_per_step=1", "trainer.threads=1", "trainer.eval_base=false", "eval.max_prompts=1",
            "eval.samples_per_prompt=2", "eval.num_steps=2", "reward.suites.drawbench.max_prompts=1"]


@pytest.mark.parametrize("method", [m if m == "tmpo" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_two_mini_runs_with_the_same_seed_are_bit_identical(tmp_path, tiny_mini_checkpoint, method):
    a = _run(_mini(method, tiny_mini_checkpoint), tmp_path / "a")
    b = _run(_mini(method, tiny_mini_checkpoint), tmp_path / "b")
    assert_same_training_state(a, b)
    assert_same(train_rows(tmp_path / "a"), train_rows(tmp_path / "b"))


def test_mini_lora_start_weights_follow_trainer_seed(tmp_path):
    """The committed mini model: LoRA's A matrices are drawn at build time, from trainer.seed."""
    def lora(seed: int, name: str) -> dict:
        torch.rand(3)
        cfg = compose_config([f"run_dir={tmp_path / name}", "logger=none", "model=mini", f"trainer.seed={seed}"])
        return build_trainer(cfg).policy.trainable_state()

    a, b, c = lora(0, "a"), lora(0, "b"), lora(1, "c")
    assert_same(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


@pytest.mark.slow  # two CLI processes (~20 s on 2 busy cores); the in-process comparisons above run by default
def test_two_processes_with_the_same_seed_write_bit_identical_runs(tmp_path):
    args = [*TOY, "trainer.total_steps=3", "model.lora={r:2,alpha:4,target_modules:[fc1,fc2]}"]
    for name in ("a", "b"):
        out = cli([*args, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    assert_same_training_state(checkpoint(tmp_path / "a"), checkpoint(tmp_path / "b"))
    assert_same(train_rows(tmp_path / "a"), train_rows(tmp_path / "b"))
