"""Mini-world stand-ins for the CLIP-style human-preference rewards (PickScore, HPS-v2.1, ImageReward).

The TMPO paper (App. D.1) scores images with three learned preference models. At the mini scale
(32x32 procedurally rendered scenes, :mod:`tmpo.world`) they are replaced by small CLIP-style
image-text models, :class:`MiniCLIP`, trained in-repo by :mod:`tmpo.rewards.train_preference`:

* an image tower (a 5-layer conv net on the ``[3, 32, 32]`` image, flattened so that positions
  survive, projected to ``embed_dim``) and a text tower (token + position embeddings, 1-2
  pre-norm transformer layers, masked mean-pool, projection), both L2-normalised;
* a learnable logit scale ``exp(logit_scale)``, clamped to <= 100 as in CLIP.

:class:`PreferenceReward` scores an image the way PickScore does (``PickScore_v1`` ``get_score``:
``model.logit_scale.exp() * image_embs @ text_embs.T``)::

    reward = scale * cos(image_emb, text_emb)

with ``scale`` the model's own learned ``exp(logit_scale)`` unless overridden. PickScore's scale is
100 (scores ~ 18-23, since CLIP cosines are ~ 0.2); the mini models learn a scale of a few tens
and cosines of ~0.3-0.9, so their values are "PickScore-like" (same formula, same order of
magnitude) but not numerically comparable to the real model. Each checkpoint's learned scale is in
its card (``tmpo/assets/preference/<name>.json``) and in ``info["scale"]``.

The three committed stand-ins (``pickscore``, ``hpsv21``, ``imagereward``) differ in seed, width,
hard-negative mix and a mild "aesthetic" bias learned from synthetic preference pairs (see
:mod:`tmpo.rewards.train_preference` for the exact recipe and each card for measured effects).

Captions are tokenised by the world's shared :class:`~tmpo.world.tokenizer.CaptionTokenizer` in the
layout of :func:`world_vocabulary` (stored in each checkpoint): lower-case words and commas; a quoted
string (the OCR prompts' ``a sign that reads "K7Q"``) becomes ``<q>``, one token per character,
``</q>``. Words outside the mini world's vocabulary raise a ValueError naming them.

Nothing heavy happens at import time; models are built or loaded in constructors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmpo.world.tokenizer import PAD, QUOTE_CLOSE, QUOTE_OPEN, CaptionTokenizer, caption_words, sign_characters

CHECKPOINT_KIND = "MiniCLIP"
CHECKPOINT_VERSION = 1
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "preference"
REWARD_NAMES: tuple[str, ...] = ("pickscore", "hpsv21", "imagereward")



def default_checkpoint(name: str) -> Path:
    """``tmpo/assets/preference/<name>.pt``."""
    return ASSET_DIR / f"{name}.pt"


def train_command(name: str) -> str:
    return f"python -m tmpo.rewards.train_preference --name {name}"


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def world_vocabulary() -> list[str]:
    """The MiniCLIP vocabulary layout (index 0 is ``<pad>``): quote marks, sign characters, caption words.

    New checkpoints store this list; a loaded checkpoint uses the list it stores.
    """
    return [PAD, QUOTE_OPEN, QUOTE_CLOSE, *sign_characters(), *caption_words()]


def caption_tokenizer(vocab: Sequence[str] | None = None, max_len: int = 24) -> CaptionTokenizer:
    """A MiniCLIP text tokenizer (no ``<bos>``; ``vocab`` defaults to :func:`world_vocabulary`)."""
    return CaptionTokenizer(world_vocabulary() if vocab is None else vocab, max_len)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass
class MiniCLIPConfig:
    """Sizes of a :class:`MiniCLIP` (stored in checkpoints)."""

    vocab_size: int
    image_size: int = 32
    width: int = 24  # conv channels of the first layer; later layers use 2x and 4x
    embed_dim: int = 128
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_len: int = 24
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature
    max_logit_scale: float = math.log(100.0)  # CLIP's clamp


class _TextBlock(nn.Module):
    """Pre-norm transformer layer with a key padding mask."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class MiniCLIP(nn.Module):
    """Small CLIP: conv image tower + transformer text tower -> unit embeddings, and a logit scale."""

    def __init__(self, config: MiniCLIPConfig) -> None:
        super().__init__()
        self.config = config
        c, s = config.width, config.image_size
        if s % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {s}")
        self.image_tower = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GELU(),  # s/2
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.GELU(),  # s/4
            nn.Conv2d(4 * c, 4 * c, 3, stride=2, padding=1), nn.GELU(),  # s/8
            nn.Flatten(),
            nn.LayerNorm(4 * c * (s // 8) ** 2),
            nn.Linear(4 * c * (s // 8) ** 2, config.embed_dim),
        )  # fmt: skip
        w = config.text_width
        self.token_embedding = nn.Embedding(config.vocab_size, w, padding_idx=0)
        self.position_embedding = nn.Parameter(torch.randn(config.max_len, w) * 0.02)
        self.text_blocks = nn.ModuleList(_TextBlock(w, config.text_heads) for _ in range(config.text_layers))
        self.text_ln = nn.LayerNorm(w)
        self.text_proj = nn.Linear(w, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    def scale(self) -> Tensor:
        """``exp(logit_scale)``, clamped to ``exp(max_logit_scale)`` (100) as in CLIP."""
        return self.logit_scale.clamp(max=self.config.max_logit_scale).exp()

    def image_features(self, images: Tensor, spatial: bool = False) -> Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> unnormalised ``[N, embed_dim]`` (resized if H, W differ).

        ``spatial=True`` stops before the projection: the flattened last conv map ``[N, 4c (s/8)^2]``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        s = self.config.image_size
        x = images.float()
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        tower = self.image_tower[:-2] if spatial else self.image_tower  # [-2:] = LayerNorm, Linear
        return tower((x - 0.5) / 0.25)

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_features(images), dim=-1)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``ids, mask [B, T]`` -> unit ``[B, embed_dim]``."""
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_len={self.config.max_len}")
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for block in self.text_blocks:
            x = block(x, ~mask)
        x = self.text_ln(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        return F.normalize(self.text_proj(pooled), dim=-1)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_state(model: MiniCLIP, tokenizer: CaptionTokenizer, card: Mapping[str, Any] | None = None) -> dict:
    """Everything needed to rebuild ``model`` and its tokenizer (the format :func:`load_miniclip` reads)."""
    return {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "config": asdict(model.config),
        "vocab": list(tokenizer.vocab),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "card": dict(card or {}),
    }


def load_miniclip(path: str | Path, name: str | None = None) -> tuple[MiniCLIP, CaptionTokenizer, dict[str, Any]]:
    """Load a MiniCLIP checkpoint -> (model in eval mode on CPU, tokenizer, card).

    Raises:
        FileNotFoundError: no file at ``path`` (the message names the training command).
        ValueError: the file is not a readable MiniCLIP checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        how = train_command(name) if name else "python -m tmpo.rewards.train_preference --name <name>"
        raise FileNotFoundError(f"no MiniCLIP preference checkpoint at {path}; train it with `{how}`")
    from tmpo.checkpoint import safe_torch_load

    state = safe_torch_load(path, what="MiniCLIP checkpoint")  # weights_only: a crafted file never runs code
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path} is not a MiniCLIP checkpoint (kind={found!r}); write one with `python -m tmpo.rewards.train_preference`"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: MiniCLIP checkpoint version {state.get('version')} != {CHECKPOINT_VERSION}")
    config = MiniCLIPConfig(**state["config"])
    tokenizer = caption_tokenizer(state["vocab"], max_len=config.max_len)
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"{path}: vocabulary has {len(tokenizer)} tokens but the model expects {config.vocab_size}")
    model = MiniCLIP(config)
    model.load_state_dict(state["state_dict"])
    model.eval().requires_grad_(False)
    return model, tokenizer, dict(state.get("card", {}))


