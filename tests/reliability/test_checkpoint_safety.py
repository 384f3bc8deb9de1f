"""Checkpoints must not run code: every file the project writes loads with weights_only=True, and a crafted
pickle is refused by every loader (run checkpoints, MiniCLIP preference models, mini weights, the mini
pretraining state) before its payload can execute."""

from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR, compose_run
from tmpo.checkpoint import load_checkpoint
from tmpo.config import ConfigError
from tmpo.run import build_trainer

METHODS = sorted(p.stem for p in Path(CONF_DIR, "method").glob("*.yaml"))


class Payload:
    """Unpickling this would create ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted(path: Path, marker: Path, **extra) -> Path:
    torch.save({"step": 1, "policy": {}, **extra, "payload": Payload(marker)}, path)
    return path


def test_a_crafted_run_checkpoint_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path / "pwned"
    path = crafted(tmp_path / "latest.pt", marker)
    with pytest.raises(ValueError, match=r"refused: it holds objects that are not tensors .*GLOBAL"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load does run it
    assert marker.exists()


def test_resume_auto_refuses_a_crafted_latest_pt_before_writing(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    crafted(run_dir / "checkpoints" / "latest.pt", marker)
    with pytest.raises(ConfigError, match="refused"):
        build_trainer(compose_run(["resume=auto"], run_dir))
    assert not marker.exists() and sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]


def test_crafted_preference_mini_and_pretraining_files_are_refused(tmp_path):
    from tmpo.policies import mini_pretrain
    from tmpo.policies.mini import load_weights
    from tmpo.rewards.preference import load_miniclip

    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="refused"):
        load_miniclip(crafted(tmp_path / "pickscore.pt", marker, kind="miniclip"))
    with pytest.raises(ValueError):
        load_weights(crafted(tmp_path / "dit.pt", marker), "dit")
    out = tmp_path / "pretrain" / "dit.pt"
    out.parent.mkdir()
    crafted(mini_pretrain.train_state_path(out), marker)
    with pytest.raises(ValueError, match="refused"):
        mini_pretrain.main(["--arch", "dit", "--out", str(out), "--steps", "1", "--width", "32", "--depth", "1",
                            "--heads", "2", "--text-layers", "1"])
    assert not marker.exists()


@pytest.mark.parametrize("method", METHODS)
def test_every_methods_checkpoint_loads_with_weights_only(tmp_path, method):
    trainer = build_trainer(compose_run([f"method={method}", "trainer.total_steps=1", "trainer.prompts_per_step=1",
                                         "eval.samples_per_prompt=20", "trainer.ema_every=1"], tmp_path))
    trainer.run()
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 1 and state["finished"] and state["config"]["method"] == method
