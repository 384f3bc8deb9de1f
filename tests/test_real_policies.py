"""FLUX.1 / SD3.5 backends on tiny random-weight models of the real diffusers classes: agreement with
the stock diffusers pipelines, LoRA targets, reference/reset adapters, precision, caching, loading,
and every method for 2 iterations through the shared loop."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


from tmpo.policies.diffusers_policy import PromptEmbeddings, calculate_shift
from tmpo.policies.flux import FluxPolicy, latent_image_ids, pack_latents, unpack_latents
from tmpo.policies.sd3 import SD3Policy
from tmpo.policies.tiny_diffusers import build_tiny_pipeline
from tmpo.samplers import sample_ode

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a red circle", "two blue squares"]


def _conf_lora(name: str) -> dict:
    from omegaconf import OmegaConf

    lora = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml").lora)
    return {**lora, "r": 4, "alpha": 8}


def tiny(family: str, lora: bool = True, **kw) -> FluxPolicy | SD3Policy:
    cls, conf = (FluxPolicy, "flux_dev") if family == "flux" else (SD3Policy, "sd35_medium")
    kw.setdefault("dtype", "fp32")
    return cls(tiny={}, resolution=32, max_sequence_length=16, lora=_conf_lora(conf) if lora else None, **kw)


def perturb_lora(policy, scale: float = 0.3, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in policy.trainable_named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


# --- FLUX specifics ------------------------------------------------------------------------------
def test_flux_packing_matches_the_pipeline_and_round_trips():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert packed.shape == (2, 12, 16)
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    ids = latent_image_ids(6, 8, torch.device("cpu"), torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    assert ids[5].tolist() == [0.0, 1.0, 1.0]  # row 1, column 1 of the 3 x 4 patch grid


def test_flux_sigmas_are_the_shifted_linspace_with_resolution_dependent_mu():
    policy = tiny("flux", lora=False)
    n = 6
    mu = calculate_shift(policy.image_seq_len(), policy.scheduler_config)
    # 64 tokens: mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256)
    assert policy.image_seq_len() == 64 and mu == pytest.approx(0.5 - 0.65 * 192 / 3840)
    s = np.linspace(1.0, 1.0 / n, n)
    expected = np.exp(mu) / (np.exp(mu) + (1.0 / s - 1.0))
    sig = policy.sigmas(n)
    assert sig.shape == (n + 1,) and sig.dtype == torch.float32 and sig[-1] == 0
    np.testing.assert_allclose(sig[:-1].numpy(), expected, rtol=1e-6)


def test_sd3_sigmas_are_the_static_shift_of_the_scheduler_spacing():
    policy = tiny("sd3", lora=False)
    n = 4
    t_min = 3 * 0.001 / (1 + 2 * 0.001)  # the scheduler's smallest training sigma after shift 3
    s = np.linspace(1.0, t_min, n)
    expected = 3 * s / (1 + 2 * s)
    np.testing.assert_allclose(policy.sigmas(n)[:-1].numpy(), expected, rtol=1e-5)
    assert policy.sigmas(n)[-1] == 0


# --- agreement with the stock pipelines -----------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_ode_sampling_equals_the_diffusers_pipeline(family):
    """Our Euler ODE over the policy's sigmas and velocity == the pipeline's own denoising loop."""
    policy = tiny(family, lora=False)
    pipe = build_tiny_pipeline(family)
    n_steps = 3
    x = sample_ode(policy, PROMPTS, 1, n_steps, torch.Generator().manual_seed(0))
    x1 = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    if family == "flux":
        out = pipe(PROMPTS, height=32, width=32, num_inference_steps=n_steps, guidance_scale=3.5, latents=pack_latents(x1),
                   output_type="latent", max_sequence_length=16).images
        ref = unpack_latents(out, 16, 16)
    else:
        ref = pipe(PROMPTS, height=32, width=32, num_inference_steps=n_steps, guidance_scale=4.5, latents=x1,
                   output_type="latent", max_sequence_length=16).images
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_decode_matches_the_pipeline_postprocessing(family):
    policy = tiny(family, lora=False)
    pipe = build_tiny_pipeline(family)
    z = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    cfg = pipe.vae.config
    ref = pipe.image_processor.postprocess(pipe.vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample, output_type="pt")
    img = policy.decode(z)
    assert img.shape == (2, 3, 32, 32) and img.dtype == torch.float32
    torch.testing.assert_close(img, ref)


# --- LoRA, reference, reset -----------------------------------------------------------------------
def test_flux_lora_targets_every_block_projection_but_not_the_head():
    policy = tiny("flux")
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n, _ in policy.trainable_named_parameters()}
    assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
            "single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
            "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2"} <= adapted
    assert "proj_out" not in adapted and not any("norm" in n or "embed" in n for n in adapted)
    again = tiny("flux")  # the LoRA init is seeded by model.seed, not by whatever ran before
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(policy.trainable_named_parameters(), again.trainable_named_parameters()))
    assert len(adapted) == 12 + 5  # 8 attention + 4 feed-forward per double block; q, k, v, proj_mlp, proj_out per single block


def test_sd3_lora_targets_joint_and_dual_attention_and_feed_forward():
    policy = tiny("sd3")
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n, _ in policy.trainable_named_parameters()}
    assert "transformer_blocks.0.attn2.to_q" in adapted and "transformer_blocks.1.ff.net.2" in adapted
    assert "transformer_blocks.1.attn.to_add_out" not in adapted  # the last block is context_pre_only
    assert "proj_out" not in adapted


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_reference_is_the_adapter_disabled_and_reset_copies_the_policy(family):
    policy = tiny(family)
    base = tiny(family, lora=False)
    cond = policy.encode_prompts(PROMPTS)
    x = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma, index = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0, 1, 1])
    v_base = base.velocity(x, sigma, base.encode_prompts(PROMPTS), index)
    torch.testing.assert_close(policy.velocity(x, sigma, cond, index), v_base)  # B = 0 at init
    perturb_lora(policy)
    v_policy = policy.velocity(x, sigma, cond, index)
    assert (v_policy - v_base).abs().max() > 1e-3
    with policy.reference():
        torch.testing.assert_close(policy.velocity(x, sigma, cond, index), v_base)
    policy.reset_reference()  # GARDO: the reference becomes the current policy
    perturb_lora(policy, seed=2)
    with policy.reference():
        torch.testing.assert_close(policy.velocity(x, sigma, cond, index), v_policy)
    assert not any(".reference." in n for n, _ in policy.trainable_named_parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        policy = tiny("flux", gradient_checkpointing=ckpt)
        perturb_lora(policy)
        policy.net.train()
        cond = policy.encode_prompts(PROMPTS)
        x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
        policy.velocity(x, torch.tensor([0.8, 0.3]), cond, torch.tensor([0, 1])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in policy.trainable_named_parameters()]))
    assert policy.base_transformer.gradient_checkpointing
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1])


# --- precision, device, caching, errors -----------------------------------------------------------
def test_bf16_transformer_keeps_latents_noise_and_log_probs_in_float32():
    from tmpo.samplers import FlowSampler, IndependentPlan

    policy = tiny("flux", dtype="bf16")
    assert policy.base_transformer.dtype == torch.bfloat16 and policy.dtype == torch.float32
    lora_dtypes = {p.dtype for _, p in policy.trainable_named_parameters()}
    assert lora_dtypes == {torch.float32}  # peft keeps the adapter in float32
    sampler = FlowSampler(IndependentPlan(group_size=2), num_steps=3, eta=0.9, noise="sde")
    rollout = sampler.rollout(policy, PROMPTS[:1], [{}], 0, 10, torch.Generator().manual_seed(0))
    for t in (rollout.leaves, rollout.parent_mean_old, rollout.edge_x_next, rollout.edge_log_prob_old):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())


def test_prompt_embeddings_are_computed_once_per_prompt_and_cpu_indices_work():
    policy = tiny("sd3")
    calls = []
    inner = policy._encode_uncached
    policy._encode_uncached = lambda prompts: calls.append(list(prompts)) or inner(prompts)
    a = policy.encode_prompts(PROMPTS)
    b = policy.encode_prompts([PROMPTS[1], PROMPTS[0], PROMPTS[1]])
    assert calls == [PROMPTS, [""]]  # the prompts once, the cached negative prompt once
    assert torch.equal(b.embeds[1], a.embeds[0]) and torch.equal(b.pooled[2], a.pooled[1])
    assert isinstance(b, PromptEmbeddings) and b.extra["neg_embeds"].shape[0] == 1


def test_bad_model_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of model.pretrained"):
        FluxPolicy(pretrained="x", tiny={})
    with pytest.raises(ValueError, match="multiple of 4"):
        FluxPolicy(tiny={}, resolution=30, dtype="fp32")
    with pytest.raises(ValueError, match="unknown dtype"):
        FluxPolicy(tiny={}, resolution=32, dtype="bf8")
    with pytest.raises(OSError, match="Download it first"):
        FluxPolicy(pretrained=str(tmp_path / "missing"), dtype="fp32")


def test_loads_a_saved_pipeline_folder_with_from_pretrained(tmp_path):
    build_tiny_pipeline("flux").save_pretrained(tmp_path / "flux")
    loaded = FluxPolicy(pretrained=str(tmp_path / "flux"), dtype="fp32", resolution=32, max_sequence_length=16, lora=None)
    built = tiny("flux", lora=False)
    x = torch.randn(2, *built.latent_shape, generator=torch.Generator().manual_seed(0))
    args = (x, torch.tensor([0.7, 0.2]), torch.tensor([0, 1]))
    torch.testing.assert_close(loaded.velocity(args[0], args[1], loaded.encode_prompts(PROMPTS), args[2]),
                               built.velocity(args[0], args[1], built.encode_prompts(PROMPTS), args[2]))


# --- every method through the shared loop ----------------------------------------------------------
RUN = ["reward=pickscore", "reward.suites.drawbench.max_prompts=1", "trainer.eval_base=false", "eval.max_prompts=1"]


def _run(tmp_path, model: str, method: str, extra: list[str] = ()) -> dict:
    from tmpo.run import compose_config, train

    cfg = compose_config([f"run_dir={tmp_path}", "logger=none", "trainer.progress=false", f"model={model}", f"method={method}", *RUN, *extra])
    return train(cfg)


@pytest.mark.parametrize("method", ["tmpo", "flow_grpo", "mixgrpo", "treegrpo", "gardo"])
def test_every_method_runs_two_iterations_on_tiny_flux(tmp_path, method):
    summary = _run(tmp_path, "flux_tiny", method)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(r["train/group_size"] == 27 and math.isfinite(r["train/loss"]) for r in train_rows)
    for key in ("pickscore", "lgmd", "cosdiv", "iter_time_s"):
        assert math.isfinite(summary[key]), key
    assert (tmp_path / "checkpoints" / "latest.pt").exists()


@pytest.mark.parametrize("method", ["tmpo", pytest.param("gardo", marks=pytest.mark.slow)])
def test_tiny_sd35_runs_two_iterations(tmp_path, method):
    summary = _run(tmp_path, "sd35_tiny", method)
    assert math.isfinite(summary["pickscore"]) and summary["steps"] == 2


@pytest.mark.slow
def test_cli_run_on_tiny_flux(tmp_path):
    cmd = [sys.executable, "-m", "tmpo.run", "model=flux_tiny", "method=tmpo", *RUN, "logger=none",
           "trainer.progress=false", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def test_gpu_benchmark_script_runs_on_the_tiny_model(tmp_path):
    from experiments.bench_real import main
    from tmpo.policies.tiny_diffusers import FLUX_FULL

    out = tmp_path / "bench.md"
    main(["--size", "tiny", "--device", "cpu", "--methods", "tmpo", "--iters", "1", "--warmup", "0", "--out", str(out)])
    table = out.read_text().splitlines()
    assert table[-1].startswith("| tmpo | 27 | 1 |")
    # the full-size spec is the released FLUX.1-dev shape: 16 latent channels packed 2x2, T5/CLIP widths
    t = FLUX_FULL["transformer"]
    assert t["in_channels"] == 4 * FLUX_FULL["vae"]["latent_channels"] == 64
    assert t["joint_attention_dim"] == FLUX_FULL["t5"]["d_model"] and t["pooled_projection_dim"] == FLUX_FULL["clip"]["hidden_size"]
    assert sum(t["axes_dims_rope"]) == t["attention_head_dim"]
