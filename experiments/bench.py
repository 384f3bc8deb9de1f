"""Speed benchmark of the shared loop: iteration time, rollout time and NFE per method (``make bench``).

    python -m experiments.bench [--model toy] [--steps 20]

Writes ``results/bench/<model>.csv`` (one row per method) and prints it. Timings are wall-clock on
whatever machine runs it (the file records the host and thread count); they are not asserted by tests.
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tmpo.run import build_trainer, compose_config

CELLS = {
    "tmpo": ["method=tmpo"],
    "tmpo_no_tree": ["method=tmpo", "ablation=no_tree"],
    "flow_grpo": ["method=flow_grpo"],
    "mixgrpo": ["method=mixgrpo"],
    "treegrpo": ["method=treegrpo"],
    "gardo": ["method=gardo"],
}


def bench(overrides: list[str], steps: int, warmup: int = 2) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        cfg = compose_config([f"run_dir={d}", "logger=none", "trainer.progress=false", *overrides])
        trainer = build_trainer(cfg)
        rows = [trainer.train_step(s) for s in range(warmup + steps)][warmup:]
    return {
        "iter_time_s": float(np.mean([r["iter_time_s"] for r in rows])),
        "iter_time_s_std": float(np.std([r["iter_time_s"] for r in rows])),
        "rollout_s": float(np.mean([r["time/rollout_s"] for r in rows])),
        "nfe_per_prompt": float(np.mean([r["train/nfe"] for r in rows])),
        "edges_per_prompt": float(np.mean([r["train/edges_per_prompt"] for r in rows])),
        "group_size": float(rows[-1]["train/group_size"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, overrides in CELLS.items():
        reward = {"toy": "gmm_modes"}.get(args.model, "geneval")
        rows.append({"method": name, **bench([f"model={args.model}", f"reward={reward}", f"trainer.threads={args.threads}", *overrides], args.steps)})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    df["host"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    df["threads"] = torch.get_num_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / f"{args.model}.csv", index=False, float_format="%.5f")
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
