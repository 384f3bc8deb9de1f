"""LGMD and cosine diversity against values worked out by hand."""

import torch

torch.set_num_threads(1)

import math  # noqa: E402

import pytest  # noqa: E402

from tmpo.metrics import cosine_diversity, lgmd  # noqa: E402


def test_lgmd_three_points():
    # (0,0), (3,4), (0,8): pair distances 5, 8, 5; D = 2.
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 8.0]])
    expected = (2 * math.log(5 / math.sqrt(2)) + math.log(8 / math.sqrt(2))) / 3
    assert lgmd(feats).item() == pytest.approx(expected, abs=1e-12)


def test_lgmd_flattens_and_normalises_by_dimension():
    # Two [2, 2] "latents" differing by 1 in every entry: distance sqrt(4) = 2, D = 4 -> log(2 / 2) = 0.
    a = torch.zeros(2, 2, dtype=torch.float64)
    assert lgmd(torch.stack([a, a + 1])).item() == pytest.approx(0.0, abs=1e-12)
    # Differing by 0.1 everywhere: log(0.1) < 0, the "collapse" side.
    assert lgmd(torch.stack([a, a + 0.1])).item() == pytest.approx(math.log(0.1), abs=1e-12)
    assert lgmd(torch.stack([a, a])).item() == -math.inf  # exact duplicates


def test_cosine_diversity_hand_values():
    # cos = 0, -1, 0 over the pairs -> 1 - cos = 1, 2, 1 -> mean 4/3.
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert cosine_diversity(feats).item() == pytest.approx(4 / 3, abs=1e-12)
    # Scale does not matter; identical directions give 0.
    assert cosine_diversity(torch.tensor([[1.0, 2.0], [3.0, 6.0]])).item() == pytest.approx(0.0, abs=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="at least 2"):
        lgmd(torch.ones(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        cosine_diversity(torch.ones(1, 4))
    with pytest.raises(ValueError, match="feature dimension"):
        lgmd(torch.ones(3))
    with pytest.raises(ValueError, match="all-zero"):
        cosine_diversity(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
