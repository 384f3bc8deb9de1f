"""Stable Diffusion 3.5 Medium as a :class:`~tmpo.policies.base.FlowPolicy` (``model=sd35_medium``; ``sd35_tiny``).

What is SD3-specific, as ``diffusers.StableDiffusion3Pipeline`` runs it:

* latents ``[16, H/8, W/8]`` go to the transformer as they are (it patchifies itself);
* the timestep passed is ``1000 * sigma``;
* sigmas: the scheduler's default spacing (``linspace(1000, t_min, N) / 1000``) with its static shift
  (3.0 for SD3.5), then a final 0;
* classifier-free guidance as Flow-GRPO's SD3 code runs it at sampling *and* training time: one
  forward on the concatenated ``[negative, positive]`` batch, ``v = v_neg + w (v_pos - v_neg)``
  (``w = 4.5``), the negative prompt's embeddings (``""``) computed once and cached;
* prompts: CLIP-L and CLIP-G penultimate states (concatenated, zero-padded to T5's width) followed by
  T5-XXL tokens; pooled = both CLIPs' projected pooled outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tmpo.policies.diffusers_policy import DiffusersFlowPolicy, PromptEmbeddings, calculate_shift


class SD3Policy(DiffusersFlowPolicy):
    """SD3 transformer + VAE + CLIP-L/CLIP-G/T5 encoders. See :class:`DiffusersFlowPolicy` for the args.

    Args:
        guidance_scale: classifier-free guidance weight (4.5 in Flow-GRPO's SD3.5 configs); 1.0 = off.
        negative_prompt: the unconditional prompt of CFG (``""``).
    """

    family = "sd3"

    def __init__(self, *args: Any, guidance_scale: float = 4.5, negative_prompt: str = "", **kwargs: Any) -> None:
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = str(negative_prompt)
        kwargs.setdefault("max_sequence_length", 256)
        super().__init__(*args, **kwargs)

    @classmethod
    def _pipeline_class(cls) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    @property
    def latent_channels(self) -> int:  # type: ignore[override]
        return int(self.base_transformer.config.in_channels)

    def _latent_multiple(self) -> int:
        return int(self.base_transformer.config.patch_size)

    def _set_timesteps(self, scheduler: Any, num_steps: int) -> None:
        kwargs = {"mu": calculate_shift(self.image_seq_len(), scheduler.config)} if scheduler.config.use_dynamic_shifting else {}
        scheduler.set_timesteps(num_steps, **kwargs)

    def _encode_uncached(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, _, pooled, _ = self.encoder_pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.compute_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        embeds, pooled = self.embed(list(prompts))
        extra: dict[str, Tensor] = {}
        if self.guidance_scale != 1.0:
            neg, neg_pooled = self.embed([self.negative_prompt])  # cached after the first call
            extra = {"neg_embeds": neg, "neg_pooled": neg_pooled}
        return PromptEmbeddings(embeds, pooled, extra)

    def _velocity(self, net: nn.Module, x: Tensor, sigma: Tensor, cond: PromptEmbeddings, index: Tensor) -> Tensor:
        dev, dt = self.compute_device, self.compute_dtype
        index = index.to(dev)  # the rollout's indices live on the state device
        n = x.shape[0]
        hidden, t = x.to(dev, dt), (sigma.to(dev, torch.float32) * 1000).to(dt).expand(n)
        embeds, pooled = cond.embeds[index], cond.pooled[index]
        cfg = self.guidance_scale != 1.0
        if cfg:
            if "neg_embeds" not in cond.extra:
                raise ValueError("SD3 CFG needs the negative prompt's embeddings: encode prompts with this policy's encode_prompts")
            hidden, t = torch.cat([hidden, hidden]), torch.cat([t, t])
            embeds = torch.cat([cond.extra["neg_embeds"].expand(n, -1, -1), embeds])
            pooled = torch.cat([cond.extra["neg_pooled"].expand(n, -1), pooled])
        out = net(hidden_states=hidden, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        out = out.float()
        if cfg:
            v_neg, v_pos = out.chunk(2)
            out = v_neg + self.guidance_scale * (v_pos - v_neg)  # the guided velocity, in float32
        return out.to(x.device)  # back to the state device
