"""Deciding, before anything is written, whether a run starts fresh, continues a checkpoint or is done.

``resume`` (top-level config key):

* ``null`` -- a fresh run; refused if ``run_dir`` already holds one (metrics rows or a checkpoint),
  which would otherwise get duplicate rows and an overwritten checkpoint.
* ``auto`` -- continue ``run_dir``'s own last checkpoint if there is one, else start (dropping rows of
  an attempt that died before its first checkpoint). What a requeued job passes.
* ``<run dir>`` or ``<run dir>/checkpoints/latest.pt`` -- continue that run in that directory.

A resumed run must have the configuration its checkpoint was written with: any difference is refused
except :data:`ALLOWED_CHANGES`; what was used is recorded (``config.yaml`` and a line per resume in
``resumes.jsonl``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmpo.checkpoint import CHECKPOINT_DIR, LATEST, clean_stray_temporaries, load_checkpoint, write_text_atomic
from tmpo.config import ConfigError, resume_run_dir
from tmpo.logger import read_metrics_lines

_log = logging.getLogger(__name__)

# Keys that may differ from the checkpoint's config, and what changing them does.
ALLOWED_CHANGES = {
    "trainer.total_steps": "extends (or ends earlier) the run: from the resumed step on, the cosine lr schedule "
                           "and a branching curriculum with curriculum_steps=null follow the new total",
    "trainer.eval_every": "evaluation cadence only",
    "trainer.checkpoint_every": "checkpoint cadence only",
    "trainer.progress": "progress bar only",
    "trainer.threads": "CPU threads (float sums may differ in the last bits)",
    "trainer.parent_chunk": "memory knob (float sums may differ in the last bits)",
}
BOOKKEEPING = ("run_dir", "resume", "logger", "tags")  # where and how a run is recorded, not what it computes
IDENTITY = ("method", "ablation", "model._target_", "objective._target_", "sampler._target_")


@dataclass
class RunPlan:
    """What :func:`plan_run` decided. ``mode``: fresh | restart | resume | finished."""

    run_dir: Path
    mode: str
    checkpoint: Path | None = None
    state: dict[str, Any] | None = None
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    added: dict[str, Any] = field(default_factory=dict)  # keys the checkpoint's code did not have

    @property
    def step(self) -> int:
        return int(self.state["step"]) if self.state else 0

    @property
    def wandb_id(self) -> str | None:
        return (self.state or {}).get("wandb_run_id")

    @property
    def summary(self) -> dict[str, Any] | None:
        """The finished run's summary (from its checkpoint, else its summary.json)."""
        if self.state and self.state.get("summary") is not None:
            return dict(self.state["summary"])
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def holds_run(run_dir: Path) -> str | None:
    """Why ``run_dir`` already holds a run (metrics rows or a checkpoint), or ``None``."""
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        found.append(f"metrics.jsonl ({sum(1 for ln in metrics.read_text().splitlines() if ln.strip())} rows)")
    if (run_dir / CHECKPOINT_DIR / LATEST).exists():
        found.append(f"{CHECKPOINT_DIR}/{LATEST}")
    return ", ".join(found) or None


def resume_dir(resume: str) -> Path:
    """The run directory that ``resume=<path>`` continues (a run dir, or its checkpoints/latest.pt)."""
    path = Path(resume)
    if (path.is_file() or path.suffix == ".pt") and path.parent.name != CHECKPOINT_DIR:
        raise ConfigError(f"resume={resume!r} is invalid: pass a run directory or its {CHECKPOINT_DIR}/{LATEST}, "
                          "so the run continues in its own directory")
    return resume_run_dir(resume)


def _identity(config: dict) -> str:
    flat = flatten(config)
    return ", ".join(f"{k}={flat.get(k)}" for k in IDENTITY if k in flat)


def compare_configs(old: dict, new: dict, where: Path) -> tuple[dict, dict]:
    """Refuse a resume whose config differs from the checkpoint's outside :data:`ALLOWED_CHANGES`.

    Returns ``(allowed changes, keys new since the checkpoint)``."""
    a, b = flatten(old), flatten(new)
    if any(a.get(k) != b.get(k) for k in IDENTITY if k in a):
        raise ConfigError(
            f"checkpoint {where} was written by {_identity(old)}; this run is {_identity(new)}. A checkpoint "
            "continues only the method, objective, sampler and model that wrote it: start a new run (another run "
            "dir) instead")
    skip = lambda k: k.split(".")[0] in BOOKKEEPING  # noqa: E731
    differ = {k: {"checkpoint": a[k], "now": b[k]} for k in a.keys() & b.keys() if a[k] != b[k] and not skip(k)}
    refused = {k: v for k, v in differ.items() if k not in ALLOWED_CHANGES}
    removed = sorted(k for k in a.keys() - b.keys() if not skip(k))
    if refused or removed:
        items = [f"{k} (checkpoint {v['checkpoint']!r}, now {v['now']!r})" for k, v in sorted(refused.items())]
        items += [f"{k} (checkpoint {a[k]!r}, not in this config)" for k in removed]
        raise ConfigError(
            f"resume from {where}: the config differs from the one the checkpoint was trained with in "
            f"{'; '.join(items[:8])}{' ...' if len(items) > 8 else ''}. Resume with the original values; only "
            f"{', '.join(ALLOWED_CHANGES)} may change on resume")
    added = {k: b[k] for k in sorted(b.keys() - a.keys()) if not skip(k)}
    return {k: v for k, v in differ.items() if k in ALLOWED_CHANGES}, added


