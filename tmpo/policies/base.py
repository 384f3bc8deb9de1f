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
        self._forward_net: nn.Module | None = None  # see forward_through

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
        elif getattr(self, "_forward_net", None) is not None:
            net = self._forward_net
        return self._velocity(net, x, sigma, cond, index)

    @contextlib.contextmanager
    def forward_through(self, wrapper: nn.Module | None) -> Iterator[None]:
        """Within this context the policy's own velocity calls ``wrapper`` (a module wrapping ``self.net``
        with the same call signature, e.g. DDP, whose backward all-reduces the gradients) instead of
        ``self.net``; ``None`` changes nothing. The reference policy is never wrapped."""
        outer = getattr(self, "_forward_net", None)
        if wrapper is not None:
            object.__setattr__(self, "_forward_net", wrapper)  # not a submodule: no duplicate parameters
        try:
            yield
        finally:
            object.__setattr__(self, "_forward_net", outer)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context :meth:`velocity` is the frozen reference policy (LoRA disabled)."""
        outer = self._use_reference
        self._use_reference = True
        try:
            if self.lora_config and getattr(self, "_lora_reference_adapter", False):
                self.net.set_adapter("reference")
                try:
                    yield
                finally:
                    self.net.set_adapter("default")
                    for n, prm in self.net.named_parameters():  # set_adapter may flip requires_grad
                        if ".reference." in n:
                            prm.requires_grad_(False)
            elif self.lora_config:
                with self.net.disable_adapter():
                    yield
            else:
                yield
        finally:
            self._use_reference = outer

    @torch.no_grad()
    def reset_reference(self) -> None:
        """Make the reference policy a copy of the current policy (GARDO's adaptive reference reset).

        Full fine-tuning copies the weights into the frozen copy; LoRA keeps a second, frozen adapter
        named ``reference`` and switches to it inside :meth:`reference`.
        """
        self._reference_was_reset = True
        if not self.lora_config:
            self._reference_net.load_state_dict(self.net.state_dict())
            return
        from peft import LoraConfig

        if "reference" not in self.net.peft_config:
            cfg = dict(self.lora_config)
            r = int(cfg.pop("r"))
            self.net.add_adapter("reference", LoraConfig(r=r, lora_alpha=float(cfg.pop("alpha", 2 * r)), **cfg))
        params = dict(self.net.named_parameters())
        for name, p in params.items():
            if ".default." in name:
                ref = params[name.replace(".default.", ".reference.")]
                ref.copy_(p)
                ref.requires_grad_(False)
        self._lora_reference_adapter = True

    def reference_state(self) -> dict[str, Tensor] | None:
        """The reference weights if :meth:`reset_reference` changed them (for exact resume), else None."""
        if not getattr(self, "_reference_was_reset", False):
            return None
        if not self.lora_config:
            return {k: v.clone() for k, v in self._reference_net.state_dict().items()}
        return {n: p.detach().clone() for n, p in self.net.named_parameters() if ".reference." in n}

    def load_reference_state(self, state: dict[str, Tensor] | None) -> None:
        if state is None:
            return
        self.reset_reference()  # creates the adapter / marks the reset, then overwrite with the saved weights
        with torch.no_grad():
            if not self.lora_config:
                self._reference_net.load_state_dict(state)
            else:
                params = dict(self.net.named_parameters())
                for n, v in state.items():
                    params[n].copy_(v)

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
