"""ImageReward v1.0 (Xu et al. 2023) rebuilt from transformers' BLIP classes, reading the same weights file.

The ``image-reward`` package (1.5) does not install cleanly beside our pins: it pins ``timm==0.6.13``
(open_clip needs a current timm) and its BLIP text encoder imports helpers that transformers 5 removed.
Its model is small, so we rebuild it:

* image tower: BLIP ViT-L/16 at 224 px = ``transformers.BlipVisionModel`` (same qkv/projection layout,
  LayerNorm eps 1e-6, post-norm on every token);
* text tower: BLIP's BERT with cross-attention to the image tokens = ``transformers.BlipTextModel``
  (``is_decoder`` config so the cross-attention layers exist; called bidirectionally);
* head: ImageReward's MLP ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` on the ``[CLS]`` state, then
  ``(r - 0.16717362830052426) / 1.0333394966054072`` (its ``score()``);
* text: ``bert-base-uncased`` + BLIP's ``[DEC]``/``[ENC]`` special tokens, padded to 35 tokens;
* images: bicubic resize to 224, centre crop, CLIP mean/std, from uint8 as ``score()`` sees PIL images.

:func:`convert_imagereward_state_dict` maps ``ImageReward.pt`` (hub ``THUDM/ImageReward``) names onto
ours; loading is strict, so a missing or unexpected key is an error naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tmpo.rewards.real_preference import _Scorer

MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 35

VISION_VIT_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6}
TEXT_MED = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 512, "layer_norm_eps": 1e-12}
TINY = {"vision": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6},
        "text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 40, "layer_norm_eps": 1e-12}}

_VISION_RENAMES = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.visual_encoder.blocks.", "vision.encoder.layers."),
)
_BLOCK_RENAMES = ((".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
                  (".attn.proj.", ".self_attn.projection."))


def convert_imagereward_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``ImageReward.pt`` keys (BLIP ViT + med BERT + ``mlp.layers``) -> :class:`ImageRewardModel` keys."""
    out = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue  # a non-persistent buffer in transformers
        new = key
        if key.startswith("blip.visual_encoder."):
            for old, rep in _VISION_RENAMES:
                if new.startswith(old):
                    new = rep + new[len(old):]
                    break
            for old, rep in _BLOCK_RENAMES:
                new = new.replace(old, rep)
        elif key.startswith("blip.text_encoder."):
            new = "text." + key[len("blip.text_encoder."):]
        elif key.startswith("mlp.layers."):
            new = "head." + key[len("mlp."):]
        else:
            raise ValueError(f"unexpected key {key!r} in the ImageReward checkpoint")
        out[new] = value
    return out


class _Head(nn.Module):
    """ImageReward's MLP (its ``nn.Sequential`` indices, so its weights load by name)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP image tower + cross-attending text tower + MLP head -> normalised reward ``[N]``."""

    def __init__(self, vision: Mapping[str, Any], text: Mapping[str, Any], pad_token_id: int = 0) -> None:
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(BlipVisionConfig(**vision))
        text_cfg = BlipTextConfig(**text, encoder_hidden_size=vision["hidden_size"], is_decoder=True, pad_token_id=pad_token_id)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.head = _Head(text_cfg.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, is_decoder=False)
        return (self.head(out.last_hidden_state[:, 0].float()).squeeze(-1) - MEAN) / STD


def blip_tokenizer(name: str = "bert-base-uncased", revision: str | None = None, local_files_only: bool = True):
    """``bert-base-uncased`` with BLIP's ``[DEC]`` bos and ``[ENC]`` tokens (vocabulary 30524)."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(name, revision=revision, local_files_only=local_files_only)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardReward(_Scorer):
    """ImageReward v1.0 score (``ImageReward.score``), the reward protocol around :class:`ImageRewardModel`.

    Args:
        checkpoint: path of ``ImageReward.pt``.
        tokenizer: ``bert-base-uncased`` (hub id in the local cache, or a folder).
        tiny: a random-weight model of the same classes and a word-level tokenizer (tests).
    """

    name = "imagereward"

    def __init__(self, checkpoint: str | None = None, tokenizer: str = "bert-base-uncased", tokenizer_revision: str | None = None,
                 local_files_only: bool = True, tiny: Mapping[str, Any] | None = None, seed: int = 0, device: str = "cpu",
                 dtype: str = "fp32", batch_size: int = 32, aux: Mapping[str, Any] | None = None) -> None:
        super().__init__(device, dtype, batch_size, aux)
        if tiny is not None:
            from tmpo.policies.tiny_diffusers import tiny_vocabulary, word_level_tokenizer

            spec = {k: {**TINY[k], **dict((tiny or {}).get(k, {}))} for k in TINY}
            vocab = tiny_vocabulary()
            self.tokenizer = word_level_tokenizer(MAX_LENGTH, vocab)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                text = {**spec["text"], "vocab_size": len(vocab), "bos_token_id": 2, "sep_token_id": 3}
                self.model = ImageRewardModel(spec["vision"], text)
        else:
            if checkpoint is None or not Path(checkpoint).is_file():
                raise FileNotFoundError(f"ImageReward checkpoint {checkpoint!r} not found; download ImageReward.pt "
                                        "(README: 'Reproducing the paper on GPUs') and set its path")
            self.tokenizer = blip_tokenizer(tokenizer, tokenizer_revision, local_files_only)
            self.model = ImageRewardModel(VISION_VIT_L, TEXT_MED, pad_token_id=self.tokenizer.pad_token_id)
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            self.model.load_state_dict(convert_imagereward_state_dict(state))
        self.model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.image_size = int(self.model.vision.config.image_size)

    def preprocess(self, arrays: list[np.ndarray]) -> Tensor:
        """ImageReward's ``_transform``: bicubic resize, centre crop, CLIP normalisation."""
        from PIL import Image
        from torchvision import transforms as T

        tf = T.Compose([T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(self.image_size),
                        T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        return torch.stack([tf(Image.fromarray(a)) for a in arrays])

    def _score_batch(self, arrays: list[np.ndarray], prompts: list[str]) -> Tensor:
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        pixels = self.preprocess(arrays).to(self.device, self.dtype)
        return self.model(pixels, text["input_ids"].to(self.device), text["attention_mask"].to(self.device))
