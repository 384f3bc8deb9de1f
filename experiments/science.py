"""What carries Softmax-TB's mode covering? Five toy experiments (science issue), 5 seeds per cell.

    python -m experiments.science                 # all experiments
    python -m experiments.science --only policy_term finite_k

1. diagnostics: entropy of p / log K, log P spread, corr(log p, R), advantage variance from log q,
   logged every iteration by every method (read back from metrics.jsonl);
2. policy_term: TMPO vs p := 1/K vs true-density (sum) log-probs;
3. finite_k: K in {3, 9, 27, 81} independent trajectories, final KL to the Boltzmann target;
4. prefix: tree vs 27 independent trajectories; how often sibling leaves land in the same mode;
5. explanations: beta warm-up, log-softmax vs z-scored advantages, tree rollouts, each isolated.

Writes ``results/science/{cells.csv,per_seed.csv,diagnostics.csv,*.png}``; runs go to ``runs/science``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from experiments.grid import mean_std_table, run_grid  # noqa: E402
from tmpo.samplers import DynamicTreePlan, FlowSampler, IndependentPlan  # noqa: E402
from tmpo.toyworld import ToyMixture  # noqa: E402

INDEP = "sampler=tree_independent"
TOY = ["model=toy", "reward=gmm_modes"]
EXPERIMENTS: dict[str, dict[str, list[str]]] = {
    "policy_term": {
        "tmpo": ["method=tmpo"],
        "tmpo_p_uniform": ["method=tmpo", "objective.policy_term=uniform"],
        "tmpo_logp_sum": ["method=tmpo", "objective.log_prob_reduction=sum"],
    },
    "finite_k": {
        f"tmpo_indep_K{k}": ["method=tmpo", INDEP, f"sampler.plan.group_size={k}"] for k in (3, 9, 27, 81)
    },
    "prefix": {
        "tmpo": ["method=tmpo"],
        "tmpo_indep_K27": ["method=tmpo", INDEP],
    },
    "explanations": {
        "tmpo": ["method=tmpo"],
        "tmpo_beta1": ["method=tmpo", "ablation=beta1"],
        "tmpo_p_uniform": ["method=tmpo", "objective.policy_term=uniform"],
        "grpo_tree": ["method=grpo"],
        "grpo_indep_K27": ["method=grpo", INDEP],
        "tmpo_indep_K27": ["method=tmpo", INDEP],
    },
    # reward vs KL along training (eval every 20 steps): is TMPO's coverage more than lower reward?
    "frontier": {
        f"{name}_curve": [*ov, "trainer.eval_every=20"]
        for name, ov in {
            "tmpo": ["method=tmpo"],
            "tmpo_p_uniform": ["method=tmpo", "objective.policy_term=uniform"],
            "tmpo_logp_sum": ["method=tmpo", "objective.log_prob_reduction=sum"],
            "grpo_tree": ["method=grpo"],
            "flow_grpo": ["method=flow_grpo"],
        }.items()
    },
}
METRICS = ["reward", "modes_covered", "kl_to_target", "fwd_kl_to_target", "occ_A", "occ_B", "occ_C", "occ_D", "occ_E"]
DIAG = ["diag/p_entropy_frac", "diag/logp_spread", "diag/corr_logp_reward", "diag/adv_var_from_log_q"]


def pair_masks(r) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, N]`` masks of leaf pairs in the same group and of siblings (same last parent; empty
    for independent trajectories, whose last parents are all distinct)."""
    n = r.leaves.shape[0]
    same_group = (r.group[:, None] == r.group[None, :]) & ~torch.eye(n, dtype=torch.bool)
    last = r.path.shape[1] - 1 - torch.argmax(r.path.flip(1), dim=1)  # each leaf's last stored edge
    last_parent = r.edge_parent[last]
    return same_group, (last_parent[:, None] == last_parent[None, :]) & same_group


def science_rollout(trainer, tree: bool, prompts: list[str], metadata: list[dict], seed: int, step: int | None = None):
    """Rollout of the trained (EMA) policy with TMPO's tree or with 27 independent trajectories."""
    plan = DynamicTreePlan() if tree else IndependentPlan(group_size=27, sde_steps="branch_schedule", tree=DynamicTreePlan())
    sampler = FlowSampler(plan, trainer.sampler.num_steps, trainer.sampler.eta, trainer.sampler.noise)
    with trainer.ema.applied():
        at = trainer.cfg.total_steps if step is None else step
        return sampler.rollout(trainer.policy, prompts, metadata, at, trainer.cfg.total_steps,
                               torch.Generator().manual_seed(seed))


