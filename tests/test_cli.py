"""``python -m tmpo.run`` as a user types it: our ``--help``, one message per bad key or value before
anything is created (Hydra's run directory included), Python logging into Hydra's ``run.log``, the
printed table; and the command-line checks in-process (every combination of a sweep)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tmpo.config import ConfigError
from tmpo.startup import check_command_line, split_command_line

REPO = Path(__file__).resolve().parent.parent
TOY = ["model=toy", "reward=gmm_modes", "trainer.progress=false", "logger=none"]


def tmpo_run(args, cwd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tmpo.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_shows_our_usage_scales_commands_and_groups(tmp_path):
    out = tmpo_run(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("usage: python -m tmpo.run")
    for expected in ("toy    model=toy reward=gmm_modes", "mini   model=mini", "real   model=flux_dev|sd35_medium",
                     "python -m tmpo.sample <run-dir>", "resume=outputs/tmpo/<run-dir>", "hydra/launcher=slurm",
                     "method: flow_grpo, gardo", "--hydra-help"):
        assert expected in text, expected
    assert "_target_" not in text  # not Hydra's dump of the whole config


@pytest.mark.parametrize("override, message", [
    ("objective.clip_epss=0.1", "unknown key objective.clip_epss=0.1 for tmpo.objectives.SoftmaxTBObjective. "
                                "Did you mean 'clip_eps'? Valid keys: beta_end, beta_start"),
    ("sampler.noise=bogus", "sampler.noise='bogus' is invalid: valid options: cps, sde"),
])
def test_a_bad_key_or_value_stops_with_one_message_and_creates_nothing(tmp_path, override, message):
    run_dir = tmp_path / "outputs" / "run"
    out = tmpo_run([*TOY[:2], override, f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"config error: {out.stderr.strip()[len('config error: '):]}"]
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_a_method_missing_from_the_scales_lr_factors_is_named_with_the_fix(tmp_path):
    out = tmpo_run(["method=mixgrpo", "~lr_scales.mixgrpo", f"hydra.run.dir={tmp_path / 'run'}", "logger=none"], tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "no entry for method=mixgrpo" in out.stderr and "set trainer.lr_scale=<factor>" in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, key", [
    (["eval.samples_per_prompt=1"], "eval.samples_per_prompt=1"),
    (["reward.suites.drawbench.samples_per_prompt=1"], "reward.suites.drawbench.samples_per_prompt=1"),
])
def test_diversity_with_one_image_per_prompt_is_refused_at_start_up(overrides, key):
    """LGMD / Cos. Div. pair a prompt's images; with one there is no pair (the evaluation used to fail
    only after training). A suite's own count overrides eval's, so it alone decides."""
    from tmpo.config import ConfigError
    from tmpo.run import compose_config
    from tmpo.validate import validate_run_config

    with pytest.raises(ConfigError, match=rf"^{key} is invalid: reward.suites.drawbench has a diversity metric"):
        validate_run_config(compose_config(["run_dir=.", *overrides]))
    validate_run_config(compose_config(["run_dir=.", *overrides, "reward.suites.drawbench.samples_per_prompt=2"]))


def test_a_refusing_constructor_leaves_no_empty_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    out = tmpo_run(["model=mini", "model.arch=transformer", f"hydra.run.dir={run_dir}", "logger=none"], tmp_path)
    assert out.returncode == 1 and out.stderr.startswith("config error: ")
    assert "unknown mini arch 'transformer'" in out.stderr and "full_key: model" in out.stderr
    assert not run_dir.exists()


def test_a_run_logs_into_run_log_and_prints_the_table(tmp_path):
    run_dir = tmp_path / "run"
    out = tmpo_run([*TOY, "trainer.total_steps=3", "trainer.checkpoint_every=1", "eval.samples_per_prompt=50",
                    f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr
    log = (run_dir / "run.log").read_text()
    for expected in ("start: method=tmpo, reward=gmm_modes, model=toy (fresh)", "config:\nmodel:",
                     "eval after iteration 0 (initial weights): reward", "checkpoint after iteration 2:",
                     "eval after iteration 3 (live weights): reward", "samples: ", "end: 3 iterations",
                     "summary table:\ntmpo on toy with the gmm_modes reward: 3 iterations, seed 0"):
        assert expected in log, expected
    assert "config:\nmodel:" not in out.stdout  # the config goes to run.log only
    table = out.stdout[out.stdout.index("tmpo on toy with the gmm_modes reward"):]
    assert "metric" in table and "base" in table and "noise" in table
    assert f"run directory: {run_dir}" in table and "samples.png" in table
    assert (run_dir / "samples.png").exists()


# --- in-process: the checks themselves ------------------------------------------------------------
def test_every_combination_of_a_sweep_is_checked(tmp_path):
    check_command_line(["-m", *TOY, "trainer.total_steps=2,3", f"hydra.sweep.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"trainer.lr=-1.0 is invalid"):
        check_command_line(["-m", *TOY, "trainer.lr=1e-3,-1", f"hydra.sweep.dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, message", [
    ("method=tmpoo", "method=tmpoo is invalid: there is no conf/method/tmpoo.yaml. Did you mean 'tmpo'? Valid options: "),
    ("trainer.lrr=1", "unknown key trainer.lrr=1. Did you mean 'lr'? Valid keys: adam_beta1"),
    ("bogus=1", "unknown key bogus=1. Valid keys: ablation, eval, logger, lr_scales, method, model"),
    ("+trainer.lr=1", "trainer.lr already exists: set it without the '+' (trainer.lr=...)"),
    ("eval.grid_samples=-1", "eval.grid_samples=-1 is invalid: must be an integer >= 0"),
])
def test_composition_errors_become_our_messages(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        check_command_line([*TOY, override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert message in str(info.value)


def test_introspection_flags_are_left_to_hydra():
    assert split_command_line(["--cfg", "job", "x=1"]) is None
    assert split_command_line(["--help"]) is None
    assert split_command_line(["-m", "a=1,2"]) == (["a=1,2"], True)
