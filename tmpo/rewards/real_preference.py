"""The paper's human-preference reward models with their real loading code (App. D.1).

* :class:`PickScoreReward` -- ``yuvalkirstain/PickScore_v1`` (a ``transformers.CLIPModel``) with the
  CLIP-ViT-H-14 processor; ``score = exp(logit_scale) * cos(image, text)`` (PickScore's rule, ~22
  for FLUX.1-dev; the TMPO tables report it raw). ``scale_divisor=26`` gives Flow-GRPO's normalised
  training reward (official-code-notes D15); the default is the raw score.
* :class:`HPSv21Reward` -- open_clip ``ViT-H-14`` loaded with ``pretrained=None`` and then the HPS v2.1
  checkpoint (``HPS_v2.1_compressed.pt``, key ``state_dict``); ``score = cos(image, text)`` as HPSv2's
  ``score()`` computes it (~0.30).
* ImageReward: :mod:`tmpo.rewards.real_imagereward`.

Every class follows the reward protocol ``reward(images [N,3,H,W] in [0,1], prompts, metadata) ->
(Tensor[N], info)``, moves to ``device`` and runs in ``dtype``, scores in batches, and can be built as a
*tiny* random-weight model of the same classes (``tiny={...}``) so that tests run the loading-free part
of the code path without weights. Weights are read from local files or the local HF cache only
(``local_files_only``): download them first (README, "Reproducing the paper on GPUs").
Images are quantised to uint8 before preprocessing, as every one of these scorers was run upstream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tmpo.policies.diffusers_policy import resolve_dtype


def to_uint8_arrays(images: Tensor) -> list[np.ndarray]:
    """``[N, 3, H, W]`` in [0, 1] -> N ``[H, W, 3]`` uint8 arrays (``(x * 255).round()``)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    arr = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(arr)


def _check_batch(images: Tensor, prompts: Sequence[str], metadata: Sequence[Any] | None) -> None:
    n = images.shape[0]
    if len(prompts) != n or (metadata is not None and len(metadata) != n):
        raise ValueError(f"got {n} images, {len(prompts)} prompts and {len(metadata or [])} metadata records")


def _features(out: Any) -> Tensor:
    """transformers 5 returns model outputs from ``get_*_features``; older versions a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


class _Scorer:
    """Shared batching, device/dtype placement and aux rewards."""

    name = "preference"

    def __init__(self, device: str, dtype: str, batch_size: int, aux: Mapping[str, Any] | None) -> None:
        self.device, self.dtype, self.batch_size = torch.device(device), resolve_dtype(dtype), int(batch_size)
        self.aux = dict(aux or {})

    def _score_batch(self, arrays: list[np.ndarray], prompts: list[str]) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        arrays = to_uint8_arrays(images)
        _check_batch(images, prompts, metadata)
        chunks = [self._score_batch(arrays[i : i + self.batch_size], list(prompts[i : i + self.batch_size]))
                  for i in range(0, len(arrays), self.batch_size)]  # fmt: skip
        scores = torch.cat(chunks).float().cpu() if chunks else torch.zeros(0)
        info: dict[str, Any] = {"name": self.name}
        if self.aux:
            info["aux"] = {k: fn(images, prompts, metadata)[0].detach().float() for k, fn in self.aux.items()}
        return scores, info


# ---------------------------------------------------------------------------------------------
# PickScore
# ---------------------------------------------------------------------------------------------

TINY_CLIP = {
    "text": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2},
    "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
               "num_hidden_layers": 2},
    "projection_dim": 16, "max_length": 16,
}


def tiny_clip(spec: Mapping[str, Any] | None = None, seed: int = 0):
    """A random ``CLIPModel`` + word-level tokenizer + ``CLIPImageProcessor`` (tests: PickScore's classes)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from tmpo.policies.tiny_diffusers import tiny_vocabulary, word_level_tokenizer

    spec = {**TINY_CLIP, **dict(spec or {})}
    vocab, max_len, side = tiny_vocabulary(), int(spec["max_length"]), int(spec["vision"]["image_size"])
    text = {**spec["text"], "vocab_size": len(vocab), "max_position_embeddings": max_len, "pad_token_id": 0,
            "bos_token_id": 2, "eos_token_id": 3}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(spec["vision"]), projection_dim=spec["projection_dim"]))
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return model.eval(), word_level_tokenizer(max_len, vocab), processor


