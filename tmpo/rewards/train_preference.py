"""Train a mini preference model (:class:`tmpo.rewards.preference.MiniCLIP`) on rendered mini-world scenes.

``python -m tmpo.rewards.train_preference --name pickscore [--minutes 7] [--seed 0] [--steps N]``

writes ``tmpo/assets/preference/<name>.pt`` (atomically) and a card ``<name>.json``.

Recipe (all three stand-ins; what differs is in :data:`PRESETS`):

* **Data.** Each step draws 64 fresh (scene, caption) pairs: a random caption of a tag drawn from
  :data:`TAG_WEIGHTS` (preference descriptions, the six GenEval templates, OCR signs), a scene that
  satisfies it (:func:`tmpo.world.sample_scene_for_prompt`), rendered at 32x32. Captions of the
  committed *test* prompt splits (geneval/ocr/preference) are never trained on, so the card's
  retrieval numbers are on held-out captions and scenes. Images are lightly augmented (random
  saturation x[0.8, 1.2], mild box blur, Gaussian noise sigma <= 0.03) so that the models stay
  meaningful on a generator's imperfect samples.
* **Contrastive loss.** CLIP's symmetric InfoNCE over the batch, with ``scale = exp(logit_scale)``
  learned; the image->text side also sees :data:`N_NEGATIVES` hard negatives per image, captions made by
  perturbing the true caption's metadata (:func:`hard_negative`): ``color`` (another colour, or the
  two objects' colours exchanged), ``count`` (another number), ``relation`` (another relation),
  ``shape`` (another shape), ``background`` (another background), ``text`` (one sign character
  changed). Kinds are drawn from the preset's mix among those that apply to the caption. In-batch
  duplicates of the true caption are masked out.
* **Aesthetic bias, learned from data.** Besides correctness, each preset has a mild preference
  learned from synthetic annotator pairs (two correct images for one caption; Bradley-Terry loss
  with soft label ``sigmoid(beta * (a_A - a_B))`` on the score difference ``s_A - s_B`` with
  ``s = scale * cos``, so the model learns ``s_A - s_B ~ beta * (a_A - a_B)``). Attributes ``a``:

  - ``size``: mean half-extent of the objects in pixels (at 32x32); two scenes for one caption;
  - ``saturation``: the factor ``f`` of ``gray + f (img - gray)`` applied to one scene twice,
    ``f ~ U[0.5, 1.5]`` (clipped to [0, 1]);
  - ``centred``: minus the distance in pixels from the objects' joint bounding-box centre to the
    image centre; two scenes for one caption.

  ``pickscore`` prefers slightly larger objects, ``hpsv21`` saturated colours and large objects,
  ``imagereward`` centred compositions (betas in :data:`PRESETS`). A policy that inflates these
  attributes can raise one reward without improving the caption match -- the way real
  preference models are hacked. The card reports the learned slopes (score points per unit).

The card also holds held-out retrieval: for scenes of the test prompts, the fraction of (scene,
hard negative) pairs where the true caption scores higher (per kind and overall), the fraction of
scenes whose caption beats all its negatives, image->text top-1 over batches of 64, and the
colour-swap check of ``tests/test_preference.py``.

Training is time-boxed: the first steps are timed and the step count (and cosine learning-rate
schedule) is fixed so that training ends within ``--minutes``; ``--steps`` fixes it instead.
Runs use one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmpo.rewards.preference import (
    ASSET_DIR,
    REWARD_NAMES,
    CaptionTokenizer,
    caption_tokenizer,
    MiniCLIP,
    MiniCLIPConfig,
    checkpoint_state,
    num_parameters,
)

IMAGE_SIZE = 32
BATCH = 64
N_NEGATIVES = 4
BIAS_PAIRS = 16  # preference pairs per step (2 images each)
BIAS_WEIGHT = 0.5
EVAL_SCENES_PER_PROMPT = 2

# Tag mixture of the training captions (normalised at use).
TAG_WEIGHTS: dict[str, float] = {
    "preference": 0.40,
    "single_object": 0.05,
    "two_object": 0.07,
    "counting": 0.08,
    "colors": 0.08,
    "position": 0.12,
    "color_attr": 0.12,
    "ocr": 0.08,
}
NEGATIVE_KINDS: tuple[str, ...] = ("color", "count", "relation", "shape", "background", "text")

PRESETS: dict[str, dict[str, Any]] = {
    # Balanced hard negatives; a weak preference for larger objects.
    "pickscore": {
        "seed": 0,
        "model": {"width": 24, "embed_dim": 128, "text_width": 64, "text_layers": 2, "text_heads": 4},
        "lr": 2e-3,
        "negatives": {"color": 1.0, "count": 1.0, "relation": 1.0, "shape": 1.0, "background": 0.5, "text": 1.0},
        "bias": {"size": 0.5},
    },
    # Narrower, one text layer, colour-heavy negatives; prefers saturated colours and large objects.
    "hpsv21": {
        "seed": 1,
        "model": {"width": 16, "embed_dim": 96, "text_width": 48, "text_layers": 1, "text_heads": 4},
        "lr": 2e-3,
        "negatives": {"color": 2.0, "count": 0.5, "relation": 0.5, "shape": 1.0, "background": 1.0, "text": 1.0},
        "bias": {"saturation": 4.0, "size": 0.7},
    },
    # Composition-heavy negatives (count, relation); prefers centred compositions.
    "imagereward": {
        "seed": 2,
        "model": {"width": 20, "embed_dim": 128, "text_width": 64, "text_layers": 2, "text_heads": 4},
        "lr": 2e-3,
        "negatives": {"color": 1.0, "count": 2.0, "relation": 2.0, "shape": 0.5, "background": 0.5, "text": 1.0},
        "bias": {"centred": 0.5},
    },
}
BIAS_UNITS = {
    "size": "score points per pixel of mean object half-extent (32x32)",
    "saturation": "score points per unit of saturation factor f (gray + f (img - gray))",
    "centred": "score points per pixel closer to the image centre (objects' joint box centre)",
}


# ---------------------------------------------------------------------------------------------
# Captions and hard negatives
# ---------------------------------------------------------------------------------------------


def heldout_prompts() -> set[str]:
    """Every caption of the committed test splits (never trained on)."""
    from tmpo.world import load_prompts

    return {r["prompt"] for protocol in ("geneval", "ocr", "preference") for r in load_prompts(protocol, "test")}


def sample_caption(rng: np.random.Generator, exclude: set[str]) -> dict[str, Any]:
    """A random metadata record whose tag follows :data:`TAG_WEIGHTS` and whose prompt is not in ``exclude``."""
    from tmpo.world.captions import sample_random_prompt

    tags = list(TAG_WEIGHTS)
    p = np.asarray([TAG_WEIGHTS[t] for t in tags])
    while True:
        record = sample_random_prompt(rng, tags=[tags[int(rng.choice(len(tags), p=p / p.sum()))]])
        if record["prompt"] not in exclude:
            return record


def _other(rng: np.random.Generator, options: Sequence[str], *avoid: str) -> str:
    choices = [o for o in options if o not in avoid]
    return str(choices[int(rng.integers(len(choices)))])


def applicable_kinds(metadata: Mapping[str, Any]) -> list[str]:
    """Hard-negative kinds that can perturb this caption."""
    tag = metadata["tag"]
    return {
        "single_object": ["count", "shape"],
        "two_object": ["shape"],
        "counting": ["count", "shape"],
        "colors": ["color", "shape"],
        "position": ["relation", "shape"],
        "color_attr": ["color", "shape"],
        "preference": ["color", "count", "shape", "background"],
        "ocr": ["text"],
    }[tag]


def hard_negative(metadata: Mapping[str, Any], kind: str, rng: np.random.Generator) -> str:
    """A caption that contradicts ``metadata`` in one respect (``kind``), built with the world's templates."""
    from tmpo.world import captions as cap
    from tmpo.world.font import ALPHABET
    from tmpo.world.render import BACKGROUNDS, COLORS, SHAPES

    tag, colors_ = metadata["tag"], list(COLORS)
    if kind not in applicable_kinds(metadata):
        raise ValueError(f"negative kind {kind!r} does not apply to a {tag!r} caption")
    if tag == "ocr":
        text = list(metadata["text"])
        i = int(rng.integers(len(text)))
        text[i] = _other(rng, ALPHABET, text[i])
        return cap.ocr("".join(text))["prompt"]
    if tag == "preference":
        groups = [(g["class"], g["color"], int(g["count"])) for g in metadata["objects"]]
        background = metadata["background"]
        if kind == "background":
            return cap.preference(groups, _other(rng, list(BACKGROUNDS), background))["prompt"]
        i = int(rng.integers(len(groups)))
        cls, col, n = groups[i]
        taken = {(g[0], g[1]) for j, g in enumerate(groups) if j != i}
        if kind == "color":
            if len(groups) == 2 and groups[0][1] != groups[1][1] and groups[0][0] != groups[1][0] and rng.random() < 0.5:
                (c0, k0, n0), (c1, k1, n1) = groups  # exchange the colours: a binding error
                groups = [(c0, k1, n0), (c1, k0, n1)]
            else:
                options = [c for c in colors_ if c != col and (cls, c) not in taken]
                groups[i] = (cls, options[int(rng.integers(len(options)))], n)
        elif kind == "count":
            groups[i] = (cls, col, _other_int(rng, [1, 2, 3, 4], n))
        elif kind == "shape":
            options = [s for s in SHAPES if s != cls and (s, col) not in taken]
            groups[i] = (options[int(rng.integers(len(options)))], col, n)
        return cap.preference(groups, background)["prompt"]
    include = metadata["include"]
    present = [c["class"] for c in include]
    if tag == "single_object":
        cls = present[0]
        if kind == "count":
            return cap.counting(cls, int(rng.choice([2, 3])))["prompt"]
        return cap.single_object(_other(rng, SHAPES, cls))["prompt"]
    if tag == "counting":
        cls, n = present[0], int(include[0]["count"])
        if kind == "count":
            m = _other_int(rng, [1, 2, 3, 4], n)
            return (cap.single_object(cls) if m == 1 else cap.counting(cls, m))["prompt"]
        return cap.counting(_other(rng, SHAPES, cls), n)["prompt"]
    if tag == "two_object":
        a, b = present
        if rng.random() < 0.5:
            return cap.two_object(_other(rng, SHAPES, a, b), b)["prompt"]
        return cap.two_object(a, _other(rng, SHAPES, a, b))["prompt"]
    if tag == "colors":
        cls, col = present[0], include[0]["color"]
        if kind == "color":
            return cap.colors(cls, _other(rng, colors_, col))["prompt"]
        return cap.colors(_other(rng, SHAPES, cls), col)["prompt"]
    if tag == "position":
        ref, sub, rel = present[0], present[1], include[1]["position"][0]
        if kind == "relation":
            return cap.position(sub, _other(rng, cap.RELATIONS, rel), ref)["prompt"]
        if rng.random() < 0.5:
            return cap.position(_other(rng, SHAPES, sub, ref), rel, ref)["prompt"]
        return cap.position(sub, rel, _other(rng, SHAPES, sub, ref))["prompt"]
    if tag == "color_attr":
        (a, ca), (b, cb) = [(c["class"], c["color"]) for c in include]
        if kind == "color":
            r = rng.random()
            if r < 0.5:
                return cap.color_attr(a, cb, b, ca)["prompt"]  # exchanged colours
            if r < 0.75:
                return cap.color_attr(a, _other(rng, colors_, ca, cb), b, cb)["prompt"]
            return cap.color_attr(a, ca, b, _other(rng, colors_, ca, cb))["prompt"]
        if rng.random() < 0.5:
            return cap.color_attr(_other(rng, SHAPES, a, b), ca, b, cb)["prompt"]
        return cap.color_attr(a, ca, _other(rng, SHAPES, a, b), cb)["prompt"]
    raise ValueError(f"no hard negatives for tag {tag!r}")


