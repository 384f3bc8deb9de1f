"""End-to-end runs of the shared loop on the toy, resume, checkpoints, logging and config errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conftest import compose_run
from tmpo.checkpoint import load_checkpoint, save_atomic
from tmpo.config import ConfigError
from tmpo.run import build_trainer, train

SMALL = ["trainer.total_steps=2", "trainer.prompts_per_step=2", "eval.samples_per_prompt=300", "trainer.checkpoint_every=1"]


def test_two_iteration_toy_run_writes_summary_metrics_and_checkpoint(tmp_path):
    cfg = compose_run(SMALL + ["trainer.ema_every=1"], tmp_path)
    summary = train(cfg)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("reward", "modes_covered", "kl_to_target", "iter_time_s", "base/reward", "base/kl_to_target"):
        assert key in on_disk and on_disk[key] is not None
    assert on_disk["method"] == "tmpo" and on_disk["steps"] == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:
        assert r["train/group_size"] == 27 and r["train/edges_per_prompt"] == 39
        assert 0 < r["diag/p_entropy_frac"] <= 1
        # TMPO's two optimizer steps per rollout (one tree each): the second step's ratios have moved
        assert r["train/optimizer_steps"] == 2 and r["train/log_ratio_absmax"] > 0
        assert 0 < r["nfe/nograd_per_prompt"] < r["nfe/grad_per_prompt"]  # the first step skips the no-grad pass
    assert summary["reward"] != summary["base/reward"]  # EMA (every step here) moved the eval policy
    assert (tmp_path / "checkpoints" / "latest.pt").exists()


@pytest.mark.parametrize("method", ["tmpo", "grpo"])
def test_resume_continues_exactly(tmp_path, method):
    args = ["trainer.total_steps=4", "trainer.prompts_per_step=2", "eval.samples_per_prompt=50", f"method={method}",
            "trainer.ema_every=2", "trainer.inner_epochs=2"]
    straight = build_trainer(compose_run(args + ["trainer.checkpoint_every=0"], tmp_path / "a"))
    straight.run()
    first = build_trainer(compose_run(args + ["trainer.checkpoint_every=2"], tmp_path / "b"))
    original = first.train_step

    def preempted(step):  # the job is killed while computing step 3, after its step-2 checkpoint ...
        if step == 2:
            raise KeyboardInterrupt("preempted")
        return original(step)

    first.train_step = preempted
    with pytest.raises(KeyboardInterrupt):
        first.run()
    resumed = build_trainer(compose_run(args + ["resume=auto"], tmp_path / "b"))
    resumed.run(resume=tmp_path / "b")  # ... continues to step 4
    for (n, a), (_, b) in zip(straight.policy.trainable_named_parameters(), resumed.policy.trainable_named_parameters()):
        assert torch.equal(a, b), n
    for n in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[n], resumed.ema.shadow[n])
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # no duplicated or lost train rows


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic({"step": 1, "policy": {}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"step": 2, "policy": {"x": Boom()}}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "latest.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or not a tmpo checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="resume="):
        load_checkpoint(tmp_path / "nope")


def test_typo_in_a_component_key_names_the_key_and_the_fix(tmp_path):
    cfg = compose_run(["+objective.clip_epss=0.1"], tmp_path)
    with pytest.raises(ConfigError, match=r"objective.clip_epss.*Did you mean 'clip_eps'"):
        build_trainer(cfg)


def test_typo_in_a_trainer_key_fails_at_compose_time(tmp_path):
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="lrr"):
        compose_run(["trainer.lrr=0.1"], tmp_path)


def test_unknown_method_lists_the_valid_options(tmp_path):
    with pytest.raises(ConfigCompositionException, match="Available options"):
        compose_run(["method=tmpoo"], tmp_path)


def test_cli_reports_config_errors_cleanly(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tmpo.run", f"hydra.run.dir={tmp_path}", "logger=none", "+sampler.etaa=1"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=120,
    )
    assert out.returncode != 0
    assert "config error: unknown key sampler.etaa" in out.stderr and "Did you mean 'eta'" in out.stderr


def test_non_finite_reward_is_an_error_not_zeroed(tmp_path):
    trainer = build_trainer(compose_run(SMALL, tmp_path))
    trainer.reward = lambda samples, prompts, meta: (torch.full((samples.shape[0],), float("nan")), {})
    with pytest.raises(ValueError, match="non-finite"):
        trainer.train_step(0)


def test_wandb_offline_logging_writes_its_run_and_our_files(tmp_path):
    cfg = compose_run(["trainer.total_steps=1", "trainer.prompts_per_step=1", "eval.samples_per_prompt=50", "logger=wandb"], tmp_path)
    train(cfg)
    assert (tmp_path / "wandb").is_dir() and (tmp_path / "summary.json").exists()


def test_mini_pipeline_end_to_end_on_a_tiny_random_model(tmp_path):
    """prompt -> flow model -> images -> GenEval detector -> RL update -> eval (task + DrawBench suite)."""
    from tmpo.run import compose_config

    cfg = compose_config([
        f"run_dir={tmp_path}", "logger=none", "trainer.progress=false", "model=mini", "reward=geneval",
        "model.random_init=true", "+model.model_config={width: 32, depth: 1, heads: 2, text_layers: 1}",
        "trainer.total_steps=2", "trainer.prompts_per_step=1", "trainer.threads=1", "trainer.ema_every=1",
        "eval.max_prompts=2", "eval.samples_per_prompt=3", "eval.num_steps=4", "reward.suites.drawbench.max_prompts=2",
    ])
    summary = train(cfg)
    for key in ("geneval", "geneval_official", "pickscore", "hpsv21", "imagereward", "lgmd", "cosdiv", "iter_time_s",
                "base/geneval", "base/pickscore", "base/lgmd"):
        assert key in summary and math.isfinite(summary[key]), key
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/group_size"] for r in rows if "train/loss" in r] == [27, 27]


def test_write_json_atomic_round_trips_and_leaves_no_temporary_file(tmp_path):
    from tmpo.checkpoint import write_json_atomic

    path = write_json_atomic({"a": 1, "b": [0.5, None]}, tmp_path / "sub" / "card.json")
    assert json.loads(path.read_text()) == {"a": 1, "b": [0.5, None]}
    write_json_atomic({"a": 2}, path)  # replaces, not appends
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["card.json"]
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, path)  # a failed write keeps the old file and no temporary
    assert json.loads(path.read_text()) == {"a": 2} and [p.name for p in path.parent.iterdir()] == ["card.json"]
