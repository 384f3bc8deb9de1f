"""Mini preference rewards: tokenizer, PickScore-style scoring, joint z-score reward, checkpoints, features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tmpo.rewards.joint import JointPreferenceReward, group_zscore
from tmpo.rewards.preference import (
    CaptionTokenizer,
    MiniCLIP,
    MiniCLIPConfig,
    PreferenceReward,
    caption_tokenizer,
    checkpoint_state,
    default_checkpoint,
    load_miniclip,
)

torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> tuple[MiniCLIP, CaptionTokenizer]:
    torch.manual_seed(seed)
    tok = caption_tokenizer()
    cfg = MiniCLIPConfig(vocab_size=len(tok), width=4, embed_dim=16, text_width=16, text_layers=1, text_heads=2)
    return MiniCLIP(cfg).eval(), tok


PROMPTS = [
    "a photo of a red circle",
    "a photo of a triangle left of a square",
    "two blue diamonds on a light gray background",
    'a sign that reads "K7Q"',
    "a photo of three crosses",
]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_round_trip():
    from tmpo.world.captions import preference

    tok = caption_tokenizer()
    three = preference([("circle", "red", 1), ("square", "blue", 2), ("cross", "green", 1)], "pale blue")["prompt"]
    assert "," in three
    for text in PROMPTS + [three]:
        ids = tok.encode(text)
        assert all(0 < i < len(tok) for i in ids)
        assert tok.decode(ids) == text
    assert tok.tokenize('a sign that reads "K7Q"')[-5:] == ["<q>", "<c:K>", "<c:7>", "<c:Q>", "</q>"]
    assert tok.encode("A Photo Of A RED circle") == tok.encode("a photo of a red circle")  # words are lower-cased
    ids, mask = tok(PROMPTS)
    assert ids.shape == mask.shape and ids.shape[0] == len(PROMPTS)
    assert mask.sum(1).tolist() == [len(tok.encode(p)) for p in PROMPTS]


def test_tokenizer_rejects_unknown():
    tok = caption_tokenizer()
    with pytest.raises(ValueError, match="orange"):
        tok.encode("a photo of an orange circle")
    with pytest.raises(ValueError, match="!"):
        tok.encode('a sign that reads "K!Q"')
    with pytest.raises(ValueError, match="quote"):
        tok.encode('a sign that reads "K7Q')
    with pytest.raises(ValueError, match="at most"):
        caption_tokenizer(max_len=4).encode("a photo of a red circle")


def test_one_tokenizer_two_layouts():
    """The denoiser and the preference models split captions identically; only their row order differs."""
    from tmpo.policies.mini_text import text_tokenizer

    dit, clip = text_tokenizer(), caption_tokenizer()
    for text in PROMPTS:
        assert dit.tokenize(text) == clip.tokenize(text)
        assert [dit.vocab[i] for i in dit.encode(text)][1:] == [
            "<q>" if t == "</q>" else t for t in (clip.vocab[i] for i in clip.encode(text))
        ]
    assert dit.encode("") == [dit.index["<bos>"]] and clip.encode("") == []
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CaptionTokenizer(["<pad>", "a"], 8, aliases={"</q>": "<q>"})
    with pytest.raises(ValueError, match="start with"):
        CaptionTokenizer(["a", "<pad>"], 8)


def test_hard_negatives_contradict_and_tokenize():
    from tmpo.rewards.train_preference import applicable_kinds, hard_negative, heldout_prompts, sample_caption

    tok, rng = caption_tokenizer(), np.random.default_rng(0)
    held_out = heldout_prompts()
    for _ in range(150):
        record = sample_caption(rng, held_out)
        assert record["prompt"] not in held_out
        for kind in applicable_kinds(record):
            negative = hard_negative(record, kind, rng)
            assert negative != record["prompt"]
            tok.encode(negative)


# ---------------------------------------------------------------------------------------------
# PreferenceReward
# ---------------------------------------------------------------------------------------------


def test_reward_is_scale_times_cosine():
    model, tok = tiny_model()
    reward = PreferenceReward(model=model, tokenizer=tok, name="tiny")
    images = torch.rand(len(PROMPTS), 3, 32, 32)
    scores, info = reward(images, PROMPTS, [{}] * len(PROMPTS))
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    # by hand: cosine of the raw tower outputs, times exp(logit_scale)
    with torch.no_grad():
        f = model.image_features(images).double()
        ids, mask = tok(PROMPTS)
        t = model.encode_text(ids, mask).double()
    cos = (f * t).sum(1) / (f.norm(dim=1) * t.norm(dim=1))
    scale = math.exp(model.config.init_logit_scale)
    assert info["scale"] == pytest.approx(scale, rel=1e-6)
    torch.testing.assert_close(scores.double(), scale * cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info["cos"].double(), cos, rtol=1e-5, atol=1e-5)
    fixed, info100 = PreferenceReward(model=model, tokenizer=tok, scale=100.0)(images, PROMPTS, None)
    torch.testing.assert_close(fixed.double(), 100 * cos, rtol=1e-5, atol=1e-4)
    assert info100["scale"] == 100.0
    # other resolutions are resized to the model's 32x32
    assert reward(torch.rand(2, 3, 64, 64), PROMPTS[:2], None)[0].shape == (2,)


def test_reward_input_errors_and_aux():
    model, tok = tiny_model()
    reward = PreferenceReward(model=model, tokenizer=tok, aux={"other": PreferenceReward(model=tiny_model(1)[0])})
    with pytest.raises(ValueError, match="3 images, 2 prompts"):
        reward(torch.rand(3, 3, 32, 32), PROMPTS[:2], [{}] * 3)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        reward(torch.rand(3, 32, 32), PROMPTS[:3], None)
    with pytest.raises(ValueError, match="orange"):
        reward(torch.rand(1, 3, 32, 32), ["an orange circle"], None)
    scores, info = reward(torch.rand(3, 3, 32, 32), PROMPTS[:3], None)
    assert info["aux"]["other"].shape == (3,) and not torch.equal(info["aux"]["other"], scores)


# ---------------------------------------------------------------------------------------------
# Joint reward
# ---------------------------------------------------------------------------------------------


def _fake(values):
    def reward(images, prompts, metadata):
        return torch.tensor(values, dtype=torch.float32), {}

    return reward


def test_joint_reward_zscores_within_groups():
    a = [1.0, 2.0, 3.0, 10.0, 10.0, 40.0]
    b = [3.0, 1.0, 2.0, 5.0, 5.0, 5.0]
    joint = JointPreferenceReward({"a": _fake(a), "b": _fake(b)}, group_size=3)
    total, info = joint(torch.zeros(6, 3, 8, 8), ["p"] * 6, [{}] * 6)
    # group 1: a -> mean 2, population std sqrt(2/3): z = (-sqrt 1.5, 0, sqrt 1.5); b -> (sqrt 1.5, -sqrt 1.5, 0)
    # group 2: a -> mean 20, std sqrt(200): z = (-1/sqrt 2, -1/sqrt 2, sqrt 2); b constant -> 0
    r = math.sqrt(1.5)
    expected = torch.tensor([-r + r, 0 - r, r + 0, -(0.5**0.5), -(0.5**0.5), 2**0.5])
    torch.testing.assert_close(total, expected.float(), rtol=1e-6, atol=1e-6)
    assert total.dtype == torch.float32 and total.shape == (6,)
    torch.testing.assert_close(info["aux"]["a"], torch.tensor(a))
    torch.testing.assert_close(info["raw"]["b"], torch.tensor(b))
    torch.testing.assert_close(info["z"]["a"][:3], torch.tensor([-r, 0.0, r]))
    # one group over the whole batch when group_size is None
    whole, _ = JointPreferenceReward({"a": _fake(a)})(torch.zeros(6, 3, 8, 8), ["p"] * 6, None)
    x = torch.tensor(a, dtype=torch.float64)
    torch.testing.assert_close(whole.double(), (x - x.mean()) / (x.std(unbiased=False) + 1e-8), rtol=1e-6, atol=1e-6)


def test_joint_reward_needs_whole_groups():
    joint = JointPreferenceReward({"a": _fake([1.0] * 5)}, group_size=3)
    with pytest.raises(ValueError, match="multiple of group_size"):
        joint(torch.zeros(5, 3, 8, 8), ["p"] * 5, None)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_zscore(torch.ones(4), 3)
    with pytest.raises(ValueError, match="positive integer"):
        JointPreferenceReward({"a": _fake([1.0])}, group_size=0)
    with pytest.raises(ValueError, match="returned 2 scores"):
        JointPreferenceReward({"a": _fake([1.0, 2.0])}, group_size=3)(torch.zeros(3, 3, 8, 8), ["p"] * 3, None)


# ---------------------------------------------------------------------------------------------
# Checkpoints and features
# ---------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    from tmpo.checkpoint import save_atomic
    from tmpo.metrics.mini_features import MiniImageFeatures

    model, tok = tiny_model(3)
    path = save_atomic(checkpoint_state(model, tok, {"steps": 7}), tmp_path / "tiny.pt")
    loaded, tok2, card = load_miniclip(path)
    assert card == {"steps": 7} and tok2.vocab == tok.vocab
    images = torch.rand(4, 3, 32, 32)
    want, _ = PreferenceReward(model=model, tokenizer=tok)(images, PROMPTS[:4], None)
    got, _ = PreferenceReward(checkpoint=path, name="tiny")(images, PROMPTS[:4], None)
    torch.testing.assert_close(got, want)
    emb = MiniImageFeatures(checkpoint=path, layer="embedding")
    feats = emb(images)
    assert feats.shape == (4, model.config.embed_dim) == (4, emb.dim) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, model.image_features(images).detach())
    spatial = MiniImageFeatures(model=model)  # default: the flattened last conv map
    grid = spatial(images)
    assert grid.shape == (4, spatial.dim) == (4, 4 * model.config.width * 16)
    torch.testing.assert_close(grid, model.image_tower[:-2]((images - 0.5) / 0.25).detach())
    unit = MiniImageFeatures(model=model, normalize=True)(images)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="unknown layer"):
        MiniImageFeatures(model=model, layer="cls")


def test_checkpoint_errors(tmp_path):
    from tmpo.checkpoint import save_atomic
    from tmpo.metrics.mini_features import MiniImageFeatures

    with pytest.raises(FileNotFoundError, match="train_preference --name hpsv21"):
        PreferenceReward(checkpoint=tmp_path / "missing.pt", name="hpsv21")
    with pytest.raises(FileNotFoundError, match="train_preference"):
        MiniImageFeatures(checkpoint=tmp_path / "missing.pt")
    foreign = save_atomic({"step": 0, "policy": {}}, tmp_path / "policy.pt")
    with pytest.raises(ValueError, match="not a MiniCLIP checkpoint"):
        PreferenceReward(checkpoint=foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_miniclip(garbage)


# ---------------------------------------------------------------------------------------------
# The committed checkpoint
# ---------------------------------------------------------------------------------------------


def test_trained_pickscore_prefers_correct_colour():
    path = default_checkpoint("pickscore")
    if not path.is_file():
        pytest.skip(f"{path} missing; train it with `python -m tmpo.rewards.train_preference --name pickscore`")
    from tmpo.rewards.train_preference import color_swap_caption, render_tensor
    from tmpo.world import load_prompts, sample_scene_for_prompt

    reward = PreferenceReward(name="pickscore")
    rng = np.random.default_rng(2024)
    records = load_prompts("preference", "test")[:50]
    images = render_tensor([sample_scene_for_prompt(r, rng) for r in records])
    right, _ = reward(images, [r["prompt"] for r in records], records)
    wrong, _ = reward(images, [color_swap_caption(r, rng) for r in records], records)
    accuracy = float((right > wrong).float().mean())
    assert accuracy >= 0.8, f"pickscore ranks the true caption above a colour-swapped one for only {accuracy:.0%}"
