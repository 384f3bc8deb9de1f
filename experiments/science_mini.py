"""The science issue's experiments on the mini scale (GenEval reward, mini DiT), 5 seeds per cell.

    python -m experiments.science_mini                         # every cell, seeds 0-4
    python -m experiments.science_mini --checkpoint dit_v1.pt  # a specific base model
    python -m experiments.science_mini --cells tmpo grpo_tree tmpo_beta1 --steps 150 \
        --runs runs/science_mini_long --out results/science/mini_150   # longer runs, three cells

Cells (all train on GenEval-mini with the strict reward, the same seeds and schedule):

* ``tmpo`` / ``tmpo_p_uniform`` / ``tmpo_logp_sum``: the policy-term ablation (experiment 2);
* ``tmpo_indep_K27``: 27 independent trajectories instead of the tree (experiment 4, prefix sharing);
* ``grpo_tree``: z-scored GRPO advantages on TMPO's tree (experiment 5, advantage shape);
* ``tmpo_beta1``: no beta warm-up (experiment 5);
* ``tmpo_indep_K{3,9,81}``: finite K (experiment 3), with ``tmpo_indep_K27`` as the K = 27 point.

Every run logs the diagnostics (experiment 1) in its ``metrics.jsonl``. After each run, sibling vs
same-group similarity of leaves (experiment 4's "same mode" on a continuous world): the cosine
similarity of the mini DINOv2 stand-in's features for tree siblings and for random same-group
pairs. Runs are iterated seed-major, so an interrupted study has whole seeds; re-running resumes.
Writes ``results/science/mini_{cells,per_seed,diagnostics}.csv``, ``mini_diagnostics.png`` and, with
two or more finite-K cells, ``mini_finite_k.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from experiments.grid import mean_std_table, run_grid
from experiments.science import DIAG, diagnostics_table, pair_masks, plot_diagnostics, plot_finite_k, science_rollout
from tmpo.checkpoint import write_json_atomic
from tmpo.metrics.mini_features import MiniImageFeatures
from tmpo.world import load_prompts

CELLS: dict[str, list[str]] = {  # in priority order: `--cells` defaults to all, a short study runs the first ones
    "tmpo": ["method=tmpo"],
    "tmpo_p_uniform": ["method=tmpo", "objective.policy_term=uniform"],
    "tmpo_indep_K27": ["method=tmpo", "sampler=tree_independent"],
    "grpo_tree": ["method=grpo"],
    "tmpo_logp_sum": ["method=tmpo", "objective.log_prob_reduction=sum"],
    "tmpo_beta1": ["method=tmpo", "ablation=beta1"],
    # experiment 3, finite K: independent trajectories, K = 27 is `tmpo_indep_K27` above
    **{f"tmpo_indep_K{k}": ["method=tmpo", "sampler=tree_independent", f"sampler.plan.group_size={k}"] for k in (3, 9, 81)},
}
FINITE_K_PANELS = ((("geneval", "partial"), ("geneval_official", "official")), (("cosdiv", "Cos. Div."),))
METRICS = ["geneval", "geneval_official", "pickscore", "hpsv21", "imagereward", "lgmd", "cosdiv", "reward"]


def sibling_similarity(trainer, tree: bool, features: MiniImageFeatures, n_prompts: int = 6, seed: int = 99) -> dict[str, float]:
    """Mean feature cosine similarity of tree siblings and of random same-group leaf pairs."""
    records = load_prompts("geneval", "test")
    records = records[:: max(1, len(records) // n_prompts)][:n_prompts]
    r = science_rollout(trainer, tree, [x["prompt"] for x in records], records, seed)
    phi = torch.nn.functional.normalize(features(trainer.policy.decode(r.leaves).clamp(0, 1)).double(), dim=1)
    cos = phi @ phi.T
    same_group, siblings = pair_masks(r)
    out = {"pair_cos_sim": float(cos[same_group].mean())}
    if tree:
        out["sibling_cos_sim"] = float(cos[siblings].mean())
    return out


def base_metrics(common: list[str], path: Path) -> dict[str, float]:
    """Eval metrics of the untouched base model under the study's eval settings (cached in ``path``)."""
    if path.exists():
        return json.loads(path.read_text())
    from tmpo.run import build_trainer, compose_config

    cfg = compose_config([f"run_dir={path.parent / 'base'}", "logger=none", "trainer.progress=false", *common, "method=tmpo"])
    metrics = build_trainer(cfg).evaluate()  # EMA == base weights before any update
    write_json_atomic(metrics, path)  # two studies sharing a runs dir may race here
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="*", default=list(CELLS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=30, help="RL iterations per run")
    ap.add_argument("--checkpoint", default=None, help="base model .pt (default: the committed mini DiT)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-prompts", type=int, default=26,
                    help="held-out GenEval prompts and preference prompts evaluated per run (10 images each)")
    ap.add_argument("--runs", type=Path, default=Path("runs/science_mini"))
    ap.add_argument("--out", type=Path, default=Path("results/science"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["model=mini", "reward=geneval", f"trainer.total_steps={args.steps}", f"trainer.threads={args.threads}",
              "trainer.eval_base=false", "trainer.checkpoint_every=10", f"eval.max_prompts={args.eval_prompts}",
              f"reward.suites.drawbench.max_prompts={args.eval_prompts}"]
    if args.checkpoint:
        common.append(f"model.checkpoint={Path(args.checkpoint).resolve()}")
    features = MiniImageFeatures()
    similarity = []

    def on_run(cell, seed, trainer):
        if cell in ("tmpo", "tmpo_indep_K27", "grpo_tree"):
            similarity.append({"cell": cell, "seed": seed, **sibling_similarity(trainer, "indep" not in cell, features)})

    base = base_metrics(common, args.runs / "base_metrics.json")
    cells = {c: [*common, *CELLS[c]] for c in args.cells}
    frames = []
    for seed in args.seeds:  # seed-major: a partial study has complete seeds
        frames.append(run_grid(cells, [seed], args.runs, on_run=on_run))
        df = pd.concat(frames, ignore_index=True)
        metrics = [m for m in METRICS if m in df]
        df[["cell", "seed", *metrics]].to_csv(args.out / "mini_per_seed.csv", index=False, float_format="%.4f")
        table = mean_std_table(df, metrics)
        table = pd.concat([pd.DataFrame([{"cell": "base", "n_seeds": 1, **{m: base[m] for m in metrics if m in base}}]), table])
        if similarity:
            sim = pd.DataFrame(similarity)
            table = table.merge(mean_std_table(sim, [c for c in ("sibling_cos_sim", "pair_cos_sim") if c in sim]),
                                on=["cell", "n_seeds"], how="left")
        table.to_csv(args.out / "mini_cells.csv", index=False, float_format="%.4f")
    seeds_done = sorted(df.seed.unique().tolist())
    diag = diagnostics_table(args.runs, list(cells), seeds_done)
    diag.groupby(["cell", "step"]).mean(numeric_only=True).drop(columns="seed").to_csv(
        args.out / "mini_diagnostics.csv", float_format="%.4f")
    final = diag.groupby(["cell", "seed"])[[d.split("/")[1] for d in DIAG]].mean().reset_index()
    mean_std_table(final, [d.split("/")[1] for d in DIAG]).to_csv(args.out / "mini_diagnostics_summary.csv",
                                                                     index=False, float_format="%.4f")
    plot_diagnostics(diag[diag.cell.isin(["tmpo", "tmpo_p_uniform", "tmpo_logp_sum", "grpo_tree"])],
                     args.out / "mini_diagnostics.png")
    if table.cell.str.startswith("tmpo_indep_K").sum() >= 2:
        plot_finite_k(table, args.out / "mini_finite_k.png", FINITE_K_PANELS, ("GenEval-mini (held-out prompts)", "diversity"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
