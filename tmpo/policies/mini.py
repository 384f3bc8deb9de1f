"""Mini backend: a CPU-trainable text-to-image rectified-flow model on the mini world's 32x32 images.

Two denoisers, both over 4x4 pixel patches (64 image tokens) with adaLN-zero timestep conditioning:

* ``arch="dit"`` -- :class:`DiT`: self-attention over image tokens, cross-attention to the text
  tokens, pooled text added to the timestep embedding. Plays FLUX.1-dev.
* ``arch="mmdit"`` -- :class:`MMDiT`: SD3-style joint attention over the concatenated image and text
  tokens with separate weights per stream. Plays SD3.5-Medium.

The latent space is pixel space scaled to [-1, 1] (``latent_shape = (3, 32, 32)``); the text encoder
(:mod:`tmpo.policies.mini_text`) is trained with the denoiser and frozen during RL fine-tuning.
Weights are made by ``python -m tmpo.policies.mini_pretrain --arch dit`` (see that module).
Sigma convention (as everywhere in tmpo): ``x_sigma = (1 - sigma) x0 + sigma x1`` with ``x1`` the
noise; the network predicts the velocity ``x1 - x0``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmpo.policies.base import FlowPolicy
from tmpo.policies.mini_text import VOCAB, TextEncoder, text_tokenizer

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "mini"
ARCHS = ("dit", "mmdit")
IMAGE_SIZE = 32


@dataclass
class MiniConfig:
    """Architecture of a mini model (stored in every checkpoint; a mismatch is an error)."""

    arch: str = "dit"
    width: int = 128  # token width of the denoiser and the text encoder
    depth: int = 4  # denoiser blocks
    heads: int = 4
    patch: int = 4
    mlp_ratio: float = 4.0
    text_layers: int = 2
    max_text_length: int = 24
    image_size: int = IMAGE_SIZE
    channels: int = 3
    vocab_size: int = len(VOCAB)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown mini arch {self.arch!r}; choose one of {ARCHS}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.width % 4:
            raise ValueError(f"width {self.width} must be a multiple of 4 (2-D sin-cos position features)")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def timestep_embedding(sigma: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of ``1000 * sigma``, ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=sigma.device) * (-math.log(10000.0) / half))
    ang = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).to(sigma.dtype)


def sincos_2d(n_side: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position features ``[n_side**2, dim]`` (DiT/MAE): half for y, half for x."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(n_side, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    feats = []
    for g in (gy.reshape(-1), gx.reshape(-1)):
        ang = g[:, None] * omega[None]
        feats += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(feats, dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _heads(x: Tensor, heads: int) -> Tensor:
    b, t, c = x.shape
    return x.view(b, t, heads, c // heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        q = _heads(self.q(x), self.heads)
        k, v = (_heads(t, self.heads) for t in self.kv(ctx).chunk(2, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.out(_merge(o))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float) -> None:
        super().__init__()
        hidden = int(width * ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-zero block: self-attention, cross-attention to text, MLP (each gated, zero at init)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.xattn = CrossAttention(width, heads)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, mlp_ratio)
        self.ada = nn.Linear(width, 9 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        s1, sc1, g1, s2, sc2, g2, s3, sc3, g3 = self.ada(F.silu(c)).chunk(9, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        x = x + g2[:, None] * self.xattn(modulate(self.norm2(x), s2, sc2), ctx, mask)
        return x + g3[:, None] * self.mlp(modulate(self.norm3(x), s3, sc3))


class MMDiTBlock(nn.Module):
    """SD3-style joint block: image and text streams with their own weights, one joint attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, last: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.last = last  # the last block's text stream output is unused: no text MLP
        self.img_norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.img_qkv = nn.Linear(width, 3 * width)
        self.img_out = nn.Linear(width, width)
        self.img_norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.img_mlp = MLP(width, mlp_ratio)
        self.img_ada = nn.Linear(width, 6 * width)
        self.txt_norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.txt_qkv = nn.Linear(width, 3 * width)
        self.txt_ada = nn.Linear(width, 2 * width if last else 6 * width)
        if not last:
            self.txt_out = nn.Linear(width, width)
            self.txt_norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.txt_mlp = MLP(width, mlp_ratio)
        for ada in (self.img_ada, self.txt_ada):
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        n_img = x.shape[1]
        si1, sci1, gi1, si2, sci2, gi2 = self.img_ada(F.silu(c)).chunk(6, dim=-1)
        txt_mod = self.txt_ada(F.silu(c)).chunk(2 if self.last else 6, dim=-1)
        qkv_i = self.img_qkv(modulate(self.img_norm1(x), si1, sci1))
        qkv_t = self.txt_qkv(modulate(self.txt_norm1(ctx), txt_mod[0], txt_mod[1]))
        q, k, v = (_heads(t, self.heads) for t in torch.cat([qkv_i, qkv_t], dim=1).chunk(3, dim=-1))
        keep = torch.cat([mask.new_ones(mask.shape[0], n_img), mask], dim=1)
        o = _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]))
        x = x + gi1[:, None] * self.img_out(o[:, :n_img])
        x = x + gi2[:, None] * self.img_mlp(modulate(self.img_norm2(x), si2, sci2))
        if self.last:
            return x, ctx
        _, _, gt1, st2, sct2, gt2 = txt_mod
        ctx = ctx + gt1[:, None] * self.txt_out(o[:, n_img:])
        ctx = ctx + gt2[:, None] * self.txt_mlp(modulate(self.txt_norm2(ctx), st2, sct2))
        return x, ctx * mask[..., None]


