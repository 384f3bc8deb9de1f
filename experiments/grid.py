"""Run a grid of (cell, seed) configs in-process, resumably, and collect their summaries.

A run whose ``summary.json`` exists is skipped, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from tmpo.run import build_trainer, compose_config


def run_cell(overrides: Sequence[str], run_dir: Path) -> dict:
    """Train one config (or reuse a finished run) and return its summary plus the final EMA policy."""
    summary_path = run_dir / "summary.json"
    # resume=auto: a finished run is reused, an interrupted one continues from its checkpoint
    cfg = compose_config([f"run_dir={run_dir}", "logger=none", "trainer.progress=false", "resume=auto", *overrides])
    trainer = build_trainer(cfg)
    if summary_path.exists():
        trainer.load(run_dir / "checkpoints" / "latest.pt")
        return {"summary": json.loads(summary_path.read_text()), "trainer": trainer}
    summary = trainer.run()  # writes summary.json
    return {"summary": summary, "trainer": trainer}


def run_grid(
    cells: Mapping[str, Sequence[str]],
    seeds: Sequence[int],
    runs_dir: Path,
    on_run=None,
) -> pd.DataFrame:
    """Every cell x seed; returns one row per run (``cell``, ``seed`` and every summary metric).

    ``on_run(cell, seed, trainer)`` is called after each run (e.g. to draw samples for a figure).
    """
    rows = []
    for cell, overrides in cells.items():
        for seed in seeds:
            t0 = time.perf_counter()
            out = run_cell([*overrides, f"trainer.seed={seed}"], runs_dir / f"{cell}_s{seed}")
            if on_run is not None:
                with torch.no_grad():
                    on_run(cell, seed, out["trainer"])
            rows.append({"cell": cell, "seed": seed, **out["summary"]})
            print(f"{cell:>24s} seed {seed}: reward {out['summary'].get('reward', float('nan')):.3f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return pd.DataFrame(rows)


def mean_std_table(df: pd.DataFrame, metrics: Sequence[str], by: str = "cell") -> pd.DataFrame:
    """``<metric>`` (mean over seeds) and ``<metric>_std`` columns per group, plus ``n_seeds``."""
    g = df.groupby(by, sort=False)
    out = pd.DataFrame({"n_seeds": g.size()})
    for m in metrics:
        out[m] = g[m].mean()
        out[f"{m}_std"] = g[m].std(ddof=1)
    return out.reset_index()
