"""Hand-made run directories (config.yaml, metrics.jsonl, summary.json as tmpo.run writes them) for the
tables aggregator's tests, with values chosen so means and stds are known by hand."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tmpo.results.layout import ABLATION_ROWS, METHOD_ROWS

STEPS = 4
BASE = {"geneval": 0.509, "ocr": 0.048, "hpsv21": 27.0, "imagereward": 33.0, "pickscore": 22.8, "lgmd": -0.633,
        "cosdiv": 0.542}
TASK = {"geneval": "geneval", "ocr": "ocr", "pickscore": None, "joint": None}


def row_value(row_index: int, seed: int) -> float:
    """Metric value of (row, seed): 0.1 * row + {0.5, 0.6, 0.7}[seed] -> mean 0.1 * row + 0.6, std 0.1."""
    return round(0.1 * row_index + 0.5 + 0.1 * seed, 10)


def iter_times(row_index: int, seed: int) -> list[float]:
    """Per-iteration seconds: mean 1 + row + seed (so 3 seeds: mean 2 + row, std 1); steps differ so the
    mean is a real average."""
    m = 1.0 + row_index + seed
    return [m - 0.5, m + 0.5, m - 0.25, m + 0.25]


def write_run(root: Path, *, table: str, protocol: str, row: str, seed: int, method: str, ablation: str = "full",
              value: float = 0.5, times: list[float] | None = None, scale: str = "mini", git: str = "c0ffee",
              finished: bool = True, eval_base: bool = True, lr: float = 3e-4, total_steps: int = STEPS,
              experiment: str | None = None, dirname: str | None = None) -> Path:
    """One run directory under ``root/<experiment>/<row>/seed<k>``; every metric of the run = ``value``."""
    experiment = experiment or f"{table}_{protocol}"
    run = root / (dirname or f"{experiment}/{row}/seed{seed}")
    run.mkdir(parents=True)
    tags = {"scale": scale, "table": table, "protocol": protocol, "row": row, "experiment": f"{scale}/{experiment}"}
    config = {
        "method": method, "ablation": ablation, "model": {"_target_": "tmpo.policies.mini.MiniPolicy", "arch": "dit"},
        "reward": {"fn": {"_target_": f"reward.{protocol}"}}, "eval": {"samples_per_prompt": 10, "num_steps": 28},
        "trainer": {"total_steps": total_steps, "seed": seed, "lr": lr, "prompts_per_step": 4, "threads": 1,
                    "eval_base": eval_base},
        "tags": tags, "run_dir": str(run), "resume": None, "logger": None,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    times = times or [2.0] * total_steps
    rows = [{"step": 0, **{f"base/{k}": v for k, v in BASE.items()}}] if eval_base else []
    done = total_steps if finished else total_steps // 2
    rows += [{"step": s, "iter_time_s": times[s - 1], "train/reward_mean": 0.1 * s + value, "train/loss": 1.0,
              "diag/x": 3.0} for s in range(1, done + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        metrics = {k: value for k in ("hpsv21", "imagereward", "pickscore", "lgmd", "cosdiv")}
        if TASK[protocol]:
            metrics[TASK[protocol]] = value
        summary = {**metrics, "steps": float(total_steps), "iter_time_s": 99.0, "reward": value,
                   **({f"base/{k}": v for k, v in BASE.items()} if eval_base else {}),
                   "method": method, "ablation": ablation, "model": config["model"]["_target_"], "seed": seed,
                   **tags, "git_commit": git, "git_dirty": False}
        (run / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return run


def write_block(root: Path, table: str, protocol: str, seeds=(0, 1, 2), skip: tuple[str, ...] = (), **kw) -> None:
    """Every row of a block: row i's metrics are row_value(i, seed), its times iter_times(i, seed); base
    evaluated on the first seed only (as run_suite does)."""
    rows = ABLATION_ROWS[1:] if table == "table2" else METHOD_ROWS
    for i, row in enumerate(rows):
        if row.key in skip:
            continue
        for seed in seeds:
            write_run(root, table=table, protocol=protocol, row=row.key, seed=seed, method=row.method,
                      ablation=row.ablation, value=row_value(i, seed), times=iter_times(i, seed),
                      eval_base=seed == seeds[0], **kw)


def write_mini_suite(root: Path, **kw) -> None:
    for table, protocol in (("table1", "geneval"), ("table1", "ocr"), ("table1", "pickscore"), ("table2", "pickscore"),
                            ("table5", "joint"), ("table6", "pickscore")):
        write_block(root, table, protocol, **kw)
