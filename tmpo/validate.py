"""Start-up checks of every value a run depends on: one message naming the key, the value and the
valid range, raised before anything is written (no run directory is created).

Component classes keep their own checks; this module reads the composed config's values (trainer,
eval, sampler and plan, objective, run dir) so that a bad value never surfaces later as a silent no-op
(``trainer.inner_epochs=0``), a clamp (``plan.late=[1,3,9]``) or a cryptic error deep in a rollout.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from tmpo.config import ConfigError
from tmpo.objectives.softmax_tb import MARGINAL_REDUCTIONS, POLICY_TERMS
from tmpo.seeding import NOISE_SEEDINGS
from tmpo.update import MINIBATCH_SPLITS

_PLAN_CHECK_STEPS = 64  # iterations at which the rollout plan is dry-run (evenly spaced over the run)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def require(key: str, value: Any, ok: bool, valid: str) -> None:
    """Raise the one start-up message: ``<key>=<value> is invalid: <valid range>``."""
    if not ok:
        raise ConfigError(f"{key}={_show(value)} is invalid: {valid}")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value)


def int_at_least(key: str, value: Any, low: int, meaning: str = "", none_ok: bool = False) -> None:
    if none_ok and value is None:
        return
    extra = f" ({meaning})" if meaning else ""
    require(key, value, _is_int(value) and value >= low, f"must be an integer >= {low}{extra}" + (" or null" if none_ok else ""))


def number_in(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
              high_open: bool = False, meaning: str = "", none_ok: bool = False) -> None:
    if none_ok and value is None:
        return
    ok = _is_num(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    lo, hi = ("(" if low_open else "[") + f"{low:g}", (f"{high:g}" + (")" if high_open else "]")) if high != math.inf else "inf)"
    extra = f" ({meaning})" if meaning else ""
    require(key, value, ok, f"must be a number in {lo}, {hi}{extra}" + (" or null" if none_ok else ""))


def one_of(key: str, value: Any, options: tuple[str, ...]) -> None:
    require(key, value, value in options, f"valid options: {', '.join(options)}")


# --- groups --------------------------------------------------------------------------------------


def check_trainer(t: DictConfig) -> None:
    int_at_least("trainer.total_steps", t.total_steps, 1, "training iterations")
    int_at_least("trainer.prompts_per_step", t.prompts_per_step, 1, "prompt groups per iteration")
    int_at_least("trainer.inner_epochs", t.inner_epochs, 1, "passes over each rollout; 0 would never update")
    int_at_least("trainer.minibatches", t.minibatches, 1, "optimizer steps per pass")
    int_at_least("trainer.parent_chunk", t.parent_chunk, 1, "parent states per forward in the update")
    int_at_least("trainer.ema_every", t.ema_every, 1, "iterations between EMA updates")
    int_at_least("trainer.checkpoint_every", t.checkpoint_every, 0, "0 = only at the end")
    int_at_least("trainer.eval_every", t.eval_every, 0, "0 = only before and after training")
    int_at_least("trainer.seed", t.seed, 0, "numpy seeds must be non-negative")
    int_at_least("trainer.threads", t.threads, 1, "torch threads", none_ok=True)
    number_in("trainer.lr", t.lr, 0.0, low_open=True, meaning="learning rate")
    if "lr_scale" in t:
        number_in("trainer.lr_scale", t.lr_scale, 0.0, low_open=True, meaning="factor on trainer.lr")
    number_in("trainer.weight_decay", t.weight_decay, 0.0)
    number_in("trainer.adam_beta1", t.adam_beta1, 0.0, 1.0, high_open=True)
    number_in("trainer.adam_beta2", t.adam_beta2, 0.0, 1.0, high_open=True)
    number_in("trainer.lr_min_ratio", t.lr_min_ratio, 0.0, 1.0, meaning="cosine floor as a fraction of lr")
    number_in("trainer.grad_clip", t.grad_clip, 0.0, low_open=True, meaning="max gradient norm", none_ok=True)
    number_in("trainer.ema_decay", t.ema_decay, 0.0, 1.0, high_open=True, meaning="EMA decay; 1 would freeze the EMA weights")
    if "lr_schedule" in t:
        one_of("trainer.lr_schedule", t.lr_schedule, ("cosine", "constant"))
    if "minibatch_split" in t:
        one_of("trainer.minibatch_split", t.minibatch_split, MINIBATCH_SPLITS)
    if "noise_seeding" in t:
        one_of("trainer.noise_seeding", t.noise_seeding, NOISE_SEEDINGS)


def check_eval(e: DictConfig) -> None:
    int_at_least("eval.samples_per_prompt", e.samples_per_prompt, 1)
    int_at_least("eval.num_steps", e.num_steps, 1, "ODE steps of the evaluation sampler")
    int_at_least("eval.max_prompts", e.max_prompts, 1, "null = every test prompt", none_ok=True)
    int_at_least("eval.batch_size", e.get("batch_size"), 1, "samples integrated at once; null = all", none_ok=True)
    int_at_least("eval.seed", e.seed, 0)


DIVERSITY_METRIC = "tmpo.metrics.task.PerPromptDiversity"


def check_diversity_samples(cfg: DictConfig) -> None:
    """A diversity metric (LGMD, Cos. Div.) compares a prompt's images pairwise: it needs >= 2 per prompt."""
    sets = [("reward.metrics", cfg.reward.get("metrics") or [], None)]
    sets += [(f"reward.suites.{name}", s.get("metrics") or [], s.get("samples_per_prompt"))
             for name, s in (cfg.reward.get("suites") or {}).items()]
    for where, metrics, own in sets:
        if not any(m.get("_target_") == DIVERSITY_METRIC for m in metrics):
            continue
        key, n = (f"{where}.samples_per_prompt", own) if own is not None else ("eval.samples_per_prompt", cfg.eval.samples_per_prompt)
        require(key, n, _is_int(n) and n >= 2, f"{where} has a diversity metric (LGMD/Cos. Div.), which compares "
                "a prompt's images in pairs: at least 2 per prompt (the paper: 10)")


