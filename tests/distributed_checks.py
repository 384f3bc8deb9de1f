"""Checks that need two real processes, run by tests/test_distributed.py under accelerate's debug_launcher
(2 forked CPU processes, gloo). Each compares with what one process computes on the whole batch, in the
same worker (the toy policy, 4 prompt groups; process r holds groups r and r + 2)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from tmpo.distributed import AcceleratedProcesses
from tmpo.evaluation import Evaluator
from tmpo.faults import NonFiniteError, PeerFailure
from tmpo.metrics.task import RewardMetric
from tmpo.rewards.preference import PreferenceReward
from tmpo.objectives import GRPOObjective
from tmpo.objectives.base import Minibatch
from tmpo.samplers import DynamicTreePlan, FlowSampler
from tmpo.seeding import GroupGenerators
from tmpo.update import _chunks, minibatch_gradient, reference_means

G = 4  # prompt groups in the global batch


def two_process_checks(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist = AcceleratedProcesses()
    assert dist.world_size == 2 and list(dist.groups(G)) == [dist.rank, dist.rank + 2]
    check_collectives(dist)
    policy, whole, part, rows = rollouts(dist)
    check_gradient(dist, policy, whole, part, rows)
    check_batch_advantages(dist, whole, part, rows)
    check_evaluation(dist, policy)
    dist.barrier()
    Path(out_dir, f"rank{dist.rank}.ok").touch()


def check_collectives(dist: AcceleratedProcesses) -> None:
    r = dist.rank
    mine = torch.tensor([10.0 * r, 10.0 * r + 1])
    assert dist.gather(mine).tolist() == [0.0, 1.0, 10.0, 11.0] and torch.equal(dist.local(dist.gather(mine)), mine)
    uneven = torch.arange(3 - 2 * r, dtype=torch.float32)[:, None] + 10 * r  # rank 0: 3 rows, rank 1: 1 row
    assert dist.gather_rows(uneven, [3, 1]).flatten().tolist() == [0.0, 1.0, 2.0, 10.0]
    assert float(dist.sum(torch.tensor(r + 1.0))) == 3.0
    rows = [{"loss": r + 1.0, "fwd_grad": 2.0, "log_ratio_absmax": 5.0 * r}, {"loss": 3.0 * r, "fwd_grad": 1.0}]
    assert dist.reduce_steps(rows, ("fwd_grad",), ("log_ratio_absmax",)) == [
        {"loss": 1.5, "fwd_grad": 4.0, "log_ratio_absmax": 5.0}, {"loss": 1.5, "fwd_grad": 2.0}]
    assert dist.agree_stop(signal.SIGUSR2 if r else None) == signal.SIGUSR2
    assert dist.agree_stop(signal.SIGTERM if r else signal.SIGINT) == signal.SIGTERM  # a preemption outranks Ctrl-C
    assert dist.agree_stop(None) is None
    try:
        dist.check_faults(NonFiniteError("my reward") if r else None, iteration=7)
        raise AssertionError("a fault on process 1 must stop both")
    except NonFiniteError as e:
        assert ("my reward" if r else "process(es) [1] of 2 hit a non-finite rollout or reward at iteration 7") in str(e)
    dist.check_faults(None, iteration=8)  # nothing anywhere: no error
    server_down = ConnectionError("reward server at 127.0.0.1:18085 refused") if r else None
    try:  # any other error on one process stops both at once (no process left waiting in a collective)
        dist.check_faults(server_down, iteration=9)
        raise AssertionError("an error on process 1 must stop both")
    except PeerFailure as e:
        assert "iteration 9" in str(e) and "process(es) [1] of 2 failed" in str(e)
        assert e.__cause__ is server_down
        assert ("this process (rank 1) failed: ConnectionError: reward server" in str(e)) == bool(r)
    try:  # a non-finite value on one process and an error on the other: the error decides
        dist.check_faults(NonFiniteError("nan reward") if r else RuntimeError("disk full"), iteration=10)
        raise AssertionError("must stop both")
    except PeerFailure as e:
        assert "process(es) [0, 1] of 2 failed" in str(e)


def rollouts(dist: AcceleratedProcesses):
    """A toy policy moved off its reference (so the KL term is non-zero), the 4-group rollout one
    process would draw and this process's 2-group part of it, with the part's rows in the whole."""
    from tmpo.policies.toy import ToyPolicy

    policy = ToyPolicy()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    sampler = FlowSampler(DynamicTreePlan(branch=2, dynamic=False, fixed_positions=[1, 3]), num_steps=4, eta=0.7, noise="cps")
    whole = sampler.rollout(policy, ["toy"] * G, [{}] * G, 0, 10, GroupGenerators(3, 0, 1, range(G)))
    own = list(dist.groups(G))
    part = sampler.rollout(policy, ["toy"] * len(own), [{}] * len(own), 0, 10, GroupGenerators(3, 0, 1, own))
    k = whole.group_size
    rows = torch.cat([torch.arange(g * k, (g + 1) * k) for g in own])
    torch.testing.assert_close(part.leaves, whole.leaves[rows], rtol=0, atol=1e-6)
    return policy, whole, part, rows


def _grad(policy) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in policy.net.parameters()])


def check_gradient(dist, policy, whole, part, rows) -> None:
    """DDP's averaged gradient of the shards = the one-process gradient of the whole batch, with KL
    weights whose totals differ between the processes (3 weighted leaves on process 0, 1 on process 1)."""
    objective = GRPOObjective(clip_eps=0.2, kl_coef=0.5, kl_form="exact")
    reward = lambda x: -(x - 0.5).pow(2).sum(1)  # noqa: E731
    weight = torch.zeros(whole.leaves.shape[0])
    weight[[0, 1, 2, 6]] = 1.0  # groups 0 (process 0) and 1 (process 1)
    prep_whole = objective.prepare(whole, reward(whole.leaves), 0)
    prep_whole.kl_leaf_weight = weight
    prep_part = objective.prepare(part, reward(part.leaves), 0)
    prep_part.kl_leaf_weight = weight[rows]
    torch.testing.assert_close(prep_part.leaf_adv, prep_whole.leaf_adv[rows], rtol=1e-5, atol=1e-6)

    def gradient(rollout, prep, processes=None) -> torch.Tensor:
        policy.net.zero_grad(set_to_none=True)
        mb = Minibatch.of_groups(rollout, torch.arange(rollout.num_groups))
        minibatch_gradient(policy, rollout, objective, prep, mb, parent_chunk=3, fresh=True,
                           ref_means=reference_means(policy, rollout, 64), processes=processes)
        return _grad(policy).clone()

    expected = gradient(whole, prep_whole)
    alone = gradient(part, prep_part)  # this process's shard, no communication
    mean_of_means = dist.gather(alone[None]).mean(0)
    gap = lambda a: float((a - expected).abs().max() / expected.abs().max())  # noqa: E731
    assert gap(alone) > 1e-2, "the shards' gradients must differ (else this checks nothing)"
    assert gap(mean_of_means) > 1e-3, f"a per-process KL normalisation must be visibly wrong ({gap(mean_of_means)})"

    dist.prepare(policy)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls: list[int] = []

    def counting_allreduce(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    dist._ddp.register_comm_hook(None, counting_allreduce)
    got = gradient(part, prep_part, dist)
    # float32 sums in another order (each process sums its shard, DDP averages the two): a few ulps of the
    # largest entries, far below the gap to the wrong normalisations checked above
    tol = 1e-6 * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=tol)
    model_parents = int((~part.parent_is_prior).sum())
    assert len(_chunks(torch.arange(model_parents), 3)) >= 2 and len(calls) == 1, (model_parents, calls)  # no_sync but the last chunk


def check_batch_advantages(dist, whole, part, rows) -> None:
    """GRPO's global std and GARDO's uncertainty gate use the whole batch: the shards gather it."""
    from baselines.gardo import GARDOObjective
    from tmpo.metrics.features import FlattenFeatures

    gen = torch.Generator().manual_seed(5)
    rewards, aux = torch.randn(whole.leaves.shape[0], generator=gen), torch.randn(whole.leaves.shape[0], generator=gen)
    k = whole.group_size
    one = GRPOObjective(global_std=True).leaf_advantages(rewards.view(G, k)).reshape(-1)
    shared = GRPOObjective(global_std=True)
    shared.processes = dist
    torch.testing.assert_close(shared.leaf_advantages(rewards[rows].view(-1, k)).reshape(-1), one[rows])

    def gardo(rollout, r, a, processes=None):
        obj = GARDOObjective(features=FlattenFeatures(), kl_gate="uncertainty")
        if processes is not None:
            obj.processes = processes
        return obj.prepare(rollout, r, 0, samples=rollout.leaves, reward_info={"aux": {"a": a}})

    one, mine = gardo(whole, rewards, aux), gardo(part, rewards[rows], aux[rows], dist)
    assert float(one.kl_leaf_weight.sum()) >= 1  # the gate flagged something
    torch.testing.assert_close(mine.kl_leaf_weight, one.kl_leaf_weight[rows])
    torch.testing.assert_close(mine.leaf_adv, one.leaf_adv[rows])
    assert float(mine.stats["gardo_flagged"]) == float(one.stats["gardo_flagged"])


class _Prompts:
    def test(self):
        return [(f"prompt {i}", {"i": i}) for i in range(5)]


def check_evaluation(dist, policy) -> None:
    """5 prompts x 2 samples over 2 processes (prompts 0-2 and 3-4): every metric equals the one-process
    evaluation, the whole-set metric sees all 10 samples in prompt order, each process scored its own."""
    scored: list[int] = []

    def reward(samples, prompts, meta):
        scored.extend(m["group"] for m in meta)
        return samples.sum(1) + torch.tensor([100.0 * m["group"] for m in meta]), {}

    def seen(samples, latents, prompts, meta, n):
        order = torch.arange(len(prompts), dtype=torch.float64)
        return {"seen": float(len(prompts)), "groups": float(sum(m["group"] for m in meta)),
                "weighted": float((order * samples[:, 0].double()).sum()), "latents": float(latents.sum())}

    def evaluator():
        return Evaluator(_Prompts(), reward, metrics=[RewardMetric("r2", reward), seen], samples_per_prompt=2, num_steps=3)

    single = evaluator()
    one = single(policy)
    scored.clear()
    ev = evaluator()
    ev.processes = dist
    got = ev(policy)
    assert sorted(set(scored)) == ([0, 1, 2] if dist.rank == 0 else [3, 4]) and len(scored) == 2 * 2 * len(set(scored))
    assert got["seen"] == 10.0 and got["groups"] == 2.0 * (0 + 1 + 2 + 3 + 4)
    assert set(got) == set(one)
    for key in one:
        torch.testing.assert_close(got[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert ev.noise.keys() == single.noise.keys() == {"reward", "r2"}
    for key, value in single.noise.items():
        torch.testing.assert_close(ev.noise[key], value, rtol=1e-5, atol=1e-8, msg=key)


class FailingReward(PreferenceReward):
    """The mini preference reward, except that process ``fail_rank``'s ``fail_call``-th call raises the error a
    reward server that stayed down would (``tests/test_distributed_run.py``: the other process must not hang)."""

    def __init__(self, fail_rank: int, fail_call: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_rank, self.fail_call, self.calls = fail_rank, fail_call, 0

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        if int(os.environ.get("RANK", "0")) == self.fail_rank and self.calls == self.fail_call:
            raise ConnectionError("reward server at 127.0.0.1:18085 refused the connection (test)")
        return super().__call__(images, prompts, metadata)
