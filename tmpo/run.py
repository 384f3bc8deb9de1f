"""Entry point: ``python -m tmpo.run method=tmpo reward=gmm_modes`` (Hydra app; ``-m`` for sweeps).

``--help`` prints our usage (``conf/hydra/help/tmpo.yaml``). A bad command line stops with one message
before Hydra creates a run directory (:mod:`tmpo.startup`). A run logs to Hydra's ``run.log`` (start,
config, each evaluation, checkpoints, end), writes ``samples.png`` and ends by printing a short table
(:mod:`tmpo.report`); the numbers are in ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tmpo.checkpoint import write_json_atomic
from tmpo.config import GRID_KEYS, ConfigError, config_dir, register_configs, to_container, validate_targets
from tmpo.distributed import Processes, SilentLogger, from_environment, log_to_rank_file, shared_run_dir_overrides
from tmpo.evaluation import EvalSuite, Evaluator
from tmpo.faults import NonFiniteError
from tmpo.logger import RunLogger
from tmpo.loop import Trainer, TrainerConfig
from tmpo.report import format_table
from tmpo.resume import RunPlan, plan_run, record_start
from tmpo.results.labels import run_labels
from tmpo.seeding import seed_everything
from tmpo.signals import Preempted, exit_after_stop
from tmpo.validate import check_run_dir, int_at_least, validate_run_config

register_configs()
CONF_DIR = str(config_dir())
_log = logging.getLogger("tmpo.run")  # not __main__ under `python -m tmpo.run`: run.log takes tmpo.*'s DEBUG records


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose the run config in-process, exactly as ``python -m tmpo.run <overrides>`` would.

    ``run_dir=...`` must be among the overrides (there is no Hydra runtime to provide it).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def check_config(cfg: DictConfig) -> None:
    """Each component's keys against its constructor and every value's range (raises ConfigError)."""
    validate_targets(cfg)
    validate_run_config(cfg)
    for key in GRID_KEYS:
        int_at_least(f"eval.{key}", cfg.eval.get(key, 0), 0, "samples.png; 0 = none")


def prepare_run(cfg: DictConfig) -> RunPlan:
    """Every start-up check, before anything is written: :func:`check_config`, then the run dir (writable;
    fresh, resumed or finished, and a resume's config against its checkpoint's)."""
    check_config(cfg)
    plan = plan_run(cfg)
    check_run_dir(plan.run_dir)
    return plan


def run_choices(cfg: DictConfig) -> dict[str, str]:
    """The config group choices (method, reward, model, ...): Hydra's record of the command line, or read
    off the config when composed outside a Hydra app (tests)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v is not None and "/" not in k}
    prompts = cfg.reward.get("prompts") or {}
    reward = prompts.get("protocol") if isinstance(prompts, DictConfig) else None
    target = lambda node: str(node.get("_target_", "")).rsplit(".", 1)[-1] or None  # noqa: E731
    return {"method": cfg.get("method"), "reward": reward or target(cfg.reward.fn), "model": target(cfg.model)}


def build_trainer(cfg: DictConfig, plan: RunPlan | None = None, labels: dict | None = None,
                  choices: dict | None = None, processes: Processes | None = None) -> Trainer:
    """Instantiate every component from a composed config and wire them into the shared loop.

    With ``resume=auto|<run dir>`` the trainer holds the checkpoint to continue (``trainer.run()`` loads it).
    ``processes``: the processes sharing the run (:func:`tmpo.distributed.from_environment`); only rank 0
    writes the run's files."""
    plan = plan or prepare_run(cfg)
    processes = processes or Processes()
    trainer_cfg = TrainerConfig(**to_container(cfg.trainer))
    seed_everything(trainer_cfg.seed)  # before anything random is built: LoRA's start weights follow the seed
    if trainer_cfg.threads:
        import torch

        torch.set_num_threads(trainer_cfg.threads)
    policy = instantiate(cfg.model)
    initial_state = {k: v.detach().cpu().clone() for k, v in policy.trainable_state().items()}  # samples.png's base
    sampler = instantiate(cfg.sampler)
    objective = instantiate(cfg.objective)
    reward = instantiate(cfg.reward.fn)
    prompts = instantiate(cfg.reward.prompts)
    metrics = [instantiate(m) for m in cfg.reward.metrics]
    suites = [
        EvalSuite(name, instantiate(s.prompts), [instantiate(m) for m in s.metrics], s.get("max_prompts"), s.get("samples_per_prompt"))
        for name, s in cfg.reward.suites.items()
    ]
    eval_kw = {k: v for k, v in to_container(cfg.eval).items() if k not in GRID_KEYS}
    evaluator = Evaluator(prompts, reward, metrics, suites, progress=trainer_cfg.progress and processes.is_main, **eval_kw)
    if processes.is_main:
        record_start(plan, cfg)  # the first write: config.yaml (and resumes.jsonl for a resume)
        wandb_kw = to_container(cfg.logger) if cfg.logger is not None else None
        logger = RunLogger(plan.run_dir, wandb=wandb_kw, config=to_container(cfg), wandb_id=plan.wandb_id,
                           labels=labels, choices=choices or run_choices(cfg))
        if plan.mode == "restart":
            logger.restart()
    else:
        logger = SilentLogger()
    trainer = Trainer(policy, sampler, reward, objective, prompts, evaluator, logger, trainer_cfg, plan.run_dir,
                      run_config=to_container(cfg), processes=processes)
    trainer.initial_state = initial_state
    if plan.mode in ("resume", "finished"):
        trainer.resume_state = plan.state
    return trainer


