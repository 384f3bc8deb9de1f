"""The mini scale's learning-rate factor per method (``lr_scales`` in conf/scale/mini.yaml), from its pilot.

    python -m experiments.mini_lr_pilot       # markdown table from the committed records

The mini models train a LoRA r=16 on a 2M-parameter DiT, for which the paper's learning rates (App.
D.4/D.5) are too small to move anything in a few hundred iterations; the mini scale multiplies each
method's paper lr by a factor. The rule: every Table 1 method runs the GenEval block (300 iterations,
seed 0) at factors 1, 3 and 10, and keeps the factor with the highest held-out GenEval (partial credit,
the paper's eval score). A factor-10 point is the suite's own seed-0 record (``results/mini/records``)
where that run used 10, otherwise ``results/mini/lr_pilot/x10``; factors 1 and 3 live in
``results/mini/lr_pilot/x{1,3}`` (``run_suite ... --extra trainer.lr_scale=<x>``, README "Learning rate
per method").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FACTORS = (1.0, 3.0, 10.0)
METHODS = ("tmpo", "treegrpo", "mixgrpo", "gardo", "flow_grpo")  # Table 1's rows
BLOCK = "table1_geneval"
METRIC = "geneval"


def _record(run: Path, factor: float) -> dict | None:
    """The run's summary if it exists and trained at ``factor``."""
    if not (run / "summary.json").exists():
        return None
    config = yaml.safe_load((run / "config.yaml").read_text())
    if float(config["trainer"]["lr_scale"]) != factor:
        return None
    return json.loads((run / "summary.json").read_text())


def pilot_points(results: Path = REPO / "results" / "mini") -> dict[str, dict[float, dict]]:
    """``{method: {factor: summary}}`` for every pilot run found."""
    points: dict[str, dict[float, dict]] = {}
    for method in METHODS:
        for factor in FACTORS:
            candidates = [results / "lr_pilot" / f"x{factor:g}" / "mini" / "records" / BLOCK / method / "seed0"]
            if factor == 10.0:
                candidates.append(results / "records" / BLOCK / method / "seed0")
            found = [s for s in (_record(run, factor) for run in candidates) if s is not None]
            if found:
                points.setdefault(method, {})[factor] = found[0]
    return points


def chosen_factor(points: dict[float, dict]) -> float | None:
    """The factor with the highest held-out GenEval, or None until all of :data:`FACTORS` have run."""
    if set(points) != set(FACTORS):
        return None
    return max(FACTORS, key=lambda f: points[f][METRIC])


def configured_factors() -> dict[str, float]:
    """``lr_scales`` as conf/scale/mini.yaml sets them."""
    return {k: float(v) for k, v in yaml.safe_load((REPO / "conf" / "scale" / "mini.yaml").read_text())["lr_scales"].items()}


def table(results: Path = REPO / "results" / "mini") -> str:
    """Markdown: per method, held-out GenEval (official in brackets) at each factor, the pick, the config."""
    points = pilot_points(results)
    configured = configured_factors()
    base = next((s for p in points.values() for s in p.values() if f"base/{METRIC}" in s), None)
    lines = [f"Base model: GenEval {base[f'base/{METRIC}']:.3f} ({base['base/geneval_official']:.3f}), eval noise "
             f"{base[f'base/noise/{METRIC}']:.3f}" if base else "Base model: not evaluated yet", "",
             "| method | x1 | x3 | x10 | pick | conf/scale/mini.yaml |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        p = points.get(method, {})
        cells = [f"{p[f][METRIC]:.3f} ({p[f]['geneval_official']:.3f})" if f in p else "—" for f in FACTORS]
        pick = chosen_factor(p)
        lines.append(f"| {method} | {' | '.join(cells)} | {'pending' if pick is None else f'x{pick:g}'} | "
                     f"x{configured[method]:g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO / "results" / "mini")
    args = parser.parse_args(argv)
    print(table(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
