"""What FLUX.1-dev and SD3.5-Medium share as :class:`~tmpo.policies.base.FlowPolicy` backends.

Components come from diffusers: either ``<Pipeline>.from_pretrained(pretrained, revision=...)`` (a hub
id or a local folder; ``local_files_only`` by default so nothing is fetched at run time unless asked)
or, for tests, the tiny random-weight builders of :mod:`tmpo.policies.tiny_diffusers`.

Conventions shared with the rest of tmpo (and with diffusers): ``x_sigma = (1 - sigma) x0 + sigma
noise`` and the transformer predicts ``v = noise - x0``, so diffusers' velocity is our velocity with no
sign change. Latents are VAE latents ``[C, H/f, W/f]`` (unpacked; FLUX packs 2x2 patches inside
:meth:`_velocity`), already multiplied by the VAE's scaling factor as diffusers samples them.

Precision: the transformer, text encoders (and optionally the VAE) run in ``dtype`` (bf16 on GPUs),
the LoRA weights stay float32 (peft's ``autocast_adapter_dtype``), and the policy's :attr:`dtype` --
the dtype the samplers use for latents, noise, transition means and log-probs -- is always float32:
bf16 log-prob ratios would be noise. :meth:`_velocity` casts in and out.

Prompt embeddings are computed once per distinct prompt and cached on the compute device.

Devices: the models run on ``device`` (``compute_device``); the *state* -- latents, noise, transition
means, log-probs, the whole rollout -- lives on ``state_device``, which is what :attr:`device` reports to
the samplers and the update. The default ``state_device: cpu`` keeps the shared loop's index
bookkeeping on one device whatever the accelerator (a latent is 256 KB at 512 px, so the copies cost
little) and leaves GPU memory to the transformer; :meth:`_velocity` moves its inputs to the compute
device and the velocity back, gradients flow through the copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tmpo.policies.base import FlowPolicy
from tmpo.policies.mini import _plain

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16" | "fp16" | "fp32"`` (or a torch dtype) -> ``torch.dtype``, with a clear error."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass
class PromptEmbeddings:
    """Encoded prompts of G groups: ``embeds [G, T, D]``, ``pooled [G, P]`` and backend extras."""

    embeds: Tensor
    pooled: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


def calculate_shift(seq_len: int, config: Mapping[str, Any]) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the image token count (diffusers' rule)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return float(seq_len * slope + base_shift - slope * base_len)


class DiffusersFlowPolicy(FlowPolicy):
    """A diffusers text-to-image transformer behind the FlowPolicy interface (subclass per family).

    Args:
        pretrained: hub id or local folder of the full pipeline (``None`` with ``tiny``).
        revision, variant: passed to ``from_pretrained`` (pin the revision for reproducibility).
        local_files_only: never reach the network while loading (download beforehand, see README).
        tiny: build a random-weight model of the same classes instead (:mod:`tmpo.policies.tiny_diffusers`
            component overrides; ``{}`` = the defaults). Exclusive with ``pretrained``.
        seed: seed of the tiny model's weights and of the LoRA initialisation (same seed, same adapter).
        device: where every model runs (``cuda``, ``cuda:1``, ``cpu``).
        state_device: where latents, noise, means, log-probs and rollouts live (see the module doc).
        dtype: transformer and text-encoder precision, ``bf16 | fp16 | fp32``.
        vae_dtype: VAE precision (fp32 by default, as Flow-GRPO decodes).
        resolution: image side in pixels (512 in the paper).
        lora: peft LoRA settings (``r``, ``alpha``, ``target_modules`` as a regex, ``init_lora_weights``...)
            or ``None`` for full fine-tuning of the transformer.
        gradient_checkpointing: recompute transformer blocks in backward (enabled before peft wraps).
        max_sequence_length: T5 tokens per prompt.
        decode_batch_size: images per VAE decode call.
    """

    family: str = ""
    latent_channels: int = 0

    def __init__(
        self,
        pretrained: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool = True,
        tiny: Mapping[str, Any] | None = None,
        seed: int = 0,
        device: str = "cpu",
        state_device: str = "cpu",
        dtype: str = "bf16",
        vae_dtype: str = "fp32",
        resolution: int = 512,
        lora: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        max_sequence_length: int = 512,
        decode_batch_size: int = 8,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (tiny is None):
            raise ValueError("give exactly one of model.pretrained (hub id or local folder) and model.tiny (test model)")
        self.compute_dtype, self.vae_dtype = resolve_dtype(dtype), resolve_dtype(vae_dtype)
        self.state_device = torch.device(state_device)
        self.resolution, self.max_sequence_length = int(resolution), int(max_sequence_length)
        self.decode_batch_size = int(decode_batch_size)
        components = self._load_components(pretrained, revision, variant, local_files_only, _plain(tiny), seed, device)
        self.net = components.pop("transformer").eval()  # no dropout in these models; eval for determinism
        self.vae = components.pop("vae").requires_grad_(False).eval()
        self.scheduler_config = dict(components.pop("scheduler").config)
        self.text_encoders = nn.ModuleDict(
            {k: v.requires_grad_(False).eval() for k, v in components.items() if isinstance(v, nn.Module)}
        )
        self._check_resolution()
        self.latent_shape = (self.latent_channels, self.resolution // self.vae_scale_factor, self.resolution // self.vae_scale_factor)
        for module, dt in ((self.net, self.compute_dtype), (self.text_encoders, self.compute_dtype), (self.vae, self.vae_dtype)):
            _move(module, device, dt)
        self.encoder_pipe = self._pipeline_class()(transformer=None, vae=None, scheduler=None, **components)
        if gradient_checkpointing:
            self.net.enable_gradient_checkpointing()  # before peft wraps the model
        with torch.random.fork_rng(devices=[]):  # peft draws the LoRA init from the global CPU generator
            torch.default_generator.manual_seed(seed)
            self.setup_finetuning(_plain(lora))
        self._prompt_cache: dict[str, tuple[Tensor, Tensor]] = {}

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def _pipeline_class(cls) -> type:
        raise NotImplementedError

    def _load_components(self, pretrained, revision, variant, local_files_only, tiny, seed, device) -> dict[str, Any]:
        if tiny is not None:
            from tmpo.policies.tiny_diffusers import build_tiny_components

            return build_tiny_components(self.family, tiny, seed, device)
        try:
            pipe = self._pipeline_class().from_pretrained(
                pretrained, revision=revision, variant=variant, dtype=self.compute_dtype, local_files_only=local_files_only
            )
        except (OSError, ValueError) as e:
            raise OSError(
                f"cannot load {self._pipeline_class().__name__} from {pretrained!r} (revision {revision!r}, "
                f"local_files_only={local_files_only}): {e}. Download it first (README: 'Reproducing the paper on GPUs') "
                "or point model.pretrained at a local copy"
            ) from e
        return {k: v for k, v in pipe.components.items() if v is not None}

    @property
    def base_transformer(self) -> nn.Module:
        """The diffusers transformer itself (under peft's wrapper when LoRA is on)."""
        net = self.net
        return net.get_base_model() if hasattr(net, "get_base_model") else net

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _check_resolution(self) -> None:
        step = self.vae_scale_factor * self._latent_multiple()
        if self.resolution % step:
            raise ValueError(f"model.resolution={self.resolution} must be a multiple of {step} for this {self.family} model")

    def _latent_multiple(self) -> int:
        """Latent sides must be a multiple of this (FLUX's 2x2 packing, SD3's patch size)."""
        raise NotImplementedError

    # --- FlowPolicy interface ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the samplers keep latents and the rollout (``state_device``)."""
        return self.state_device

    @property
    def compute_device(self) -> torch.device:
        """Where the transformer, VAE and text encoders run."""
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Latents, noise, means and log-probs are float32 whatever the transformer's precision."""
        return torch.float32

    def image_seq_len(self) -> int:
        """Image tokens the transformer sees (FLUX's ``mu`` depends on it)."""
        _, h, w = self.latent_shape
        m = self._latent_multiple()
        return (h // m) * (w // m)

    def _set_timesteps(self, scheduler: Any, num_steps: int) -> None:
        raise NotImplementedError

    def sigmas(self, num_steps: int) -> Tensor:
        """``[num_steps + 1]`` from ``FlowMatchEulerDiscreteScheduler.set_timesteps`` as the pipeline calls it."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        self._set_timesteps(scheduler, num_steps)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    def _encode_uncached(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``(embeds [n, T, D], pooled [n, P])`` from the pipeline's own ``encode_prompt``."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompt embeddings, computed once per distinct prompt and then served from the cache."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            embeds, pooled = self._encode_uncached(missing)
            dev = self.compute_device
            for i, p in enumerate(missing):
                self._prompt_cache[p] = (embeds[i].to(dev, self.compute_dtype), pooled[i].to(dev, self.compute_dtype))
        pairs = [self._prompt_cache[p] for p in prompts]
        return torch.stack([e for e, _ in pairs]), torch.stack([q for _, q in pairs])

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        embeds, pooled = self.embed(list(prompts))
        return PromptEmbeddings(embeds, pooled)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images ``[N, 3, H, W]`` in [0, 1] (float32, on the state device), ``decode_batch_size`` at a time."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        out = []
        for chunk in torch.split(latents, self.decode_batch_size):
            z = (chunk.to(self.compute_device, torch.float32) / cfg.scaling_factor + shift).to(self.vae_dtype)
            image = self.vae.decode(z, return_dict=False)[0]
            out.append((image.float() / 2 + 0.5).clamp(0, 1).to(self.state_device))
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> latents (VAE posterior mean, scaled as :meth:`decode` expects)."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        dist = self.vae.encode((images.to(self.compute_device, self.vae_dtype) * 2 - 1), return_dict=False)[0]
        return ((dist.mean.float() - shift) * cfg.scaling_factor).to(self.state_device)

    # --- LoRA helpers -------------------------------------------------------------------------
    def lora_state_dict(self, adapter_name: str = "default") -> dict[str, Tensor]:
        """The adapter's weights under diffusers' transformer names (what ``save_lora_weights`` wants)."""
        from peft import get_peft_model_state_dict

        if not self.lora_config:
            raise ValueError("this policy has no LoRA adapter (model.lora is null): nothing to export")
        state = get_peft_model_state_dict(self.net, adapter_name=adapter_name)
        return {_strip_peft_prefix(k): v.detach().cpu().clone() for k, v in state.items()}

    def lora_adapter_config(self, adapter_name: str = "default") -> dict[str, Any]:
        return self.net.peft_config[adapter_name].to_dict()

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"transformer": count(self.net), "vae": count(self.vae), "text_encoders": count(self.text_encoders)}


def _move(module: nn.Module, device: str, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``, casting only when needed (diffusers warns on every cast)."""
    params = list(module.parameters())
    if params and all(p.dtype == dtype for p in params):
        module.to(device=device)
    else:
        module.to(device=device, dtype=dtype)


def _strip_peft_prefix(key: str) -> str:
    prefix = "base_model.model."
    return key[len(prefix):] if key.startswith(prefix) else key


def np_linspace_sigmas(num_steps: int) -> np.ndarray:
    """FLUX's pipeline default ``linspace(1, 1/N, N)`` before the scheduler's shift."""
    return np.linspace(1.0, 1.0 / num_steps, num_steps)
