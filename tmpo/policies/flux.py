"""FLUX.1-dev as a :class:`~tmpo.policies.base.FlowPolicy` (``model=flux_dev``; ``model=flux_tiny`` for tests).

What is FLUX-specific, as ``diffusers.FluxPipeline`` runs it:

* latents ``[16, H/8, W/8]`` are packed into 2x2 patches (``[N, HW/256, 64]`` tokens) for the
  transformer and unpacked after; ``img_ids`` are the patch grid coordinates, ``txt_ids`` zeros;
* the timestep passed is ``sigma`` (the pipeline's ``t / 1000``);
* FLUX.1-dev is guidance-distilled: one forward per step with the guidance embedding (3.5 in the
  paper), no classifier-free guidance at sampling or training time;
* sigmas: ``linspace(1, 1/N, N)`` shifted by the scheduler with ``mu`` linear in the token count
  (``use_dynamic_shifting``), then a final 0;
* prompts: CLIP-L pooled output + T5-XXL token embeddings (``max_sequence_length`` tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tmpo.policies.diffusers_policy import DiffusersFlowPolicy, PromptEmbeddings, calculate_shift, np_linspace_sigmas


def pack_latents(latents: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, (H/2)(W/2), 4C]`` (``FluxPipeline._pack_latents``)."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` for latent sides ``height`` x ``width``."""
    n, _, d = tokens.shape
    x = tokens.view(n, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[(H/2)(W/2), 3]`` positions (0, row, col) of the packed patches (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxPolicy(DiffusersFlowPolicy):
    """FLUX.1 transformer + VAE + CLIP/T5 text encoders. See :class:`DiffusersFlowPolicy` for the args.

    Args:
        guidance: the distilled guidance embedding's value (3.5 for FLUX.1-dev in the paper).
    """

    family = "flux"

    def __init__(self, *args: Any, guidance: float = 3.5, **kwargs: Any) -> None:
        self.guidance = float(guidance)
        super().__init__(*args, **kwargs)
        if self.base_transformer.config.guidance_embeds is False and self.guidance:
            self.guidance = 0.0  # FLUX.1-schnell-style models have no guidance embedding

    @classmethod
    def _pipeline_class(cls) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    @property
    def latent_channels(self) -> int:  # type: ignore[override]
        return int(self.base_transformer.config.in_channels) // 4

    def _latent_multiple(self) -> int:
        return 2

    def _set_timesteps(self, scheduler: Any, num_steps: int) -> None:
        mu = calculate_shift(self.image_seq_len(), scheduler.config)
        scheduler.set_timesteps(sigmas=np_linspace_sigmas(num_steps), mu=mu)

    def _encode_uncached(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, pooled, _ = self.encoder_pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.compute_device, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled

    def _velocity(self, net: nn.Module, x: Tensor, sigma: Tensor, cond: PromptEmbeddings, index: Tensor) -> Tensor:
        dev, dt = self.compute_device, self.compute_dtype
        index = index.to(dev)  # the rollout's indices live on the state device
        n, _, h, w = x.shape
        guidance = torch.full((n,), self.guidance, device=dev, dtype=torch.float32) if self.guidance else None
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=dev, dtype=dt)
        out = net(
            hidden_states=pack_latents(x.to(dev, dt)),
            timestep=sigma.to(dev, dt).expand(n),
            guidance=guidance,
            pooled_projections=cond.pooled[index],
            encoder_hidden_states=cond.embeds[index],
            txt_ids=text_ids,
            img_ids=latent_image_ids(h, w, dev, dt),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).float().to(x.device)  # back to the state device, in float32
