"""Sample-diversity metrics of the TMPO paper (Sec. 5.1 "Diversity is measured by..."; App. D.1).

Both take a batch of per-sample features (``[N, ...]``, flattened to ``[N, D]``) of images
generated for one prompt and average a pairwise quantity over the ``N (N - 1) / 2`` pairs
``i < j``. Which features to use is the caller's choice: the paper uses flattened VAE latents for
LGMD and DINOv2 ViT-L/14 embeddings for cosine diversity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _flatten_pairs(features: Tensor) -> Tensor:
    """``features`` as ``[N, D]`` float64 (exact enough for log-distances of near-duplicates)."""
    if features.ndim < 2:
        raise ValueError(f"features must be [N, ...] with a feature dimension, got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 samples to form a pair, got N={features.shape[0]}")
    return features.reshape(features.shape[0], -1).to(torch.float64)


def lgmd(features: Tensor) -> Tensor:
    """Log Geometric Mean Distance (paper Sec. 5.1, App. D.1).

    ``LGMD = 2 / (N (N - 1)) * sum_{i<j} log(||phi_i - phi_j||_2 / sqrt(D))`` with ``phi`` the
    flattened features and ``D`` their dimension: the log of the geometric mean of the
    dimension-normalised pairwise distances. Positive means samples differ by more than one unit
    per dimension on average; negative values signal mode collapse. Two identical samples give
    ``-inf`` (the geometric mean is dominated by the closest pair, by design).

    Args:
        features: ``[N, ...]``, N >= 2.

    Returns:
        A 0-dim float64 tensor.
    """
    flat = _flatten_pairs(features)
    distances = torch.pdist(flat)  # [N (N - 1) / 2], the pairs i < j
    return torch.log(distances / math.sqrt(flat.shape[1])).mean()


def cosine_diversity(features: Tensor) -> Tensor:
    """Cosine diversity (paper Sec. 5.1, App. D.1, following GARDO).

    ``Cos.Div. = 2 / (N (N - 1)) * sum_{i<j} (1 - cos(psi_i, psi_j))``, in [0, 2].

    Args:
        features: ``[N, ...]``, N >= 2, no all-zero sample (its cosine is undefined).

    Returns:
        A 0-dim float64 tensor.
    """
    flat = _flatten_pairs(features)
    norms = flat.norm(dim=1)
    if bool((norms == 0).any()):
        raise ValueError("cosine diversity is undefined for an all-zero feature vector")
    unit = flat / norms[:, None]
    cos = unit @ unit.T
    i, j = torch.triu_indices(len(flat), len(flat), offset=1)
    return (1.0 - cos[i, j]).mean()
