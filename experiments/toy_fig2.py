"""Toy comparison after the paper's Fig. 2: every method on the 2-D mixture, several seeds.

    python -m experiments.toy_fig2            # or: make toy
    python -m experiments.toy_fig2 --seeds 0 1 2 3 4 --methods tmpo grpo flow_grpo mixgrpo treegrpo gardo

Writes ``results/toy/summary.csv`` (one row per method: mean over seeds, ``_std`` columns for the
spread), ``results/toy/per_seed.csv`` and ``results/toy/fig2.png`` (samples before/after per method and
the mode occupancy against the Boltzmann target). Runs go to ``runs/toy/`` and are reused if present.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from experiments.grid import mean_std_table, run_grid  # noqa: E402
from tmpo.samplers import sample_ode  # noqa: E402
from tmpo.toyworld import ToyMixture  # noqa: E402

TOY = ["model=toy", "reward=gmm_modes"]
METHODS = ["tmpo", "grpo", "flow_grpo", "mixgrpo", "treegrpo", "gardo"]
LABELS = {
    "base": "pre-trained", "tmpo": "TMPO", "grpo": "GRPO (tree)", "flow_grpo": "Flow-GRPO", "mixgrpo": "MixGRPO",
    "treegrpo": "TreeGRPO", "gardo": "GARDO",
}
METRICS = ["modes_covered", "kl_to_target", "fwd_kl_to_target", "reward", "off_mode", "occ_A", "occ_B", "occ_C", "occ_D", "occ_E"]


def draw_samples(trainer, n: int = 2000, seed: int = 7) -> np.ndarray:
    with trainer.ema.applied():
        x = sample_ode(trainer.policy, ["toy"], n, 28, torch.Generator().manual_seed(seed))
    return x.numpy()


def plot(samples: dict[str, np.ndarray], table, out: Path) -> None:
    world = ToyMixture()
    names = list(samples)
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.6))
    centers, rewards = world.centers.numpy(), world.mode_rewards.numpy()
    target = world.boltzmann_target(2.0).numpy()
    for j, name in enumerate(names):
        ax = axes[0, j]
        pts = samples[name]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3, color="tab:blue")
        for (cx, cy), r, m in zip(centers, rewards, world.modes):
            ax.add_patch(plt.Circle((cx, cy), 3 * m.std, fill=False, color=plt.cm.RdYlGn(r), lw=1.5))
            ax.text(cx, cy + 3 * m.std + 0.2, f"{m.name} r={r:g}", ha="center", fontsize=6)
        ax.set_xlim(-5, 5), ax.set_ylim(-5, 5), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(LABELS.get(name, name), fontsize=9)
        ax = axes[1, j]
        row = table[table.cell == name].iloc[0]
        occ = np.array([row[f"occ_{m.name}"] for m in world.modes])
        err = np.array([row.get(f"occ_{m.name}_std", 0.0) for m in world.modes])
        xs = np.arange(len(world.modes))
        ax.bar(xs - 0.2, occ / max(occ.sum(), 1e-12), 0.4, yerr=err / max(occ.sum(), 1e-12), label="samples")
        ax.bar(xs + 0.2, target, 0.4, label="target", color="tab:gray")
        ax.set_xticks(xs, [m.name for m in world.modes]), ax.set_ylim(0, 1)
        ax.set_title(f"KL {row['kl_to_target']:.2f}±{row.get('kl_to_target_std', 0):.2f}, "
                     f"modes {row['modes_covered']:.1f}", fontsize=7)
        if j == 0:
            ax.legend(fontsize=6)
    fig.suptitle("Toy (paper Fig. 2): seed-0 samples (top); mode occupancy, mean±std over seeds, vs exp(2r) target (bottom)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--runs", type=Path, default=Path("runs/toy"))
    ap.add_argument("--out", type=Path, default=Path("results/toy"))
    ap.add_argument("--extra", nargs="*", default=[], help="overrides applied to every run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    samples: dict[str, np.ndarray] = {}

    def keep(cell, seed, trainer):
        if seed == args.seeds[0]:
            samples[cell] = draw_samples(trainer)

    cells = {m: [*TOY, f"method={m}", *args.extra] for m in args.methods}
    df = run_grid(cells, args.seeds, args.runs, on_run=keep)
    # the pre-trained model's eval (identical for every run of a seed) as its own row
    base = df[df.cell == args.methods[0]][["seed"] + [f"base/{m}" for m in METRICS]].copy()
    base.columns = ["seed"] + METRICS
    base.insert(0, "cell", "base")
    per_seed = pd.concat([base, df[["cell", "seed"] + METRICS + ["iter_time_s"]]], ignore_index=True)
    per_seed.to_csv(args.out / "per_seed.csv", index=False, float_format="%.4f")
    table = mean_std_table(per_seed, METRICS + ["iter_time_s"])
    table.insert(3, "n_modes", 5)
    table = table.rename(columns={"cell": "method"})
    cols = ["method", "modes_covered", "n_modes", "kl_to_target"] + [c for c in table.columns if c not in
                                                                        ("method", "modes_covered", "n_modes", "kl_to_target")]
    table[cols].to_csv(args.out / "summary.csv", index=False, float_format="%.4f")
    samples = {"base": draw_samples(_base_trainer(args)), **samples}
    plot(samples, table.rename(columns={"method": "cell"}), args.out / "fig2.png")
    print(table[["method", "modes_covered", "modes_covered_std", "kl_to_target", "kl_to_target_std", "reward", "reward_std"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _base_trainer(args):
    """An untrained policy with EMA = its own weights, for the 'before' panel."""
    from tmpo.run import build_trainer, compose_config

    cfg = compose_config([f"run_dir={args.runs / 'base'}", "logger=none", "trainer.progress=false", *TOY, *args.extra])
    return build_trainer(cfg)


if __name__ == "__main__":
    main()
