"""A labelled run (an experiment's table/protocol/row/scale tags) carries the same labels, with the git
commit, into its summary.json and its wandb run's name, group, tags and config -- both readers of
tmpo.results find it (needs tmpo/run.py's train() and tmpo/logger.py's wandb.init to use run_labels)."""

from __future__ import annotations

import json

import wandb

from conftest import compose_run
from tmpo.results.labels import git_state
from tmpo.results.runs import LocalRuns
from tmpo.run import train

TAGS = {"scale": "mini", "table": "table5", "protocol": "joint", "row": "tmpo", "experiment": "mini/table5_joint"}


class FakeWandbRun:
    id = "fake123"

    def __init__(self):
        self.summary, self.logged = {}, []

    def log(self, row, step):
        self.logged.append(row)

    def finish(self, *a, **kw):
        pass

    def mark_preempting(self):
        pass


def test_labels_reach_summary_json_and_the_wandb_run(tmp_path, monkeypatch):
    seen = {}

    def fake_init(**kw):
        seen.update(kw)
        return FakeWandbRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    overrides = ["trainer.total_steps=2", "trainer.prompts_per_step=2", "eval.samples_per_prompt=50",
                 "trainer.seed=3", *[f"+tags.{k}={v}" for k, v in TAGS.items()]]
    cfg = compose_run(overrides, tmp_path)
    cfg.logger = {"mode": "offline"}  # compose_run disables the logger; this run goes through wandb.init
    train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = {**TAGS, "method": "tmpo", "ablation": "full", "seed": 3, **git_state()}
    assert {k: summary[k] for k in expected} == expected
    assert seen["name"] == "mini/table5_joint/tmpo/seed3" and seen["group"] == "mini/table5_joint/tmpo"
    assert seen["tags"][:5] == ["mini", "table5", "joint", "tmpo", "seed3"]
    assert {k: seen["config"]["labels"][k] for k in expected} == expected
    assert seen["config"]["trainer"]["seed"] == 3  # the whole resolved config rides along
    record = LocalRuns(tmp_path.parent).read(tmp_path)
    assert record.finished and record.labels["row"] == "tmpo" and record.labels["git_commit"] == git_state()["git_commit"]
