"""Several processes sharing a run (tmpo/distributed.py): the sharding and seeding arithmetic on one
process, then the collectives for real in two CPU processes (accelerate's debug_launcher, gloo).

The two-process checks compare each quantity with what one process computes on the whole batch, in the
same worker: the rollout noise, the DDP gradient (with KL weights that differ between processes, so a
per-process mean of means would be wrong), the number of gradient all-reduces per optimizer step
(``no_sync`` for every chunk but the last), batch-wide advantages (GRPO's global std, GARDO's gate),
stop/fault agreement and the gathered evaluation (every sample exactly once, in prompt order).
"""

from __future__ import annotations

import pytest
import torch

from tmpo.distributed import Processes, check_minibatches, eval_shards, group_shard
from tmpo.samplers import DynamicTreePlan, FlowSampler, IndependentPlan, sample_ode
from tmpo.seeding import GroupGenerators, resolve_noise_seeding, stream_seed


# --- sharding arithmetic ------------------------------------------------------------------------
@pytest.mark.parametrize("n_groups,world", [(8, 8), (8, 2), (16, 8), (6, 3), (1, 1), (5, 1)])
def test_group_shards_hold_every_group_once_and_equally_many(n_groups, world):
    shards = [list(group_shard(n_groups, world, r)) for r in range(world)]
    assert sorted(g for s in shards for g in s) == list(range(n_groups))
    assert {len(s) for s in shards} == {n_groups // world}
    assert shards[0][:2] == list(range(0, min(n_groups, 2 * world), world))  # strided: r, r + W, ...


def test_group_shards_make_whole_group_minibatches_agree_with_one_process():
    """With n | groups per process, the i-th whole-group minibatch of every process together is the i-th
    minibatch of the one-process split (tmpo.update.split_minibatches: tensor_split(arange(G), n))."""
    n_groups, world, n = 8, 2, 2
    one = [set(b.tolist()) for b in torch.tensor_split(torch.arange(n_groups), n)]
    per_process = [torch.tensor_split(torch.tensor(list(group_shard(n_groups, world, r))), n) for r in range(world)]
    together = [set(torch.cat([p[i] for p in per_process]).tolist()) for i in range(n)]
    assert together == one == [{0, 1, 2, 3}, {4, 5, 6, 7}]


def test_a_batch_that_does_not_split_evenly_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"prompts_per_step=6 is not divisible by the 4 processes.*multiple of 4"):
        group_shard(6, 4, 0)


def test_whole_group_minibatches_need_enough_groups_per_process():
    check_minibatches(2, "groups", 16, 8)  # 2 groups per process: fine
    check_minibatches(2, "group_leaves", 8, 8)  # a share of every group's leaves: fine
    check_minibatches(2, "groups", 1, 1)  # one process: the split keeps its old meaning
    with pytest.raises(ValueError, match=r"minibatches=2.*leaves 1 group\(s\) per process.*prompts_per_step=16"):
        check_minibatches(2, "groups", 8, 8)