class PickScoreReward(_Scorer):
    """PickScore: ``exp(logit_scale) * cos(image_emb, text_emb) / scale_divisor``.

    Args:
        model: ``CLIPModel`` weights (``yuvalkirstain/PickScore_v1`` or a local folder).
        processor: tokenizer + image processor (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        revision, processor_revision: pinned hub revisions.
        scale_divisor: 1 = raw PickScore (paper tables); 26 = Flow-GRPO's training normalisation.
        tiny: a random-weight model of the same classes instead (tests); ``{}`` = defaults.
        aux: optional ``{name: reward}`` scored alongside into ``info["aux"]`` (GARDO's gate).
    """

    name = "pickscore"

    def __init__(self, model: str | None = "yuvalkirstain/PickScore_v1", processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 revision: str | None = None, processor_revision: str | None = None, local_files_only: bool = True,
                 scale_divisor: float = 1.0, tiny: Mapping[str, Any] | None = None, seed: int = 0, device: str = "cpu",
                 dtype: str = "fp32", batch_size: int = 32, aux: Mapping[str, Any] | None = None) -> None:
        super().__init__(device, dtype, batch_size, aux)
        if tiny is not None:
            self.model, self.tokenizer, self.image_processor = tiny_clip(tiny, seed)
        else:
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

            kw = {"local_files_only": local_files_only}
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(processor, revision=processor_revision, **kw)
                self.image_processor = AutoImageProcessor.from_pretrained(processor, revision=processor_revision, **kw)
                self.model = CLIPModel.from_pretrained(model, revision=revision, **kw).eval()
            except OSError as e:
                raise OSError(f"PickScore: cannot load {model!r} / processor {processor!r} from local files ({e}); "
                              "download them first (README: 'Reproducing the paper on GPUs')") from e
        self.model.requires_grad_(False).to(self.device, self.dtype)
        self.scale_divisor = float(scale_divisor)
        self.max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))

    def _score_batch(self, arrays: list[np.ndarray], prompts: list[str]) -> Tensor:
        pixels = self.image_processor(images=arrays, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        img = _features(self.model.get_image_features(pixel_values=pixels)).float()
        txt = _features(self.model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])).float()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return self.model.logit_scale.exp().float() * cos / self.scale_divisor


# ---------------------------------------------------------------------------------------------
# HPS v2.1
# ---------------------------------------------------------------------------------------------

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


class HPSv21Reward(_Scorer):
    """HPS v2.1: open_clip ViT-H-14 with the HPS v2.1 weights; ``score = cos(image, text)``.

    Args:
        checkpoint: path of ``HPS_v2.1_compressed.pt`` (from the ``xswu/HPSv2`` hub repo).
        model_name: the open_clip architecture (``ViT-H-14``); its tokenizer ships with open_clip.
        tiny: an ``open_clip.CLIP`` of the same class with tiny towers instead (tests).
    """

    name = "hpsv21"

    def __init__(self, checkpoint: str | None = None, model_name: str = "ViT-H-14", tiny: Mapping[str, Any] | None = None,
                 seed: int = 0, device: str = "cpu", dtype: str = "fp32", batch_size: int = 32,
                 aux: Mapping[str, Any] | None = None) -> None:
        import open_clip

        super().__init__(device, dtype, batch_size, aux)
        if tiny is not None:
            cfg = {**TINY_OPEN_CLIP, **dict(tiny)}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = open_clip.CLIP(cfg["embed_dim"], dict(cfg["vision_cfg"]), dict(cfg["text_cfg"]))
            self.preprocess = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
        else:
            if checkpoint is None or not Path(checkpoint).is_file():
                raise FileNotFoundError(f"HPS v2.1 checkpoint {checkpoint!r} not found; download HPS_v2.1_compressed.pt "
                                        "(README: 'Reproducing the paper on GPUs') and set its path")
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            self.model.load_state_dict(state["state_dict"] if "state_dict" in state else state)
        self.model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def _score_batch(self, arrays: list[np.ndarray], prompts: list[str]) -> Tensor:
        from PIL import Image

        pixels = torch.stack([self.preprocess(Image.fromarray(a)) for a in arrays]).to(self.device, self.dtype)
        text = self.tokenizer(prompts).to(self.device)
        img = self.model.encode_image(pixels, normalize=True).float()
        txt = self.model.encode_text(text, normalize=True).float()
        return (img * txt).sum(-1)
