"""The short table a run prints at its end: each eval metric before and after training, the change, the
evaluation's own noise, what was evaluated, the iteration time and where the run was written.

The numbers come from the run's ``summary.json`` (``<metric>``, ``base/<metric>``, ``noise/<metric>``,
``eval_weights``/``ema_updates``/``ema_initial_share``, ``iter_time_s``, ``steps``); nothing is recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_SKIP_PREFIXES = ("base/", "noise/", "train/", "occ_")  # per-mode occupancies: too many rows for a summary
_NOT_METRICS = {"iter_time_s", "steps", "eval_weights", "ema_updates", "ema_initial_share", "n_modes", "seed"}
RUN_FILES = ("summary.json", "metrics.jsonl", "samples.png", "run.log", "checkpoints/latest.pt")


def table_metrics(summary: Mapping[str, Any]) -> list[str]:
    """The eval metrics of a summary in evaluation order (task suite first): numeric top-level keys."""
    return [k for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not k.startswith(_SKIP_PREFIXES) and k not in _NOT_METRICS and "/" not in k]


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _signed(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else ("+" if v >= 0 else "") + _num(v)


def evaluated_sentence(summary: Mapping[str, Any], ema_decay: float | None = None, ema_every: int | None = None) -> str:
    """Say which weights the final evaluation scored (``Trainer.evaluated_weights``)."""
    which = summary.get("eval_weights")
    updates = int(summary.get("ema_updates") or 0)
    cadence = f" (decay {ema_decay:g} every {ema_every} iterations)" if ema_decay is not None and ema_every else ""
    if which == "live":
        return (f"the live weights: the EMA{cadence} had no update in {int(summary.get('steps', 0))} iterations, "
                "so it still equals the untrained model")
    if which == "ema":
        share = summary.get("ema_initial_share")
        note = f"; {share:.0%} of it is still the untrained model" if share is not None and share >= 0.005 else ""
        return f"the EMA weights{cadence}: {updates} update{'s' if updates != 1 else ''}{note}"
    return "the untrained model" if which == "initial" else "unknown (no eval_weights in the summary)"


def format_table(summary: Mapping[str, Any], run_dir: str | Path, title: str = "",
                 ema_decay: float | None = None, ema_every: int | None = None) -> str:
    """The end-of-run table as text (the JSON stays in ``summary.json``)."""
    rows = [("metric", "base", "trained", "change", "noise")]
    first_gain = None
    for k in table_metrics(summary):
        trained, base, noise = summary.get(k), summary.get(f"base/{k}"), summary.get(f"noise/{k}")
        change = trained - base if isinstance(base, (int, float)) and isinstance(trained, (int, float)) else None
        rows.append((k, _num(base), _num(trained), _signed(change), _num(noise)))
        if first_gain is None and change is not None and noise:
            first_gain = (k, change, noise)
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [title] if title else []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if first_gain is not None:
        k, change, noise = first_gain
        lines.append(f"{k} changed by {_signed(change)} = {change / noise:+.1f} x its eval noise")
    lines.append("noise: sd of one evaluation over eval seeds (per-prompt spread of its images); - = not a per-image mean")
    lines.append(f"evaluated: {evaluated_sentence(summary, ema_decay, ema_every)}")
    steps, it = summary.get("steps"), summary.get("iter_time_s")
    if it is not None and math.isfinite(it):
        lines.append(f"iteration time: {it:.2f} s (mean over this session's iterations; {int(steps or 0)} in all)")
    run_dir = Path(run_dir)
    present = [f for f in RUN_FILES if (run_dir / f).exists()]
    lines.append(f"run directory: {run_dir.resolve()}" + (f"  ({', '.join(present)})" if present else ""))
    return "\n".join(lines)