def check_objective(o: DictConfig) -> None:
    """Numeric ranges shared by the objectives (only the keys the chosen objective has)."""
    ranges = {
        "clip_eps": dict(low=0.0, low_open=True, meaning="PPO clip range"),
        "kl_coef": dict(low=0.0, meaning="KL weight; 0 turns the KL off"),
        "adv_clip": dict(low=0.0, low_open=True, none_ok=True),
        "std_eps": dict(low=0.0),
        "beta_start": dict(low=0.0, low_open=True, meaning="reward temperature"),
        "beta_end": dict(low=0.0, low_open=True, meaning="reward temperature"),
        "kl_thres": dict(low=0.0, low_open=True),
    }
    for key, kw in ranges.items():
        if key in o:
            number_in(f"objective.{key}", o[key], **kw)
    for key in ("beta_warmup_steps",):
        if key in o:
            int_at_least(f"objective.{key}", o[key], 0)
    if "reset_every" in o:
        int_at_least("objective.reset_every", o.reset_every, 1)
    if "log_prob_reduction" in o:
        one_of("objective.log_prob_reduction", o.log_prob_reduction, ("mean", "sum"))
    if "policy_term" in o:
        one_of("objective.policy_term", o.policy_term, POLICY_TERMS)
    if "marginal_reduction" in o:
        one_of("objective.marginal_reduction", o.marginal_reduction, MARGINAL_REDUCTIONS)


def check_leaf_likelihood(cfg: DictConfig) -> None:
    """``objective.policy_term=marginal`` needs the sampler's leaf densities (``sampler.leaf_likelihood``),
    and those settings must be valid -- checked here, not at the first update after the base evaluation."""
    settings = cfg.sampler.get("leaf_likelihood") if "sampler" in cfg else None
    if cfg.objective.get("policy_term") == "marginal" and settings is None:
        raise ConfigError("objective.policy_term=marginal is invalid without sampler.leaf_likelihood (each leaf's "
                          "log p_old(x_0) that the policy term needs): use method=tmpo_marginal, or add "
                          "'+sampler.leaf_likelihood={ode_steps: 32, probes: 1, exact: auto, solver: heun}'")
    if settings is not None:
        from tmpo.likelihood import LeafLikelihood

        try:
            LeafLikelihood.from_config(OmegaConf.to_container(settings, resolve=True))
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None


