"""Run logging: ``metrics.jsonl`` (one line per step) and ``summary.json`` always; wandb optionally."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tmpo.checkpoint import write_json_atomic, write_text_atomic

_log = logging.getLogger(__name__)


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        v = float(v) if hasattr(v, "__float__") and not isinstance(v, (bool, int, str)) else v
        out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


def read_metrics_lines(path: Path, warn: bool = True) -> list[str]:
    """The complete rows of a ``metrics.jsonl``; a torn last line (a write killed midway) is dropped
    with a warning naming the file, any other unreadable line is an error."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                if warn:
                    _log.warning("%s: dropped its torn last line %d (%d characters; a write was interrupted): %r",
                                 path, i, len(line), line[:80])
                continue
            raise ValueError(f"{path}: line {i} is not valid JSON ({e}); only a torn last line can be repaired, "
                             "fix or delete that line to resume") from e
        rows.append(line)
    return rows


def wandb_names(labels: Mapping[str, Any], choices: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """wandb ``name``, ``group`` and ``tags`` of a run.

    A run of a paper table (``scale``/``table``/``protocol``/``row`` labels) takes the tables' names
    (:func:`tmpo.results.labels.wandb_identity`); any other run is grouped by ``<model>/<reward>/<method>``
    (the config group choices, e.g. ``mini/geneval/tmpo``) and named ``<group>/seed<k>``. The tags are the
    method, reward, model, ``seed<k>`` and the experiment, so a project filters by any of them.
    """
    from tmpo.results.labels import wandb_identity

    choices = dict(choices or {})
    method = choices.get("method") or labels.get("method")
    model = choices.get("model") or str(labels.get("model") or "").rsplit(".", 1)[-1]  # a class path: its name
    reward, seed = choices.get("reward"), labels.get("seed")
    if labels.get("ablation") not in (None, "", "full"):
        method = f"{method}-{labels['ablation']}"
    ident = wandb_identity(labels)
    if not ident:
        group = "/".join(str(x) for x in (model, reward, method) if x not in (None, ""))
        ident = {"name": f"{group}/seed{seed}", "group": group, "tags": []}
    extra = [str(x) for x in (method, reward, model, f"seed{seed}") if x not in (None, "")]
    if labels.get("experiment"):
        extra.append(f"experiment={labels['experiment']}")
    ident["tags"] = list(dict.fromkeys([*ident["tags"], *extra]))  # in order, without repeats
    return ident


class RunLogger:
    """Writes ``metrics.jsonl``/``summary.json`` in ``run_dir`` and mirrors to wandb when enabled.

    Args:
        run_dir: the run's directory.
        wandb: ``None`` (files only) or kwargs for ``wandb.init`` (``mode`` defaults to ``"offline"``,
            so no account is needed; set ``mode: online`` and ``project`` to sync). ``name``/``group``/
            ``tags`` given here win over :func:`wandb_names`.
        config: the resolved run config, stored with the wandb run.
        wandb_id: the id of the wandb run to continue (stored in the checkpoint), with ``resume="allow"``.
        labels: what the run is (``tmpo.results.labels.run_labels``; computed from ``config`` if None): in
            the wandb config and summary and in ``summary.json``.
        choices: the config group choices (``hydra.runtime.choices``: method, reward, model) for the names.

    wandb's x-axis is ``iteration`` (``define_metric``); the base model's eval is logged at iteration 0.
    """

    def __init__(self, run_dir: str | Path, wandb: dict | None = None, config: dict | None = None,
                 wandb_id: str | None = None, labels: Mapping[str, Any] | None = None,
                 choices: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rows = self.metrics_path.read_bytes().count(b"\n") if self.metrics_path.exists() else 0  # set exactly by resume_at/restart
        if labels is None and config is not None:
            from tmpo.results.labels import run_labels

            labels = run_labels(config)
        self.labels: dict[str, Any] = dict(labels or {})  # the same labels as summary.json: tables read either
        self._wandb = None
        if wandb is not None:
            import wandb as wandb_lib

            kw = {"mode": "offline", "dir": str(self.run_dir), **wandb_names(self.labels, choices), **dict(wandb)}
            if wandb_id:
                kw.update(id=wandb_id, resume="allow")  # a requeued job continues the same wandb run
            self._wandb = wandb_lib.init(config={**(config or {}), "labels": self.labels}, **kw)
            if hasattr(self._wandb, "define_metric"):
                self._wandb.define_metric("iteration")
                self._wandb.define_metric("*", step_metric="iteration")
        self.wandb_id: str | None = self._wandb.id if self._wandb is not None else None

    def resume_at(self, step: int, rows: int | None = None) -> None:
        """On resume, keep exactly what was logged up to the checkpoint: its first ``rows`` rows (recorded
        in the checkpoint), or for older checkpoints the rows with ``step <= step``."""
        lines = read_metrics_lines(self.metrics_path)
        if rows is None:
            keep = [ln for ln in lines if json.loads(ln).get("step", -1) <= step]
        else:
            if rows > len(lines):
                _log.warning("%s has %d rows but the checkpoint at step %d was written after row %d: rows were lost",
                             self.metrics_path, len(lines), step, rows)
            keep = lines[:rows]
        if len(keep) < len(lines):
            _log.warning("%s: dropped %d row(s) logged after the checkpoint at step %d", self.metrics_path,
                         len(lines) - len(keep), step)
        self._rewrite(keep)

    def restart(self) -> None:
        """A run restarted from step 0 (no checkpoint was written): drop the rows its first attempt logged."""
        lines = read_metrics_lines(self.metrics_path)
        if lines:
            _log.warning("%s: dropped %d row(s) of an attempt that stopped before its first checkpoint",
                         self.metrics_path, len(lines))
        self._rewrite([])

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (kept for callers of the older API)."""
        self.resume_at(step)

    def _rewrite(self, lines: list[str]) -> None:
        if self.metrics_path.exists() or lines:
            write_text_atomic("".join(ln + "\n" for ln in lines), self.metrics_path)
        self.rows = len(lines)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **_clean(metrics)}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows += 1
        if self._wandb is not None:
            self._wandb.log({**row, "iteration": step}, step=step)

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        """Log an image file to wandb (the file itself is already in the run dir)."""
        if self._wandb is not None:
            import wandb as wandb_lib

            self._wandb.log({key: wandb_lib.Image(str(path), caption=caption), "iteration": step}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        """``summary.json`` and the wandb summary: the final metrics and the run's labels."""
        clean = {**_clean(metrics), **self.labels}
        write_json_atomic(clean, self.run_dir / "summary.json", sort_keys=True)
        if self._wandb is not None:
            self._wandb.summary.update(clean)

    def finish(self, preempting: bool = False) -> None:
        """Close the wandb run; ``preempting`` tells wandb the run will be resumed (same id)."""
        if self._wandb is not None:
            if preempting and hasattr(self._wandb, "mark_preempting"):
                self._wandb.mark_preempting()
            self._wandb.finish()
            self._wandb = None
