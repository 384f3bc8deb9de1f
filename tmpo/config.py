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
    batch_size: int | None = None  # samples integrated at once (null = a suite's whole set; bound it on GPUs)
    grid_prompts: int = 6  # samples.png: this many test prompts (rows), base vs the evaluated weights
    grid_samples: int = 4  # ... and this many initial noises per prompt (0: no samples.png)


GRID_KEYS = ("grid_prompts", "grid_samples")  # eval keys read by tmpo.run (samples.png), not by the Evaluator


def config_dir() -> Path:
    """The Hydra config directory: the package's own copy in an installed wheel (``tmpo/conf``, built from
    the repository's ``conf/`` by setup.py), else the source checkout's ``conf/`` (editable installs)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no Hydra config directory: neither {package / 'conf'} nor {package.parent / 'conf'} "
                            "holds config.yaml; reinstall tmpo (pip install .) or run from a checkout")


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
    lr_scales: dict[str, float] = field(default_factory=dict)  # a scale's per-method trainer.lr_scale (conf/scale/mini.yaml)
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


def unknown_key_message(path: str, valid: list[str], owner: str = "", value: str | None = None) -> str:
    """``unknown key <path>[=<value>] <owner>. Did you mean '<closest>'? Valid keys: ...`` (one line)."""
    key = path.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    shown = path if value is None else f"{path}={value}"
    return f"unknown key {shown}{' ' + owner if owner else ''}.{hint} Valid keys: {', '.join(sorted(valid))}"


def target_keys(target: str) -> list[str] | None:
    """The keyword arguments a ``_target_`` accepts, or ``None`` when it takes ``**kwargs`` (any key)."""
    obj = _import(target)
    params = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]


def _shown(node: DictConfig, key: str) -> str:
    """A node's value as the command line would spell it (unresolved: interpolations stay as written)."""
    child = node._get_node(key)
    if isinstance(child, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(child, resolve=False))
    return str(child._value())


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
        raise ConfigError(unknown_key_message(f"{where}.{key}", valid, f"for {node['_target_']}", _shown(node, key)))
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