def _positions(key: str, value: Any, s_min: int, s_max: int, why: str) -> list:
    vals = list(OmegaConf.to_container(value, resolve=True)) if isinstance(value, ListConfig) else value
    require(key, value, isinstance(vals, (list, tuple)) and len(vals) >= 1 and all(_is_num(v) for v in vals),
            "must be a non-empty list of step numbers")
    require(key, value, all(s_min <= v <= s_max for v in vals), f"every position must lie in [s_min, s_max] = [{s_min}, {s_max}]{why}")
    return list(vals)


def check_tree_plan(p: DictConfig, where: str, num_steps: int, noise: str) -> None:
    """TMPO's dynamic tree (paper App. C.2): branch counts, the curriculum positions and the Beta draw."""
    int_at_least(f"{where}.branch", p.branch, 2, "children per branch point; 1 leaves one sample per prompt")
    int_at_least(f"{where}.s_min", p.s_min, 1)
    top = num_steps - 1 if noise == "cps" else num_steps  # a CPS step into sigma = 0 has no noise to branch on
    why = f"; s_max <= {top}" + (" (the last CPS step has zero noise)" if noise == "cps" else "")
    if p.s_max is not None:
        int_at_least(f"{where}.s_max", p.s_max, p.s_min + 1, f"must exceed s_min{why}")
        require(f"{where}.s_max", p.s_max, p.s_max <= top, f"must be <= {top} with sampler.num_steps={num_steps}{why}")
    s_max = top if p.s_max is None else int(p.s_max)
    null_note = f" (s_max = null means sampler.num_steps - 1 = {num_steps - 1})" if p.s_max is None else ""
    require(f"{where}.s_max", p.s_max, s_max > p.s_min, f"resolves to {s_max}, which must exceed s_min={p.s_min}{null_note}; raise sampler.num_steps")
    early = _positions(f"{where}.early", p.early, p.s_min, s_max, null_note)
    late = _positions(f"{where}.late", p.late, p.s_min, s_max, null_note)
    require(f"{where}.late", p.late, len(late) == len(early), f"must have as many positions as {where}.early ({len(early)})")
    require(f"{where}.early", p.early, len(early) <= s_max - p.s_min + 1,
            f"{len(early)} distinct branch points do not fit in steps [{p.s_min}, {s_max}]")
    number_in(f"{where}.kappa", p.kappa, 0.0, low_open=True, meaning="Beta concentration")
    number_in(f"{where}.mu_bar_margin", p.mu_bar_margin, 0.0, 0.5, low_open=True, high_open=True)
    int_at_least(f"{where}.curriculum_steps", p.curriculum_steps, 1, "null = trainer.total_steps", none_ok=True)
    if not p.dynamic:
        fixed = _positions(f"{where}.fixed_positions", p.fixed_positions, p.s_min, s_max, null_note)
        require(f"{where}.fixed_positions", p.fixed_positions, len(set(fixed)) == len(fixed), "positions must be distinct")


def check_plan_values(p: DictConfig, num_steps: int, noise: str) -> None:
    """Per-plan ranges, by the plan's class (values only; the classes are not touched)."""
    name = str(p.get("_target_", "")).rsplit(".", 1)[-1]
    if name == "DynamicTreePlan":
        check_tree_plan(p, "sampler.plan", num_steps, noise)
    if name in ("IndependentPlan", "SlidingWindowPlan"):
        int_at_least("sampler.plan.group_size", p.group_size, 2, "K samples per prompt; advantages compare them, so K = 1 has none")
    if name == "IndependentPlan" and p.get("tree") is not None:
        check_tree_plan(p.tree, "sampler.plan.tree", num_steps, noise)
    if name in ("SlidingWindowPlan", "TreeWindowPlan"):
        int_at_least("sampler.plan.window", p.window, 1)
        int_at_least("sampler.plan.shift_every", p.shift_every, 1)
        int_at_least("sampler.plan.shift", p.shift, 0, "0 freezes the window")
    if name == "TreeWindowPlan":
        int_at_least("sampler.plan.branch", p.branch, 2, "children per window step")
        require("sampler.num_steps", num_steps, num_steps > p.window, f"must exceed sampler.plan.window={p.window}")
    if name == "SlidingWindowPlan":
        require("sampler.num_steps", num_steps, num_steps >= 3, "must be >= 3 for the sliding window (its last two steps are never trained)")


