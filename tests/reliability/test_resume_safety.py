"""Resume that cannot lie: a fresh run never writes into a run dir that holds a run; resume=<dir> continues in
that dir; the config must match the checkpoint's except the allowed keys, and what was used is recorded; a
checkpoint never moves between methods; a finished run says so and writes nothing."""

import json
import re

import pytest
import torch

from conftest import compose_run
from rel_helpers import TOY, checkpoint, cli, killed_in_process, rows, snapshot
from tmpo.config import ConfigError
from tmpo.run import build_trainer, train

SMALL = ["trainer.total_steps=3", "trainer.prompts_per_step=1", "eval.samples_per_prompt=50", "trainer.ema_every=1"]


def _finished_run(run_dir, extra=()):
    train(compose_run([*SMALL, *extra], run_dir))
    return run_dir


def _stopped_run(run_dir, extra=(), at=2):
    """A run killed while computing iteration ``at + 1``, after its checkpoint at step ``at``."""
    return killed_in_process(run_dir, [*SMALL, "trainer.total_steps=4", "trainer.checkpoint_every=1", *extra], at)


@pytest.mark.parametrize("keep", ["metrics", "checkpoint"])
def test_a_fresh_run_into_a_dir_holding_a_run_is_refused_before_writing(tmp_path, keep):
    run_dir = _finished_run(tmp_path / "run")
    if keep == "metrics":
        (run_dir / "checkpoints" / "latest.pt").unlink()
    else:
        (run_dir / "metrics.jsonl").unlink()
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"already holds a run .*resume=auto"):
        train(compose_run(SMALL, run_dir))
    assert snapshot(run_dir) == before


def test_resume_dir_continues_in_that_dir_and_a_finished_run_says_so(tmp_path):
    """Through the CLI from another working directory: no new timestamped dir, no second eval row."""
    run_dir = tmp_path / "run"
    first = cli([*TOY, "trainer.total_steps=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    files = {k: v for k, v in snapshot(run_dir).items() if not k.startswith(".hydra") and k != "run.log"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    done = cli([*TOY, "trainer.total_steps=3", f"resume={run_dir}"], cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert "is finished (step 3 of 3): nothing to train" in done.stdout + done.stderr
    assert {k: v for k, v in snapshot(run_dir).items() if k in files} == files  # not a byte changed
    assert not (elsewhere / "outputs").exists()

    longer = cli([*TOY, "trainer.total_steps=5", f"resume={run_dir}/checkpoints/latest.pt"], cwd=elsewhere)
    assert longer.returncode == 0, longer.stderr
    assert not (elsewhere / "outputs").exists()
    logged = rows(run_dir)
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in logged if "eval/reward" in r] == [3, 5]  # the first run's final eval, then this one's
    record = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert record == [{**record[0], "step": 3, "changed": {"trainer.total_steps": {"checkpoint": 3, "now": 5}}, "added": {}}]
    assert "total_steps: 5" in (run_dir / "config.yaml").read_text()  # config.yaml records what was used
    assert checkpoint(run_dir)["finished"] and json.loads((run_dir / "summary.json").read_text())["steps"] == 5


@pytest.mark.parametrize("override, key", [
    ("trainer.lr=0.01", "trainer.lr"),
    ("trainer.seed=7", "trainer.seed"),
    ("objective.clip_eps=0.3", "objective.clip_eps"),
    ("model.hidden=128", "model.hidden"),
    ("eval.num_steps=10", "eval.num_steps"),
])
def test_config_drift_on_resume_is_refused_naming_the_key(tmp_path, override, key):
    run_dir = _stopped_run(tmp_path / "run")
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=rf"differs .* in {key} \(checkpoint .*, now .*\).*only trainer.total_steps"):
        build_trainer(compose_run([*SMALL, "trainer.total_steps=4", "resume=auto", override], run_dir))
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("method", ["flow_grpo", "gardo"])
def test_a_checkpoint_never_moves_to_another_method(tmp_path, method):
    run_dir = _stopped_run(tmp_path / "run")  # written by tmpo
    with pytest.raises(ConfigError, match=rf"written by method=tmpo.*this run is method={method}"):
        build_trainer(compose_run([*SMALL, "trainer.total_steps=4", "resume=auto", f"method={method}"], run_dir))
    # the in-process API (trainer.load) refuses it too; a checkpoint without a stored config (older
    # format) gets a message naming the objective instead of KeyError: 'b'
    other = build_trainer(compose_run([*SMALL, f"method={method}"], tmp_path / "other"))
    with pytest.raises(ValueError, match=rf"written by method=tmpo.*this run is method={method}"):
        other.load(run_dir)
    if method == "gardo":
        old_format = {k: v for k, v in checkpoint(run_dir).items() if k != "config"}
        with pytest.raises(ValueError, match="objective state does not fit GARDOObjective"):
            other.load(old_format)


def test_resume_auto_extends_total_steps_with_the_lr_of_the_new_schedule(tmp_path):
    run_dir = _stopped_run(tmp_path / "run")  # stopped at step 2 of 4
    trainer = build_trainer(compose_run([*SMALL, "trainer.total_steps=8", "resume=auto", "trainer.lr=1e-3",
                                         "trainer.lr_min_ratio=0.1"], run_dir))
    trainer.run()
    lrs = [r["train/lr"] for r in rows(run_dir) if "train/lr" in r]
    # iterations 1-2 on the 4-step cosine, 3-8 on the 8-step cosine: lr * (0.1 + 0.45 (1 + cos(pi s / T)))
    import math

    want = [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * s / T))) for s, T in [(0, 4), (1, 4), *[(s, 8) for s in range(2, 8)]]]
    assert lrs == pytest.approx(want, rel=1e-6)


def test_resume_below_the_checkpoint_step_is_refused(tmp_path):
    run_dir = _stopped_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"trainer.total_steps=1 is invalid: the checkpoint .* is at step 2"):
        build_trainer(compose_run([*SMALL, "trainer.total_steps=1", "resume=auto"], run_dir))


def test_resume_dir_without_a_checkpoint_is_an_error_and_a_foreign_run_dir_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no checkpoints/latest.pt"):
        build_trainer(compose_run([*SMALL, f"resume={tmp_path / 'empty'}"], tmp_path / "empty"))
    run_dir = _stopped_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="continues the run in .* but run_dir is"):
        build_trainer(compose_run([*SMALL, f"resume={run_dir}"], tmp_path / "other"))


def test_wandb_run_id_is_stored_and_the_resumed_run_continues_it(tmp_path):
    run_dir = _stopped_run(tmp_path / "run", extra=["logger=wandb"])
    wandb_id = checkpoint(run_dir)["wandb_run_id"]
    assert wandb_id
    trainer = build_trainer(compose_run([*SMALL, "trainer.total_steps=4", "resume=auto", "logger=wandb"], run_dir))
    try:
        trainer.run()
    finally:
        trainer.logger.finish()
    assert checkpoint(run_dir)["wandb_run_id"] == wandb_id
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # two attempts, one wandb run (wandb appends -1 to the second dir when both start within one second)
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{wandb_id}(-\d+)?", r) for r in runs)


def test_every_checkpoint_records_the_config_it_was_trained_with(tmp_path):
    run_dir = _finished_run(tmp_path / "run")
    ck = checkpoint(run_dir)
    assert ck["config"]["method"] == "tmpo" and ck["config"]["trainer"]["total_steps"] == 3
    assert ck["summary"]["steps"] == 3 and ck["finished"]
    assert isinstance(ck["policy"], dict) and all(isinstance(v, torch.Tensor) for v in ck["policy"].values())
