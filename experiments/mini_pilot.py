"""The mini suite's pilot check (conf/experiment/mini/_common.yaml): does TMPO's task metric, after a
block's iterations, exceed the untouched model's by more than twice the evaluation's own noise?

    python -m experiments.mini_pilot          # markdown table from the committed runs

Reads TMPO seed 0 of every block in ``results/mini/records`` and the longer probes in
``results/mini/pilot`` (their evaluations every 60-75 iterations), and prints, per block and
evaluation: the task metric of the base and of the trained (EMA) model, the change, the base
evaluation's noise (sd over eval seeds, :mod:`tmpo.metrics.noise`) and the verdict.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from tmpo.results.runs import read_jsonl

REPO = Path(__file__).resolve().parent.parent
# The column each block's table reports as its task metric (Table 1's PickScore block: DrawBench PickScore).
TASK_METRIC = {"geneval": "geneval", "ocr": "ocr", "pickscore": "pickscore", "joint": "pickscore"}
JOINT_ALSO = ("hpsv21", "imagereward")


def _evals(summary: dict, rows: list[dict]) -> list[dict]:
    """A run's evaluations from its summary and metrics rows: ``step`` and metric values (``eval/`` prefix
    dropped), the base first and the final one last."""
    base = {"step": 0, **{k[5:]: v for k, v in summary.items() if k.startswith("base/")}}
    evals = [{"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
             for r in rows if any(k.startswith("eval/") for k in r)]
    last = {"step": int(summary["steps"]), **{k: v for k, v in summary.items() if "/" not in k or k.startswith("noise/")}}
    if not evals or evals[-1]["step"] != last["step"]:
        evals.append(last)
    return [base, *evals]


def pilot_lines(run: Path, label: str) -> list[str]:
    """One markdown line per evaluation after the base, per checked metric."""
    summary = json.loads((run / "summary.json").read_text())
    protocol = summary.get("protocol", "")
    metrics = [TASK_METRIC[protocol], *(JOINT_ALSO if protocol == "joint" else ())]
    base, *evals = _evals(summary, read_jsonl(run / "metrics.jsonl"))
    lines = []
    for ev in evals:
        for m in metrics:
            noise = base.get(f"noise/{m}")
            change = ev[m] - base[m]
            verdict = "pass" if noise is not None and change > 2 * noise else "no"
            lines.append(f"| {label} | {m} | {ev['step']} | {base[m]:.4g} | {ev[m]:.4g} | {change:+.3g} | "
                         f"{noise:.2g} | {verdict} |")
    return lines


def label(run: Path) -> str:
    """``<block> (<iterations> it[, lr_scale <x>])`` from the run's config (lr_scale shown where not the mini 10)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    block = cfg["tags"]["experiment"].split("/")[-1]
    lr = "" if cfg["trainer"].get("lr_scale") == 10.0 else f", lr_scale {cfg['trainer']['lr_scale']:g}"
    return f"{block} ({cfg['trainer']['total_steps']} it{lr})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=REPO / "results" / "mini")
    args = ap.parse_args(argv)
    print("| block (iterations, settings) | metric | after iteration | base | TMPO | change | base noise | > 2x noise |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [*sorted(args.root.glob("records/*/tmpo/seed0")), *sorted((args.root / "pilot").glob("*"))]
    for run in runs:
        print("\n".join(pilot_lines(run, label(run))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
