"""``python -m tmpo.export``: a trained LoRA loads into a stock diffusers pipeline and reproduces the policy."""

from __future__ import annotations

import pytest
import torch


from hydra.utils import instantiate

from tmpo.checkpoint import load_checkpoint
from tmpo.export import diffusers_lora_keys, export_lora, main
from tmpo.policies.flux import latent_image_ids, pack_latents, unpack_latents
from tmpo.policies.tiny_diffusers import build_tiny_pipeline
from tmpo.run import compose_config, train
from tmpo.samplers import sample_ode

PROMPTS = ["a photo of a red circle", "two blue squares"]
MODELS = {"flux": "flux_tiny", "sd3": "sd35_tiny"}


def _trained_run(tmp_path, family: str):
    """2 iterations of Flow-GRPO from a saved tiny pipeline folder (the real from_pretrained path), EMA every step."""
    base = tmp_path / "base"
    build_tiny_pipeline(family).save_pretrained(base)
    run = tmp_path / "run"
    cfg = compose_config([
        f"run_dir={run}", "logger=none", "trainer.progress=false", f"model={MODELS[family]}", "method=flow_grpo",
        f"model.pretrained={base}", "model.tiny=null", "reward=pickscore", "reward.suites={}", "trainer.eval_base=false",
        "eval.max_prompts=1", "trainer.ema_every=1", "trainer.lr=1e-2",
    ])
    train(cfg)
    return base, run, cfg


def _stock_velocity(pipe, family: str, x, sigma, prompts):
    """The loaded pipeline's transformer called as its own ``__call__`` does, for latents ``x``."""
    if family == "flux":
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, max_sequence_length=16)
        n, _, h, w = x.shape
        out = pipe.transformer(hidden_states=pack_latents(x), timestep=sigma, guidance=torch.full((n,), 3.5),
                               pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                               img_ids=latent_image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=True, max_sequence_length=16)
    out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([sigma, sigma]) * 1000,
                           encoder_hidden_states=torch.cat([neg, embeds]), pooled_projections=torch.cat([neg_pooled, pooled]),
                           return_dict=False)[0]
    v_neg, v_pos = out.chunk(2)
    return v_neg + 4.5 * (v_pos - v_neg)


@pytest.mark.parametrize("family", ["flux", pytest.param("sd3", marks=pytest.mark.slow)])
def test_exported_lora_in_a_stock_pipeline_reproduces_the_policy(tmp_path, family):
    from diffusers import DiffusionPipeline

    base, run, cfg = _trained_run(tmp_path, family)
    out = export_lora(run, tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "export.json").is_file()

    policy = instantiate(cfg.model)
    ema = load_checkpoint(run)["ema"]
    policy.load_trainable_state(ema)
    # the export's renaming == peft's own adapter state dict (minus the wrapper prefix)
    ours, peft_state = diffusers_lora_keys(ema), policy.lora_state_dict()
    assert ours.keys() == peft_state.keys() and all(torch.equal(ours[k], peft_state[k]) for k in ours)

    pipe = DiffusionPipeline.from_pretrained(base)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.4])
    v_stock = _stock_velocity(pipe, family, x, sigma, PROMPTS)
    pipe.load_lora_weights(out)
    v_lora = _stock_velocity(pipe, family, x, sigma, PROMPTS)
    v_policy = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS), torch.tensor([0, 1]))
    assert (v_lora - v_stock).abs().max() > 1e-4  # the adapter is not the identity after training
    torch.testing.assert_close(v_lora, v_policy, rtol=1e-5, atol=1e-5)  # float32 rounding of the same computation
    # and the pipeline's whole sampling loop with the loaded LoRA equals our ODE sampler
    noise = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(5))
    kw = {"guidance_scale": 3.5, "latents": pack_latents(noise)} if family == "flux" else {"guidance_scale": 4.5, "latents": noise}
    sampled = pipe(PROMPTS, height=32, width=32, num_inference_steps=3, output_type="latent", max_sequence_length=16, **kw).images
    if family == "flux":
        sampled = unpack_latents(sampled, 16, 16)
    torch.testing.assert_close(sampled, sample_ode(policy, PROMPTS, 1, 3, torch.Generator().manual_seed(5)), rtol=1e-4, atol=1e-5)


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="config.yaml not found"):
        main([str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="not a LoRA weight"):
        diffusers_lora_keys({"base_model.model.proj_out.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no LoRA weights"):
        diffusers_lora_keys({})
