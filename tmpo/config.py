"""Config schemas (Hydra ConfigStore) and start-up validation of every ``_target_`` node."""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from tmpo.loop import TrainerConfig


class ConfigError(ValueError):
    """A config value that cannot work, with the key, the problem and the fix."""


@dataclass
class RewardGroupConfig:
    """The ``reward`` group: the reward function, its prompt source and its evaluation metrics."""

    fn: Any = MISSING
    prompts: Any = MISSING
    metrics: list[Any] = field(default_factory=list)  # on the task's test prompts
    suites: dict[str, Any] = field(default_factory=dict)  # name -> {prompts, metrics, max_prompts?, samples_per_prompt?}


@dataclass
class EvalConfig:
    max_prompts: int | None = None
    samples_per_prompt: int = 10
    num_steps: int = 28
    seed: int = 1234


@dataclass
class RunConfig:
    """Top-level schema: a misspelt top-level or trainer key fails at compose time."""

    model: Any = MISSING
    reward: RewardGroupConfig = field(default_factory=RewardGroupConfig)
    sampler: Any = MISSING
    objective: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: Any = None  # kwargs for wandb.init, or null for files only
    method: str = MISSING  # name of the method (for tables); set by the method config
    ablation: str = "full"
    tags: dict[str, Any] = field(default_factory=dict)  # free-form labels copied to summary.json
    run_dir: str = "."
    resume: str | None = None  # null (fresh) | auto (this run dir's own checkpoint) | <run dir> (tmpo/resume.py)


def resume_run_dir(resume: str) -> Path:
    """The run directory ``resume=<path>`` continues: the path, or for ``<run dir>/checkpoints/<file>.pt``
    the run dir that holds it."""
    path = Path(resume)
    if path.parent.name == "checkpoints" and (path.suffix == ".pt" or path.is_file()):
        return path.parent.parent
    return path


def _hydra_run_dir(resume: Any, default: str) -> str:
    """``hydra.run.dir`` resolver: ``resume=<path>`` runs in that run's own directory."""
    return default if resume in (None, "", "auto") else str(resume_run_dir(str(resume)))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("tmpo_run_dir"):
        OmegaConf.register_new_resolver("tmpo_run_dir", _hydra_run_dir)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    register_resolvers()


register_resolvers()  # also in processes that unpickle a job (submitit) and never import tmpo.run


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"_target_ {path!r} cannot be imported ({e}); check the spelling of the class path") from e


def _check_node(node: DictConfig, where: str) -> None:
    target = _import(str(node["_target_"]))
    fn = target.__init__ if inspect.isclass(target) else target
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in node.keys():
        key = str(key)
        if key.startswith("_") or key in valid:
            continue
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown key {where}.{key} for {node['_target_']}.{hint} Valid keys: {', '.join(sorted(valid))}"
        )
    missing = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) and n not in node]
    if missing and not node.get("_partial_", False):
        raise ConfigError(f"{where} ({node['_target_']}) is missing required key(s): {', '.join(missing)}")


def validate_targets(cfg: Any, where: str = "cfg") -> None:
    """Bind every ``_target_`` node's keys to its constructor signature (torchtune-style ``validate``)."""
    if isinstance(cfg, DictConfig):
        if "_target_" in cfg:
            _check_node(cfg, where)
        for k in cfg.keys():
            validate_targets(cfg._get_node(k), f"{where}.{k}" if where != "cfg" else str(k))
    elif isinstance(cfg, ListConfig):
        for i in range(len(cfg)):
            validate_targets(cfg._get_node(i), f"{where}[{i}]")


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