def sibling_agreement(trainer, tree: bool, n_prompts: int = 16, seed: int = 99, step: int | None = None) -> dict[str, float]:
    """P(same mode) for leaves sharing their last parent (tree siblings) and for random same-group pairs."""
    r = science_rollout(trainer, tree, ["toy"] * n_prompts, [{}] * n_prompts, seed, step)
    mode = ToyMixture().assign(r.leaves)
    same_group, siblings = pair_masks(r)
    same_mode = (mode[:, None] == mode[None, :]) & (mode[:, None] >= 0)
    out = {"pair_same_mode": float(same_mode[same_group].float().mean()), "k": float(r.group_size)}
    if tree:
        out["sibling_same_mode"] = float(same_mode[siblings].float().mean())
    return out


def base_prefix_agreement(seeds: list[int]) -> pd.DataFrame:
    """Sibling vs random-pair mode agreement of the *pre-trained* model's rollouts, early and late tree."""
    from tmpo.run import build_trainer, compose_config

    rows = []
    for progress_step, label in ((0, "early (p=0)"), (300, "late (p=1)")):
        for seed in seeds:
            cfg = compose_config(["run_dir=/tmp/tmpo_base_prefix", "logger=none", "trainer.progress=false", *TOY])
            trainer = build_trainer(cfg)
            trainer.cfg.total_steps = 300
            for tree in (True, False):
                res = sibling_agreement(trainer, tree=tree, n_prompts=32, seed=seed, step=progress_step)
                rows.append({"schedule": label, "rollout": "tree" if tree else "independent", "seed": seed, **res})
    return pd.DataFrame(rows)