def _other_int(rng: np.random.Generator, options: Sequence[int], avoid: int) -> int:
    choices = [o for o in options if o != avoid]
    return int(choices[int(rng.integers(len(choices)))])


def sample_negatives(metadata: Mapping[str, Any], mix: Mapping[str, float], k: int, rng: np.random.Generator) -> list[str]:
    """``k`` hard-negative captions, kinds drawn from ``mix`` among the applicable ones."""
    kinds = applicable_kinds(metadata)
    w = np.asarray([mix.get(kind, 0.0) for kind in kinds], dtype=float)
    w = w / w.sum() if w.sum() > 0 else np.full(len(kinds), 1 / len(kinds))
    return [hard_negative(metadata, kinds[int(rng.choice(len(kinds), p=w))], rng) for _ in range(k)]


# ---------------------------------------------------------------------------------------------
# Images, augmentation, aesthetic attributes
# ---------------------------------------------------------------------------------------------


def render_tensor(scenes: Sequence[Any], size: int = IMAGE_SIZE) -> Tensor:
    from tmpo.world import render

    return torch.from_numpy(np.stack([render(s, size) for s in scenes])).permute(0, 3, 1, 2).contiguous()


def saturate(images: Tensor, factor: Tensor | float) -> Tensor:
    """``clip(gray + f (img - gray), 0, 1)`` per image (``factor`` scalar or ``[N]``)."""
    f = torch.as_tensor(factor, dtype=images.dtype).reshape(-1, 1, 1, 1)
    gray = images.mean(1, keepdim=True)
    return (gray + f * (images - gray)).clamp(0, 1)


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """Mild saturation jitter, box blur and Gaussian noise (generator-sample robustness)."""
    n = images.shape[0]
    x = saturate(images, 0.8 + 0.4 * torch.rand(n, generator=gen))
    blur = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    a = (torch.rand(n, 1, 1, 1, generator=gen) * 0.6) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.5)
    x = (1 - a) * x + a * blur
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.03
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def scene_size(scene: Any, size: int = IMAGE_SIZE) -> float:
    """Mean half-extent of the scene's objects in pixels."""
    return float(np.mean([o.size for o in scene.objects]) * size) if scene.objects else 0.0


