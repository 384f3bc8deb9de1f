"""DINOv2 ViT-L/14 image features (``facebook/dinov2-large`` through transformers) for Cos. Div. and GARDO.

The TMPO paper measures cosine diversity "in DINOv2 ViT-L/14 feature space" (App. D.1) and GARDO
reweights advantages by nearest-neighbour distances of the same kind of features. We use the
``pooler_output`` of ``Dinov2Model``: the final-layer-normed ``[CLS]`` token, 1024-d for ViT-L.
Preprocessing is the checkpoint's own ``AutoImageProcessor`` (resize 256, centre crop 224, ImageNet
statistics) on uint8 images. ``tiny={...}`` builds a random-weight ``Dinov2Model`` for tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tmpo.policies.diffusers_policy import resolve_dtype
from tmpo.rewards.real_preference import to_uint8_arrays

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "mlp_ratio": 2, "patch_size": 8, "image_size": 32}


class DINOv2Features:
    """``extractor(images [N, 3, H, W] in [0, 1]) -> Tensor[N, D]`` (float32, CPU), ``batch_size`` at a time."""

    def __init__(self, model: str | None = "facebook/dinov2-large", revision: str | None = None, local_files_only: bool = True,
                 tiny: Mapping[str, Any] | None = None, seed: int = 0, device: str = "cpu", dtype: str = "fp32",
                 batch_size: int = 32) -> None:
        from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model

        self.device, self.dtype, self.batch_size = torch.device(device), resolve_dtype(dtype), int(batch_size)
        if tiny is not None:
            cfg = {**TINY, **dict(tiny)}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = Dinov2Model(Dinov2Config(**cfg))
            side = cfg["image_size"]
            self.processor = BitImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        else:
            try:
                self.processor = AutoImageProcessor.from_pretrained(model, revision=revision, local_files_only=local_files_only)
                self.model = Dinov2Model.from_pretrained(model, revision=revision, local_files_only=local_files_only)
            except OSError as e:
                raise OSError(f"DINOv2: cannot load {model!r} from local files ({e}); download it first "
                              "(README: 'Reproducing the paper on GPUs')") from e
        self.model.eval().requires_grad_(False).to(self.device, self.dtype)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        arrays = to_uint8_arrays(images)
        out = []
        for i in range(0, len(arrays), self.batch_size):
            pixels = self.processor(images=arrays[i : i + self.batch_size], return_tensors="pt")["pixel_values"]
            out.append(self.model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)
