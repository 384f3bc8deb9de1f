"""Run logging: ``metrics.jsonl`` (one line per step) and ``summary.json`` always; wandb optionally."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        v = float(v) if hasattr(v, "__float__") and not isinstance(v, (bool, int, str)) else v
        out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


class RunLogger:
    """Writes ``metrics.jsonl``/``summary.json`` in ``run_dir`` and mirrors to wandb when enabled.

    Args:
        run_dir: the run's directory.
        wandb: ``None`` (files only) or kwargs for ``wandb.init`` (``mode`` defaults to ``"offline"``,
            so no account is needed; set ``mode: online`` and ``project`` to sync).
        config: the resolved run config, stored with the wandb run.
    """

    def __init__(self, run_dir: str | Path, wandb: dict | None = None, config: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        if wandb is not None:
            import wandb as wandb_lib

            kw = {"mode": "offline", "dir": str(self.run_dir), **dict(wandb)}
            self._wandb = wandb_lib.init(config=config, **kw)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpointed step so the file continues exactly."""
        if not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", -1) <= step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **_clean(metrics)}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        clean = _clean(metrics)
        (self.run_dir / "summary.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
        if self._wandb is not None:
            self._wandb.summary.update(clean)

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
