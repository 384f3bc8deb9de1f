"""One seed for every random number generator a run touches, set before anything is built, and the
per-(seed, step, stream[, group]) streams the loop draws prompts and noise from."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices) from ``trainer.seed``.

    Called before the model is built, so random initialisations (LoRA's ``A`` matrices, fresh heads) are
    a function of the run's seed: two runs with the same config start bit-identical. The loop itself
    draws prompts and noise from per-(seed, step) generators (:func:`stream_seed`), not from these.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def stream_seed(*entropy: int) -> int:
    """A reproducible 63-bit seed from integers (run seed, step, stream[, group]) via ``SeedSequence``:
    different tuples give independent streams, the same tuple the same stream on every process, and a
    resume replays the same noise."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


NOISE_SEEDINGS = ("auto", "batch", "group")  # trainer.noise_seeding (tmpo.loop.TrainerConfig)


def resolve_noise_seeding(value: str, world_size: int) -> str:
    """``trainer.noise_seeding`` -> ``"batch" | "group"`` for a run of ``world_size`` processes."""
    if value not in NOISE_SEEDINGS:
        raise ValueError(f"trainer.noise_seeding={value!r}; valid options: {', '.join(NOISE_SEEDINGS)}")
    if value == "batch" and world_size > 1:
        raise ValueError(f"trainer.noise_seeding=batch draws the whole batch's noise from one stream, which {world_size} "
                         "processes holding parts of the batch cannot share; use group (or auto)")
    if value == "auto":
        return "group" if world_size > 1 else "batch"
    return value


class GroupGenerators:
    """One noise generator per prompt group, so a group's noise does not depend on which other groups
    share its batch or its process (``trainer.noise_seeding=group``).

    The rollout plan is shared by every group of an iteration and comes from :attr:`plan`, seeded like the
    whole-batch generator of ``noise_seeding=batch`` (so both draw the same plans). Group ``g`` (its index
    in the *global* batch of the iteration) draws from ``SeedSequence([seed, step, stream, g])``. A
    process holding groups ``[a, b)`` draws exactly the rows the one-process run draws for them.

    Args:
        seed, step, stream: as the loop's per-(seed, step, stream) generators.
        groups: the global indices of the groups this process holds, in batch order.
    """

    def __init__(self, seed: int, step: int, stream: int, groups: range | list[int]) -> None:
        self.groups = list(groups)
        if not self.groups:
            raise ValueError("GroupGenerators needs at least one group")
        self.plan = torch.Generator().manual_seed(stream_seed(seed, step, stream))
        self._gens = [torch.Generator().manual_seed(stream_seed(seed, step, stream, g)) for g in self.groups]

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """``[rows, *S]`` standard normals; the rows are group-major, ``rows / G`` per group (the sampler's
        layout: every group holds the same number of states at every step), each group's from its own stream."""
        rows, rest = shape[0], tuple(shape[1:])
        if rows % len(self._gens):
            raise ValueError(f"{rows} rows cannot be split evenly over {len(self._gens)} groups")
        per = rows // len(self._gens)
        return torch.cat([torch.randn((per, *rest), generator=g, dtype=dtype) for g in self._gens])


def standard_normal(generator: torch.Generator | GroupGenerators, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.randn(shape)`` from a whole-batch generator, or per group from :class:`GroupGenerators`."""
    if isinstance(generator, GroupGenerators):
        return generator.randn(tuple(shape), dtype)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype)


def plan_generator(generator: torch.Generator | GroupGenerators) -> torch.Generator:
    """The generator the rollout plan (and anything shared by all groups) is drawn from."""
    return generator.plan if isinstance(generator, GroupGenerators) else generator
