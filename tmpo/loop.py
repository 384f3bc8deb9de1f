"""The one rollout-and-update loop shared by every method and every scale.

prompts -> sampler.rollout -> decode + reward -> objective.prepare (advantages) -> policy_update
(two-pass exact edge-level gradient, PPO clip, KL to reference) -> EMA -> periodic eval -> log ->
atomic checkpoint. Components are injected; nothing here knows a method's, model's or reward's name.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from tmpo.checkpoint import LATEST, load_checkpoint, save_atomic
from tmpo.diagnostics import group_diagnostics
from tmpo.ema import EMA
from tmpo.evaluation import Evaluator
from tmpo.logger import RunLogger
from tmpo.objectives.base import Objective
from tmpo.policies.base import FlowPolicy
from tmpo.prompts import PromptSource
from tmpo.samplers.sampler import FlowSampler
from tmpo.update import policy_update


@dataclass
class TrainerConfig:
    """Loop hyper-parameters (paper App. D.4 defaults where it gives them)."""

    total_steps: int = 100
    prompts_per_step: int = 8  # prompts (groups) per iteration; each yields K leaves
    lr: float = 3e-5
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_min_ratio: float = 0.1  # cosine annealing down to lr_min_ratio * lr
    grad_clip: float | None = 0.5
    inner_epochs: int = 1  # passes over each rollout (PPO epochs)
    minibatches: int = 1  # optimizer steps per pass over the rollout
    minibatch_split: str = "groups"  # groups | leaves | group_leaves (tmpo.update.split_minibatches)
    lr_schedule: str = "cosine"  # cosine (TMPO, App. D.4) | constant (the baselines' code)
    parent_chunk: int = 64  # parent states per forward/backward in the update (memory knob)
    ema_decay: float = 0.9
    ema_every: int = 8
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_base: bool = True  # evaluate the untouched model first (logged as base/<metric>)
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None leaves it alone
    progress: bool = True


def _seed_for(seed: int, step: int, stream: int) -> int:
    """Independent, reproducible seed per (run seed, step, stream): resumes replay the same noise."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


