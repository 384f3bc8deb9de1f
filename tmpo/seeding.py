"""One seed for every random number generator a run touches, set before anything is built."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices) from ``trainer.seed``.

    Called before the model is built, so random initialisations (LoRA's ``A`` matrices, fresh heads) are
    a function of the run's seed: two runs with the same config start bit-identical. The loop itself
    draws prompts and noise from per-(seed, step) generators (``tmpo.loop._seed_for``), not from these.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
