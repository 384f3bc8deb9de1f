"""Entry point: ``python -m tmpo.run method=tmpo reward=gmm_modes`` (Hydra app; ``-m`` for sweeps)."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tmpo.config import ConfigError, register_configs, to_container, validate_targets
from tmpo.evaluation import EvalSuite, Evaluator
from tmpo.logger import RunLogger
from tmpo.loop import Trainer, TrainerConfig

register_configs()
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose the run config in-process, exactly as ``python -m tmpo.run <overrides>`` would.

    ``run_dir=...`` must be among the overrides (there is no Hydra runtime to provide it).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def build_trainer(cfg: DictConfig) -> Trainer:
    """Instantiate every component from a composed config and wire them into the shared loop."""
    validate_targets(cfg)
    trainer_cfg = TrainerConfig(**to_container(cfg.trainer))
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
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    wandb_kw = to_container(cfg.logger) if cfg.logger is not None else None
    logger = RunLogger(run_dir, wandb=wandb_kw, config=to_container(cfg))
    return Trainer(policy, sampler, reward, objective, prompts, evaluator, logger, trainer_cfg, run_dir)


def train(cfg: DictConfig) -> dict[str, float]:
    trainer = build_trainer(cfg)
    try:
        summary = trainer.run(resume=cfg.resume)
    finally:
        trainer.logger.finish()
    labels = {"method": cfg.method, "ablation": cfg.ablation, "model": cfg.model._target_, "seed": cfg.trainer.seed, **cfg.tags}
    summary_path = Path(cfg.run_dir) / "summary.json"
    full = {**json.loads(summary_path.read_text()), **labels}
    summary_path.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    print(json.dumps({k: summary[k] for k in sorted(summary) if not k.startswith("occ_")}, indent=None))
    return summary.get("reward")


if __name__ == "__main__":
    main()
