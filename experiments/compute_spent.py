"""Core-hours that recorded runs spent training: iteration time x iterations, summed over ``summary.json`` files.

    python -m experiments.compute_spent results/mini/records results/mini/lr_pilot results/mini/pilot

Each run trains on one thread, so its seconds are core-seconds. A run found under several roots (the suite's
seed-0 records are copies of the learning-rate pilot's picks) is counted once, under the first root that has
it. Evaluations are not included: a run's summary does not time them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

# What makes two summaries the same run: its labels and its measured iteration time.
RUN_IDENTITY = ("table", "protocol", "row", "seed", "git_commit", "iter_time_s")


def training_runs(roots: list[Path]) -> pd.DataFrame:
    """One line per distinct run under ``roots``: its root, labels, iterations and training core-hours."""
    lines = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory of run records (pass e.g. results/mini/records)")
        for path in sorted(root.rglob("summary.json")):
            summary = json.loads(path.read_text())
            missing = [k for k in ("iter_time_s", "steps") if summary.get(k) is None]
            if missing:
                raise ValueError(f"{path} has no {', '.join(missing)}: not a finished training run's summary")
            lines.append({"root": str(root), **{k: summary.get(k) for k in RUN_IDENTITY},
                          "steps": summary["steps"], "core_h": summary["iter_time_s"] * summary["steps"] / 3600})
    runs = pd.DataFrame(lines, columns=["root", *RUN_IDENTITY, "steps", "core_h"])
    return runs.drop_duplicates(subset=list(RUN_IDENTITY), keep="first").reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", type=Path, help="directories holding run records (summary.json files)")
    args = ap.parse_args(argv)
    runs = training_runs(args.roots)
    per_root = runs.groupby("root", sort=False).agg(runs=("core_h", "size"), core_hours=("core_h", "sum"))
    print(per_root.round(2).to_string())
    total = runs.core_h.sum()
    print(f"\n{len(runs)} distinct runs: {total:.2f} core-hours of training = {total / 2:.2f} h on two one-thread lanes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
