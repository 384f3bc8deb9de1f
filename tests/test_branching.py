"""Curriculum Beta branching schedule (paper App. C.2, eqs. 41-46) and the duplicate rule."""

import numpy as np
import pytest

from tmpo.samplers.branching import curriculum_mean, resolve_positions, sample_branch_positions


def test_curriculum_mean_interpolates_linearly():
    assert curriculum_mean((1, 2, 3), (1, 3, 5), 0.0).tolist() == [1, 2, 3]
    assert curriculum_mean((1, 2, 3), (1, 3, 5), 0.5).tolist() == [1, 2.5, 4]
    assert curriculum_mean((1, 2, 3), (1, 3, 5), 7.0).tolist() == [1, 3, 5]  # p = min(u/U, 1)


@pytest.mark.parametrize(
    "raw, expected",
    [([2, 2, 2], [2, 3, 4]), ([5, 5, 5], [3, 4, 5]), ([1, 1, 5], [1, 2, 5]), ([4, 1, 4], [1, 4, 5]), ([3, 1, 2], [1, 2, 3])],
)
def test_duplicates_are_resolved_so_T_stays_three(raw, expected):
    assert resolve_positions(raw, 1, 5) == expected


def test_too_few_steps_for_distinct_positions_is_an_error():
    with pytest.raises(ValueError, match="cannot place 3 distinct"):
        resolve_positions([1, 1, 1], 1, 2)


def test_samples_are_sorted_distinct_and_in_range():
    rng = np.random.default_rng(0)
    for p in np.linspace(0, 1, 11):
        for _ in range(50):
            s = sample_branch_positions((1, 2, 3), (1, 3, 5), p, 1, 5, 6.0, rng)
            assert len(s) == 3 and s == sorted(set(s)) and 1 <= s[0] and s[-1] <= 5


def test_beta_mean_equals_the_curriculum_mean():
    # eq. 44: E[xi] = mu_bar; one branch point at mu = 3 in [1, 5] -> mu_bar = 0.5 -> mean step 3.
    rng = np.random.default_rng(1)
    draws = [sample_branch_positions([3], [3], 0.0, 1, 5, 6.0, rng)[0] for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(3.0, abs=0.06)
    # eq. 45: Var[xi] = mu_bar (1 - mu_bar) / (kappa + 1) = 0.25/7; rounding adds ~1/12 step^2
    assert np.var(draws) == pytest.approx(16 * 0.25 / 7 + 1 / 12, rel=0.12)


def test_first_branch_at_s_min_uses_the_clamped_mu_bar():
    # mu_bar = 0 would make Beta(0, kappa) undefined; clamped to 0.05 -> Beta(0.3, 5.7): mostly step 1
    rng = np.random.default_rng(2)
    first = [sample_branch_positions((1, 2, 3), (1, 3, 5), 0.0, 1, 5, 6.0, rng)[0] for _ in range(2000)]
    assert 0.8 < np.mean(np.array(first) == 1) < 0.98


def test_progress_moves_branches_later():
    rng = np.random.default_rng(3)
    early = np.mean([sample_branch_positions((1, 2, 3), (1, 3, 5), 0.0, 1, 5, 6.0, rng) for _ in range(1000)], axis=0)
    late = np.mean([sample_branch_positions((1, 2, 3), (1, 3, 5), 1.0, 1, 5, 6.0, rng) for _ in range(1000)], axis=0)
    assert late[1] > early[1] + 0.4 and late[2] > early[2] + 0.8