@pytest.mark.parametrize("n,world", [(5, 2), (553, 8), (8, 8), (3, 1)])
def test_eval_shards_are_contiguous_cover_every_prompt_once_and_differ_by_at_most_one(n, world):
    shards = eval_shards(n, world)
    assert [s.start for s in shards] == [0, *[s.stop for s in shards[:-1]]] and shards[-1].stop == n
    sizes = [s.stop - s.start for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert eval_shards(5, 2) == [slice(0, 3), slice(3, 5)]  # hand-derived: 3 + 2, the first block the larger


def test_fewer_eval_prompts_than_processes_is_refused():
    with pytest.raises(ValueError, match="raise eval.max_prompts"):
        eval_shards(2, 4)


def test_one_process_is_the_identity():
    p = Processes()
    x = torch.randn(3, 2)
    assert not p.distributed and p.is_main and list(p.groups(4)) == [0, 1, 2, 3]
    assert p.gather(x) is x and p.local(x) is x and p.gather_rows(x, [3]) is x and p.sum(x) is x
    rows = [{"a": 1.0}]
    assert p.reduce_steps(rows, (), ()) is rows and p.agree_stop(None) is None and p.eval_part(5) == (slice(0, 5), [5])


def test_noise_seeding_auto_is_batch_alone_and_group_with_several_processes():
    assert resolve_noise_seeding("auto", 1) == "batch" and resolve_noise_seeding("auto", 4) == "group"
    assert resolve_noise_seeding("group", 1) == "group"
    with pytest.raises(ValueError, match="noise_seeding=batch.*use group"):
        resolve_noise_seeding("batch", 2)
    with pytest.raises(ValueError, match="valid options"):
        resolve_noise_seeding("per_leaf", 1)


# --- per-group noise -------------------------------------------------------------------------------
def test_group_generators_draw_each_groups_rows_whatever_the_other_groups():
    whole = GroupGenerators(0, 3, 1, range(4)).randn((8, 5), torch.float32)  # 2 rows per group
    odd = GroupGenerators(0, 3, 1, [1, 3]).randn((4, 5), torch.float32)
    assert torch.equal(odd, torch.cat([whole[2:4], whole[6:8]]))
    # group g's stream is SeedSequence([seed, step, stream, g]); the plan's is the whole-batch stream's seed
    g1 = torch.randn((2, 5), generator=torch.Generator().manual_seed(stream_seed(0, 3, 1, 1)))
    assert torch.equal(whole[2:4], g1)
    plan = GroupGenerators(0, 3, 1, [2]).plan
    assert torch.equal(torch.rand(4, generator=plan), torch.rand(4, generator=torch.Generator().manual_seed(stream_seed(0, 3, 1))))
    with pytest.raises(ValueError, match="split evenly"):
        GroupGenerators(0, 0, 1, range(3)).randn((4, 2), torch.float32)


def _toy():
    from tmpo.policies.toy import ToyPolicy

    return ToyPolicy(hidden=256)


@pytest.mark.parametrize("plan", [DynamicTreePlan(branch=2, dynamic=False, fixed_positions=[1, 3]),
                                  IndependentPlan(group_size=3, sde_steps=[2, 3])])
def test_a_process_rolls_out_exactly_its_groups_of_the_whole_batch(plan):
    """The rollout of groups {1, 3} drawn alone equals those groups' part of the 4-group rollout: same plan,
    same leaves (a tree: 2 x 2 leaves per group; independent: 3), same stored transitions."""
    policy, sampler = _toy(), FlowSampler(plan, num_steps=4, eta=0.7, noise="cps")
    prompts = ["toy"] * 4
    whole = sampler.rollout(policy, prompts, [{}] * 4, 5, 10, GroupGenerators(7, 5, 1, range(4)))
    part = sampler.rollout(policy, prompts[:2], [{}] * 2, 5, 10, GroupGenerators(7, 5, 1, [1, 3]))
    k = whole.group_size
    rows = torch.cat([torch.arange(g * k, (g + 1) * k) for g in (1, 3)])
    assert part.group_size == k and part.info == whole.info
    torch.testing.assert_close(part.leaves, whole.leaves[rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(part.trajectory_log_prob_old(), whole.trajectory_log_prob_old()[rows], rtol=0, atol=1e-5)


def test_group_seeding_draws_the_plan_batch_seeding_draws():
    """Both seedings take the iteration's plan from the same stream: only the noise layout differs."""
    sampler = FlowSampler(DynamicTreePlan(), num_steps=6)
    for step in range(5):
        batch = sampler.make_plan(step, 10, torch.Generator().manual_seed(stream_seed(0, step, 1)))
        group = sampler.make_plan(step, 10, GroupGenerators(0, step, 1, range(3)).plan)
        assert batch == group


def test_an_eval_shard_samples_the_rows_of_the_whole_set():
    policy = _toy()
    whole = sample_ode(policy, ["a", "b", "c"], 2, 4, torch.Generator().manual_seed(1))
    part = sample_ode(policy, ["a", "b", "c"], 2, 4, torch.Generator().manual_seed(1), shard=slice(1, 3))
    torch.testing.assert_close(part, whole[2:6], rtol=0, atol=1e-6)


def test_leaf_likelihood_refuses_group_seeding():
    sampler = FlowSampler(IndependentPlan(group_size=2, sde_steps=[1]), num_steps=2, leaf_likelihood={"ode_steps": 2})
    with pytest.raises(ValueError, match="leaf_likelihood.*noise_seeding=group"):
        sampler.rollout(_toy(), ["t"], [{}], 0, 1, GroupGenerators(0, 0, 1, [0]))


# --- two real processes ---------------------------------------------------------------------------
def test_two_cpu_processes_match_one_process(tmp_path):
    """Runs ``tests/distributed_checks.py:two_process_checks`` in 2 forked CPU processes (gloo); every
    assertion is inside the workers, an exception in either fails this test."""
    from accelerate import debug_launcher

    from distributed_checks import two_process_checks

    debug_launcher(two_process_checks, args=(str(tmp_path),), num_processes=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]

