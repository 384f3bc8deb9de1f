"""One word-level tokenizer for the mini world's captions, shared by the mini text encoder and the
MiniCLIP preference models.

A caption is split into canonical tokens: lower-cased words and commas from the world's closed
vocabulary, and a double-quoted string (the OCR prompts' ``a sign that reads "K7Q"``) as
``<q>``, one ``<c:X>`` token per character, ``</q>``. Each model owns a *vocabulary layout*: the
list of canonical tokens in the order of its embedding rows (stored with or built for its
checkpoint), optionally with a ``<bos>`` token prepended to every caption and with aliases that
map two canonical tokens onto one row (the mini DiT embeds both quote marks with one row).
Unknown words, characters outside the font, unbalanced quotes and over-long captions raise a
ValueError that names the problem.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from tmpo.world.captions import NUMBER_WORDS, RELATIONS, plural
from tmpo.world.font import ALPHABET
from tmpo.world.render import BACKGROUNDS, COLORS, SHAPES

PAD, BOS, QUOTE_OPEN, QUOTE_CLOSE = "<pad>", "<bos>", "<q>", "</q>"
_TEMPLATE_WORDS = ("a", "an", "photo", "of", "and", "on", "background", "sign", "that", "reads", ",")
# A quoted string, a word (anything up to whitespace, a comma or a quote), a comma, or a stray quote.
_PIECE_RE = re.compile(r'"([^"]*)"|([^\s,"]+)|(,)|(")')


def char_token(c: str) -> str:
    """The token of one sign character."""
    return f"<c:{c}>"


def caption_words() -> list[str]:
    """Every word (and the comma) a caption template can produce, in a fixed order without repeats."""
    words: list[str] = list(_TEMPLATE_WORDS)
    words += list(SHAPES) + [plural(s) for s in SHAPES] + list(COLORS)
    words += [w for name in BACKGROUNDS for w in name.split()]
    words += [w for rel in RELATIONS for w in rel.split()]
    words += list(NUMBER_WORDS.values())
    return list(dict.fromkeys(words))  # "blue" is a colour and a background word


def sign_characters() -> list[str]:
    """The tokens of every character the font can draw."""
    return [char_token(c) for c in ALPHABET]


def split_caption(text: str) -> list[str]:
    """Caption -> canonical tokens (no ``<bos>``, no padding); raises ValueError on anything unknown."""
    tokens: list[str] = []
    for quoted, word, comma, stray in _PIECE_RE.findall(text):
        if stray:
            raise ValueError(f"unbalanced quote in caption {text!r}")
        if comma:
            tokens.append(",")
        elif word:
            tokens.append(word.lower())
        else:
            bad = sorted(set(quoted) - set(ALPHABET))
            if bad:
                raise ValueError(
                    f"characters {bad} inside quotes in caption {text!r} are not in the sign alphabet {ALPHABET}"
                )
            tokens += [QUOTE_OPEN, *(char_token(c) for c in quoted), QUOTE_CLOSE]
    return tokens


class CaptionTokenizer:
    """Caption -> token ids in one model's vocabulary layout; padded batches with a validity mask.

    Args:
        vocab: canonical tokens in embedding-row order; must start with ``<pad>`` (id 0).
        max_len: longest id sequence (``<bos>`` included); longer captions raise ValueError.
        bos: prepend ``<bos>`` (must be in ``vocab``), so the empty caption has one valid token.
        aliases: canonical token -> the vocabulary token whose row it shares.
    """

    def __init__(
        self, vocab: Sequence[str], max_len: int, *, bos: bool = False, aliases: Mapping[str, str] | None = None
    ) -> None:
        self.vocab = list(vocab)
        if not self.vocab or self.vocab[0] != PAD:
            raise ValueError(f"vocabulary must start with {PAD!r}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocabulary has duplicate tokens")
        self.index = {t: i for i, t in enumerate(self.vocab)}
        self.aliases = dict(aliases or {})
        for src, dst in self.aliases.items():
            if dst not in self.index:
                raise ValueError(f"alias {src!r} -> {dst!r}: {dst!r} is not in the vocabulary")
            self.index.setdefault(src, self.index[dst])
        if bos and BOS not in self.index:
            raise ValueError(f"bos=True needs {BOS!r} in the vocabulary")
        self.bos = bool(bos)
        self.max_len = int(max_len)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """Caption -> canonical token strings (no ``<bos>``)."""
        tokens = split_caption(text)
        unknown = sorted({t for t in tokens if t not in self.index})
        if unknown:
            shown = [t[3:-1] if t.startswith("<c:") else t for t in unknown]
            raise ValueError(
                f"unknown word(s) {shown} in caption {text!r}: the mini models only know the world's caption "
                "vocabulary (tmpo.world.tokenizer.caption_words)"
            )
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption (starting with ``<bos>`` if this layout has one)."""
        ids = ([self.index[BOS]] if self.bos else []) + [self.index[t] for t in self.tokenize(text)]
        if len(ids) > self.max_len:
            raise ValueError(f"caption {text!r} has {len(ids)} tokens; the model takes at most {self.max_len}")
        return ids

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Inverse of :meth:`encode` (padding and ``<bos>`` dropped; sign characters re-joined in quotes)."""
        words: list[str] = []
        quoted: list[str] | None = None
        for i in ids.tolist() if isinstance(ids, Tensor) else ids:
            tok = self.vocab[int(i)]
            if tok in (PAD, BOS):
                continue
            if tok in (QUOTE_OPEN, QUOTE_CLOSE):  # one row may serve both marks (an alias): toggle
                if quoted is None:
                    quoted = []
                else:
                    words.append('"' + "".join(quoted) + '"')
                    quoted = None
            elif tok.startswith("<c:"):
                if quoted is None:
                    raise ValueError(f"sign character {tok} outside quotes")
                quoted.append(tok[3:-1])
            elif tok == ",":
                if words:
                    words[-1] += ","
            else:
                words.append(tok)
        return " ".join(words)

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(ids [B, T] long, mask [B, T] bool)``, padded with ``<pad>`` (id 0) to the longest caption."""
        seqs = [self.encode(t) for t in texts]
        length = max(1, max((len(s) for s in seqs), default=1))
        ids = torch.zeros((len(seqs), length), dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.bool)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = True
        return ids, mask
