"""Reading runs: one record per training run, from local run directories or from a wandb project.

Both sources implement :class:`RunSource` (``records() -> list[RunRecord]``), so the aggregator never
knows where a run came from:

* :class:`LocalRuns` -- every run directory under a root (``config.yaml`` + ``metrics.jsonl`` +
  ``summary.json``, as ``python -m tmpo.run`` writes them, or the slim copies the suite launcher commits
  under ``results/<scale>/records/``).
* :class:`WandbRuns` -- a wandb project through its public API (``wandb.Api().runs(path, filters)``);
  labels from the run's config (``labels``, written by :class:`tmpo.logger.RunLogger`), final metrics
  from its summary metrics, iteration times and training rewards from its history.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import yaml

from tmpo.checkpoint import write_text_atomic
from tmpo.results.labels import run_labels

HISTORY_KEYS = ("step", "iter_time_s", "train/reward_mean")  # what tables and Fig. 4 read per iteration
_KEEP_KEYS = ("step", "iter_time_s", "train/reward_mean", "train/reward_std")
_UNKNOWN_GIT = {"git_commit": "unknown", "git_dirty": None}


@dataclass
class RunRecord:
    """One training run.

    ``history``: one row per training iteration (``step``, ``iter_time_s``, ``train/reward_mean``).
    ``finished``: the run reached ``trainer.total_steps`` and wrote its final evaluation.
    """

    run_id: str
    labels: dict[str, Any]
    config: dict[str, Any]
    summary: dict[str, Any] | None
    history: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(HISTORY_KEYS)))
    finished: bool = False
    why_unfinished: str = ""


class RunSource(Protocol):
    def records(self) -> list[RunRecord]: ...


def total_steps(config: Mapping[str, Any]) -> int | None:
    trainer = config.get("trainer") or {}
    return int(trainer["total_steps"]) if trainer.get("total_steps") is not None else None


def history_frame(rows: Iterable[Mapping[str, Any]], where: str) -> pd.DataFrame:
    """Training rows (those with an ``iter_time_s``) as a frame sorted by step; a repeated step is an error
    (a resumed run's log must continue, not repeat)."""
    train = [{k: r.get(k) for k in HISTORY_KEYS} for r in rows if r.get("iter_time_s") is not None]
    df = pd.DataFrame(train, columns=list(HISTORY_KEYS))
    if df.empty:
        return df
    df = df.astype({"step": int, "iter_time_s": float, "train/reward_mean": float})
    repeated = df.step[df.step.duplicated()].unique()
    if len(repeated):
        raise ValueError(f"{where}: training steps {sorted(repeated.tolist())[:5]} are logged twice; "
                         "the log of a resumed run must continue its checkpoint, not repeat it")
    return df.sort_values("step", ignore_index=True)


def check_finished(config: Mapping[str, Any], summary: Mapping[str, Any] | None, history: pd.DataFrame) -> str:
    """Why the run is unfinished ("" if it is finished)."""
    steps = total_steps(config)
    if summary is None:
        return "no final summary (still running, crashed, or killed)"
    if steps is None:
        return "its config has no trainer.total_steps"
    if summary.get("steps") is None or int(summary["steps"]) != steps:
        return f"its summary is at step {summary.get('steps')} of {steps}"
    if history.empty or history.step.tolist() != list(range(1, steps + 1)):
        return f"its history holds {len(history)} of the {steps} training iterations"
    return ""


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (blank lines skipped); a line that is not JSON is an error naming it."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i} is not valid JSON ({e})") from e
    return rows