def _check_old_format(state: dict, new: dict, where: Path) -> tuple[dict, dict]:
    """Checkpoints written before run configs were stored: compare what they hold (the trainer settings)."""
    _log.warning("%s predates stored run configs: only its trainer settings can be compared", where)
    old = {"trainer": dict(state.get("trainer_config") or {})}
    return compare_configs(old, {"trainer": dict(new.get("trainer") or {})}, where)


def plan_run(cfg: DictConfig) -> RunPlan:
    """Decide fresh / restart / resume / finished for ``cfg`` and check it is allowed; writes nothing."""
    run_dir = Path(cfg.run_dir)
    resume = cfg.get("resume")
    if resume in (None, "") and os.environ.get("SUBMITIT_EXECUTOR"):
        resume = "auto"  # a submitit job may be a requeue of itself: it continues its own run dir
    new = OmegaConf.to_container(cfg, resolve=True)
    if resume not in (None, "", "auto"):
        target = resume_dir(str(resume))
        if not target.is_dir():
            raise ConfigError(f"resume={resume!r} is invalid: {target} is not a run directory")
        if target.resolve() != run_dir.resolve():
            raise ConfigError(f"resume={resume!r} continues the run in {target}, but run_dir is {run_dir}; drop the "
                              "hydra.run.dir/run_dir override (with resume=<dir> the run dir defaults to that dir)")
    ckpt = run_dir / CHECKPOINT_DIR / LATEST
    if resume in (None, ""):
        held = holds_run(run_dir)
        if held:
            raise ConfigError(f"run dir {run_dir} already holds a run ({held}); a fresh run would duplicate its rows and "
                              "overwrite its checkpoint. Pass resume=auto to continue it, or choose another run dir")
        return RunPlan(run_dir, "fresh")
    if not ckpt.exists():
        if resume != "auto":
            raise ConfigError(f"resume={resume!r}: {run_dir} has no {CHECKPOINT_DIR}/{LATEST} to continue")
        return RunPlan(run_dir, "restart" if holds_run(run_dir) else "fresh")
    try:
        state = load_checkpoint(ckpt)
        read_metrics_lines(run_dir / "metrics.jsonl", warn=False)  # a corrupt row stops the resume here, not later
    except ValueError as e:
        raise ConfigError(f"cannot resume {run_dir}: {e}") from e
    if state.get("config") is not None:
        changes, added = compare_configs(state["config"], new, ckpt)
    else:
        changes, added = _check_old_format(state, new, ckpt)
    total, step = int(cfg.trainer.total_steps), int(state["step"])
    if total < step:
        raise ConfigError(f"trainer.total_steps={total} is invalid: the checkpoint {ckpt} is at step {step}; "
                          f"resume with trainer.total_steps >= {step}")
    finished = bool(state.get("finished")) if "finished" in state else (run_dir / "summary.json").exists()
    mode = "finished" if finished and step >= total else "resume"
    return RunPlan(run_dir, mode, ckpt, state, changes, added)


def record_start(plan: RunPlan, cfg: DictConfig) -> None:
    """The first writes of a run: stray temporaries removed, ``config.yaml`` = the config used, and for a
    resume a ``resumes.jsonl`` line naming the step, the checkpoint and every changed key."""
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stray_temporaries(run_dir, run_dir / CHECKPOINT_DIR)
    if plan.mode == "finished":
        return  # nothing will be trained: the record of what was used stays as it is
    write_text_atomic(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "config.yaml")
    if plan.mode != "resume":
        return
    for key, change in plan.changes.items():
        _log.warning("resume: %s changed %r -> %r: %s", key, change["checkpoint"], change["now"], ALLOWED_CHANGES[key])
    for key, value in plan.added.items():
        _log.warning("resume: %s=%r is new since the checkpoint was written (its code had no such setting)", key, value)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": plan.step, "checkpoint": str(plan.checkpoint),
              "changed": plan.changes, "added": plan.added}
    with (run_dir / "resumes.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    _log.warning("resuming %s at step %d from %s", run_dir, plan.step, plan.checkpoint)