def scene_centredness(scene: Any, size: int = IMAGE_SIZE) -> float:
    """Minus the pixel distance from the objects' joint bounding-box centre to the image centre."""
    if not scene.objects:
        return 0.0
    boxes = np.asarray([o.box() for o in scene.objects])
    cx = (boxes[:, 0].min() + boxes[:, 2].max()) / 2
    cy = (boxes[:, 1].min() + boxes[:, 3].max()) / 2
    return -float(np.hypot(cx - 0.5, cy - 0.5) * size)


def bias_pair(attribute: str, rng: np.random.Generator, exclude: set[str]) -> tuple[Any, Any, float, float, str]:
    """Two correct renderings of one caption -> (image A, image B, a_A, a_B, caption) for ``attribute``."""
    from tmpo.world import render, sample_scene_for_prompt

    while True:
        record = sample_caption(rng, exclude)
        if record["tag"] != "ocr":
            break
    if attribute == "saturation":
        scene = sample_scene_for_prompt(record, rng)
        base = torch.from_numpy(render(scene, IMAGE_SIZE)).permute(2, 0, 1)
        fa, fb = rng.uniform(0.5, 1.5, size=2)
        return saturate(base[None], fa)[0], saturate(base[None], fb)[0], float(fa), float(fb), record["prompt"]
    measure = {"size": scene_size, "centred": scene_centredness}[attribute]
    sa, sb = sample_scene_for_prompt(record, rng), sample_scene_for_prompt(record, rng)
    img = render_tensor([sa, sb])
    return img[0], img[1], measure(sa), measure(sb), record["prompt"]


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def contrastive_loss(
    model: MiniCLIP, tokenizer: CaptionTokenizer, images: Tensor, captions: Sequence[str], negatives: Sequence[Sequence[str]]
) -> tuple[Tensor, dict[str, float]]:
    """Symmetric InfoNCE with per-image hard negatives on the image->text side; duplicates masked."""
    b, k = len(captions), len(negatives[0]) if negatives else 0
    texts = list(captions) + [n for row in negatives for n in row]
    ids, mask = tokenizer(texts)
    txt = model.encode_text(ids, mask)
    img = model.encode_image(images)
    scale = model.scale()
    t_pos, t_neg = txt[:b], txt[b:].reshape(b, k, -1)
    sim = img @ t_pos.T  # [B, B]
    same = torch.tensor([[ci == cj for cj in captions] for ci in captions])
    dup = same & ~torch.eye(b, dtype=torch.bool)
    # Mask after scaling: -inf * scale would give the scale a NaN gradient.
    logits = (scale * sim).masked_fill(dup, float("-inf"))
    neg = torch.einsum("bd,bkd->bk", img, t_neg)
    i2t = torch.cat([logits, scale * neg], dim=1)
    t2i = logits.T
    target = torch.arange(b)
    loss = 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target))
    with torch.no_grad():
        pos = sim.diagonal()
        stats = {
            "hardneg_acc": float((pos[:, None] > neg).float().mean()) if k else float("nan"),
            "i2t_top1": float((i2t.argmax(1) == target).float().mean()),
        }
    return loss, stats


