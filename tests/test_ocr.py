"""OCR reward: edit distance, prompt parsing, and the mini text reader on rendered signs."""

import torch

torch.set_num_threads(1)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tmpo.rewards.mini_ocr import MiniTextReader  # noqa: E402
from tmpo.rewards.ocr import OCRReward, levenshtein, normalized_edit_distance, parse_ocr_prompt  # noqa: E402
from tmpo.world import captions  # noqa: E402
from tmpo.world.font import ALPHABET  # noqa: E402
from tmpo.world.render import Scene, Sign, render  # noqa: E402


def _sign_image(text, size=32, center=(0.5, 0.5), board="white", ink="black", background="light gray"):
    return render(Scene((), background, Sign(text, center, board, ink)), size)


def _batch(images):
    return torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in images])


def test_levenshtein_and_ned_hand_values():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert normalized_edit_distance("K7Q", "K1Q") == pytest.approx(1 / 3)
    assert normalized_edit_distance("K7Q", "7Q") == pytest.approx(1 / 3)  # one deletion
    assert normalized_edit_distance("AB", "BA") == 1.0  # two substitutions / 2
    assert normalized_edit_distance("K7Q", "K7Q") == 0.0
    assert normalized_edit_distance("", "") == 0.0
    assert normalized_edit_distance("ABC", "") == 1.0 and normalized_edit_distance("", "A") == 1.0


def test_parse_ocr_prompt():
    assert parse_ocr_prompt('a sign that reads "K7Q"') == "K7Q"
    assert parse_ocr_prompt("a sign that reads \u201cAB1\u201d") == "AB1"
    with pytest.raises(ValueError, match="no quoted text"):
        parse_ocr_prompt("a sign that reads K7Q")
    with pytest.raises(ValueError, match="empty"):
        parse_ocr_prompt('a sign that reads ""')


def test_reader_knows_every_glyph():
    reader = MiniTextReader()
    for i in range(0, len(ALPHABET), 3):
        text = ALPHABET[i : i + 3]
        assert reader.read(_sign_image(text)) == text
    assert reader.read(_sign_image("W", ink="charcoal", board="pale yellow")) == "W"
    assert reader.read(render(Scene((), "cream"), 32)) == ""


@pytest.mark.parametrize("size, n", [(32, 150), (64, 40)])
def test_reader_reads_ground_truth_scenes(size, n):
    """>= 98% of random sign scenes (any position, board, ink, background, distractors) read exactly."""
    rng = np.random.default_rng(size)
    reader = MiniTextReader()
    hits = 0
    for _ in range(n):
        md = captions.ocr(captions.random_text(rng))
        hits += reader.read(render(captions.sample_scene_for_prompt(md, rng, size), size)) == md["text"]
    assert hits / n >= 0.98


def test_ocr_reward_values():
    reward = OCRReward(MiniTextReader())
    images = _batch([_sign_image("K7Q"), _sign_image("K7Q"), _sign_image("K7Q"), render(Scene((), "white"), 32)])
    prompts = [f'a sign that reads "{t}"' for t in ("K7Q", "K1Q", "K7QZ", "AB")]
    values, info = reward(images, prompts, [None] * 4)
    # Exact; one substitution of 3; one insertion of 4; nothing read (NED 1).
    assert values.dtype == torch.float32
    assert values.tolist() == pytest.approx([1.0, 1 - 1 / 3, 1 - 1 / 4, 0.0])
    assert info["recognized"] == ["K7Q", "K7Q", "K7Q", ""] and info["target"][1] == "K1Q"


def test_ocr_reward_rejects_mismatched_metadata():
    reward = OCRReward(MiniTextReader())
    with pytest.raises(ValueError, match="does not match"):
        reward(_batch([_sign_image("K7Q")]), ['a sign that reads "K7Q"'], [captions.ocr("ABC")])
    with pytest.raises(ValueError, match="1 images, 2 prompts"):
        reward(_batch([_sign_image("K7Q")]), ["a", "b"], [None, None])
