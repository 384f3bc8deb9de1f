"""The paper's reward and metric models with their real loading/scoring code, on tiny random-weight models of
the same classes (transformers CLIP, open_clip CLIP, BLIP, DINOv2), the real OCR engine, prompt files and
the real reward configs end to end on tiny FLUX."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch


from tmpo.metrics.diversity import cosine_diversity
from tmpo.metrics.dinov2 import DINOv2Features
from tmpo.real_prompts import FilePrompts, read_prompt_file
from tmpo.rewards.real_imagereward import ImageRewardModel, ImageRewardReward, TINY, convert_imagereward_state_dict
from tmpo.rewards.real_preference import HPSv21Reward, PickScoreReward

PROMPTS = ["a photo of a red circle", "two blue squares", "a photo of a cat", "a green triangle above a square"]


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def scorers():
    return {"pickscore": PickScoreReward(tiny={}, batch_size=3), "hpsv21": HPSv21Reward(tiny={}, batch_size=3),
            "imagereward": ImageRewardReward(tiny={}, batch_size=3)}


@pytest.mark.parametrize("name", ["pickscore", "hpsv21", "imagereward"])
def test_scores_are_finite_deterministic_and_batch_size_invariant(scorers, name):
    scorer = scorers[name]
    images = _images()
    scores, info = scorer(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and bool(torch.isfinite(scores).all())
    assert info["name"] == name
    assert torch.equal(scorer(images, PROMPTS)[0], scores)
    one_by_one = torch.cat([scorer(images[i : i + 1], PROMPTS[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(one_by_one, scores, rtol=1e-5, atol=1e-5)
    swapped = scorer(images, PROMPTS[::-1])[0]
    assert not torch.equal(swapped, scores)  # the caption matters


def test_pickscore_is_logit_scale_times_cosine_and_hps_is_a_cosine(scorers):
    pick, hps = scorers["pickscore"], scorers["hpsv21"]
    raw = pick(_images(), PROMPTS)[0]
    scale = float(pick.model.logit_scale.exp())
    assert scale == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP's initial temperature in a random model
    assert bool((raw.abs() <= scale + 1e-4).all())
    divided = PickScoreReward(tiny={}, scale_divisor=26.0)(_images(), PROMPTS)[0]
    torch.testing.assert_close(divided * 26.0, raw)  # Flow-GRPO's /26 normalisation
    assert bool((hps(_images(), PROMPTS)[0].abs() <= 1.0).all())
    assert hps.tokenizer.context_length == 77  # open_clip's real BPE tokenizer (shipped with the package)


def test_uint8_quantisation_as_upstream(scorers):
    images = _images()
    quantised = (images * 255).round() / 255
    torch.testing.assert_close(scorers["hpsv21"](images, PROMPTS)[0], scorers["hpsv21"](quantised, PROMPTS)[0])


def test_imagereward_checkpoint_names_map_onto_the_transformers_model():
    """Every key of an ImageReward.pt-shaped state dict (BLIP ViT + med BERT + MLP names) lands on exactly one
    parameter of our model; loading is strict, so a gap or a leftover would raise."""
    model = ImageRewardModel(TINY["vision"], {**TINY["text"], "vocab_size": 90})
    target = model.state_dict()
    vision = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    for i in range(TINY["vision"]["num_hidden_layers"]):
        vision += [f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")]
    text = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias", "embeddings.position_ids"]
    for i in range(TINY["text"]["num_hidden_layers"]):
        for block in ("attention", "crossattention"):
            text += [f"encoder.layer.{i}.{block}.{m}.{p}" for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
                     for p in ("weight", "bias")]
        text += [f"encoder.layer.{i}.{m}.{p}" for m in ("intermediate.dense", "output.dense", "output.LayerNorm") for p in ("weight", "bias")]
    head = [f"mlp.layers.{k}.{p}" for k in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    names = [f"blip.visual_encoder.{n}" for n in vision] + [f"blip.text_encoder.{n}" for n in text] + head
    converted_names = convert_imagereward_state_dict({n: torch.zeros(1) for n in names})
    assert set(converted_names) == set(target)
    original = {}  # ImageReward.pt-shaped: each original name with its target's shape (position_ids is dropped)
    for n in names:
        converted = convert_imagereward_state_dict({n: torch.zeros(1)})
        original[n] = torch.randn(target[next(iter(converted))].shape) if converted else torch.arange(40)[None]
    model.load_state_dict(convert_imagereward_state_dict(original))  # strict
    with pytest.raises(ValueError, match="unexpected key 'blip.text_decoder"):
        convert_imagereward_state_dict({"blip.text_decoder.cls.weight": torch.zeros(1)})


def test_dinov2_features_shape_determinism_and_batch_invariance():
    feats = DINOv2Features(tiny={}, batch_size=2)
    images = _images(5)
    f = feats(images)
    assert f.shape == (5, feats.dim) == (5, 32) and f.dtype == torch.float32
    torch.testing.assert_close(feats(images[2:4]), f[2:4], rtol=1e-5, atol=1e-5)
    same = feats(images[:1].expand(3, -1, -1, -1))
    assert float(cosine_diversity(same)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_diversity(f)) > 0


def _render(text: str) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(img).text((16, 24), text, fill="black", font=ImageFont.load_default(size=40))
    return np.asarray(img).astype(np.float32) / 255


def test_rapidocr_reads_rendered_text_and_drives_the_ocr_reward():
    from tmpo.rewards.ocr import OCRReward
    from tmpo.rewards.real_ocr import RapidOCRReader

    reader = RapidOCRReader()
    images = torch.from_numpy(np.stack([_render("K7Q"), np.ones((96, 256, 3), np.float32)])).permute(0, 3, 1, 2)
    scores, info = OCRReward(reader)(images, ['a sign that reads "K7Q"'] * 2)
    assert info["recognized"] == ["K7Q", ""] and scores.tolist() == [1.0, 0.0]


def test_prompt_files_read_txt_and_jsonl_with_clear_errors(tmp_path):
    (tmp_path / "a.txt").write_text("a cat\n\n two dogs \n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "a cat", "tag": "single_object"}) + "\n")
    assert read_prompt_file(tmp_path / "a.txt") == [("a cat", {"prompt": "a cat"}), ("two dogs", {"prompt": "two dogs"})]
    src = FilePrompts(test=str(tmp_path / "m.jsonl"), train=str(tmp_path / "a.txt"))
    assert src.test()[0][1]["tag"] == "single_object" and len(src.train(3, np.random.default_rng(0))) == 3
    with pytest.raises(FileNotFoundError, match=r"TMPO_DATA"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 needs a 'prompt'"):
        read_prompt_file(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no training split"):
        FilePrompts(test=str(tmp_path / "a.txt")).train(1, np.random.default_rng(0))


@pytest.mark.parametrize("reward", ["real_pickscore", "real_geneval", "real_ocr", "real_joint"])
@pytest.mark.parametrize("model", ["flux_dev", "sd35_medium"])
def test_real_configs_compose_and_bind_to_their_classes(tmp_path, reward, model):
    from tmpo.config import validate_targets
    from tmpo.run import compose_config

    cfg = compose_config([f"run_dir={tmp_path}", f"model={model}", f"reward={reward}", "method=gardo"])
    validate_targets(cfg)
    assert cfg.model.lora.r == 64 and cfg.model.device == "cuda"
    assert cfg.objective.features._target_ == "tmpo.metrics.dinov2.DINOv2Features"
    assert cfg.reward.suites.drawbench.metrics[4].features.device == "cuda"


@pytest.fixture
def prompt_data(tmp_path, monkeypatch):
    for name in ("pickscore/train.txt", "pickscore/test.txt", "drawbench/test.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("\n".join(PROMPTS) + "\n")
    monkeypatch.setenv("TMPO_DATA", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("method", ["tmpo", "gardo"])
def test_real_reward_stack_runs_on_tiny_flux(tmp_path, prompt_data, method):
    """Tiny FLUX + tiny PickScore (HPS, ImageReward as aux) + DrawBench suite with DINOv2 Cos. Div. and LGMD on
    VAE latents; GARDO's diversity weights from the tiny DINOv2."""
    from tmpo.run import compose_config, train

    cfg = compose_config([
        f"run_dir={tmp_path / 'run'}", "logger=none", "trainer.progress=false", "model=flux_tiny", f"method={method}",
        "reward=real_pickscore_tiny", "trainer.eval_base=false", "eval.max_prompts=1", "reward.suites.drawbench.max_prompts=1",
    ])
    if method == "gardo":
        assert cfg.objective.features.tiny == {}
    summary = train(cfg)
    for key in ("reward", "pickscore", "hpsv21", "imagereward", "lgmd", "cosdiv"):
        assert math.isfinite(summary[key]), key
