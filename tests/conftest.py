"""Shared test setup: one thread (2-core CI machines), offline, and Hydra composition helpers."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_run(overrides: list[str], run_dir: Path):
    """Compose the real run config as ``python -m tmpo.run <overrides>`` would, writing into ``run_dir``."""
    from tmpo.run import compose_config

    return compose_config([f"run_dir={run_dir}", "logger=none", "trainer.progress=false", *TOY, *overrides])


TOY = ["model=toy", "reward=gmm_modes"]  # the default model is mini; unit tests of the loop run the toy


@pytest.fixture
def toy_policy():
    from tmpo.policies.toy import ToyPolicy

    torch.manual_seed(0)
    return ToyPolicy()