def plot_frontier(runs: Path, cells: list[str], seeds: list[int], out: Path) -> pd.DataFrame:
    rows = []
    for cell in cells:
        for seed in seeds:
            for line in (runs / f"{cell}_s{seed}" / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                if "eval/reward" in row:
                    rows.append({"cell": cell, "seed": seed, "step": row["step"], "reward": row["eval/reward"],
                                 "kl_to_target": row["eval/kl_to_target"], "modes_covered": row["eval/modes_covered"]})
                elif "base/reward" in row:
                    rows.append({"cell": cell, "seed": seed, "step": 0, "reward": row["base/reward"],
                                 "kl_to_target": row["base/kl_to_target"], "modes_covered": row["base/modes_covered"]})
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for cell, g in df.groupby("cell", sort=False):
        m = g.groupby("step")[["reward", "kl_to_target"]].mean()
        ax.plot(m.reward, m.kl_to_target, marker=".", label=cell.replace("_curve", ""))
    ax.set_xlabel("eval reward (EMA policy)"), ax.set_ylabel("KL(occupancy || target)")
    ax.set_title("reward vs mode KL along training (mean of seeds)", fontsize=9), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return df


def diagnostics_table(runs: Path, cells: list[str], seeds: list[int]) -> pd.DataFrame:
    rows = []
    for cell in cells:
        for seed in seeds:
            path = runs / f"{cell}_s{seed}" / "metrics.jsonl"
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if "train/loss" in row:
                    rows.append({"cell": cell, "seed": seed, "step": row["step"], "reward": row["train/reward_mean"],
                                 **{d.split("/")[1]: row[d] for d in DIAG}})
    return pd.DataFrame(rows)


def plot_diagnostics(diag: pd.DataFrame, out: Path) -> None:
    names = ["p_entropy_frac", "logp_spread", "corr_logp_reward", "adv_var_from_log_q"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for cell, g in diag.groupby("cell", sort=False):
        m = g.groupby("step")[names].agg(["mean", "std"])
        for ax, n in zip(axes, names):
            ax.plot(m.index, m[(n, "mean")], label=cell, lw=1)
            ax.fill_between(m.index, m[(n, "mean")] - m[(n, "std")], m[(n, "mean")] + m[(n, "std")], alpha=0.15)
    for ax, n in zip(axes, names):
        ax.set_title(n, fontsize=9), ax.set_xlabel("step")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_finite_k(
    table: pd.DataFrame,
    out: Path,
    panels: Sequence[Sequence[tuple[str, str]]] = (
        (("kl_to_target", "KL(occupancy || target)"), ("fwd_kl_to_target", "KL(target || occupancy)")),
    ),
    ylabels: Sequence[str] = ("final KL",),
) -> None:
    """Metrics of the ``tmpo_indep_K<k>`` cells against K (log axis), mean +- std over seeds; one panel
    per entry of ``panels``, each a list of ``(column, label)``; a ``base`` row is drawn dotted."""
    t = table[table.cell.str.startswith("tmpo_indep_K")].copy()
    base = table[table.cell == "base"]
    t["K"] = t.cell.str.extract(r"K(\d+)").astype(int)
    t = t.sort_values("K")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, panel, ylabel in zip(axes[0], panels, ylabels):
        for (col, label), marker in zip(panel, "osd^"):
            line = ax.errorbar(t.K, t[col], yerr=t[f"{col}_std"], marker=marker, label=label, capsize=3)
            if col in base and base[col].notna().any():  # the untouched model, same eval
                ax.axhline(float(base[col].iloc[0]), ls=":", color=line[0].get_color(), lw=1)
        ax.set_xscale("log"), ax.minorticks_off(), ax.set_xticks(t.K, [str(k) for k in t.K])
        ax.set_xlabel("K (independent trajectories)")
        ax.set_ylabel(ylabel), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=list(EXPERIMENTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--runs", type=Path, default=Path("runs/science"))
    ap.add_argument("--out", type=Path, default=Path("results/science"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    cells: dict[str, list[str]] = {}
    membership = []
    for exp in args.only:
        for cell, overrides in EXPERIMENTS[exp].items():
            cells.setdefault(cell, overrides)
            membership.append({"experiment": exp, "cell": cell})
    agreement = []

    def on_run(cell, seed, trainer):
        if cell in ("tmpo", "tmpo_indep_K27", "grpo_tree", "grpo_indep_K27"):
            agreement.append({"cell": cell, "seed": seed, **sibling_agreement(trainer, tree="indep" not in cell)})

    df = run_grid({c: [*TOY, *ov] for c, ov in cells.items()}, args.seeds, args.runs, on_run=on_run)
    df[["cell", "seed"] + METRICS].to_csv(args.out / "per_seed.csv", index=False, float_format="%.4f")
    table = mean_std_table(df, METRICS)
    if agreement:
        ag = pd.DataFrame(agreement)
        cols = [c for c in ("sibling_same_mode", "pair_same_mode") if c in ag]
        table = table.merge(mean_std_table(ag, cols), on=["cell", "n_seeds"], how="left")
    table = pd.DataFrame(membership).merge(table, on="cell")
    table.to_csv(args.out / "cells.csv", index=False, float_format="%.4f")
    diag = diagnostics_table(args.runs, list(cells), args.seeds)
    diag.groupby(["cell", "step"]).mean(numeric_only=True).drop(columns="seed").to_csv(
        args.out / "diagnostics.csv", float_format="%.4f")
    plot_diagnostics(diag[diag.cell.isin(["tmpo", "tmpo_p_uniform", "tmpo_logp_sum", "grpo_tree"])], args.out / "diagnostics.png")
    if "frontier" in args.only:
        curves = plot_frontier(args.runs, list(EXPERIMENTS["frontier"]), args.seeds, args.out / "frontier.png")
        curves.to_csv(args.out / "frontier.csv", index=False, float_format="%.4f")
    if "prefix" in args.only:
        bp = base_prefix_agreement(args.seeds)
        bp.groupby(["schedule", "rollout"])[["sibling_same_mode", "pair_same_mode"]].agg(["mean", "std"]).to_csv(
            args.out / "prefix_base.csv", float_format="%.4f")
    if "finite_k" in args.only:
        plot_finite_k(table.drop_duplicates("cell"), args.out / "finite_k.png")
    show = ["experiment", "cell", "reward", "reward_std", "modes_covered", "modes_covered_std", "kl_to_target", "kl_to_target_std"]
    print(table[show].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
