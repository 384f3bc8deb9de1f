"""Softmax-TB with the model's marginal density of each leaf as its policy term (issue 17).

    python -m experiments.science_marginal toy          # (1) toy cells x 5 seeds, frontier, diagnostics
    python -m experiments.science_marginal trust        # (3) trust region on the toy: 1/2/4 steps, mean/sum
    python -m experiments.science_marginal mini-check   # likelihood settings on mini leaves: cost and error
    python -m experiments.science_marginal mini --seeds 0 1 --steps 40     # (2) mini pilot
    python -m experiments.science_marginal mini-trust   # (3) trust region on mini, a few iterations

Runs go to ``runs/science_marginal/<part>`` (reused and resumed if present); tables and figures to
``results/science/marginal/``. Every cell is a plain ``python -m tmpo.run`` config (the overrides are
listed below), so a single run can be reproduced from the command line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from experiments.grid import mean_std_table, run_grid  # noqa: E402
from experiments.science_mini import base_metrics  # noqa: E402
from tmpo.likelihood import LeafLikelihood, log_density  # noqa: E402
from tmpo.results.runs import read_jsonl  # noqa: E402

TOY = ["model=toy", "reward=gmm_modes"]
OUT = Path("results/science/marginal")
RUNS = Path("runs/science_marginal")
CURVE = ["trainer.eval_every=20"]
TOY_CELLS: dict[str, list[str]] = {
    "tmpo_marginal": ["method=tmpo_marginal"],
    "tmpo_marginal_mean": ["method=tmpo_marginal", "objective.marginal_reduction=mean"],
    "tmpo": ["method=tmpo"],
    "grpo_tree": ["method=grpo"],
    "flow_grpo": ["method=flow_grpo"],
    # the marginal term is an entropy bonus at temperature 1/beta (README): a larger beta trades it for reward
    "tmpo_marginal_b5": ["method=tmpo_marginal", "objective.beta_end=5.0"],
    "tmpo_marginal_b10": ["method=tmpo_marginal", "objective.beta_end=10.0"],
}
TOY_METRICS = ["reward", "modes_covered", "kl_to_target", "fwd_kl_to_target", "off_mode", "occ_A", "occ_B", "occ_C",
               "occ_D", "occ_E", "iter_time_s"]
SAMPLER_METRICS = ["reward", "modes_covered", "kl_to_target", "fwd_kl_to_target", "off_mode"]
# per-iteration numbers read back from metrics.jsonl (a missing key is NaN: e.g. no marginal term)
TRAIN_KEYS = {
    "train_reward": "train/reward_mean", "p_entropy_traj": "diag/p_entropy_frac",
    "p_entropy_marginal": "train/marginal_p_entropy_frac", "logp_spread_traj": "diag/logp_spread",
    "logp_spread_marginal": "train/marginal_logp_spread", "corr_logp_reward_marginal": "train/marginal_corr_logp_reward",
    "adv_var_from_log_q": "diag/adv_var_from_log_q", "clip_frac": "train/clip_frac",
    "log_ratio_absmax": "train/log_ratio_absmax", "optimizer_steps": "train/optimizer_steps",
    "rollout_s": "time/rollout_s", "iter_time_s": "iter_time_s", "evals_per_leaf": "train/leaf_likelihood_evals_per_leaf",
}
REWARD_LEVELS = (0.4, 0.45, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
MINI_METRICS = ["geneval", "geneval_official", "pickscore", "lgmd", "cosdiv", "reward", "iter_time_s"]


# --- reading runs back ------------------------------------------------------------------------------


def cell_rows(runs: Path, cells, seeds):
    """``(cell, seed, row)`` for every metrics row of every run ``<runs>/<cell>_s<seed>``."""
    for cell in cells:
        for seed in seeds:
            for row in read_jsonl(runs / f"{cell}_s{seed}" / "metrics.jsonl"):
                yield cell, seed, row


def train_table(runs: Path, cells, seeds) -> pd.DataFrame:
    """One row per (cell, seed, step) with :data:`TRAIN_KEYS`."""
    return pd.DataFrame([{"cell": cell, "seed": seed, "step": row["step"],
                          **{k: row.get(v, np.nan) for k, v in TRAIN_KEYS.items()}}
                         for cell, seed, row in cell_rows(runs, cells, seeds) if "train/loss" in row])


def eval_curves(runs: Path, cells, seeds) -> pd.DataFrame:
    """Eval metrics along training (step 0 = the base model), one row per (cell, seed, step)."""
    out = []
    for cell, seed, row in cell_rows(runs, cells, seeds):
        prefix = "eval/" if "eval/reward" in row else "base/" if "base/reward" in row else None
        if prefix:
            out.append({"cell": cell, "seed": seed, "step": row["step"] if prefix == "eval/" else 0,
                        **{m: row[prefix + m] for m in ("reward", "kl_to_target", "fwd_kl_to_target", "modes_covered")}})
    return pd.DataFrame(out).sort_values(["cell", "seed", "step"])


def at_reward(curve: pd.DataFrame, level: float, metric: str) -> float:
    """``metric`` where the eval reward first crosses ``level`` along one run, upwards or downwards (linear
    between evals), NaN if never: a run that lowers the reward is matched at levels below its start."""
    r, m = curve.reward.to_numpy(), curve[metric].to_numpy()
    for i in range(1, len(r)):
        if min(r[i - 1], r[i]) < level <= max(r[i - 1], r[i]):
            w = (level - r[i - 1]) / (r[i] - r[i - 1])
            return float(m[i - 1] + w * (m[i] - m[i - 1]))
    return float("nan")


def matched_reward_table(curves: pd.DataFrame, levels=REWARD_LEVELS) -> pd.DataFrame:
    """Per cell and reward level: mean and std over the seeds that reach it of KL, forward KL and modes."""
    rows = []
    for cell, g in curves.groupby("cell", sort=False):
        for level in levels:
            vals = {m: [at_reward(c, level, m) for _, c in g.groupby("seed")]
                    for m in ("kl_to_target", "fwd_kl_to_target", "modes_covered")}
            reached = [v for v in vals["kl_to_target"] if np.isfinite(v)]
            row = {"cell": cell, "reward_level": level, "seeds_reaching": len(reached)}
            for m, v in vals.items():
                v = [x for x in v if np.isfinite(x)]
                row[m] = float(np.mean(v)) if v else np.nan
                row[f"{m}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


# --- figures ----------------------------------------------------------------------------------------


def plot_frontier(curves: pd.DataFrame, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for cell, g in curves.groupby("cell", sort=False):
        m = g.groupby("step")[["reward", "kl_to_target", "fwd_kl_to_target"]].mean()
        for ax, col in zip(axes, ("kl_to_target", "fwd_kl_to_target")):
            ax.plot(m.reward, m[col], marker=".", label=cell)
    axes[0].set_ylabel("KL(occupancy || target)"), axes[1].set_ylabel("KL(target || occupancy)  (mode covering)")
    for ax in axes:
        ax.set_xlabel("eval reward (EMA policy)"), ax.legend(fontsize=7)
    fig.suptitle("reward vs distance to the Boltzmann target along training (mean of the runs that finished, eval every "
                 "20 steps; on-mode occupancy)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_diagnostics(diag: pd.DataFrame, out: Path) -> None:
    names = [("p_entropy_marginal", "H(p) / log K, marginal p"), ("p_entropy_traj", "H(p) / log K, trajectory p"),
             ("adv_var_from_log_q", "share of A explained by log q"), ("train_reward", "train reward")]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4))
    for i, (cell, g) in enumerate(diag.groupby("cell", sort=False)):
        m = g.groupby("step")[[n for n, _ in names]].mean()
        for ax, (n, _) in zip(axes, names):
            if m[n].notna().any():  # one colour per cell in every panel; rolling mean over 5 iterations
                ax.plot(m.index, m[n].rolling(5, min_periods=1).mean(), label=cell, lw=1, color=f"C{i}")
    for ax, (_, title) in zip(axes, names):
        ax.set_title(title, fontsize=9), ax.set_xlabel("iteration")
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# --- (1) toy ------------------------------------------------------------------------------------------


def training_sampler_metrics(trainer, n_prompts: int = 40, seed: int = 99) -> dict[str, float]:
    """Mode metrics of the final EMA policy's leaves drawn with its own *training* sampler (6 steps, tree or
    independent SDE, late branch schedule), next to the eval's 28-step ODE: which of the two moved."""
    from tmpo.rewards.gmm import ModeCoverage
    from tmpo.toyworld import ToyMixture

    total = trainer.cfg.total_steps
    with trainer.ema.applied():
        r = trainer.sampler.rollout(trainer.policy, ["toy"] * n_prompts, [{}] * n_prompts, total, total,
                                    torch.Generator().manual_seed(seed))
    out = ModeCoverage()(r.leaves, r.leaves, [], [])
    out["reward"] = float(ToyMixture().reward(r.leaves).mean())
    return {f"sampler_{m}": out[m] for m in SAMPLER_METRICS}


