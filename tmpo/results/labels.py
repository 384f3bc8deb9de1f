"""Run labels: what a run is (table, protocol, row, scale, experiment, seed, method) and which code ran it.

The same labels go into a run's ``summary.json`` (``tmpo.run.train``) and into its wandb run's name,
group, tags and config (``tmpo.logger.RunLogger``), so both result readers find the run.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Labels an experiment config sets (conf/experiment/**, under ``tags``) and the tables aggregator keys on.
TABLE_LABELS = ("scale", "table", "protocol", "row", "experiment")
REPO_DIR = Path(__file__).resolve().parents[2]


def git_state(repo: Path = REPO_DIR) -> dict[str, Any]:
    """``{"git_commit": <HEAD sha or "unknown">, "git_dirty": <tracked files modified?, or None>}``.

    A checkout with uncommitted changes to tracked files is ``git_dirty: true``: the commit then does not
    fully describe the code that ran.
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit or "unknown", "git_dirty": None if status is None else bool(status)}


def run_labels(config: Mapping[str, Any], git: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The labels of a run from its resolved config (a plain dict): method, ablation, model class, seed,
    every ``tags`` entry (an experiment's table/protocol/row/scale/experiment) and the git state
    (``git`` given, or read from this checkout)."""
    trainer = config.get("trainer") or {}
    model = config.get("model") or {}
    labels: dict[str, Any] = {
        "method": config.get("method"),
        "ablation": config.get("ablation"),
        "model": model.get("_target_") if isinstance(model, Mapping) else None,
        "seed": trainer.get("seed") if isinstance(trainer, Mapping) else None,
    }
    labels.update(dict(config.get("tags") or {}))
    labels.update(git_state() if git is None else dict(git))
    return labels


def wandb_identity(labels: Mapping[str, Any]) -> dict[str, Any]:
    """wandb ``name``/``group``/``tags`` for a labelled run (``{}`` for a run outside an experiment).

    group = ``<scale>/<table>_<protocol>/<row>`` (the seeds of one table row), name = group + ``/seed<k>``.
    """
    if any(labels.get(k) in (None, "") for k in ("scale", "table", "protocol", "row")):
        return {}
    group = f"{labels['scale']}/{labels['table']}_{labels['protocol']}/{labels['row']}"
    seed = labels.get("seed")
    tags = [str(labels[k]) for k in ("scale", "table", "protocol", "row")] + [f"seed{seed}"]
    if labels.get("experiment"):
        tags.append(f"experiment={labels['experiment']}")
    return {"name": f"{group}/seed{seed}", "group": group, "tags": tags}
