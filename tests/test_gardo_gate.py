"""GARDO's uncertainty gate (shared/specs/baselines.md §4): KL only on the top fraction b of the
non-negative uncertainties, with b adapted by the risk compensator. Hand-derived on 10+ values, so an
inverted percentile (KL on ~90% of the samples instead of ~10%) or a sign slip fails here."""

import pytest
import torch

from baselines.gardo import GARDOObjective, RiskCompensator, gate_flags
from tmpo.metrics.features import FlattenFeatures


@pytest.mark.parametrize("b, top", [(0.1, {9}), (0.2, {8, 9}), (0.3, {7, 8, 9}), (0.5, {5, 6, 7, 8, 9})])
def test_gate_flags_exactly_the_top_fraction_of_ten_values(b, top):
    # u = 0..9 in scrambled order; the (100 - 100 b)-th percentile of 0..9 is 9 (1 - b) (linear
    # interpolation), e.g. 8.1 for b = 0.1: only u = 9 exceeds it
    u = torch.tensor([3.0, 9.0, 0.0, 7.0, 5.0, 1.0, 8.0, 2.0, 6.0, 4.0])
    flags = gate_flags(u, b)
    assert {int(v) for v in u[flags]} == top
    assert flags.float().mean().item() == pytest.approx(b)


def test_gate_ignores_negative_uncertainties_and_flags_nothing_when_all_are_negative():
    # ten non-negative values 0..9 among ten negative ones: the percentile is over the non-negative only
    u = torch.cat([torch.arange(10.0), -torch.arange(1.0, 11.0)])[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    flags = gate_flags(u, 0.2)
    assert sorted(u[flags].tolist()) == [8.0, 9.0]
    assert not flags[u < 0].any()
    assert not gate_flags(-torch.arange(1.0, 11.0), 0.2).any()


def test_gate_flags_strictly_above_the_threshold():
    # all non-negative values equal: the percentile is that value and nothing exceeds it
    assert not gate_flags(torch.tensor([2.0] * 10), 0.1).any()


def test_risk_compensator_means_include_zero_uncertainties_and_scale_b():
    rc = RiskCompensator(b=0.1, history=20)
    rc.update(torch.tensor([0.0, 2.0, -5.0]))  # mean over u >= 0: (0 + 2) / 2 = 1
    assert rc.means == [1.0] and rc.b == pytest.approx(0.1)
    rc.update(torch.tensor([1.0]))  # equal to the max and min of [1]: b unchanged
    assert rc.b == pytest.approx(0.1)
    rc.update(torch.tensor([1.5]))  # above the max: x 1.1
    assert rc.b == pytest.approx(0.11)
    rc.update(torch.tensor([1.2]))  # between the min (1) and the max (1.5) of the history: unchanged
    assert rc.b == pytest.approx(0.11)
    rc.update(torch.tensor([-1.0]))  # no non-negative u: mean 0, below the min: x 0.9
    assert rc.means[-1] == 0.0 and rc.b == pytest.approx(0.099)


def test_compensator_keeps_only_the_last_history_means():
    rc = RiskCompensator(b=0.1, history=3)
    for m in (5.0, 1.0, 2.0, 3.0):
        rc.update(torch.tensor([m]))
    assert rc.means == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("sign, flagged", [(1.0, 19), (-1.0, 0)])
def test_prepare_puts_the_kl_only_on_the_flagged_top_tenth(toy_policy, sign, flagged):
    """Through ``prepare``: main reward ranks sample i as i + 1, the auxiliary reward in reverse (20 - i),
    so u_i = sign * (2i - 19). With sign = +1 the non-negative u are 1, 3, ..., 19 (samples 10..19); their
    90th percentile is 17.2 and only sample 19 exceeds it. sign = -1 mirrors it onto sample 0."""
    from tmpo.samplers import FlowSampler, IndependentPlan

    rollout = FlowSampler(IndependentPlan(group_size=10), 4, 0.9, "sde").rollout(
        toy_policy, ["toy"] * 2, [{}] * 2, 0, 10, torch.Generator().manual_seed(0))
    main = torch.linspace(1.0, 0.0, 20)
    aux = torch.linspace(0.0, 1.0, 20)
    obj = GARDOObjective(features=FlattenFeatures(), kl_gate="uncertainty", uncertainty_sign=sign)
    prep = obj.prepare(rollout, main, 0, samples=rollout.leaves, reward_info={"aux": {"aes": aux}})
    expected = torch.zeros(20)
    expected[flagged] = 1.0
    assert torch.equal(prep.kl_leaf_weight.float(), expected)
    assert float(prep.stats["gardo_b"]) == pytest.approx(0.1)  # the compensator's starting fraction
    assert float(prep.stats["gardo_flagged"]) == pytest.approx(1 / 20)
