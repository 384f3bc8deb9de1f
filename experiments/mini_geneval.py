"""TMPO on the mini world with the GenEval reward: before/after numbers and a sample grid.

    python -m experiments.mini_geneval --steps 60            # results/mini/geneval_<method>.{json,png}

Trains ``method`` (default tmpo) from the committed mini base model, evaluates the EMA policy on every
held-out GenEval prompt (10 images each) and on the DrawBench-style preference prompts, and draws a
grid of samples (rows: test prompts; columns: base model seeds | trained model seeds, same noise).
The run directory (``runs/mini/<method>``) is resumable: re-running continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from experiments.grid import run_cell  # noqa: E402
from tmpo.samplers import sample_ode  # noqa: E402

NAMES = ["geneval", "geneval_official", "pickscore", "hpsv21", "imagereward", "lgmd", "cosdiv", "iter_time_s"]


def sample_grid(trainer, prompts: list[str], seeds: int, out: Path, title: str) -> None:
    gen = lambda: torch.Generator().manual_seed(2024)  # noqa: E731  same noise for base and trained
    with torch.no_grad():
        with trainer.policy.reference():  # the base model (LoRA disabled)
            base = trainer.policy.decode(sample_ode(trainer.policy, prompts, seeds, 28, gen()))
        with trainer.ema.applied():
            tuned = trainer.policy.decode(sample_ode(trainer.policy, prompts, seeds, 28, gen()))
    fig, axes = plt.subplots(len(prompts), 2 * seeds + 1, figsize=(1.1 * (2 * seeds + 1), 1.15 * len(prompts)))
    for i, p in enumerate(prompts):
        for j in range(seeds):
            for col, imgs in ((j, base), (seeds + 1 + j, tuned)):
                ax = axes[i, col]
                ax.imshow(imgs[i * seeds + j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
        axes[i, seeds].axis("off")
        axes[i, seeds].text(0.5, 0.5, p.replace("a photo of ", ""), ha="center", va="center", fontsize=5, wrap=True)
    axes[0, 0].set_title("base", fontsize=7, loc="left")
    axes[0, seeds + 1].set_title("trained (EMA)", fontsize=7, loc="left")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="tmpo")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=Path, default=Path("runs/mini"))
    ap.add_argument("--out", type=Path, default=Path("results/mini"))
    ap.add_argument("--extra", nargs="*", default=[], help="further overrides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = ["model=mini", "reward=geneval", f"method={args.method}", f"trainer.total_steps={args.steps}",
                 f"trainer.threads={args.threads}", f"trainer.seed={args.seed}", "trainer.checkpoint_every=10", *args.extra]
    out = run_cell(overrides, args.runs / f"{args.method}_s{args.seed}")
    summary, trainer = out["summary"], out["trainer"]
    args.out.mkdir(parents=True, exist_ok=True)
    table = {"method": args.method, "steps": args.steps, "command": "python -m experiments.mini_geneval " + " ".join(
        [f"--method {args.method}", f"--steps {args.steps}", f"--seed {args.seed}", *(["--extra", *args.extra] if args.extra else [])])}
    for n in NAMES:
        table[n] = summary.get(n)
        if n != "iter_time_s":
            table[f"base/{n}"] = summary.get(f"base/{n}")
    (args.out / f"geneval_{args.method}.json").write_text(json.dumps(table, indent=2) + "\n")
    prompts = [t for t, _ in trainer.prompts.test()][::9][:6]
    sample_grid(trainer, prompts, 4, args.out / f"geneval_{args.method}_grid.png",
                f"{args.method} on GenEval-mini, {args.steps} steps: base (left) vs trained (right), same initial noise")
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
