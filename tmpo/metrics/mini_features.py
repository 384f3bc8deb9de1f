"""Mini-scale stand-in for DINOv2 features: the image tower of a trained MiniCLIP preference model.

The TMPO paper's cosine diversity (App. D.1) and GARDO's diversity weights use DINOv2 ViT-L/14
embeddings, which capture "semantic layout and texture differences". At the mini scale the feature
extractor is the image tower of one of the committed :class:`tmpo.rewards.preference.MiniCLIP`
models (``pickscore`` by default). Two read-outs:

* ``layer="spatial"`` (default): the tower's last conv map, flattened (``4c x 4 x 4`` values,
  1536 for pickscore): what is where. On 8 correct renderings of one preference test prompt
  its cosine diversity is ~0.5 (different layouts), so layout collapse is visible.
* ``layer="embedding"``: the projected image embedding before L2 normalisation
  (``[N, embed_dim]``). It is trained to match captions, which rarely state positions, so it is
  nearly layout-invariant: cosine diversity ~0.03 within a prompt, ~0.8 across prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tmpo.rewards.preference import MiniCLIP, default_checkpoint, load_miniclip

LAYERS: tuple[str, ...] = ("spatial", "embedding")


class MiniImageFeatures:
    """``extractor(images [N, 3, H, W] in [0, 1]) -> Tensor[N, D]`` (float32, on the images' device).

    Args:
        checkpoint: a MiniCLIP ``.pt``; default ``tmpo/assets/preference/<name>.pt``.
        name: which committed model's image tower to use.
        layer: ``"spatial"`` (flattened last conv map) or ``"embedding"`` (projected embedding).
        normalize: return unit vectors (cosine metrics normalise anyway; default False).
        model: an in-memory MiniCLIP instead of a checkpoint (tests).
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        name: str = "pickscore",
        *,
        layer: str = "spatial",
        normalize: bool = False,
        model: MiniCLIP | None = None,
        batch_size: int = 256,
    ) -> None:
        if model is not None:
            if checkpoint is not None:
                raise ValueError("pass either checkpoint or model, not both")
            self.model = model.eval().requires_grad_(False)
        else:
            path = Path(checkpoint) if checkpoint is not None else default_checkpoint(name)
            self.model = load_miniclip(path, name)[0]
        if layer not in LAYERS:
            raise ValueError(f"unknown layer {layer!r}; choose one of {LAYERS}")
        self.name, self.layer, self.normalize, self.batch_size = name, layer, bool(normalize), int(batch_size)

    @property
    def dim(self) -> int:
        c, s = self.model.config.width, self.model.config.image_size
        return self.model.config.embed_dim if self.layer == "embedding" else 4 * c * (s // 8) ** 2

    def _features(self, x: Tensor) -> Tensor:
        if self.layer == "embedding":
            return self.model.image_features(x)
        return self.model.image_features(x, spatial=True)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        self.model.to(images.device)
        x = images.detach().float().clamp(0, 1)
        chunks = [self._features(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]
        out = torch.cat(chunks).float() if chunks else x.new_zeros(0, self.dim)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out
