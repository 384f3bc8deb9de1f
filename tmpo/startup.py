"""The command line, checked before Hydra creates anything: ``python -m tmpo.run <overrides>``.

Hydra creates the run directory (``.hydra/``, ``run.log``) before it calls the task, and reports a
misspelt key as ``Could not override 'objective.clip_epss'``. :func:`check_command_line` composes the
config(s) the command line asks for (every combination of a ``-m`` sweep's values), translates Hydra's
composition errors into one message naming the key, the bad value and the valid ones, and runs every
start-up check of :func:`tmpo.run.prepare_run`'s kind -- so a bad command stops with nothing written.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tmpo.config import ConfigError, config_dir, target_keys, unknown_key_message

# Hydra flags after which the command line is Hydra's business (introspection, other configs, completion).
_HANDS_OFF = ("--cfg", "-c", "--info", "-i", "--hydra-help", "--version", "--shell-completion", "-sc",
              "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun",
              "--resolve", "--package", "-p")
MAX_SWEEP_CHECKS = 64  # a larger sweep checks its first 64 combinations (every job still checks itself)


def split_command_line(argv: Sequence[str]) -> tuple[list[str], bool] | None:
    """``(overrides, multirun)`` of a ``tmpo.run`` command line, or ``None`` when Hydra should handle it
    alone (``--cfg job``, ``--info``, another config dir or name, ...)."""
    overrides, multirun = [], False
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in _HANDS_OFF:
            return None
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("-r", "--run"):
            continue
        elif arg.startswith("-") and "=" not in arg:
            return None  # an option we do not know: let Hydra say what it thinks of it
        else:
            overrides.append(arg)
    return overrides, multirun


def sweep_combinations(overrides: Sequence[str]) -> list[list[str]]:
    """Every job's override list of a ``-m`` command line (Hydra's basic sweeper's expansion)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


def _compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _group_options(group: str) -> list[str]:
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _override_of(overrides: Sequence[str], key: str) -> str | None:
    for o in overrides:
        name, _, value = o.lstrip("+~").partition("=")
        if name.split("@")[0] == key:
            return value
    return None


def explain_unknown_key(path: str, overrides: Sequence[str]) -> ConfigError:
    """Hydra's ``Could not override '<path>'`` as our message: the key's closest valid spelling and the
    valid keys of its node (a ``_target_`` node's constructor arguments, else the node's keys)."""
    parent_path, _, key = path.rpartition(".")
    value = _override_of(overrides, path)
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0].split("@")[0] != path]
    try:
        cfg = _compose(rest)
    except Exception:  # noqa: BLE001 -- another override is broken too: Hydra's own message will name it
        return ConfigError(f"unknown key {path}" + (f"={value}" if value is not None else ""))
    node = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    if not isinstance(node, DictConfig):
        head = path.split(".")[0]
        valid = [str(k) for k in cfg.keys() if k != "hydra"]
        if parent_path and OmegaConf.select(cfg, head) is None:
            return ConfigError(unknown_key_message(head, valid, "(top level)", None))
        return ConfigError(f"{parent_path} is not a group of keys (it is {OmegaConf.select(cfg, parent_path)!r}); "
                           f"cannot set {path}")
    valid = None
    owner = ""
    if "_target_" in node:
        valid = target_keys(str(node["_target_"]))
        owner = f"for {node['_target_']}"
    if valid is None:
        valid = [str(k) for k in node.keys() if not str(k).startswith("_") and k != "hydra"]
    return ConfigError(unknown_key_message(path, valid, owner, value))


def explain_missing_option(message: str) -> ConfigError | None:
    """Hydra's ``Could not find 'method/tmpoo'`` as ``method=tmpoo is invalid: ... valid options: ...``."""
    m = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", message)
    if not m:
        return None
    group, option = m.group(1), m.group(2)
    options = [o for o in _group_options(group) if not o.startswith("_")]
    if not options:
        return None
    close = difflib.get_close_matches(option, options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{group}={option} is invalid: there is no conf/{group}/{option}.yaml.{hint} "
                       f"Valid options: {', '.join(options)}")


def translate_composition_error(error: Exception, overrides: Sequence[str]) -> ConfigError | None:
    """Our one-line message for Hydra's common composition errors (``None``: leave it to Hydra)."""
    text = f"{error} {error.__cause__ or ''}"
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        return explain_unknown_key(m.group(1), overrides)
    m = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if m:
        return ConfigError(f"{m.group(1)} already exists: set it without the '+' ({m.group(1)}=...)")
    return explain_missing_option(text)


def check_job(overrides: Sequence[str], multirun: bool) -> None:
    """Compose one job's config and run every start-up check on it (raises :class:`ConfigError`)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tmpo.run import check_config
    from tmpo.validate import check_run_dir

    try:
        cfg = _compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        translated = translate_composition_error(e, overrides)
        if translated is None:
            return  # Hydra will report it, before creating anything
        raise translated from None
    run_dir = cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir
    job = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    job.run_dir = str(run_dir)
    check_config(job)
    check_run_dir(run_dir, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    if not multirun:
        from tmpo.resume import plan_run

        plan_run(job)


def check_command_line(argv: Sequence[str]) -> None:
    """Check every job a ``python -m tmpo.run`` command line asks for (raises :class:`ConfigError`)."""
    split = split_command_line(argv)
    if split is None:
        return
    overrides, multirun = split
    jobs = [overrides]
    if multirun:
        try:
            jobs = sweep_combinations(overrides)[:MAX_SWEEP_CHECKS]
        except Exception:  # noqa: BLE001 -- a sweep syntax we do not expand: Hydra checks it
            return
    for job in jobs:
        check_job(job, multirun)


def remove_empty_run_dir(run_dir: str | Path) -> bool:
    """Remove a run directory that holds only what Hydra created at start-up (``.hydra/``, ``run.log``):
    a start that failed before writing anything of ours leaves no empty run behind."""
    import shutil

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - {".hydra", "run.log"}:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True
