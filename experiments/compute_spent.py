"""Core-hours that recorded runs spent training: their per-iteration wall-clock times, summed.

    python -m experiments.compute_spent results/mini/records results/mini/lr_pilot results/mini/pilot

Runs are read as ``make tables`` reads them (:class:`tmpo.results.runs.LocalRuns`), and an unfinished one
is refused the same way. Each run trains on one thread, so its seconds are core-seconds. A run found under
several roots (the suite's seed-0 records are copies of the learning-rate pilot's picks) is counted once,
under the first root that has it. Evaluations are not included: the history does not time them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from tmpo.results.runs import LocalRuns

LABELS = ("table", "protocol", "row", "seed", "git_commit")


def training_runs(roots: list[Path]) -> pd.DataFrame:
    """One line per distinct run under ``roots``: its root, labels, iterations and training core-hours.

    Two runs are the same when their labels and their summed iteration times agree."""
    lines = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory of run records (pass e.g. results/mini/records)")
        for run in LocalRuns(root).records():
            if not run.finished:
                raise ValueError(f"{run.run_id} is not a finished training run: {run.why_unfinished}")
            seconds = float(run.history.iter_time_s.sum())
            lines.append({"root": str(root), **{k: run.labels.get(k) for k in LABELS},
                          "steps": len(run.history), "core_h": seconds / 3600})
    runs = pd.DataFrame(lines, columns=["root", *LABELS, "steps", "core_h"])
    return runs.drop_duplicates(subset=[*LABELS, "core_h"], keep="first").reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", type=Path, help="directories holding run records (config.yaml, "
                                                        "metrics.jsonl, summary.json)")
    args = ap.parse_args(argv)
    runs = training_runs(args.roots)
    per_root = runs.groupby("root", sort=False).agg(runs=("core_h", "size"), core_hours=("core_h", "sum"))
    print(per_root.round(2).to_string())
    total = runs.core_h.sum()
    print(f"\n{len(runs)} distinct runs: {total:.2f} core-hours of training = {total / 2:.2f} h on two one-thread lanes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
