"""What a run leaves for its user: wandb's conventions (names from the labels, an ``iteration`` axis,
labels in the summary before ``finish()``, the sample image), ``samples.png`` and generation from a
finished run with ``python -m tmpo.sample`` (toy and mini)."""

from __future__ import annotations

import pytest
import wandb
from PIL import Image

from conftest import compose_run
from tmpo.logger import wandb_names
from tmpo.run import train
from tmpo.sample import main as sample_main

# a mini run in seconds: a random 1-block model, one prompt, a 4-step eval of 2 images per prompt
MINI = ["model=mini", "reward=geneval", "model.random_init=true",
        "+model.model_config={width: 32, depth: 1, heads: 2, text_layers: 1}", "trainer.total_steps=2",
        "trainer.prompts_per_step=1", "eval.max_prompts=3", "eval.samples_per_prompt=2", "eval.num_steps=4",
        "reward.suites.drawbench.max_prompts=2", "eval.grid_prompts=2", "eval.grid_samples=3"]


class FakeRun:
    """Records what RunLogger does to a wandb run, in order."""

    id = "fake-id"

    def __init__(self, events):
        self.events = events
        self.summary = self

    def update(self, values):
        self.events.append(("summary", dict(values)))

    def define_metric(self, name, **kw):
        self.events.append(("define_metric", name, kw))

    def log(self, row, step):
        self.events.append(("log", dict(row), step))

    def finish(self, *a, **kw):
        self.events.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    events, init = [], {}

    def fake_init(**kw):
        init.update(kw)
        return FakeRun(events)

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(wandb, "Image", lambda path, caption=None: ("image", str(path), caption))
    return init, events


def test_wandb_run_names_axis_summary_and_image(tmp_path, fake_wandb):
    init, events = fake_wandb
    cfg = compose_run(["trainer.total_steps=3", "eval.samples_per_prompt=50", "trainer.seed=4"], tmp_path)
    cfg.logger = {"mode": "offline"}
    train(cfg)
    assert init["mode"] == "offline"
    # composed outside a Hydra app: the group choices are read off the config (under the CLI: toy/gmm_modes/tmpo)
    assert init["group"] == "ToyPolicy/GMMModeReward/tmpo" and init["name"] == "ToyPolicy/GMMModeReward/tmpo/seed4"
    assert init["tags"] == ["tmpo", "GMMModeReward", "ToyPolicy", "seed4"]
    assert init["config"]["labels"]["method"] == "tmpo" and init["config"]["trainer"]["seed"] == 4
    kinds = [e[0] for e in events]
    assert events[:2] == [("define_metric", "iteration", {}), ("define_metric", "*", {"step_metric": "iteration"})]
    logs = [e for e in events if e[0] == "log"]
    assert all(e[1]["iteration"] == e[2] for e in logs)  # every row carries its x value
    assert [e[2] for e in logs] == [0, 1, 2, 3, 3, 3]  # base eval, 3 iterations, final eval, image
    assert logs[-1][1]["samples"][0] == "image" and logs[-1][1]["samples"][1] == str(tmp_path / "samples.png")
    summary = next(e[1] for e in events if e[0] == "summary")
    assert summary["method"] == "tmpo" and summary["seed"] == 4 and "git_commit" in summary and "reward" in summary
    assert kinds.index("summary") < kinds.index("finish") and kinds[-1] == "finish"


def test_paper_table_runs_keep_the_tables_names_and_gain_the_method_tags():
    labels = {"method": "tmpo", "seed": 1, "scale": "mini", "table": "table1", "protocol": "geneval", "row": "tmpo",
              "experiment": "mini/table1_geneval", "model": "tmpo.policies.mini.MiniPolicy"}
    names = wandb_names(labels, {"method": "tmpo", "reward": "geneval", "model": "mini"})
    assert names["group"] == "mini/table1_geneval/tmpo" and names["name"] == "mini/table1_geneval/tmpo/seed1"
    assert names["tags"] == ["mini", "table1", "geneval", "tmpo", "seed1", "experiment=mini/table1_geneval"]


def _png_size(path):
    with Image.open(path) as im:
        return im.size


def test_toy_run_samples_png_and_the_sample_command(tmp_path, capsys):
    run = tmp_path / "run"
    train(compose_run(["trainer.total_steps=2", "eval.samples_per_prompt=50"], run))
    assert _png_size(run / "samples.png")[0] > 500
    out = tmp_path / "grid.png"
    sample_main([str(run), "toy", "-n", "300", "--out", str(out), "--compare-base"])
    assert "live weights" in capsys.readouterr().out  # 2 iterations < ema_every: the live weights were evaluated
    assert _png_size(out)[0] > 500


def test_mini_run_samples_png_and_the_sample_command(tmp_path, capsys):
    run = tmp_path / "run"
    train(compose_run(MINI, run))
    width, height = _png_size(run / "samples.png")
    assert width > 300 and height > 150
    out = tmp_path / "sub" / "grid.png"
    sample_main([str(run), "a red circle left of a blue square", "-n", "8", "--out", str(out)])
    assert "1 prompt(s) x 8, live weights" in capsys.readouterr().out
    assert _png_size(out)[0] > 8 * 32
    with pytest.raises(SystemExit, match="unknown word"):
        sample_main([str(run), "a red zeppelin", "-n", "2", "--out", str(tmp_path / "bad.png")])
    with pytest.raises(SystemExit, match="config.yaml not found"):
        sample_main([str(tmp_path), "a red circle", "--out", str(tmp_path / "bad.png")])
    assert not (tmp_path / "bad.png").exists()
