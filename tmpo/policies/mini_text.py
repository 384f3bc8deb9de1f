"""Text side of the mini model: a word-level tokenizer over the world's closed vocabulary and a small
transformer text encoder (the analogue of FLUX's T5/CLIP encoders, here trained from scratch).

The tokenizer knows every word the caption templates of :mod:`tmpo.world.captions` can produce
(GenEval templates, OCR signs, preference descriptions). A quoted string is split into characters,
so ``a sign that reads "K7Q"`` becomes ``a sign that reads " K 7 Q "`` with one token per sign
character. A word outside the vocabulary raises a ``ValueError`` that names it. Every sequence
starts with ``<bos>``, so even the empty caption (used for caption dropout / classifier-free
guidance) has one valid token.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from tmpo.world.captions import NUMBER_WORDS, RELATIONS, plural
from tmpo.world.font import ALPHABET
from tmpo.world.render import BACKGROUNDS, COLORS, SHAPES

PAD, BOS, QUOTE = "<pad>", "<bos>", '"'
_TEMPLATE_WORDS = ("a", "an", "photo", "of", "and", "on", "background", "sign", "that", "reads", ",")


def _build_vocab() -> tuple[str, ...]:
    words: list[str] = list(_TEMPLATE_WORDS)
    words += list(SHAPES) + [plural(s) for s in SHAPES] + list(COLORS)
    words += [w for name in BACKGROUNDS for w in name.split()]
    words += [w for rel in RELATIONS for w in rel.split()]
    words += list(NUMBER_WORDS.values())
    chars = [f"char:{c}" for c in ALPHABET]  # sign characters live in their own namespace
    unique = list(dict.fromkeys(words))  # keep order, drop duplicates ("blue" is a colour and a background word)
    return (PAD, BOS, QUOTE, *unique, *chars)


VOCAB: tuple[str, ...] = _build_vocab()
_TOKEN_RE = re.compile(r'"[^"]*"|[^\s,"]+|,|"')


class WordTokenizer:
    """Caption -> token ids over :data:`VOCAB`; padded batches with a validity mask.

    Args:
        max_length: longest token sequence (``<bos>`` included); longer captions raise ValueError.
    """

    def __init__(self, max_length: int = 32) -> None:
        self.vocab = VOCAB
        self.index = {w: i for i, w in enumerate(VOCAB)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, prompt: str) -> list[str]:
        """Token strings of one caption (without ``<bos>``)."""
        out: list[str] = []
        for piece in _TOKEN_RE.findall(prompt):
            if piece.startswith('"'):
                if len(piece) < 2 or not piece.endswith('"'):
                    raise ValueError(f"unbalanced quote in prompt {prompt!r}")
                for ch in piece[1:-1]:
                    if ch not in ALPHABET:
                        raise ValueError(
                            f"character {ch!r} inside quotes in prompt {prompt!r} is not in the sign alphabet {ALPHABET}"
                        )
                out += [QUOTE, *(f"char:{c}" for c in piece[1:-1]), QUOTE]
                continue
            word = piece.lower()
            if word not in self.index:
                raise ValueError(
                    f"unknown word {piece!r} in prompt {prompt!r}; the mini tokenizer only knows the world's "
                    f"caption vocabulary (tmpo.policies.mini_text.VOCAB)"
                )
            out.append(word)
        return out

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one caption, starting with ``<bos>``."""
        ids = [self.index[BOS]] + [self.index[t] for t in self.tokenize(prompt)]
        if len(ids) > self.max_length:
            raise ValueError(f"prompt {prompt!r} has {len(ids)} tokens, more than max_length={self.max_length}")
        return ids

    def decode(self, ids: list[int] | Tensor) -> str:
        """Inverse of :meth:`encode` (padding and ``<bos>`` dropped; sign characters re-joined in quotes)."""
        words: list[str] = []
        quoted: list[str] | None = None
        for i in (ids.tolist() if isinstance(ids, Tensor) else ids):
            tok = self.vocab[int(i)]
            if tok in (PAD, BOS):
                continue
            if tok == QUOTE:
                if quoted is None:
                    quoted = []
                else:
                    words.append('"' + "".join(quoted) + '"')
                    quoted = None
            elif tok.startswith("char:"):
                if quoted is None:
                    raise ValueError("sign character outside quotes")
                quoted.append(tok[5:])
            elif tok == ",":
                if words:
                    words[-1] += ","
            else:
                words.append(tok)
        return " ".join(words)

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``(ids [G, T] long, mask [G, T] bool)`` padded to the longest caption of the batch."""
        seqs = [self.encode(p) for p in prompts]
        t = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), t), dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        return ids, mask


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
