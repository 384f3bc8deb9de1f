"""What a killed run leaves on disk is repaired or refused by name: a torn last metrics line is dropped
with a warning, a corrupt earlier line stops the resume, stray temporaries of killed atomic writes are
removed, summary.json is replaced atomically, rows of an attempt with no checkpoint are dropped."""

import json
import logging

import pytest

from conftest import compose_run
from rel_helpers import checkpoint, killed_in_process, rows, snapshot, train_rows
from tmpo.config import ConfigError
from tmpo.logger import RunLogger
from tmpo.run import build_trainer, train

SMALL = ["trainer.total_steps=4", "trainer.prompts_per_step=1", "eval.samples_per_prompt=50", "trainer.ema_every=1",
         "trainer.checkpoint_every=1"]


def _killed_after(run_dir, at: int):
    """A run whose process died while computing iteration ``at + 1`` (checkpoint at step ``at``)."""
    return killed_in_process(run_dir, SMALL, at)


def test_torn_last_metrics_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    run_dir = _killed_after(tmp_path / "run", at=2)
    metrics = run_dir / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 3, "train/loss": 0.1')  # the kill hit in the middle of the next row
    with caplog.at_level(logging.WARNING):
        train(compose_run([*SMALL, "resume=auto"], run_dir))
    assert any(str(metrics) in r.getMessage() and "torn last line" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == [1, 2, 3, 4]

    straight = tmp_path / "straight"
    train(compose_run(SMALL, straight))
    assert train_rows(run_dir) == train_rows(straight)


def test_a_corrupt_line_before_the_last_stops_the_resume_naming_it(tmp_path):
    run_dir = _killed_after(tmp_path / "run", at=2)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20]
    metrics.write_text("\n".join(lines) + "\n")
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"cannot resume .*metrics.jsonl: line 2 is not valid JSON"):
        build_trainer(compose_run([*SMALL, "resume=auto"], run_dir))
    assert snapshot(run_dir) == before


def test_rows_logged_after_the_checkpoint_are_dropped_exactly(tmp_path):
    run_dir = _killed_after(tmp_path / "run", at=3)
    ck = checkpoint(run_dir)
    with (run_dir / "metrics.jsonl").open("a") as f:  # rows the killed process logged after its last checkpoint
        f.write(json.dumps({"step": 4, "train/loss": 0.5}) + "\n" + json.dumps({"step": 4, "eval/reward": 0.1}) + "\n")
    train(compose_run([*SMALL, "resume=auto"], run_dir))
    steps = [(r["step"], "train/loss" in r) for r in rows(run_dir)]
    assert steps[: ck["metrics_rows"]] == [(0, False), (1, True), (2, True), (3, True)]
    assert steps[ck["metrics_rows"]:] == [(4, True), (4, False)]  # iteration 4 and the final eval, once each


def test_stray_temporaries_of_killed_writes_are_removed_on_resume(tmp_path, caplog):
    run_dir = _killed_after(tmp_path / "run", at=2)
    strays = [run_dir / "checkpoints" / "latest.pt.k3j2x9.tmp", run_dir / "summary.json.ab12cd.tmp"]
    for p in strays:
        p.write_bytes(b"half a file")
    keep = run_dir / "notes.tmp"  # not the pattern atomic writes use: left alone
    keep.write_text("mine")
    with caplog.at_level(logging.WARNING):
        train(compose_run([*SMALL, "resume=auto"], run_dir))
    assert not any(p.exists() for p in strays) and keep.exists()
    assert any("temporary file(s) left by interrupted writes" in r.getMessage() for r in caplog.records)


def test_summary_json_is_replaced_atomically(tmp_path):
    logger = RunLogger(tmp_path)
    logger.summary({"reward": 0.5})
    with pytest.raises(TypeError):
        logger.summary({"reward": 0.7, "bad": {1, 2}})  # fails while serialising: the old file must survive
    assert json.loads((tmp_path / "summary.json").read_text()) == {"reward": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_resume_auto_without_a_checkpoint_restarts_and_drops_the_orphaned_rows(tmp_path, caplog):
    run_dir = tmp_path / "run"
    trainer = build_trainer(compose_run([*SMALL, "trainer.checkpoint_every=0"], run_dir))
    original = trainer.train_step
    trainer.train_step = lambda step: original(step) if step < 2 else (_ for _ in ()).throw(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        trainer.run()  # base row + 2 train rows, no checkpoint
    assert len(rows(run_dir)) == 3 and not (run_dir / "checkpoints").exists()
    with caplog.at_level(logging.WARNING):
        train(compose_run([*SMALL, "resume=auto"], run_dir))
    assert any("dropped 3 row(s) of an attempt that stopped before its first checkpoint" in r.getMessage()
               for r in caplog.records)
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == [1, 2, 3, 4]
    assert sum("base/reward" in r for r in rows(run_dir)) == 1