class Trainer:
    def __init__(
        self,
        policy: FlowPolicy,
        sampler: FlowSampler,
        reward: Callable,
        objective: Objective,
        prompts: PromptSource,
        evaluator: Evaluator | None,
        logger: RunLogger,
        cfg: TrainerConfig,
        run_dir: str | Path,
    ) -> None:
        self.policy, self.sampler, self.reward, self.objective = policy, sampler, reward, objective
        self.prompts, self.evaluator, self.logger, self.cfg = prompts, evaluator, logger, cfg
        self.run_dir = Path(run_dir)
        named = policy.trainable_named_parameters()
        extra = list(getattr(objective, "parameters", lambda: [])())
        if not named:
            raise ValueError("the policy has no trainable parameters (check the model's lora/finetuning config)")
        self.params = [p for _, p in named] + extra
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = EMA(named, decay=cfg.ema_decay, every=cfg.ema_every)
        self.step = 0
        self.base_metrics: dict[str, float] = {}

    def _lr_factor(self, step: int) -> float:
        """Cosine annealing from 1 to ``lr_min_ratio`` over the run (App. D.4), or a constant 1."""
        if self.cfg.lr_schedule == "constant":
            return 1.0
        if self.cfg.lr_schedule != "cosine":
            raise ValueError(f"trainer.lr_schedule={self.cfg.lr_schedule!r}; valid options: cosine, constant")
        frac = min(step / max(self.cfg.total_steps, 1), 1.0)
        return self.cfg.lr_min_ratio + (1 - self.cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    # --- one iteration -------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        rng = np.random.default_rng(_seed_for(self.cfg.seed, step, 0))
        batch = self.prompts.train(self.cfg.prompts_per_step, rng)
        texts, meta = [t for t, _ in batch], [m for _, m in batch]
        gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, step, 1))
        rollout = self.sampler.rollout(self.policy, texts, meta, step, self.cfg.total_steps, gen)
        t_rollout = time.perf_counter()
        samples, rewards, reward_info = self.score(rollout)
        prepared = self.objective.prepare(rollout, rewards, step, samples=samples, reward_info=reward_info)
        t_reward = time.perf_counter()  # decode, reward and advantages (GARDO's features and aux rewards)
        stats = policy_update(
            self.policy, rollout, self.objective, prepared, self.optimizer, self.params,
            inner_epochs=self.cfg.inner_epochs, minibatches=self.cfg.minibatches,
            parent_chunk=self.cfg.parent_chunk, grad_clip=self.cfg.grad_clip,
            minibatch_split=self.cfg.minibatch_split,
            generator=torch.Generator().manual_seed(_seed_for(self.cfg.seed, step, 2)),
        )
        t_update = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.ema.update(step)
        g, k = rollout.num_groups, rollout.group_size
        metrics = {f"train/{n}": v for n, v in stats.items() if not n.startswith("fwd_")}
        metrics.update({f"nfe/{n[4:]}_per_prompt": v / g for n, v in stats.items() if n.startswith("fwd_")})
        metrics["nfe/sample_per_prompt"] = float(rollout.nfe)
        metrics.update({f"train/{n}": v for n, v in self.objective.after_update(self.policy, stats, step).items()})
        metrics.update({f"train/{n}": float(v) for n, v in prepared.stats.items()})
        adv = prepared.leaf_adv if prepared.leaf_adv is not None else torch.full_like(rewards, float("nan"))
        log_p_traj = rollout.trajectory_log_prob_old() * self.objective.log_prob_scale(rollout.latent_dim)
        diag = group_diagnostics(rewards.view(g, k), log_p_traj.view(g, k), adv.view(g, k))
        metrics.update({f"diag/{n}": v for n, v in diag.items()})
        metrics.update({
            "train/reward_mean": float(rewards.mean()),
            "train/reward_std": float(rewards.std()),
            "train/adv_mean": float(adv.mean()),
            "train/adv_std": float(adv.std()),
            "train/lr": lr,
            "train/group_size": float(k),
            "train/nfe": float(rollout.nfe),
            "train/edges_per_prompt": float(rollout.edge_x_next.shape[0] / g),
            "time/rollout_s": t_rollout - t0,
            "time/reward_s": t_reward - t_rollout,
            "time/update_s": t_update - t_reward,
            "iter_time_s": time.perf_counter() - t0,
        })
        return metrics

    def score(self, rollout) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Decode and score the leaves -> ``(samples, rewards [L], reward info)``.

        A non-finite or mis-shaped reward is an error, never zeroed."""
        with torch.no_grad():
            samples = self.policy.decode(rollout.leaves)
        k = rollout.group_size
        texts = [t for t in rollout.prompts for _ in range(k)]
        meta = [{**m, "group": g} for g, m in enumerate(rollout.metadata) for _ in range(k)]
        rewards, info = self.reward(samples, texts, meta)
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
        if rewards.shape != (rollout.leaves.shape[0],):
            raise ValueError(f"reward returned shape {tuple(rewards.shape)}, expected [{rollout.leaves.shape[0]}]")
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError(f"reward returned non-finite values ({int((~torch.isfinite(rewards)).sum())} of {rewards.numel()})")
        return samples, rewards, dict(info or {})

    # --- evaluation, checkpoints ---------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        with self.ema.applied():
            return self.evaluator(self.policy)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "policy": self.policy.trainable_state(),
            "policy_reference": self.policy.reference_state(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "base_metrics": dict(self.base_metrics),
            "trainer_config": asdict(self.cfg),
        }

    def save(self) -> Path:
        return save_atomic(self.state_dict(), self.run_dir / "checkpoints" / LATEST)

    def load(self, path: str | Path) -> None:
        state = load_checkpoint(path)
        self.policy.load_trainable_state(state["policy"])
        self.policy.load_reference_state(state.get("policy_reference"))
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.base_metrics = dict(state.get("base_metrics", {}))
        self.step = int(state["step"])
        self.logger.truncate_after(self.step)

    # --- the run -------------------------------------------------------------------------------
    def run(self, resume: str | Path | None = None) -> dict[str, float]:
        """Train to ``total_steps`` (continuing from ``resume`` if given); return the summary."""
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if resume:
            self.load(resume)
        elif self.cfg.eval_base and self.evaluator is not None:
            self.base_metrics = self.evaluate()
            self.logger.log({f"base/{k}": v for k, v in self.base_metrics.items()}, step=0)
        last: dict[str, float] = {}
        times: list[float] = []
        bar = tqdm(range(self.step, self.cfg.total_steps), desc="train", disable=not self.cfg.progress,
                   initial=self.step, total=self.cfg.total_steps, mininterval=1.0)
        for step in bar:
            last = self.train_step(step)
            times.append(last["iter_time_s"])
            self.step = step + 1
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.total_steps:
                last.update({f"eval/{k}": v for k, v in self.evaluate().items()})
            self.logger.log(last, step=self.step)
            bar.set_postfix(reward=f"{last['train/reward_mean']:.3f}", refresh=False)
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save()
        final = self.evaluate()
        if final:
            self.logger.log({f"eval/{k}": v for k, v in final.items()}, step=self.step)
        self.save()
        summary = dict(final)
        summary.update({f"base/{k}": v for k, v in self.base_metrics.items()})
        summary["iter_time_s"] = float(np.mean(times)) if times else float("nan")
        summary["steps"] = float(self.step)
        if last:
            summary["train/reward_mean_last"] = last["train/reward_mean"]
        self.logger.summary(summary)
        return summary
