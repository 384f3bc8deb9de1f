"""The science studies' cells: each ablation changes exactly what it names, nothing else (same lr, schedule...)."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from experiments.science import EXPERIMENTS
from experiments.science_mini import CELLS as MINI_CELLS
from tmpo.run import compose_config
from tmpo.samplers import DynamicTreePlan, IndependentPlan

MINI = ["model=mini", "reward=geneval"]
TOY = ["model=toy", "reward=gmm_modes"]


def resolved(overrides: list[str]) -> dict:
    cfg = compose_config(["run_dir=unused", "logger=none", *overrides])
    flat = OmegaConf.to_container(cfg, resolve=True)
    out: dict = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            out[prefix] = node

    walk(flat, "")
    return out


def changed_keys(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")}


# what each cell may change relative to plain TMPO (key prefixes)
ALLOWED = {
    "tmpo_p_uniform": {"objective.policy_term"},
    "tmpo_logp_sum": {"objective.log_prob_reduction"},
    "tmpo_beta1": {"objective.beta_start", "objective.beta_end", "ablation"},
    "grpo_tree": {"objective.", "method"},
    "tmpo_indep_K": {"sampler.plan."},
    "grpo_indep_K": {"objective.", "method", "sampler.plan."},
}


def allowed_for(cell: str) -> set[str]:
    return next(v for k, v in ALLOWED.items() if cell.startswith(k))


@pytest.mark.parametrize("scale,cells", [("mini", MINI_CELLS), *((f"toy:{n}", c) for n, c in EXPERIMENTS.items())])
def test_every_science_cell_differs_from_tmpo_only_in_what_it_names(scale, cells):
    base_overrides = MINI if scale == "mini" else TOY
    reference = resolved([*base_overrides, "method=tmpo"])
    for cell, overrides in cells.items():
        name = cell.removesuffix("_curve")
        if name == "tmpo" or name == "flow_grpo":
            continue
        cfg = resolved([*base_overrides, *overrides])
        extra = {k for k in changed_keys(reference, cfg) if not any(k.startswith(p) for p in allowed_for(name))}
        extra.discard("trainer.eval_every")  # the frontier cells evaluate along training, by design
        assert not extra, f"{scale} cell {cell} changes {sorted(extra)} besides what it names"
        assert cfg["trainer.lr"] == reference["trainer.lr"]


@pytest.mark.parametrize("k", [3, 9, 27, 81])
def test_finite_k_cells_build_k_independent_trajectories_at_the_tree_positions(k):
    cell = f"tmpo_indep_K{k}"
    for overrides in (MINI_CELLS.get(cell), EXPERIMENTS["finite_k"][cell]):
        if overrides is None:
            continue
        cfg = compose_config(["run_dir=unused", "logger=none", *MINI, *overrides])
        sampler = instantiate(cfg.sampler)
        assert isinstance(sampler.plan, IndependentPlan) and sampler.plan.group_size == k
        assert sampler.plan.sde_steps == "branch_schedule" and isinstance(sampler.plan.tree, DynamicTreePlan)
    tree = instantiate(compose_config(["run_dir=unused", "logger=none", *MINI, *MINI_CELLS["tmpo"]]).sampler).plan
    assert isinstance(tree, DynamicTreePlan) and tree.branch ** len(tree.early) == 27  # T = 3 branch points x B = 3