def dry_run_plan(cfg: DictConfig) -> None:
    """Make the rollout plan at evenly spaced iterations: it must store a trainable step and give each
    prompt at least two samples; a CPS sampler must not put noise on its last (zero-noise) step."""
    from hydra.utils import instantiate

    s = cfg.sampler
    total, n = int(cfg.trainer.total_steps), int(s.num_steps)
    plan = instantiate(s.plan)
    what = f"sampler.plan ({str(s.plan._target_).rsplit('.', 1)[-1]}) with sampler.num_steps={n}"
    stride = max(1, total // _PLAN_CHECK_STEPS)
    for step in sorted({*range(0, total, stride), total - 1}):
        try:
            rp = plan.make(step, total, n, np.random.default_rng(step))
        except ValueError as e:
            raise ConfigError(f"{what} is invalid: it cannot make the rollout of iteration {step + 1}: {e}") from e
        if rp.group_size < 2:
            raise ConfigError(f"{what} is invalid: it gives {rp.group_size} sample per prompt at iteration {step + 1}; "
                              "advantages compare the samples of a prompt, so the group needs at least 2")
        if not rp.stored_steps:
            raise ConfigError(f"{what} is invalid: it stores no trainable step at iteration {step + 1}, so nothing "
                              "would be trained; raise sampler.num_steps or add SDE/train steps to the plan")
        if s.noise == "cps" and rp.steps and rp.steps[-1].stochastic:
            raise ConfigError(f"{what} is invalid: it puts a stochastic step on the last step ({n}) at iteration "
                              f"{step + 1}, where the CPS noise std is 0; keep SDE steps and branch points below "
                              f"step {n}, or use sampler.noise=sde")


def check_sampler(cfg: DictConfig) -> None:
    s = cfg.sampler
    if not str(s.get("_target_", "")).endswith("FlowSampler"):
        return
    int_at_least("sampler.num_steps", s.num_steps, 1, "denoising steps of a training rollout")
    one_of("sampler.noise", s.noise, ("cps", "sde"))
    if s.noise == "cps":
        number_in("sampler.eta", s.eta, 0.0, 1.0, low_open=True,
                  meaning="CPS noise std = sigma_next * sin(eta pi / 2): 0 has no noise, above 1 it shrinks again")
    else:
        number_in("sampler.eta", s.eta, 0.0, low_open=True, meaning="SDE noise level; 0 is the deterministic ODE")
    if isinstance(s.get("plan"), DictConfig) and "_target_" in s.plan:
        check_plan_values(s.plan, int(s.num_steps), str(s.noise))
        dry_run_plan(cfg)


def check_run_dir(run_dir: str | os.PathLike, key: str = "run_dir") -> None:
    """The run directory must be creatable and writable: probe its nearest existing ancestor
    (a temporary directory, removed at once)."""
    path = Path(run_dir).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={str(run_dir)!r} is invalid: it exists and is not a directory")
    anchor = path
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ConfigError(f"{key}={str(run_dir)!r} is invalid: {anchor} is a file, so the directory cannot be created")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tmpo-write-probe-", dir=anchor))
    except OSError as e:
        raise ConfigError(f"{key}={str(run_dir)!r} is invalid: cannot create files in {anchor} ({e.strerror}); "
                          "choose a writable directory (hydra.run.dir=... or run_dir=...)") from e


def check_lr_scales(cfg: DictConfig) -> None:
    """A scale that sets ``trainer.lr_scale`` per method (``${lr_scales.${method}}``) must list this method."""
    if OmegaConf.is_interpolation(cfg.trainer, "lr_scale") and cfg.method not in cfg.lr_scales:
        listed = ", ".join(f"{k}={v:g}" for k, v in cfg.lr_scales.items()) or "none"
        raise ConfigError(f"trainer.lr_scale is invalid: this scale takes it from lr_scales.<method>, which has no entry "
                          f"for method={cfg.method} (listed: {listed}); add lr_scales.{cfg.method}=<factor> to the scale's "
                          "config (conf/scale/) or set trainer.lr_scale=<factor>")


def validate_run_config(cfg: DictConfig) -> None:
    """Every start-up check on a composed run config (raises :class:`ConfigError`; writes nothing)."""
    check_lr_scales(cfg)
    check_trainer(cfg.trainer)
    check_eval(cfg.eval)
    check_diversity_samples(cfg)
    check_objective(cfg.objective)
    check_sampler(cfg)
    check_leaf_likelihood(cfg)
