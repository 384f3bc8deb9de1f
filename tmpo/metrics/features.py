"""Feature extractors behind one interface ``extractor(samples) -> Tensor[N, D]`` (diversity metrics, GARDO)."""

from __future__ import annotations

from torch import Tensor


class FlattenFeatures:
    """The samples themselves, flattened (toy points; a stand-in where no learned extractor exists)."""

    def __call__(self, samples: Tensor) -> Tensor:
        return samples.flatten(1).float()