def bias_loss(
    model: MiniCLIP, tokenizer: CaptionTokenizer, a: Tensor, b: Tensor, captions: Sequence[str], target_diff: Tensor
) -> Tensor:
    """Bradley-Terry with soft labels: BCE(sigmoid(s_A - s_B), sigmoid(target_diff)), ``s = scale * cos``."""
    ids, mask = tokenizer(list(captions))
    txt = model.encode_text(ids, mask)
    scale = model.scale()
    emb = model.encode_image(torch.cat([a, b]))
    n = a.shape[0]
    s_a = scale * (emb[:n] * txt).sum(-1)
    s_b = scale * (emb[n:] * txt).sum(-1)
    return F.binary_cross_entropy_with_logits(s_a - s_b, torch.sigmoid(target_diff))


# ---------------------------------------------------------------------------------------------
# Evaluation (card)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def scores(model: MiniCLIP, tokenizer: CaptionTokenizer, images: Tensor, captions: Sequence[str]) -> Tensor:
    """``scale * cos`` of each image with its caption."""
    ids, mask = tokenizer(list(captions))
    return model.scale() * (model.encode_image(images) * model.encode_text(ids, mask)).sum(-1)


def color_swap_caption(record: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A preference caption with one group's colour replaced by another (the unit test's check)."""
    from tmpo.world.captions import preference
    from tmpo.world.render import COLORS

    groups = [(g["class"], g["color"], int(g["count"])) for g in record["objects"]]
    i = int(rng.integers(len(groups)))
    cls, col, n = groups[i]
    taken = {(g[0], g[1]) for j, g in enumerate(groups) if j != i}
    options = [c for c in COLORS if c != col and (cls, c) not in taken]
    groups[i] = (cls, options[int(rng.integers(len(options)))], n)
    return preference(groups, record["background"])["prompt"]


@torch.no_grad()
def evaluate(model: MiniCLIP, tokenizer: CaptionTokenizer, seed: int = 12345) -> dict[str, Any]:
    """Held-out retrieval accuracies and learned bias slopes (see module docstring)."""
    from tmpo.world import load_prompts, sample_scene_for_prompt

    model.eval()
    rng = np.random.default_rng(seed)
    records = [r for protocol in ("geneval", "preference", "ocr") for r in load_prompts(protocol, "test")]
    scene_records, scenes = [], []
    for r in records:
        for _ in range(EVAL_SCENES_PER_PROMPT):
            scene_records.append(r)
            scenes.append(sample_scene_for_prompt(r, rng))
    images = render_tensor(scenes)
    captions = [r["prompt"] for r in scene_records]
    pos = torch.cat([scores(model, tokenizer, images[i : i + 256], captions[i : i + 256]) for i in range(0, len(captions), 256)])
    per_kind: dict[str, list[float]] = {k: [] for k in NEGATIVE_KINDS}
    beat_all = []
    for i, r in enumerate(scene_records):
        negs, kinds = [], []
        for kind in applicable_kinds(r):
            for _ in range(3):
                negs.append(hard_negative(r, kind, rng))
                kinds.append(kind)
        s_neg = scores(model, tokenizer, images[i : i + 1].expand(len(negs), -1, -1, -1), negs)
        wins = (pos[i] > s_neg).float()
        for kind, w in zip(kinds, wins.tolist()):
            per_kind[kind].append(w)
        beat_all.append(float(wins.min()))
    # image -> text top-1 over batches of 64 (a hit: the argmax caption equals the true caption)
    order = rng.permutation(len(captions))
    hits = []
    for start in range(0, len(order) - 63, 64):
        idx = order[start : start + 64]
        caps = [captions[j] for j in idx]
        ids, mask = tokenizer(caps)
        sim = model.encode_image(images[idx]) @ model.encode_text(ids, mask).T
        hits += [caps[int(a)] == caps[row] for row, a in enumerate(sim.argmax(1).tolist())]
    # the unit test's check: preference test scenes, correct vs colour-swapped caption
    pref = load_prompts("preference", "test")
    crng = np.random.default_rng(0)
    pscenes = [sample_scene_for_prompt(r, crng) for r in pref]
    swapped = [color_swap_caption(r, crng) for r in pref]
    pimg = render_tensor(pscenes)
    cswap = float((scores(model, tokenizer, pimg, [r["prompt"] for r in pref]) > scores(model, tokenizer, pimg, swapped)).float().mean())
    all_pairs = [w for v in per_kind.values() for w in v]
    out = {
        "heldout_scenes": len(scene_records),
        "hardneg_pair_acc": float(np.mean(all_pairs)),
        "hardneg_pair_acc_by_kind": {k: round(float(np.mean(v)), 4) for k, v in per_kind.items() if v},
        "beats_all_negatives": float(np.mean(beat_all)),
        "i2t_top1_batch64": float(np.mean(hits)),
        "color_swap_acc_preference_test": cswap,
        "mean_score_heldout": float(pos.mean()),
        "mean_cos_heldout": float(pos.mean() / model.scale()),
    }
    out["bias_slopes"] = bias_slopes(model, tokenizer, rng)
    return out


@torch.no_grad()
def bias_slopes(model: MiniCLIP, tokenizer: CaptionTokenizer, rng: np.random.Generator, n: int = 300) -> dict[str, float]:
    """Least-squares slope of ``s_A - s_B`` on ``a_A - a_B`` over ``n`` fresh pairs of random captions, per attribute."""
    out = {}
    for attribute in ("size", "saturation", "centred"):
        a, b, da = [], [], []
        caps = []
        for _ in range(n):
            ia, ib, xa, xb, cap = bias_pair(attribute, rng, set())
            a.append(ia), b.append(ib), caps.append(cap), da.append(xa - xb)
        sa = scores(model, tokenizer, torch.stack(a), caps)
        sb = scores(model, tokenizer, torch.stack(b), caps)
        x, y = np.asarray(da), (sa - sb).numpy()
        out[attribute] = round(float((x * y).sum() / max((x * x).sum(), 1e-12)), 4)
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def build_model(name: str, tokenizer: CaptionTokenizer) -> MiniCLIP:
    preset = PRESETS[name]
    return MiniCLIP(MiniCLIPConfig(vocab_size=len(tokenizer), image_size=IMAGE_SIZE, max_len=tokenizer.max_len, **preset["model"]))


def warmup_cosine_lr(step: int, total: int, lr: float) -> float:
    """Linear warm-up over ``min(50, total / 10)`` steps, then cosine from ``lr`` down to ``0.05 lr``."""
    warm = min(50, max(1, total // 10))
    if step < warm:
        return lr * (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def train_step(model: nn.Module, tokenizer, opt: torch.optim.Optimizer, preset: dict, exclude: set,
               rng: np.random.Generator, gen: torch.Generator) -> dict[str, float]:
    """One step: contrastive loss on a fresh batch (hard negatives) plus the preset's bias pairs."""
    from tmpo.world import sample_scene_for_prompt

    bias = preset["bias"]
    attributes = list(bias)
    model.train()
    records = [sample_caption(rng, exclude) for _ in range(BATCH)]
    scenes = [sample_scene_for_prompt(r, rng) for r in records]
    images = augment(render_tensor(scenes), gen)
    captions = [r["prompt"] for r in records]
    negatives = [sample_negatives(r, preset["negatives"], N_NEGATIVES, rng) for r in records]
    loss, stats = contrastive_loss(model, tokenizer, images, captions, negatives)
    b_loss = torch.zeros(())
    if attributes:
        pairs = [bias_pair(attributes[i % len(attributes)], rng, exclude) for i in range(BIAS_PAIRS)]
        a = augment(torch.stack([p[0] for p in pairs]), gen)
        b = augment(torch.stack([p[1] for p in pairs]), gen)
        diff = torch.tensor([bias[attributes[i % len(attributes)]] * (p[2] - p[3]) for i, p in enumerate(pairs)])
        b_loss = bias_loss(model, tokenizer, a, b, [p[4] for p in pairs], diff)
    total_loss = loss + BIAS_WEIGHT * b_loss
    opt.zero_grad(set_to_none=True)
    total_loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {"loss": loss.item(), "bias_loss": b_loss.item(), **stats}


