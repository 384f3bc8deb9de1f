"""The policy interface every backend (toy, mini, FLUX, SD3.5) implements, plus LoRA/reference handling."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class FlowPolicy(nn.Module):
    """A rectified-flow velocity model behind the small interface the loop and samplers use.

    Subclasses build ``self.net`` (the velocity network) and implement :meth:`sigmas`,
    :meth:`encode_prompts`, :meth:`_velocity` and :meth:`decode`. Fine-tuning is either LoRA through
    peft (``lora`` = dict of ``r``, ``alpha``, ``target_modules``, ...; the reference policy is the same
    network with the adapter disabled) or full (``lora=None``; the reference is a frozen copy).
    """

    latent_shape: Sequence[int]

    def __init__(self) -> None:
        super().__init__()
        self._reference_net: nn.Module | None = None
        self._use_reference = False
        self.lora_config: dict | None = None

    # --- to implement -------------------------------------------------------------------------
    def sigmas(self, num_steps: int) -> Tensor:
        """Noise levels ``[num_steps + 1]`` from 1 (noise) down to 0 (data)."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> Any:
        """Encode G prompts into the conditioning that :meth:`_velocity` indexes by group."""
        raise NotImplementedError

    def _velocity(self, net: nn.Module, x: Tensor, sigma: Tensor, cond: Any, index: Tensor) -> Tensor:
        """Velocity of ``net`` at ``(x [N, *S], sigma [N])`` for prompts ``cond[index]``."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to what rewards consume (images in [0, 1] or, for the toy, points)."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    def setup_finetuning(self, lora: dict | None) -> None:
        """Attach a peft LoRA adapter to ``self.net`` or keep a frozen copy as the reference."""
        self.lora_config = dict(lora) if lora else None
        if self.lora_config:
            from peft import LoraConfig, get_peft_model

            cfg = dict(self.lora_config)
            r = int(cfg.pop("r"))
            alpha = float(cfg.pop("alpha", 2 * r))
            self.net.requires_grad_(False)
            self.net = get_peft_model(self.net, LoraConfig(r=r, lora_alpha=alpha, **cfg))
        else:
            self._reference_net = copy.deepcopy(self.net).requires_grad_(False)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Any, index: Tensor) -> Tensor:
        net = self.net
        if self._use_reference:
            net = self._reference_net if self._reference_net is not None else self.net
        return self._velocity(net, x, sigma, cond, index)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context :meth:`velocity` is the frozen reference policy (LoRA disabled)."""
        outer = self._use_reference
        self._use_reference = True
        try:
            if self.lora_config:
                with self.net.disable_adapter():
                    yield
            else:
                yield
        finally:
            self._use_reference = outer

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.trainable_named_parameters()}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        params = dict(self.trainable_named_parameters())
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the policy's trainable parameters: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}; was it written with a different model/LoRA config?"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype
