"""TMPO on the mini world with the GenEval reward: before/after numbers and a sample grid.

    python -m experiments.mini_geneval --steps 60 --seeds 0 1 2   # results/mini/geneval_<method>{.json,_grid.png}

Trains ``method`` (default tmpo) from the committed mini base model for each seed, evaluates the EMA policy on every
held-out GenEval prompt (10 images each) and on the DrawBench-style preference prompts, and draws a
grid of samples (rows: test prompts; columns: base model seeds | trained model seeds, same noise).
The json holds the mean and std over seeds, each seed's numbers and the base model's (``base/<name>``),
plus GenEval's official accuracy per tag (``official/<tag>``, ``official/overall`` = mean over tags, as
on the model card).
Run directories (``runs/mini/<method>_<steps>_s<seed>``) are resumable: re-running continues them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from experiments.grid import run_cell  # noqa: E402
from tmpo.policies.mini_pretrain import evaluate_base  # noqa: E402
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


def per_tag_accuracy(policy) -> dict[str, float]:
    """GenEval official accuracy per tag (and the per-tag mean, ``overall``) on every held-out prompt,
    10 images each, fixed noise; the model card's protocol with the paper's 10 images per prompt."""
    with torch.no_grad():
        out = evaluate_base(policy, n_per_prompt=10, num_steps=28, seed=0)
    return {k: float(v) for k, v in out.items() if k != "n_images"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="tmpo")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (the base is evaluated once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=Path, default=Path("runs/mini"))
    ap.add_argument("--out", type=Path, default=Path("results/mini"))
    ap.add_argument("--extra", nargs="*", default=[], help="further overrides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m experiments.mini_geneval", f"--method {args.method}", f"--steps {args.steps}",
                        "--seeds", *map(str, args.seeds), *(["--extra", *args.extra] if args.extra else [])])
    rows, base = [], {}
    for i, seed in enumerate(args.seeds):
        overrides = ["model=mini", "reward=geneval", f"method={args.method}", f"trainer.total_steps={args.steps}",
                     f"trainer.threads={args.threads}", f"trainer.seed={seed}", "trainer.checkpoint_every=10",
                     # the base model's eval is the same for every training seed (fixed eval noise): run it once
                     f"trainer.eval_base={'true' if i == 0 else 'false'}", *args.extra]
        out = run_cell(overrides, args.runs / f"{args.method}_{args.steps}_s{seed}")
        summary, trainer = out["summary"], out["trainer"]
        base = base or {n: summary[f"base/{n}"] for n in NAMES if f"base/{n}" in summary}
        with trainer.ema.applied():
            tags = per_tag_accuracy(trainer.policy)
        rows.append({"seed": seed, **{n: summary.get(n) for n in NAMES}, **{f"official/{t}": v for t, v in tags.items()}})
        if i == 0:
            with trainer.policy.reference():
                base.update({f"official/{t}": v for t, v in per_tag_accuracy(trainer.policy).items()})
            prompts = [t for t, _ in trainer.prompts.test()][::9][:6]
            sample_grid(trainer, prompts, 4, args.out / f"geneval_{args.method}_grid.png",
                        f"{args.method} on GenEval-mini, {args.steps} steps (seed {seed}): base (left) vs trained "
                        "(right), same initial noise")
        print(json.dumps(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    table: dict = {"method": args.method, "steps": args.steps, "seeds": args.seeds, "command": command}
    for n in [*NAMES, *(c for c in df.columns if c.startswith("official/"))]:
        table[n] = float(df[n].mean())
        table[f"{n}_std"] = float(df[n].std(ddof=1)) if len(df) > 1 else None
        if n in base:
            table[f"base/{n}"] = base[n]
    table["per_seed"] = rows
    (args.out / f"geneval_{args.method}.json").write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