def preference_card(name: str, command: str, seed: int, step: int, preset: dict, model: nn.Module, train_s: float,
                    ema: dict[str, float], metrics: dict, history: list[dict]) -> dict[str, Any]:
    """The model card written next to the checkpoint."""
    bias = preset["bias"]
    return {
        "name": name,
        "command": command,
        "seed": seed,
        "steps": step,
        "batch": BATCH,
        "hard_negatives_per_image": N_NEGATIVES,
        "negative_mix": preset["negatives"],
        "bias": {k: {"beta": v, "unit": BIAS_UNITS[k]} for k, v in bias.items()},
        "bias_pairs_per_step": BIAS_PAIRS if bias else 0,
        "model": {**preset["model"], "parameters": num_parameters(model)},
        "lr": preset["lr"],
        "train_seconds": round(train_s, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": round(ema["loss"], 4),
        "final_bias_loss": round(ema["bias_loss"], 4),
        "final_train_hardneg_acc": round(ema["hardneg_acc"], 4),
        "logit_scale_exp": round(model.scale().item(), 3),
        "eval": metrics,
        "history": history,
    }


def train(name: str, minutes: float, seed: int | None, steps: int | None, out_dir: Path, command: str) -> dict[str, Any]:
    """Train preset ``name`` for ``steps`` steps, or for ``minutes`` (the step count, and so the lr schedule,
    fixed from the speed measured over steps 5-25); evaluate, write ``<name>.pt`` and ``<name>.json``."""
    from tmpo.checkpoint import save_atomic, write_json_atomic

    preset = PRESETS[name]
    seed = preset["seed"] if seed is None else seed
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    gen = torch.Generator().manual_seed(seed)
    tokenizer = caption_tokenizer()
    model = build_model(name, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=preset["lr"], weight_decay=1e-4)
    exclude = heldout_prompts()
    start = time.time()
    total = steps if steps is not None else 10**9
    probe = (5, 25)  # steps timed to fix the schedule (the first few are slower)
    ema, history, t_probe = None, [], start
    step = 0
    while step < total:
        if steps is None and step == probe[0]:
            t_probe = time.time()
        if steps is None and step == probe[1]:  # fix the step count (and lr schedule) from the measured speed
            per_step = (time.time() - t_probe) / (probe[1] - probe[0])
            left = minutes * 60 * 0.95 - (time.time() - start)
            total = max(probe[1] + 1, probe[1] + int(left / per_step))
            print(f"[{name}] {per_step:.3f} s/step -> {total} steps for {minutes} min", flush=True)
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, total, preset["lr"])
        vals = train_step(model, tokenizer, opt, preset, exclude, rng, gen)
        ema = vals if ema is None else {k: 0.95 * ema[k] + 0.05 * v for k, v in vals.items()}
        step += 1
        if step % 50 == 0 or step == total:
            line = {"step": step, "elapsed_s": round(time.time() - start, 1), "scale": round(model.scale().item(), 2),
                    **{k: round(v, 4) for k, v in ema.items()}}  # fmt: skip
            history.append(line)
            print(json.dumps(line), flush=True)
        if steps is None and time.time() - start > minutes * 60:
            print(f"[{name}] time budget reached at step {step}", flush=True)
            break
    train_s = time.time() - start
    card = preference_card(name, command, seed, step, preset, model, train_s, ema, evaluate(model, tokenizer), history)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_atomic(checkpoint_state(model, tokenizer, card), out_dir / f"{name}.pt")
    os.chmod(path, 0o644)  # mkstemp creates 0600; the asset is meant to be shared
    card["checkpoint_bytes"] = path.stat().st_size
    write_json_atomic(card, out_dir / f"{name}.json")
    return card


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, choices=REWARD_NAMES)
    parser.add_argument("--minutes", type=float, default=7.0, help="wall-clock training budget (default 7)")
    parser.add_argument("--seed", type=int, default=None, help="default: the preset's seed")
    parser.add_argument("--steps", type=int, default=None, help="fixed step count instead of the time budget")
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help=f"output folder (default {ASSET_DIR})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python -m tmpo.rewards.train_preference " + " ".join(sys.argv[1:] if argv is None else argv)
    card = train(args.name, args.minutes, args.seed, args.steps, args.out, command)
    print(json.dumps({k: v for k, v in card.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
