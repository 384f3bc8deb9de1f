"""Entry point: ``python -m tmpo.run method=tmpo reward=gmm_modes`` (Hydra app; ``-m`` for sweeps)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from tmpo.checkpoint import write_json_atomic
from tmpo.config import ConfigError, register_configs, to_container, validate_targets
from tmpo.evaluation import EvalSuite, Evaluator
from tmpo.faults import NonFiniteError
from tmpo.logger import RunLogger
from tmpo.loop import Trainer, TrainerConfig
from tmpo.resume import RunPlan, plan_run, record_start
from tmpo.results.labels import run_labels
from tmpo.seeding import seed_everything
from tmpo.signals import Preempted, exit_after_stop
from tmpo.validate import check_run_dir, validate_run_config

register_configs()
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
_log = logging.getLogger(__name__)


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose the run config in-process, exactly as ``python -m tmpo.run <overrides>`` would.

    ``run_dir=...`` must be among the overrides (there is no Hydra runtime to provide it).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def prepare_run(cfg: DictConfig) -> RunPlan:
    """Every start-up check, before anything is written: each component's keys, every value's range,
    the run dir (writable; fresh, resumed or finished, and a resume's config against its checkpoint's)."""
    validate_targets(cfg)
    validate_run_config(cfg)
    plan = plan_run(cfg)
    check_run_dir(plan.run_dir)
    return plan


def build_trainer(cfg: DictConfig, plan: RunPlan | None = None) -> Trainer:
    """Instantiate every component from a composed config and wire them into the shared loop.

    With ``resume=auto|<run dir>`` the trainer holds the checkpoint to continue (``trainer.run()`` loads it)."""
    plan = plan or prepare_run(cfg)
    trainer_cfg = TrainerConfig(**to_container(cfg.trainer))
    seed_everything(trainer_cfg.seed)  # before anything random is built: LoRA's start weights follow the seed
    if trainer_cfg.threads:
        import torch

        torch.set_num_threads(trainer_cfg.threads)
    policy = instantiate(cfg.model)
    sampler = instantiate(cfg.sampler)
    objective = instantiate(cfg.objective)
    reward = instantiate(cfg.reward.fn)
    prompts = instantiate(cfg.reward.prompts)
    metrics = [instantiate(m) for m in cfg.reward.metrics]
    suites = [
        EvalSuite(name, instantiate(s.prompts), [instantiate(m) for m in s.metrics], s.get("max_prompts"), s.get("samples_per_prompt"))
        for name, s in cfg.reward.suites.items()
    ]
    evaluator = Evaluator(prompts, reward, metrics, suites, progress=trainer_cfg.progress, **to_container(cfg.eval))
    record_start(plan, cfg)  # the first write: config.yaml (and resumes.jsonl for a resume)
    wandb_kw = to_container(cfg.logger) if cfg.logger is not None else None
    logger = RunLogger(plan.run_dir, wandb=wandb_kw, config=to_container(cfg), wandb_id=plan.wandb_id)
    if plan.mode == "restart":
        logger.restart()
    trainer = Trainer(policy, sampler, reward, objective, prompts, evaluator, logger, trainer_cfg, plan.run_dir,
                      run_config=to_container(cfg))
    if plan.mode in ("resume", "finished"):
        trainer.resume_state = plan.state
    return trainer


def _write_summary(summary: dict, labels: dict, path: Path) -> None:
    on_disk = json.loads(path.read_text()) if path.exists() else dict(summary)
    write_json_atomic({**on_disk, **labels}, path, sort_keys=True)


def train(cfg: DictConfig) -> dict[str, float]:
    plan = prepare_run(cfg)
    labels = run_labels(to_container(cfg))  # method, seed, the experiment's table/protocol/row/scale, git commit
    summary_path = Path(plan.run_dir) / "summary.json"
    if plan.mode == "finished":
        summary = plan.summary or {}
        _log.warning("the run in %s is finished (step %d of %d): nothing to train; raise trainer.total_steps to "
                     "continue it", plan.run_dir, plan.step, cfg.trainer.total_steps)
        if not summary_path.exists() and summary:
            _write_summary(summary, labels, summary_path)
        return summary
    trainer = build_trainer(cfg, plan)
    try:
        summary = trainer.run()
    except Preempted:
        trainer.logger.finish(preempting=True)
        raise
    finally:
        trainer.logger.finish()
    _write_summary(summary, labels, summary_path)
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except Preempted as stop:
        exit_after_stop(stop)
    except (NonFiniteError, FloatingPointError) as e:
        raise SystemExit(f"run stopped: {e}") from None
    print(json.dumps({k: summary[k] for k in sorted(summary) if not k.startswith("occ_")}, indent=None))
    return summary.get("reward")


if __name__ == "__main__":
    main()