class LocalRuns:
    """Every run directory (one holding ``config.yaml``) under ``root``; hidden and ``wandb`` dirs skipped."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def run_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"no run directory {self.root}: run the suite first (make suite), or pass --runs <dir> "
                                    "or --source wandb")
        out = []
        for cfg in sorted(self.root.rglob("config.yaml")):
            rel = cfg.relative_to(self.root).parts[:-1]
            if any(p.startswith(".") or p == "wandb" for p in rel):
                continue
            out.append(cfg.parent)
        return out

    def read(self, run_dir: Path) -> RunRecord:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        rows = read_jsonl(metrics_path) if metrics_path.exists() else []
        history = history_frame(rows, str(metrics_path))
        labels = run_labels(config, git=_UNKNOWN_GIT)
        if summary is not None:  # train() merged the labels (with the git state) into the summary
            labels.update({k: summary[k] for k in labels if k in summary})
        why = check_finished(config, summary, history)
        return RunRecord(str(run_dir), labels, config, summary, history, finished=not why, why_unfinished=why)

    def records(self) -> list[RunRecord]:
        return [self.read(d) for d in self.run_dirs()]


class WandbRuns:
    """Runs of a wandb project, through ``wandb.Api`` (or any object with the same ``runs`` method).

    Args:
        path: ``<entity>/<project>``.
        filters: a wandb (MongoDB-style) run filter, e.g. ``{"tags": {"$in": ["paper"]}}`` (the run's tags
            are its scale, table, protocol, row and seed: :func:`tmpo.results.labels.wandb_identity`).
        api: defaults to ``wandb.Api()``; tests pass a local fake with the same interface.
    """

    def __init__(self, path: str, filters: Mapping[str, Any] | None = None, api: Any = None) -> None:
        if path.count("/") != 1 or not all(path.split("/")):
            raise ValueError(f"wandb path {path!r} must be <entity>/<project>")
        self.path, self.filters, self._api = path, dict(filters or {}), api

    def _runs(self) -> Iterable[Any]:
        api = self._api
        if api is None:
            import wandb

            api = wandb.Api(timeout=60)
        return api.runs(self.path, filters=self.filters or None)

    def read(self, run: Any) -> RunRecord:
        config = dict(run.config)
        labels = dict(config.pop("labels", None) or run_labels(config, git=_UNKNOWN_GIT))
        summary = dict(run.summary_metrics)
        history = history_frame(run.scan_history(keys=list(HISTORY_KEYS)), f"wandb run {self.path}/{run.id}")
        why = "" if run.state == "finished" else f"its wandb state is {run.state!r}"
        why = why or check_finished(config, summary or None, history)
        return RunRecord(f"wandb:{self.path}/{run.id}", labels, config, summary or None, history,
                         finished=not why, why_unfinished=why)

    def records(self) -> list[RunRecord]:
        return [self.read(r) for r in self._runs()]


def slim_metrics(lines: Iterable[str]) -> list[str]:
    """The rows of a ``metrics.jsonl`` cut to what the tables and figures read: per iteration ``step``,
    ``iter_time_s`` and the training reward; evaluation rows (``eval/*``, ``base/*``) whole."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        keep = {k: v for k, v in row.items() if k in _KEEP_KEYS or k.startswith(("eval/", "base/"))}
        if set(keep) - {"step"}:
            out.append(json.dumps(keep))
    return out


def copy_run(src: Path, dst: Path) -> Path:
    """Copy a finished run's ``config.yaml``, ``summary.json`` and slimmed ``metrics.jsonl`` to ``dst``
    (the committed record of a run: kilobytes, not the checkpoints)."""
    record = LocalRuns(src.parent).read(src)
    if not record.finished:
        raise ValueError(f"{src} is not finished ({record.why_unfinished}); only finished runs are copied")
    dst.mkdir(parents=True, exist_ok=True)
    write_text_atomic((src / "config.yaml").read_text(), dst / "config.yaml")
    write_text_atomic("".join(ln + "\n" for ln in slim_metrics((src / "metrics.jsonl").read_text().splitlines())),
                      dst / "metrics.jsonl")
    write_text_atomic((src / "summary.json").read_text(), dst / "summary.json")  # last: marks the copy complete
    return dst