def run_grid_or_diverge(cells: dict[str, list[str]], seeds, runs: Path, on_run=None) -> pd.DataFrame:
    """:func:`run_grid` run by run; a toy run whose policy leaves every mode (the toy eval's "the policy has
    diverged" error) is kept as a row with ``diverged = 1`` and NaN metrics instead of stopping the study.
    Its metrics.jsonl up to the divergence stays (curves), and a rerun retries it from its last checkpoint."""
    frames = []
    for cell, overrides in cells.items():
        for seed in seeds:
            try:
                frames.append(run_grid({cell: overrides}, [seed], runs, on_run=on_run).assign(diverged=0))
            except ValueError as e:
                if "diverged" not in str(e):
                    raise
                print(f"{cell:>24s} seed {seed}: diverged ({e})", flush=True)
                frames.append(pd.DataFrame([{"cell": cell, "seed": seed, "diverged": 1}]))
    return pd.concat(frames, ignore_index=True)


def run_toy(seeds: list[int], runs: Path, out: Path) -> None:
    cells = {c: [*TOY, *ov, *CURVE] for c, ov in TOY_CELLS.items()}
    extra = []
    df = run_grid_or_diverge(cells, seeds, runs,
                             on_run=lambda c, s, t: extra.append({"cell": c, "seed": s, **training_sampler_metrics(t)}))
    df = df.merge(pd.DataFrame(extra), on=["cell", "seed"], how="left")
    metrics = [*TOY_METRICS, *(f"sampler_{m}" for m in SAMPLER_METRICS), "diverged"]
    df[["cell", "seed", *metrics]].to_csv(out / "toy_per_seed.csv", index=False, float_format="%.4f")
    mean_std_table(df, metrics).to_csv(out / "toy_cells.csv", index=False, float_format="%.4f")
    curves = eval_curves(runs, cells, seeds)
    finished = df.loc[df.diverged == 0, ["cell", "seed"]]
    curves.merge(df[["cell", "seed", "diverged"]], on=["cell", "seed"]).to_csv(
        out / "toy_curves.csv", index=False, float_format="%.4f")
    # matched reward: every run's curve up to where it stopped; mean curves and diagnostics: finished runs only
    matched_reward_table(curves).to_csv(out / "toy_matched_reward.csv", index=False, float_format="%.4f")
    plot_frontier(curves.merge(finished, on=["cell", "seed"]), out / "toy_frontier.png")
    diag = train_table(runs, cells, seeds).merge(finished, on=["cell", "seed"])
    per_step = diag.groupby(["cell", "step"]).mean(numeric_only=True).drop(columns="seed")
    per_step.to_csv(out / "toy_diagnostics.csv", float_format="%.4f")
    plot_diagnostics(diag, out / "toy_diagnostics.png")
    phases = {"first 30": diag.step <= 30, "last 30": diag.step > diag.step.max() - 30, "all": diag.step > 0}
    summary = pd.concat([diag[mask].groupby("cell", sort=False).mean(numeric_only=True).drop(columns=["seed", "step"])
                         .assign(phase=name) for name, mask in phases.items()])
    summary.to_csv(out / "toy_diagnostics_summary.csv", float_format="%.4f")
    print(mean_std_table(df, metrics).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


# --- (3) trust region ----------------------------------------------------------------------------------


def trust_cells(base: list[str], methods=("tmpo",), no_clip: bool = True) -> dict[str, list[str]]:
    """1, 2, 4 optimizer steps per rollout, split by groups or by leaves, per-dim mean or sum log-probs; with
    ``no_clip`` also 4 steps with the clip off (eps = 100) to see what the clip changes in the outcome."""
    cells = {}
    for method in methods:
        for red in ("mean", "sum"):
            common = [*base, f"method={method}", f"objective.log_prob_reduction={red}"]
            for n in (1, 2, 4):
                for split in (("groups",) if n == 1 else ("groups", "leaves")):
                    cells[f"{method}_{red}_mb{n}_{split}"] = [
                        *common, f"trainer.minibatches={n}", f"trainer.minibatch_split={split}"]
            if no_clip:
                cells[f"{method}_{red}_mb4_groups_noclip"] = [*common, "trainer.minibatches=4", "trainer.minibatch_split=groups",
                                                               "objective.clip_eps=100"]
    return cells


def trust_table(runs: Path, cells, seeds) -> pd.DataFrame:
    """Clip fraction among the steps that can clip (all but the first after a rollout: its ratio is 1) and
    |log ratio|, mean over iterations and seeds, early and late in the run."""
    d = train_table(runs, cells, seeds)
    n = d.optimizer_steps
    d["clip_frac_later_steps"] = np.where(n > 1, d.clip_frac * n / (n - 1).clip(lower=1), np.nan)
    last = d.step.max()
    rows = []
    for cell, g in d.groupby("cell", sort=False):
        row = {"cell": cell, "optimizer_steps": g.optimizer_steps.iloc[0]}
        tenth = max(1, last // 10)
        for name, part in (("all", g), ("first_10pct", g[g.step <= tenth]), ("last_10pct", g[g.step > last - tenth])):
            row[f"clip_frac_{name}"] = part.clip_frac_later_steps.mean()
            row[f"log_ratio_absmax_mean_{name}"] = part.log_ratio_absmax.mean()
        row["log_ratio_absmax_max"] = g.log_ratio_absmax.max()
        row["iters_with_any_clip"] = float((g.clip_frac > 0).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def run_trust(seeds: list[int], runs: Path, out: Path, mini: bool = False, steps: int = 10) -> None:
    if mini:
        base = ["model=mini", "reward=geneval", f"trainer.total_steps={steps}", "trainer.threads=1", "trainer.eval_base=false",
                "eval.max_prompts=4", "eval.samples_per_prompt=2", "reward.suites.drawbench.max_prompts=2"]
        cells, tag = trust_cells(base, no_clip=False), "mini"
    else:
        cells, tag = trust_cells(TOY, methods=("tmpo", "grpo")), "toy"
    df = run_grid_or_diverge(cells, seeds, runs)
    metrics = [m for m in ("reward", "modes_covered", "kl_to_target", "off_mode", "geneval", "diverged") if m in df]
    table = trust_table(runs, cells, seeds).merge(mean_std_table(df, metrics), on="cell")
    table.to_csv(out / f"{tag}_trust_region.csv", index=False, float_format="%.5g")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


# --- (2) mini --------------------------------------------------------------------------------------


def mini_common(steps: int, threads: int, eval_prompts: int) -> list[str]:
    return ["model=mini", "reward=geneval", f"trainer.total_steps={steps}", f"trainer.threads={threads}",
            "trainer.eval_base=false", "trainer.checkpoint_every=5", f"eval.max_prompts={eval_prompts}",
            f"reward.suites.drawbench.max_prompts={eval_prompts}"]


def mini_check(out: Path, n_prompts: int = 2, leaves: int = 6, seed: int = 0) -> pd.DataFrame:
    """Cheaper likelihood settings against an accurate one on a sample of leaves of the base model's tree.

    Discretisation: every setting uses the *same* single Rademacher probe per leaf (same generator seed), so
    its difference to rk4 x 32 steps is the solver's error alone. Probe noise: heun x 8 with 4 independent
    single probes. Errors are of log p centred within each prompt's leaves (what the softmax sees)."""
    from tmpo.run import build_trainer, compose_config
    from tmpo.world import load_prompts

    trainer = build_trainer(compose_config(["run_dir=/tmp/tmpo_marginal_check", "logger=none", "trainer.progress=false",
                                            *mini_common(1, 1, 1), "method=tmpo"]))
    records = load_prompts("geneval", "train")[:n_prompts]
    r = trainer.sampler.rollout(trainer.policy, [x["prompt"] for x in records], records, 0, 300,
                                torch.Generator().manual_seed(seed))
    pick = torch.cat([torch.arange(g * r.group_size, g * r.group_size + leaves) for g in range(n_prompts)])
    group = r.group[pick]

    def velocity(x, sigma, rows):
        return trainer.policy.velocity(x, sigma, r.cond, group[rows])

    def solve(cfg: LeafLikelihood, probe_seed: int) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        ld = log_density(velocity, r.leaves[pick], cfg, torch.Generator().manual_seed(probe_seed)).log_density
        return ld, (time.perf_counter() - t0) / pick.numel()

    centred = lambda v: v - v.view(n_prompts, leaves).mean(1).repeat_interleave(leaves)  # noqa: E731
    ref, ref_s = solve(LeafLikelihood(ode_steps=32, solver="rk4", exact=False), 1)
    rows = [{"setting": "rk4 x 32 (reference)", "evals_per_leaf": 128, "s_per_leaf": ref_s, "max_err": 0.0, "mean_err": 0.0,
             "within_prompt_std": float(centred(ref).std()), "mean_log_p": float(ref.mean())}]
    for solver, steps in (("euler", 4), ("euler", 8), ("euler", 16), ("heun", 4), ("heun", 8), ("heun", 16), ("rk4", 8),
                          ("rk4", 64)):  # the last one: how far the reference itself is from convergence
        cfg = LeafLikelihood(ode_steps=steps, solver=solver, exact=False)
        ld, sec = solve(cfg, 1)
        err = centred(ld) - centred(ref)
        rows.append({"setting": f"{solver} x {steps}", "evals_per_leaf": cfg.evaluations_per_sample(3072), "s_per_leaf": sec,
                     "max_err": float(err.abs().max()), "mean_err": float(err.abs().mean()),
                     "within_prompt_std": float(centred(ld).std()), "mean_log_p": float(ld.mean()),
                     "corr_with_reference": float(torch.corrcoef(torch.stack([ld, ref]))[0, 1])})
    probes = torch.stack([solve(LeafLikelihood(ode_steps=8, solver="heun", exact=False), s)[0] for s in (11, 12, 13, 14)])
    noise = torch.stack([centred(p) for p in probes])  # [4, n]
    rows.append({"setting": "heun x 8, probe noise (std over 4 single probes)", "evals_per_leaf": 16,
                 "max_err": float(noise.std(0).max()), "mean_err": float(noise.std(0).mean()),
                 "within_prompt_std": float(noise.mean(0).std())})
    table = pd.DataFrame(rows)
    table.to_csv(out / "mini_likelihood_check.csv", index=False, float_format="%.4g")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


def run_mini(seeds: list[int], steps: int, threads: int, eval_prompts: int, runs: Path, out: Path, cells: list[str],
             likelihood: list[str]) -> None:
    common = mini_common(steps, threads, eval_prompts)
    options = {"tmpo_marginal": ["method=tmpo_marginal", *likelihood], "tmpo": ["method=tmpo"], "grpo_tree": ["method=grpo"],
               "tmpo_marginal_mean": ["method=tmpo_marginal", "objective.marginal_reduction=mean", *likelihood]}
    base = base_metrics(common, runs / "base_metrics.json")  # the untouched model, same eval
    frames = []
    for seed in seeds:  # seed-major: an interrupted pilot has whole seeds
        frames.append(run_grid({c: [*common, *options[c]] for c in cells}, [seed], runs))
        df = pd.concat(frames, ignore_index=True)
        metrics = [m for m in MINI_METRICS if m in df]
        df[["cell", "seed", *metrics]].to_csv(out / "mini_per_seed.csv", index=False, float_format="%.4f")
        table = pd.concat([pd.DataFrame([{"cell": "base", "n_seeds": 1, **{m: base[m] for m in metrics if m in base}}]),
                           mean_std_table(df, metrics)])
        table.to_csv(out / "mini_cells.csv", index=False, float_format="%.4f")
    done = sorted(df.seed.unique().tolist())
    diag = train_table(runs, cells, done)
    diag.groupby(["cell", "step"]).mean(numeric_only=True).drop(columns="seed").to_csv(
        out / "mini_diagnostics.csv", float_format="%.4f")
    phases = {"first 10": diag.step <= 10, "last 10": diag.step > diag.step.max() - 10, "all": diag.step > 0}
    pd.concat([diag[m].groupby("cell", sort=False).mean(numeric_only=True).drop(columns=["seed", "step"]).assign(phase=n)
               for n, m in phases.items()]).to_csv(out / "mini_diagnostics_summary.csv", float_format="%.4f")
    plot_diagnostics(diag, out / "mini_diagnostics.png")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["toy", "trust", "mini-check", "mini", "mini-trust"])
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--steps", type=int, default=40, help="mini: RL iterations per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-prompts", type=int, default=26)
    ap.add_argument("--cells", nargs="+", default=["tmpo_marginal", "tmpo"], help="mini cells")
    ap.add_argument("--likelihood", nargs="*", default=["sampler.leaf_likelihood.ode_steps=8"],
                    help="mini: overrides of sampler.leaf_likelihood for the marginal cells")
    ap.add_argument("--runs", type=Path, default=RUNS)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.runs / args.part
    if args.part == "toy":
        run_toy(args.seeds or [0, 1, 2, 3, 4], runs, args.out)
    elif args.part == "trust":
        run_trust(args.seeds or [0, 1, 2], runs, args.out)
    elif args.part == "mini-check":
        mini_check(args.out)
    elif args.part == "mini":
        run_mini(args.seeds or [0, 1], args.steps, args.threads, args.eval_prompts, runs, args.out, args.cells, args.likelihood)
    else:
        run_trust(args.seeds or [0], runs, args.out, mini=True, steps=args.steps)


if __name__ == "__main__":
    main()
