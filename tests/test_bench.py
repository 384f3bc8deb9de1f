"""The benchmark's bookkeeping (experiments/bench.py): evaluation counts of plans, the lower bound, the probe.

No timing is asserted; these check that what the benchmark counts and adds up is right."""

from __future__ import annotations

import pytest
import torch

import tmpo.loop
from baselines.treegrpo import TreeWindowPlan
from experiments import bench
from tmpo.loop import Trainer
from tmpo.run import build_trainer, compose_config
from tmpo.samplers.plans import tree_plan


@pytest.mark.parametrize("positions, nfe, parents", [
    # branch at step 1 = 3 independent noises (no model parent); 3 nodes to step 2, 9 to step 3, 27 after
    ([1, 2, 3], 3 + 3 + 9 + 27 + 27 + 27, 3 + 9),
    ([1, 3, 5], 3 + 3 + 3 + 9 + 9 + 27, 3 + 9),
    ([2, 3, 4], 1 + 1 + 3 + 9 + 27 + 27, 1 + 3 + 9),
])
def test_plan_counts_of_trees(positions, nfe, parents):
    assert bench.plan_counts(tree_plan(positions, 3, 6)) == (nfe, parents)


def test_plan_counts_of_treegrpo_windows():
    plan = TreeWindowPlan(branch=3, window=3, shift_every=25, shift=1)
    rng = None
    assert bench.plan_counts(plan.make(0, 500, 6, rng)) == (1 + 3 + 9 + 27 + 27 + 27, 1 + 3 + 9)  # window 1-3
    assert bench.plan_counts(plan.make(50, 500, 6, rng)) == (1 + 1 + 1 + 3 + 9 + 27, 1 + 3 + 9)  # window 3-5


class _Timer:
    table = {(4, "fwd"): 1.0, (12, "fwd"): 2.0, (8, "fwd_bwd"): 10.0, (8, "ref"): 3.0, (8, "fwd"): 5.0}

    def seconds(self, batch, kind):
        return self.table[(batch, kind)]


def test_bound_adds_sampling_grad_reference_and_reward_but_not_the_recompute():
    calls = [bench.Call("rollout", 4, "fwd"), bench.Call("rollout", 12, "fwd"), bench.Call("update", 8, "ref"),
             bench.Call("update", 8, "fwd_bwd"), bench.Call("update", 8, "fwd_bwd"), bench.Call("update", 8, "fwd"),
             bench.Call("reward", 4, "fwd")]  # a call inside decode + reward is already in its measured time
    out = bench.iteration_bound(calls, _Timer(), reward_s=0.5)
    assert out == {"bound_s": 1 + 2 + 3 + 20 + 0.5, "bound_sample_s": 3.0, "bound_grad_s": 20.0, "bound_ref_s": 3.0, "recompute_s": 5.0}


def test_check_counts_names_a_mismatch():
    rec = {"calls": [bench.Call("rollout", 8, "fwd")], "nfe_sample": 2.0, "nfe_grad": 0.0, "nfe_nograd_update": 0.0, "nfe_ref": 0.0}
    bench.check_counts(rec, groups=4)
    rec["nfe_sample"] = 3.0
    with pytest.raises(RuntimeError, match="probe counted 8"):
        bench.check_counts(rec, groups=4)


def test_probe_counts_match_the_loop_and_uninstall_cleanly(tmp_path):
    cfg = compose_config(bench.cell_overrides("toy", ["method=tmpo"], str(tmp_path)))
    trainer = build_trainer(cfg)
    update = tmpo.loop.policy_update
    probe = bench.Probe(trainer, bench.Clock(torch.device("cpu")), bench.Memory(torch.device("cpu")))
    with probe.installed():
        rec = probe.iteration(3)  # check_counts inside: the calls add up to the loop's counters
    assert rec["group_size"] == bench.GROUP_SIZE and rec["optimizer_steps"] == 2
    assert {c.phase for c in rec["calls"]} == {"rollout", "update"}
    grad = [c for c in rec["calls"] if c.kind == "fwd_bwd"]
    assert sum(c.batch for c in grad) == rec["nfe_grad"] * bench.PROMPTS
    assert 0 < rec["rollout_s"] + rec["reward_s"] + rec["update_s"] <= rec["iter_s"] * 1.05
    assert rec["mem_growth_mb"] >= 0
    # nothing left behind: the class's methods and the loop's update are back
    assert tmpo.loop.policy_update is update
    assert "score" not in vars(trainer) and trainer.score.__func__ is Trainer.score
    assert "rollout" not in vars(trainer.sampler) and "velocity" not in vars(trainer.policy)