def _write_summary(summary: dict, labels: dict, path: Path) -> None:
    on_disk = json.loads(path.read_text()) if path.exists() else dict(summary)
    write_json_atomic({**on_disk, **labels}, path, sort_keys=True)


def write_samples_png(trainer: Trainer, cfg: DictConfig) -> Path | None:
    """``samples.png`` in the run dir (base vs the evaluated weights, same noise; a resumed run that trained
    further replaces it) and the same image in wandb."""
    from tmpo.sample import spread_prompts, write_run_samples

    rows, n = int(cfg.eval.get("grid_prompts", 0)), int(cfg.eval.get("grid_samples", 0))
    path = trainer.run_dir / "samples.png"
    if not rows or not n or getattr(trainer, "initial_state", None) is None:
        return None
    if len(getattr(trainer.policy, "latent_shape", (0, 0))) == 1:
        n = max(n, 500)  # points (the 2-D toy): a distribution needs many samples to be seen
    prompts = spread_prompts([t for t, _ in trainer.prompts.test()], rows)
    written = write_run_samples(trainer, trainer.initial_state, prompts, n, int(cfg.eval.num_steps),
                                int(cfg.eval.seed), path)
    if written is not None:
        trainer.logger.log_image("samples", written, trainer.step, caption="base (left) vs trained (right), same noise")
        _log.info("samples: %s", written)
    return written


def train(cfg: DictConfig) -> dict[str, Any]:
    processes = from_environment()  # first: a process's GPU is set before any model is built
    if not processes.is_main:
        log_to_rank_file(processes.rank)
    plan = prepare_run(cfg)
    processes.barrier()  # every process has read the run dir (fresh or resume) before rank 0 writes to it
    labels = run_labels(to_container(cfg))  # method, seed, the experiment's table/protocol/row/scale, git commit
    choices = run_choices(cfg)
    summary_path = Path(plan.run_dir) / "summary.json"
    _log.info("start: %s (%s) in %s; %s", ", ".join(f"{k}={v}" for k, v in choices.items() if k in ("method", "reward", "model")),
              plan.mode, plan.run_dir, f"seed {cfg.trainer.seed}, {cfg.trainer.total_steps} iterations")
    if plan.mode == "finished":
        summary = plan.summary or {}
        _log.warning("the run in %s is finished (step %d of %d): nothing to train; raise trainer.total_steps to "
                     "continue it", plan.run_dir, plan.step, cfg.trainer.total_steps)
        if not summary_path.exists() and summary and processes.is_main:
            _write_summary(summary, labels, summary_path)
        return summary
    try:
        trainer = build_trainer(cfg, plan, labels, choices, processes)
    except Exception:
        if plan.mode == "fresh" and processes.is_main:
            from tmpo.startup import remove_empty_run_dir

            remove_empty_run_dir(plan.run_dir)  # only Hydra's files: a failed start leaves no empty run dir
        raise
    _log.debug("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        summary = trainer.run()
        if processes.is_main:
            write_samples_png(trainer, cfg)
    except Preempted:
        trainer.logger.finish(preempting=True)
        processes.barrier()  # rank 0's files are complete before any process exits for the requeue
        raise
    finally:
        trainer.logger.finish()
    _log.info("end: %d iterations in %s", trainer.step, plan.run_dir)
    return summary


def run_title(cfg: DictConfig, summary: dict[str, Any]) -> str:
    choices = run_choices(cfg)
    steps = int(summary.get("steps", cfg.trainer.total_steps))
    return (f"{choices.get('method')} on {choices.get('model')} with the {choices.get('reward')} reward: "
            f"{steps} iterations, seed {cfg.trainer.seed}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except InstantiationException as e:  # a component's constructor refused a value; Hydra names the key
        raise SystemExit(f"config error: {e}") from None
    except Preempted as stop:
        exit_after_stop(stop)
    except (NonFiniteError, FloatingPointError) as e:
        raise SystemExit(f"run stopped: {e}") from None
    table = format_table(summary, cfg.run_dir, run_title(cfg, summary), cfg.trainer.ema_decay, cfg.trainer.ema_every)
    _log.debug("summary table:\n%s", table)
    if int(os.environ.get("RANK", "0")) == 0:  # several processes print one table
        print(table, flush=True)
    return summary.get("reward")


def cli(argv: list[str] | None = None) -> None:
    """``python -m tmpo.run``: check the command line, then hand it to Hydra."""
    from tmpo.startup import check_command_line

    argv = sys.argv[1:] if argv is None else argv
    try:
        check_command_line(argv)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    sys.argv.extend(shared_run_dir_overrides(argv))  # several processes (accelerate launch): one run dir
    main()


if __name__ == "__main__":
    cli()