class _Denoiser(nn.Module):
    """Shared patch embedding, timestep/pooled-text conditioning and adaLN final layer."""

    def __init__(self, cfg: MiniConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, p = cfg.width, cfg.patch
        self.n_side = cfg.image_size // p
        self.patch_in = nn.Linear(cfg.channels * p * p, w)
        self.pos = nn.Parameter(sincos_2d(self.n_side, w)[None])  # learnable, initialised to 2-D sin-cos
        self.t_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.pool_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(w, 2 * w)
        self.final_linear = nn.Linear(w, cfg.channels * p * p)
        for layer in (self.final_ada, self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        p = self.cfg.patch
        x = x.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        n, p, s, c = tokens.shape[0], self.cfg.patch, self.n_side, self.cfg.channels
        x = tokens.view(n, s, s, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, c, s * p, s * p)

    def conditioning(self, sigma: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        pooled = (ctx * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.t_embed(timestep_embedding(sigma, self.cfg.width).to(ctx.dtype)) + self.pool_embed(pooled)

    def head(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        return self.unpatchify(self.final_linear(modulate(self.final_norm(h), shift, scale)))


class DiT(_Denoiser):
    """DiT with cross-attention to text tokens: ``forward(x [N,3,H,W], sigma [N], ctx [N,T,C], mask [N,T])``."""

    def __init__(self, cfg: MiniConfig) -> None:
        super().__init__(cfg)
        self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))

    def forward(self, x: Tensor, sigma: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        c = self.conditioning(sigma, ctx, mask)
        h = self.patch_in(self.patchify(x)) + self.pos
        for block in self.blocks:
            h = block(h, c, ctx, mask)
        return self.head(h, c)


class MMDiT(_Denoiser):
    """MMDiT with joint image+text attention: same call signature as :class:`DiT`."""

    def __init__(self, cfg: MiniConfig) -> None:
        super().__init__(cfg)
        self.txt_in = nn.Linear(cfg.width, cfg.width)
        self.blocks = nn.ModuleList(
            MMDiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio, last=i == cfg.depth - 1) for i in range(cfg.depth)
        )

    def forward(self, x: Tensor, sigma: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        c = self.conditioning(sigma, ctx, mask)
        h = self.patch_in(self.patchify(x)) + self.pos
        t = self.txt_in(ctx)
        for block in self.blocks:
            h, t = block(h, c, t, mask)
        return self.head(h, c)


def build_denoiser(cfg: MiniConfig) -> _Denoiser:
    return DiT(cfg) if cfg.arch == "dit" else MMDiT(cfg)


def build_text_encoder(cfg: MiniConfig) -> TextEncoder:
    return TextEncoder(cfg.vocab_size, cfg.width, cfg.text_layers, cfg.heads, cfg.max_text_length)


def shifted_sigmas(num_steps: int, shift: float) -> Tensor:
    """``sigma' = shift * s / (1 + (shift - 1) * s)`` on ``linspace(1, 0, num_steps + 1)`` (SD3/FLUX schedule)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


def default_checkpoint(arch: str) -> Path:
    return ASSET_DIR / f"{arch}.pt"


def pretrain_command(arch: str) -> str:
    return f"python -m tmpo.policies.mini_pretrain --arch {arch} --out tmpo/assets/mini/{arch}.pt"


def load_weights(path: str | Path, arch: str) -> dict[str, Any]:
    """Read a published mini weights file, with clear errors if it is missing or of another arch."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mini {arch} checkpoint {path} not found; create it with `{pretrain_command(arch)}`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a mini checkpoint ({e})") from e
    if not isinstance(state, dict) or not {"config", "denoiser", "text_encoder"} <= set(state):
        raise ValueError(f"{path} is not a mini checkpoint (needs keys config, denoiser, text_encoder)")
    if state["config"].get("arch") != arch:
        raise ValueError(f"{path} holds a mini {state['config'].get('arch')!r} model, but arch={arch!r} was requested")
    return state


# ---------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------


class MiniPolicy(FlowPolicy):
    """Text-to-image flow policy on 32x32 mini-world images.

    Args:
        checkpoint: weights file written by :mod:`tmpo.policies.mini_pretrain`; ``None`` = the
            committed ``tmpo/assets/mini/<arch>.pt``.
        arch: ``"dit"`` (FLUX.1-dev analogue) or ``"mmdit"`` (SD3.5-Medium analogue).
        lora: peft LoRA settings (``r``, ``alpha``, ``target_modules``, ...) or ``None`` for full
            fine-tuning of the denoiser. The text encoder is always frozen.
        shift: timestep shift of the sampling schedule (:func:`shifted_sigmas`).
        guidance_scale: classifier-free guidance weight; 1.0 (default) = off, one model call per step.
        model_config: architecture overrides (:class:`MiniConfig` fields) for a *random-weight* model
            (tests); requires ``random_init``.
        random_init: build an untrained model instead of loading weights (tests, smoke runs).
        seed: seed of the random initialisation.
    """

    latent_shape = (3, IMAGE_SIZE, IMAGE_SIZE)

    def __init__(
        self,
        checkpoint: str | None = None,
        arch: str = "dit",
        lora: dict | None = None,
        shift: float = 3.0,
        guidance_scale: float = 1.0,
        model_config: dict | None = None,
        random_init: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown mini arch {arch!r}; choose one of {ARCHS}")
        self.shift = float(shift)
        self.guidance_scale = float(guidance_scale)
        if random_init:
            self.config = MiniConfig(**{**(_plain(model_config) or {}), "arch": arch})
            torch.manual_seed(seed)
            self.text_encoder = build_text_encoder(self.config)
            self.net = build_denoiser(self.config)
            self.card: dict = {}
        else:
            if model_config:
                raise ValueError("model_config overrides only apply with random_init=True; a checkpoint fixes the architecture")
            path = Path(checkpoint) if checkpoint else default_checkpoint(arch)
            state = load_weights(path, arch)
            try:
                self.config = MiniConfig(**state["config"])
                self.text_encoder = build_text_encoder(self.config)
                self.net = build_denoiser(self.config)
                self.text_encoder.load_state_dict(state["text_encoder"])
                self.net.load_state_dict(state["denoiser"])
            except (TypeError, RuntimeError) as e:
                raise ValueError(f"{path} does not match the mini {arch} architecture: {e}") from e
            self.card = dict(state.get("card") or {})
        self.tokenizer = text_tokenizer(self.config.max_text_length)
        self.text_encoder.requires_grad_(False).eval()
        self.setup_finetuning(_plain(lora))

    def sigmas(self, num_steps: int) -> Tensor:
        return shifted_sigmas(num_steps, self.shift)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``(tokens [G, T, C], mask [G, T])`` of the frozen text encoder."""
        ids, mask = self.tokenizer(list(prompts))
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.no_grad():
            tokens = self.text_encoder(ids, mask).to(self.dtype)
        return tokens, mask

    def _velocity(self, net: nn.Module, x: Tensor, sigma: Tensor, cond: Any, index: Tensor) -> Tensor:
        tokens, mask = cond
        v = net(x, sigma, tokens[index], mask[index])
        if self.guidance_scale == 1.0:
            return v
        null_tokens, null_mask = self.encode_prompts([""])
        n = x.shape[0]
        v_null = net(x, sigma, null_tokens.expand(n, -1, -1), null_mask.expand(n, -1))
        return v_null + self.guidance_scale * (v - v_null)

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    @staticmethod
    def encode_images(images: Tensor) -> Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] to latents in [-1, 1] (inverse of :meth:`decode`)."""
        return images * 2 - 1

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"denoiser": count(self.net), "text_encoder": count(self.text_encoder)}


def _plain(value: Any) -> Any:
    """Hydra's DictConfig/ListConfig (or any mapping/sequence) as plain dicts and lists, for peft."""
    if isinstance(value, (str, bytes)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def config_dict(cfg: MiniConfig) -> dict:
    return asdict(cfg)
