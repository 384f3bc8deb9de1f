"""Every bad value caught at start-up: one message naming the key, the value and the valid range, raised
before anything is written (the run directory is not even created)."""

import pytest

from conftest import compose_run
from rel_helpers import TOY, cli
from tmpo.config import ConfigError
from tmpo.run import build_trainer

BAD = {  # override -> what the message must name (key=value and the valid range)
    "trainer.total_steps=-5": r"trainer.total_steps=-5 is invalid: must be an integer >= 1",
    "trainer.total_steps=0": r"trainer.total_steps=0 is invalid: must be an integer >= 1",
    "trainer.inner_epochs=0": r"trainer.inner_epochs=0 is invalid: must be an integer >= 1",
    "trainer.checkpoint_every=-1": r"trainer.checkpoint_every=-1 is invalid: must be an integer >= 0",
    "trainer.prompts_per_step=0": r"trainer.prompts_per_step=0 is invalid: must be an integer >= 1",
    "trainer.lr=-0.001": r"trainer.lr=-0.001 is invalid: must be a number in \(0, inf\)",
    "trainer.ema_decay=1.0": r"trainer.ema_decay=1.0 is invalid: must be a number in \[0, 1\)",
    "trainer.seed=-1": r"trainer.seed=-1 is invalid: must be an integer >= 0",
    "sampler.eta=-0.5": r"sampler.eta=-0.5 is invalid: must be a number in \(0, 1\]",
    "sampler.eta=3": r"sampler.eta=3 is invalid: must be a number in \(0, 1\]",
    "sampler.plan.branch=0": r"sampler.plan.branch=0 is invalid: must be an integer >= 2",
    "sampler.plan.late=[1,3,9]": r"sampler.plan.late=\[1, 3, 9\] is invalid: every position must lie in \[s_min, s_max\] = \[1, 5\]",
    "sampler.plan.early=[1,2]": r"sampler.plan.late=\[1, 3, 5\] is invalid: must have as many positions as sampler.plan.early \(2\)",
    "sampler.num_steps=3": r"sampler.plan.early=\[1, 2, 3\] is invalid: every position must lie in \[s_min, s_max\] = \[1, 2\]",
    "objective.clip_eps=0": r"objective.clip_eps=0 is invalid: must be a number in \(0, inf\)",
    "eval.samples_per_prompt=0": r"eval.samples_per_prompt=0 is invalid: must be an integer >= 1",
}
BAD_FOR_METHOD = {
    ("flow_grpo", "sampler.plan.group_size=1"): r"sampler.plan.group_size=1 is invalid: must be an integer >= 2",
    ("flow_grpo", "sampler.num_steps=1"): r"sampler.plan \(IndependentPlan\) with sampler.num_steps=1 is invalid: it stores no trainable step",
    ("flow_grpo", "sampler.noise=cps"): r"sampler.plan \(IndependentPlan\) with sampler.num_steps=6 is invalid: it puts a stochastic step on the last step",
    ("mixgrpo", "sampler.num_steps=2"): r"sampler.num_steps=2 is invalid: must be >= 3",
    ("treegrpo", "sampler.plan.branch=1"): r"sampler.plan.branch=1 is invalid: must be an integer >= 2",
    ("gardo", "objective.reset_every=0"): r"objective.reset_every=0 is invalid: must be an integer >= 1",
    ("tmpo", "objective.policy_term=marginal"):
        r"objective.policy_term=marginal is invalid without sampler.leaf_likelihood .* method=tmpo_marginal",
    ("tmpo", "objective.policy_term=marginl"): r"objective.policy_term='marginl' is invalid: .*trajectory, uniform, marginal",
    ("tmpo_marginal", "objective.marginal_reduction=nats"): r"objective.marginal_reduction='nats' is invalid: .*sum, mean",
    ("tmpo_marginal", "sampler.leaf_likelihood.solver=rk5"): r"sampler.leaf_likelihood: invalid solver='rk5' \(one of euler, heun, rk4\)",
    ("tmpo_marginal", "sampler.leaf_likelihood.ode_steps=0"): r"sampler.leaf_likelihood: invalid ode_steps=0 \(an integer >= 1\)",
}


@pytest.mark.parametrize("override", sorted(BAD))
def test_a_bad_value_is_one_message_before_anything_is_written(tmp_path, override):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=BAD[override]):
        build_trainer(compose_run([override], run_dir))
    assert not run_dir.exists()


@pytest.mark.parametrize("method, override", sorted(BAD_FOR_METHOD))
def test_a_bad_value_of_a_method_is_one_message_before_anything_is_written(tmp_path, method, override):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=BAD_FOR_METHOD[(method, override)]):
        build_trainer(compose_run([f"method={method}", override], run_dir))
    assert not run_dir.exists()


def test_every_method_and_scale_passes_the_checks_as_configured():
    from pathlib import Path

    from conftest import CONF_DIR
    from tmpo.run import compose_config
    from tmpo.validate import validate_run_config

    for method in sorted(p.stem for p in Path(CONF_DIR, "method").glob("*.yaml")):
        for scale in (["model=toy", "reward=gmm_modes"], ["model=mini"], ["model=mini_mmdit"]):
            validate_run_config(compose_config(["run_dir=/nonexistent", f"method={method}", *scale]))
    for ablation in sorted(p.stem for p in Path(CONF_DIR, "ablation").glob("*.yaml")):
        validate_run_config(compose_config(["run_dir=/nonexistent", f"ablation={ablation}"]))


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_unwritable_run_dir_is_named_at_start_up(tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        run_dir, match = tmp_path / "file" / "run", r"run_dir=.* is invalid: .*file is a file"
    else:
        run_dir, match = "/proc/tmpo-cannot-write/run", r"run_dir=.* is invalid: cannot create files in /proc"
    with pytest.raises(ConfigError, match=match):
        build_trainer(compose_run([], run_dir))


def test_the_cli_prints_the_message_and_writes_no_run_files(tmp_path):
    run_dir = tmp_path / "run"
    out = cli([*TOY, "trainer.inner_epochs=0", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 1
    assert "config error: trainer.inner_epochs=0 is invalid: must be an integer >= 1" in out.stderr
    assert "Traceback" not in out.stderr
    assert not any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints", "summary.json"))