# ---------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------


class PreferenceReward:
    """PickScore-style reward: ``reward(images [N,3,H,W] in [0,1], prompts, metadata) -> (Tensor[N], info)``.

    ``reward_i = scale * cos(image_emb_i, text_emb(prompt_i))`` (PickScore's scoring rule). ``scale``
    defaults to the checkpoint's learned ``exp(logit_scale)`` (PickScore's is 100; the mini
    models' learned scale is in their card); pass a number to override it.

    Args:
        checkpoint: a ``.pt`` written by :mod:`tmpo.rewards.train_preference`; default
            ``tmpo/assets/preference/<name>.pt``.
        name: which stand-in (``pickscore``, ``hpsv21``, ``imagereward``); also the reward's name.
        scale: multiplier of the cosine; None = the model's learned scale.
        model, tokenizer: an in-memory model instead of a checkpoint (tests, training-time eval).
        batch_size: images per forward pass.
        aux: optional ``{name: reward}`` evaluated alongside (not added to the reward); their raw
            scores go to ``info["aux"]`` (GARDO's uncertainty gate reads auxiliary rewards there).

    ``info``: ``cos`` (the raw cosines, ``[N]``), ``scale`` (float), ``name`` and, with ``aux``,
    ``aux``. ``metadata`` is not used (a preference model only sees the caption) but must have one
    record per image when given.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        name: str = "pickscore",
        scale: float | None = None,
        *,
        model: MiniCLIP | None = None,
        tokenizer: CaptionTokenizer | None = None,
        batch_size: int = 256,
        aux: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.aux = dict(aux or {})
        if model is not None:
            if checkpoint is not None:
                raise ValueError("pass either checkpoint or model, not both")
            self.model = model.eval().requires_grad_(False)
            self.tokenizer = tokenizer or caption_tokenizer(max_len=model.config.max_len)
            self.card: dict[str, Any] = {}
        else:
            path = Path(checkpoint) if checkpoint is not None else default_checkpoint(name)
            self.model, self.tokenizer, self.card = load_miniclip(path, name)
        self.scale = float(self.model.scale()) if scale is None else float(scale)
        self.batch_size = int(batch_size)
        self._text_cache: dict[str, Tensor] = {}

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Unit text embeddings ``[N, D]`` (cached per distinct prompt, on CPU)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            device = next(self.model.parameters()).device
            ids, mask = self.tokenizer(missing)
            with torch.no_grad():
                emb = self.model.encode_text(ids.to(device), mask.to(device)).float().cpu()
            self._text_cache.update(zip(missing, emb))
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit image embeddings ``[N, D]`` on ``images.device``."""
        self.model.to(images.device)
        chunks = [self.model.encode_image(images[i : i + self.batch_size].float().clamp(0, 1))
                  for i in range(0, images.shape[0], self.batch_size)]  # fmt: skip
        return torch.cat(chunks) if chunks else images.new_zeros(0, self.model.config.embed_dim)

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        n = images.shape[0]
        if len(prompts) != n or (metadata is not None and len(metadata) != n):
            raise ValueError(f"got {n} images, {len(prompts)} prompts and {len(metadata or [])} metadata records")
        img = self.image_embeddings(images.detach())
        txt = self.text_embeddings(list(prompts)).to(img.device)
        cos = (img * txt).sum(-1).float()
        scores = (self.scale * cos).float()
        info: dict[str, Any] = {"cos": cos, "scale": self.scale, "name": self.name}
        if self.aux:
            info["aux"] = {k: fn(images, prompts, metadata)[0].detach().float() for k, fn in self.aux.items()}
        return scores, info
