"""The one rollout-and-update loop shared by every method and every scale.

prompts -> sampler.rollout -> decode + reward -> objective.prepare (advantages) -> policy_update
(two-pass exact edge-level gradient, PPO clip, KL to reference) -> EMA -> periodic eval -> log ->
atomic checkpoint. Components are injected; nothing here knows a method's, model's or reward's name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import numpy as np
import torch
from tqdm.auto import tqdm

from tmpo.checkpoint import LATEST, load_checkpoint, save_atomic
from tmpo.diagnostics import group_diagnostics
from tmpo.distributed import Processes, check_minibatches
from tmpo.ema import EMA
from tmpo.evaluation import Evaluator
from tmpo.faults import NonFiniteError, PeerFailure, degenerate_advantages, eval_fault, rollout_fault
from tmpo.logger import RunLogger
from tmpo.objectives.base import Objective
from tmpo.policies.base import FlowPolicy
from tmpo.prompts import PromptSource
from tmpo.samplers.sampler import FlowSampler
from tmpo.seeding import GroupGenerators, resolve_noise_seeding, stream_seed
from tmpo.signals import GracefulStop, Preempted
from tmpo.update import policy_update

_log = logging.getLogger(__name__)


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
    keep_last_good: bool = True  # CPU copy of the state at each iteration's start, checkpointed on a fault
    lr_scale: float = 1.0  # the optimizer's lr is lr * lr_scale: a scale's factor on the paper's per-method lrs
    # rollout noise: batch = one stream for the iteration's whole batch; group = one stream per prompt group
    # from (seed, step, the group's index in the batch), the same rollouts whatever the number of processes;
    # auto = group when several processes share the batch (tmpo.distributed), else batch
    noise_seeding: str = "auto"


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
        run_config: dict | None = None,
        processes: Processes | None = None,
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
            self.params, lr=cfg.lr * cfg.lr_scale, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = EMA(named, decay=cfg.ema_decay, every=cfg.ema_every)
        self.step = 0
        self.base_metrics: dict[str, float] = {}
        self.run_config = run_config  # the resolved run config, stored in checkpoints (a resume compares it)
        self.resume_state: dict[str, Any] | None = None  # the checkpoint build_trainer chose (resume=auto|<dir>)
        self.finished = False  # the loaded checkpoint is the end of a finished run
        self._saved_summary: dict | None = None
        self._saved_step: int | None = None
        self._pending_good: dict | None = None  # state at this iteration's start, until its rollout is finite
        self._last_good: dict | None = None  # the latest state whose rollout was finite (tmpo.faults)
        self.processes = processes or Processes()  # one process, or several sharing each batch (tmpo.distributed)
        self.noise_seeding = resolve_noise_seeding(cfg.noise_seeding, self.processes.world_size)
        if self.processes.distributed:
            self._share_work()

    def _share_work(self) -> None:
        """Several processes: check the batch splits evenly, hand the processes to the parts that gather
        batch-wide statistics, and wrap the policy for gradient synchronisation."""
        self.processes.groups(self.cfg.prompts_per_step)
        check_minibatches(self.cfg.minibatches, self.cfg.minibatch_split, self.cfg.prompts_per_step, self.processes.world_size)
        self.objective.processes = self.processes
        if self.evaluator is not None:
            self.evaluator.processes = self.processes
        self.processes.prepare(self.policy)

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
        rng = np.random.default_rng(stream_seed(self.cfg.seed, step, 0))
        batch = self.prompts.train(self.cfg.prompts_per_step, rng)  # the global batch: the same on every process
        own = self.processes.groups(len(batch))
        batch = [batch[i] for i in own]
        texts, meta = [t for t, _ in batch], [m for _, m in batch]
        if self.noise_seeding == "group":
            gen = GroupGenerators(self.cfg.seed, step, 1, own)
        else:
            gen = torch.Generator().manual_seed(stream_seed(self.cfg.seed, step, 1))
        rollout, t_rollout, samples, rewards, reward_info = self._sample_and_score(texts, meta, step, gen)
        prepared = self.objective.prepare(rollout, rewards, step, samples=samples, reward_info=reward_info)
        t_reward = time.perf_counter()  # decode, reward and advantages (GARDO's features and aux rewards)
        stats = policy_update(
            self.policy, rollout, self.objective, prepared, self.optimizer, self.params,
            inner_epochs=self.cfg.inner_epochs, minibatches=self.cfg.minibatches,
            parent_chunk=self.cfg.parent_chunk, grad_clip=self.cfg.grad_clip,
            minibatch_split=self.cfg.minibatch_split,
            generator=torch.Generator().manual_seed(stream_seed(self.cfg.seed, step, 2)),
            processes=self.processes,
        )
        t_update = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.ema.update(step)
        k = rollout.group_size
        g = rollout.num_groups * self.processes.world_size  # groups in the global batch; stats are global
        metrics = {f"train/{n}": v for n, v in stats.items() if not n.startswith("fwd_")}
        metrics.update({f"nfe/{n[4:]}_per_prompt": v / g for n, v in stats.items() if n.startswith("fwd_")})
        metrics["nfe/sample_per_prompt"] = float(rollout.nfe)
        metrics.update({f"train/{n}": v for n, v in self.objective.after_update(self.policy, stats, step).items()})
        metrics.update({f"train/{n}": float(v) for n, v in self._global_means(prepared.stats).items()})
        adv = prepared.leaf_adv if prepared.leaf_adv is not None else torch.full_like(rewards, float("nan"))
        log_p_traj = rollout.trajectory_log_prob_old() * self.objective.log_prob_scale(rollout.latent_dim)
        rewards, adv, log_p_traj = (self.processes.gather(t) for t in (rewards, adv, log_p_traj))  # global batch
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
            "train/edges_per_prompt": float(int(self.processes.sum(torch.tensor(rollout.edge_x_next.shape[0]))) / g),
            "time/rollout_s": t_rollout - t0,
            "time/reward_s": t_reward - t_rollout,
            "time/update_s": t_update - t_reward,
            "iter_time_s": time.perf_counter() - t0,
        })
        return metrics

    def _sample_and_score(self, texts: list[str], meta: list[dict], step: int, gen) -> tuple:
        """Roll out and score this process's prompts -> ``(rollout, t_rollout, samples, rewards, info)``.

        With several processes a non-finite rollout or reward on any of them stops all of them at this
        iteration; the last good state is then the one every process agreed was good before it. Any other
        error there (a reward server that stayed down) stops all of them too (:class:`PeerFailure`), with
        the state the iteration started from, instead of leaving the others waiting in a collective."""
        before = self._last_good
        error: Exception | None = None
        rollout = t_rollout = samples = rewards = reward_info = None
        try:
            rollout = self.sampler.rollout(self.policy, texts, meta, step, self.cfg.total_steps, gen)
            t_rollout = time.perf_counter()
            samples, rewards, reward_info = self.score(rollout)
        except Exception as e:  # noqa: BLE001 -- agreed on below, then re-raised on every process
            if not self.processes.distributed:
                raise
            error = e
        if self.processes.distributed:
            try:
                self.processes.check_faults(error, step + 1)
            except NonFiniteError:
                self._last_good = before
                raise
        return rollout, t_rollout, samples, rewards, reward_info

    def _global_means(self, stats: dict[str, Any]) -> dict[str, float]:
        """Per-process statistics (means over equally many leaves) as means over processes."""
        if not stats or not self.processes.distributed:
            return stats
        return self.processes.reduce_steps([{n: float(v) for n, v in stats.items()}], (), ())[0]

    def score(self, rollout) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Decode and score the leaves -> ``(samples, rewards [L], reward info)``.

        A non-finite or mis-shaped reward is an error, never zeroed; non-finite samples or log-probs are
        named first as the policy's divergence (:meth:`check_rollout_finite`)."""
        self.check_rollout_finite(rollout)
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
            raise NonFiniteError(f"reward returned non-finite values ({int((~torch.isfinite(rewards)).sum())} of "
                                 f"{rewards.numel()}) at iteration {self.step + 1}, on finite samples")
        return samples, rewards, dict(info or {})

    # --- evaluation, checkpoints ---------------------------------------------------------------
    def evaluated_weights(self) -> dict[str, Any]:
        """Which weights :meth:`evaluate` scores after ``self.step`` iterations, with the numbers that say so.

        The EMA (paper App. D.3) once it has been updated: ``ema_updates = step // ema_every`` updates, and
        ``ema_initial_share = ema_decay ** ema_updates`` of it is still the initial (untrained) weights. Before
        its first update the EMA *is* the initial model, so a run shorter than ``ema_every`` iterations scores
        the live weights instead of silently re-scoring the base model.
        """
        updates = self.step // self.cfg.ema_every
        if updates == 0:
            return {"eval_weights": "live" if self.step else "initial", "ema_updates": 0}
        return {"eval_weights": "ema", "ema_updates": updates, "ema_initial_share": self.cfg.ema_decay ** updates}

    @contextlib.contextmanager
    def weights_for_eval(self) -> Iterator[str]:
        """Within this context the policy holds the weights :meth:`evaluated_weights` names (yielded)."""
        which = self.evaluated_weights()["eval_weights"]
        if which == "ema":
            with self.ema.applied():
                yield which
        else:
            yield which

    def evaluate(self) -> dict[str, float]:
        """Evaluate the EMA policy (the live one before the EMA's first update); a non-finite eval reward
        is an error, other non-finite metrics a warning."""
        if self.evaluator is None:
            return {}
        with self.weights_for_eval() as which:
            metrics = self.evaluator(self.policy)
        noise = getattr(self.evaluator, "noise", None) or {}  # sd over eval seeds, per-image-mean metrics only
        metrics.update({f"noise/{k}": v for k, v in noise.items() if k in metrics and math.isfinite(v)})
        error, others = eval_fault(metrics)
        if error:
            raise NonFiniteError(f"{error} (after iteration {self.step})")
        if others:
            _log.warning("evaluation after iteration %d: non-finite %s", self.step, ", ".join(others))
        shown = ", ".join(f"{k} {v:.4g}" + (f" (noise {noise[k]:.2g})" if k in noise else "")
                          for k, v in metrics.items() if "/" not in k and isinstance(v, float))
        _log.info("eval after iteration %d (%s weights): %s", self.step, which, shown)
        return metrics

    def state_dict(self, finished: bool = False, summary: dict | None = None) -> dict[str, Any]:
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
            "config": self.run_config,  # what a resume must match (tmpo.resume)
            "wandb_run_id": getattr(self.logger, "wandb_id", None),  # a requeued job continues this wandb run
            "metrics_rows": getattr(self.logger, "rows", None),  # metrics.jsonl rows logged up to this state
            "finished": finished,
            "summary": summary,
        }

    def save(self, finished: bool = False, summary: dict | None = None) -> Path:
        """Checkpoint (rank 0 writes; every process waits until it is on disk)."""
        path = self.run_dir / "checkpoints" / LATEST
        if self.processes.is_main:
            path = save_atomic(self.state_dict(finished, summary), path)
            _log.debug("checkpoint after iteration %d: %s", self.step, path)
        self.processes.barrier()
        self._saved_step = self.step
        return path

    def load(self, path: str | Path | dict[str, Any]) -> None:
        """Restore a checkpoint (a path, or a state :func:`tmpo.checkpoint.load_checkpoint` returned)."""
        state = path if isinstance(path, dict) else load_checkpoint(path)
        if state.get("config") is not None and self.run_config is not None:
            from tmpo.resume import compare_configs  # local import: tmpo.resume -> tmpo.config -> this module

            compare_configs(state["config"], self.run_config, "the checkpoint" if isinstance(path, dict) else Path(path))
        self.policy.load_trainable_state(state["policy"])
        self.policy.load_reference_state(state.get("policy_reference"))
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        try:
            self.objective.load_state_dict(state["objective"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"the checkpoint's objective state does not fit {type(self.objective).__name__} ({e!r}); "
                             "it was written by another method or objective") from e
        self.base_metrics = dict(state.get("base_metrics", {}))
        self.step = int(state["step"])
        self.finished = bool(state.get("finished")) and self.step >= self.cfg.total_steps
        self._saved_summary = state.get("summary")
        self._saved_step = self.step
        self._follow_new_total(state)
        self.logger.resume_at(self.step, state.get("metrics_rows"))

    def _follow_new_total(self, state: dict[str, Any]) -> None:
        """After ``trainer.total_steps`` changed on resume, the next iteration's lr follows the new schedule
        (the optimizer's saved lr was computed for the old total)."""
        old_total = (state.get("trainer_config") or {}).get("total_steps")
        if old_total is None or old_total == self.cfg.total_steps:
            return
        old_lr = self.optimizer.param_groups[0]["lr"]
        lrs = [base * self._lr_factor(self.step) for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        _log.warning("trainer.total_steps %s -> %s: the lr of iteration %d is %.4g (was %.4g on the old schedule)",
                     old_total, self.cfg.total_steps, self.step + 1, lrs[0], old_lr)

    # --- faults: the last good state -----------------------------------------------------------
    def check_rollout_finite(self, rollout) -> None:
        """Name a diverged policy (non-finite samples or log-probs) before the reward sees its samples;
        a finite rollout marks the state it was sampled from as good."""
        fault = rollout_fault(rollout, iteration=self.step + 1)
        if fault:
            raise NonFiniteError(fault)
        if self._pending_good is not None:
            self._last_good, self._pending_good = self._pending_good, None

    def _snapshot(self) -> dict[str, Any]:
        def to_cpu(x):
            if isinstance(x, torch.Tensor):
                return x.detach().to("cpu", copy=True)
            if isinstance(x, dict):
                return {k: to_cpu(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(to_cpu(v) for v in x)
            return x

        return to_cpu(self.state_dict())

    def _checkpoint_last_good(self, error: Exception) -> NoReturn:
        """Save the latest state whose rollout was finite (not the faulty one) and re-raise, naming it."""
        good = self._last_good
        if good is None:
            raise error
        path = self.run_dir / "checkpoints" / LATEST
        if self.processes.is_main:
            path = save_atomic(good, path)
        self.processes.barrier()
        self._saved_step = None
        where = f"after iteration {good['step']}" if good["step"] else "the initial state"
        head = str(error) if isinstance(error, (NonFiniteError, PeerFailure)) else f"iteration {self.step + 1}: {error}"
        note = f"{head} -- the last good state ({where}, the latest whose samples were finite) is checkpointed at {path}"
        raise type(error)(note) from error

    def _stop(self, stop: GracefulStop) -> NoReturn:
        path = self.save() if self._saved_step != self.step else self.run_dir / "checkpoints" / LATEST
        raise Preempted(stop.signum, self.step, str(path))

    # --- the run -------------------------------------------------------------------------------
    def run(self, resume: str | Path | None = None) -> dict[str, float]:
        """Train to ``total_steps`` and return the summary, continuing from ``resume`` or from the checkpoint
        :func:`tmpo.run.build_trainer` chose (``resume=auto|<dir>``).

        A stop signal (SIGTERM, SIGUSR1, SIGUSR2, SIGINT) finishes the current iteration, checkpoints and
        raises :class:`tmpo.signals.Preempted`; a non-finite rollout, reward or gradient checkpoints the
        last good state and re-raises."""
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        with GracefulStop() as stop:
            if resume or self.resume_state is not None:
                self.load(resume if resume else self.resume_state)
                self.resume_state = None
                if self.finished:
                    return self._finished_summary()
            elif self.cfg.eval_base and self.evaluator is not None:
                self.base_metrics = self.evaluate()
                self.logger.log({f"base/{k}": v for k, v in self.base_metrics.items()}, step=0)
            last, times = self._train(stop)
            if self._stop_agreed(stop):
                self._stop(stop)
            if self._saved_step != self.step:
                self.save()  # a preemption during a long final eval loses no training
            final = self.evaluate()
            if final:
                self.logger.log({f"eval/{k}": v for k, v in final.items()}, step=self.step)
            summary = dict(final)
            summary.update({f"base/{k}": v for k, v in self.base_metrics.items()})
            summary["iter_time_s"] = float(np.mean(times)) if times else float("nan")
            summary["steps"] = float(self.step)
            summary.update(self.evaluated_weights())
            if last:
                summary["train/reward_mean_last"] = last["train/reward_mean"]
            self.save(finished=True, summary=summary)
            self.logger.summary(summary)
            if stop.requested:
                _log.warning("stop signal during the final evaluation: the run finished and is saved")
        return summary

    def _train(self, stop: GracefulStop) -> tuple[dict[str, float], list[float]]:
        """The iterations from ``self.step`` to ``total_steps``; returns the last metrics row and iteration times."""
        last: dict[str, float] = {}
        times: list[float] = []
        bar = tqdm(range(self.step, self.cfg.total_steps), desc="train", disable=not self.cfg.progress or not self.processes.is_main,
                   initial=self.step, total=self.cfg.total_steps, mininterval=1.0)
        with bar:
            for step in bar:
                if self._stop_agreed(stop):
                    break
                if self.cfg.keep_last_good:  # only rank 0 writes it: the others keep which step it is
                    self._pending_good = self._snapshot() if self.processes.is_main else {"step": self.step}
                try:
                    last = self.train_step(step)
                except (NonFiniteError, FloatingPointError, PeerFailure) as e:
                    self._checkpoint_last_good(e)
                times.append(last["iter_time_s"])
                self.step = step + 1
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.total_steps:
                    last.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                self.logger.log(last, step=self.step)
                bar.set_postfix(reward=f"{last['train/reward_mean']:.3f}", refresh=False)
                warning = degenerate_advantages(last, getattr(self.objective, "adv_clip", None))
                if warning:
                    _log.warning("iteration %d: %s", self.step, warning)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save()
        return last, times

    def _stop_agreed(self, stop: GracefulStop) -> bool:
        """Whether any process received a stop signal (then all stop at the same iteration boundary)."""
        signum = self.processes.agree_stop(stop.signum)
        if signum is not None and stop.signum is None:
            stop.signum = signum
        return stop.requested

    def _finished_summary(self) -> dict[str, float]:
        """A resumed run that already finished: report it, restore a missing summary.json, train nothing."""
        path = self.run_dir / "summary.json"
        summary = dict(self._saved_summary or {})
        if not summary and path.exists():
            summary = json.loads(path.read_text())
        if not path.exists() and summary:
            self.logger.summary(summary)
        _log.warning("the run in %s is finished (step %d of %d): nothing to train; raise trainer.total_steps to "
                     "continue it", self.run_dir, self.step, self.cfg.total_steps)
        return summary
