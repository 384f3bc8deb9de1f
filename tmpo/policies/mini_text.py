"""Text side of the mini model: the denoiser's caption tokenizer layout and a small transformer text
encoder (the analogue of FLUX's T5/CLIP encoders, here trained from scratch).

Tokenisation is :class:`tmpo.world.tokenizer.CaptionTokenizer` (shared with the MiniCLIP preference
models); this module fixes the mini DiT/MMDiT's vocabulary layout, :data:`VOCAB`: ``<pad>``,
``<bos>``, one quote row used for both quote marks, the caption words, then one row per sign
character. Every caption starts with ``<bos>``, so even the empty caption (caption dropout /
classifier-free guidance) has one valid token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tmpo.world.tokenizer import BOS, PAD, QUOTE_CLOSE, QUOTE_OPEN, CaptionTokenizer, caption_words, sign_characters

# Row order of the committed mini checkpoints' token embeddings; changing it invalidates them.
VOCAB: tuple[str, ...] = (PAD, BOS, QUOTE_OPEN, *caption_words(), *sign_characters())


def text_tokenizer(max_length: int = 32) -> CaptionTokenizer:
    """The mini denoiser's tokenizer: :data:`VOCAB`, ``<bos>`` first, both quote marks on one row."""
    return CaptionTokenizer(VOCAB, max_length, bos=True, aliases={QUOTE_CLOSE: QUOTE_OPEN})


class TextEncoder(nn.Module):
    """Token embedding + learned positions + ``layers`` pre-norm transformer encoder layers."""

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 2, heads: int = 4, max_length: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(max_length, width))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.tok.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``ids, mask [G, T]`` -> token features ``[G, T, width]`` (padding rows are zeroed)."""
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        h = self.layers(h, src_key_padding_mask=~mask)
        return self.norm(h) * mask[..., None]
