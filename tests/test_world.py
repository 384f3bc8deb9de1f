"""The mini world: font, rasteriser, caption templates, scene sampling and the prompt files."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from tmpo.rewards import geneval
from tmpo.rewards.geneval import relative_position, validate_metadata
from tmpo.world import captions, load_prompts
from tmpo.world.font import ALPHABET, GLYPHS, text_bitmap
from tmpo.world.make_prompts import build_all, main as make_prompts_main
from tmpo.world.render import (
    BACKGROUNDS,
    COLORS,
    INKS,
    SIGN_BOARDS,
    Scene,
    SceneObject,
    Sign,
    render,
    sign_pixel_box,
)

# ---------------------------------------------------------------- font


def test_glyphs_are_distinct_by_two_pixels_and_span_their_cell():
    assert set(ALPHABET) == set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    for a, b in itertools.combinations(ALPHABET, 2):
        assert (GLYPHS[a] != GLYPHS[b]).sum() >= 2, (a, b)
    for ch, g in GLYPHS.items():
        assert g.shape == (5, 3) and g[0].any() and g[-1].any() and g[:, 0].any() and g[:, -1].any(), ch


def test_text_bitmap_layout():
    bitmap = text_bitmap("L1", scale=2)
    assert bitmap.shape == (10, 14)  # 5 rows x (3 + 1 + 3) columns, doubled
    assert not bitmap[:, 6:8].any()  # the one-font-pixel gap
    # "L" = #.. x4, ### : its left column is all ink, its bottom row is full.
    assert bitmap[:, :2].all() and bitmap[8:, :6].all() and not bitmap[:8, 2:6].any()
    with pytest.raises(ValueError, match="not in the font"):
        text_bitmap("k7")


# ---------------------------------------------------------------- rasteriser


def test_render_square_edges_are_antialiased():
    # Square with half-extent 4 px centred on (16.5, 16) px: its right edge is at x = 20.5, the
    # centre of pixel column 20, so that column is half covered and column 21 is background.
    obj = SceneObject("square", "blue", (16.5 / 32, 16 / 32), 4 / 32)
    image = render(Scene((obj,), "white"), 32)
    blue, white = np.array(COLORS["blue"]), np.array(BACKGROUNDS["white"])
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    assert np.allclose(image[16, 16], blue, atol=1e-6)
    assert np.allclose(image[16, 20], 0.5 * blue + 0.5 * white, atol=1e-6)
    assert np.allclose(image[16, 21], white, atol=1e-6)
    assert np.allclose(image[0, 0], white, atol=1e-6)


@pytest.mark.parametrize(
    "shape, area",
    [("circle", np.pi * 64), ("square", 256.0), ("triangle", 128.0), ("diamond", 128.0), ("cross", 163.84)],
)
def test_render_coverage_matches_area(shape, area):
    # Half-extent 8 px: circle pi r^2, square (2r)^2, triangle and diamond 2 r^2, cross with arm
    # half-width 0.4 r: two 16 x 6.4 bars minus their 6.4 x 6.4 overlap = 163.84.
    obj = SceneObject(shape, "red", (0.5, 0.5), 8 / 32)
    image = render(Scene((obj,), "white"), 32)
    red, white = np.array(COLORS["red"]), np.array(BACKGROUNDS["white"])
    coverage = ((image - white) / (red - white))[..., 1]  # green channel: largest red-white contrast
    assert coverage.sum() == pytest.approx(area, rel=0.01)


def test_sign_text_is_drawn_crisply():
    sign = Sign("K7Q", (0.5, 0.5), "white", "black")
    assert sign_pixel_box(sign, 32) == (3, 9, 29, 23)  # 26 x 14 px board, centred
    image = render(Scene((), "cream", sign), 32)
    ink = image[11:21, 5:27].max(-1) < 0.1  # text starts one font pixel (2 px) inside the board
    assert np.array_equal(ink, text_bitmap("K7Q", 2))
    assert np.allclose(image[9, 3], SIGN_BOARDS["white"]) and np.allclose(image[0, 0], BACKGROUNDS["cream"])
    with pytest.raises(ValueError, match="does not fit"):
        sign_pixel_box(Sign("ABCDEFG", (0.5, 0.5)), 32)


def test_scene_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown shape"):
        SceneObject("star", "red", (0.5, 0.5), 0.2)
    with pytest.raises(ValueError, match="unknown colour"):
        SceneObject("circle", "teal", (0.5, 0.5), 0.2)
    with pytest.raises(ValueError, match="unknown background"):
        Scene((), "black")


# ---------------------------------------------------------------- captions


def test_caption_templates_match_geneval_wording():
    assert captions.single_object("circle")["prompt"] == "a photo of a circle"
    assert captions.two_object("circle", "square")["prompt"] == "a photo of a circle and a square"
    assert captions.counting("cross", 3)["prompt"] == "a photo of three crosses"
    assert captions.colors("diamond", "red")["prompt"] == "a photo of a red diamond"
    assert captions.position("circle", "left of", "square")["prompt"] == "a photo of a circle left of a square"
    color_attr = captions.color_attr("circle", "red", "square", "blue")
    assert color_attr["prompt"] == "a photo of a red circle and a blue square"
    assert captions.ocr("K7Q")["prompt"] == 'a sign that reads "K7Q"'
    assert captions.with_article("orange circle") == "an orange circle"
    pref = captions.preference([("circle", "red", 1), ("square", "blue", 2)], "cream")
    assert pref["prompt"] == "a red circle and two blue squares on a cream background"


def test_vocabulary_agrees_with_the_geneval_rules():
    assert captions.GENEVAL_TAGS == geneval.TAGS and captions.RELATIONS == geneval.RELATIONS
    assert set(COLORS) <= set(geneval.COLORS)  # colour labels must be GenEval colour names


def test_metadata_layout_matches_geneval():
    assert captions.counting("square", 2)["include"] == [{"class": "square", "count": 2}]
    assert captions.counting("square", 2)["exclude"] == [{"class": "square", "count": 3}]
    # Position: the reference is clause 0, the subject clause 1 points at it.
    assert captions.position("circle", "below", "square")["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["below", 0]},
    ]
    for tag in captions.GENEVAL_TAGS:
        records = captions.enumerate_geneval(tag)
        assert len({r["prompt"] for r in records}) == len(records)
        for record in records:
            validate_metadata(record)
    # 5 shapes, 5 colours: 5, 20 ordered pairs, 5 x 2 counts, 25, 20 x 4 relations, 20 x 20 colour pairs.
    sizes = [len(captions.enumerate_geneval(t)) for t in captions.GENEVAL_TAGS]
    assert sizes == [5, 20, 10, 25, 80, 400]


# ---------------------------------------------------------------- scenes for prompts


def _check_scene_fits(scene, metadata, size=32):
    boxes = [np.array(o.box()) * size for o in scene.objects]
    for b in boxes:
        assert b.min() >= 1.0 - 1e-9 and b.max() <= size - 1.0 + 1e-9  # inside with a 1-px margin
    for a, b in itertools.combinations(boxes, 2):
        assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= 2.0 - 1e-9  # 2-px gap
    if metadata["tag"] == "ocr":
        assert scene.sign is not None and scene.sign.text == metadata["text"]
        return
    wanted = Counter()
    if metadata["tag"] == "preference":
        for g in metadata["objects"]:
            wanted[g["class"], g["color"]] += g["count"]
        assert scene.background == metadata["background"]
        assert Counter((o.shape, o.color) for o in scene.objects) == wanted
        return
    shapes = Counter(o.shape for o in scene.objects)
    assert shapes == Counter({c["class"]: c["count"] for c in metadata["include"]})
    for clause in metadata["include"]:
        members = [o for o in scene.objects if o.shape == clause["class"]]
        if "color" in clause:
            assert all(o.color == clause["color"] for o in members)
        if "position" in clause:
            relation, ref = clause["position"]
            ref_cls = metadata["include"][ref]["class"]
            for o in members:
                for r in (x for x in scene.objects if x.shape == ref_cls):
                    assert relation in relative_position(np.array(o.box()) * size, np.array(r.box()) * size)


@pytest.mark.parametrize("tag", captions.ALL_TAGS)
def test_sampled_scenes_satisfy_their_prompt(tag):
    rng = np.random.default_rng(7)
    for _ in range(40):
        metadata = captions.sample_random_prompt(rng, tags=(tag,))
        assert metadata["tag"] == tag
        _check_scene_fits(captions.sample_scene_for_prompt(metadata, rng), metadata)


def test_scene_sampling_is_seeded_and_diverse():
    md = captions.position("circle", "above", "triangle")
    a = [captions.sample_scene_for_prompt(md, np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(5)
    scenes = [captions.sample_scene_for_prompt(md, rng) for _ in range(20)]
    assert len({s.objects for s in scenes}) == 20
    assert len({o.color for s in scenes for o in s.objects}) == len(COLORS)  # free colours vary


def test_sign_scenes_keep_board_and_background_apart():
    rng = np.random.default_rng(0)
    for _ in range(30):
        scene = captions.sample_scene_for_prompt(captions.ocr("AB3"), rng)
        assert scene.sign.board != scene.background and scene.sign.ink in INKS
        x1, y1, x2, y2 = sign_pixel_box(scene.sign, 32)
        for o in scene.objects:  # distractor shapes stay 2 px clear of the board
            b = np.array(o.box()) * 32
            assert max(x1 - b[2], b[0] - x2, y1 - b[3], b[1] - y2) >= 2.0 - 1e-9


def test_random_scene_covers_every_tag():
    rng = np.random.default_rng(0)
    tags = Counter(captions.sample_random_scene(rng)[1]["tag"] for _ in range(400))
    assert set(tags) == set(captions.ALL_TAGS)


def test_unknown_tag_is_rejected():
    with pytest.raises(ValueError, match="not one of"):
        captions.sample_scene_for_prompt({"tag": "clevr", "prompt": "x"}, np.random.default_rng(0))


# ---------------------------------------------------------------- prompt files


def test_committed_prompt_files_are_up_to_date():
    assert make_prompts_main(["--check"]) == 0


@pytest.mark.parametrize("protocol, n_train, n_test", [("geneval", 208, 52), ("ocr", 200, 50), ("preference", 200, 50)])
def test_prompt_splits_are_disjoint(protocol, n_train, n_test):
    train, test = load_prompts(protocol, "train"), load_prompts(protocol, "test")
    assert (len(train), len(test)) == (n_train, n_test)
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == n_train and not train_prompts & {r["prompt"] for r in test}
    if protocol == "geneval":
        for split in (train, test):
            assert {r["tag"] for r in split} == set(captions.GENEVAL_TAGS)
            for r in split:
                validate_metadata(r)


def test_prompt_generation_depends_only_on_seed():
    assert build_all(3) == build_all(3)
    assert build_all(3)["ocr", "train"] != build_all(4)["ocr", "train"]


def test_load_prompts_errors_name_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_prompts"):
        load_prompts("ocr", "train", root=tmp_path)
    bad = tmp_path / "ocr_train.jsonl"
    bad.write_text(json.dumps(captions.ocr("ABC")) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"ocr_train.jsonl:2: not valid JSON.*make_prompts"):
        load_prompts("ocr", "train", root=tmp_path)
    bad.write_text(json.dumps({"tag": "ocr", "prompt": "a sign"}) + "\n")
    with pytest.raises(ValueError, match=r":1: an OCR record needs"):
        load_prompts("ocr", "train", root=tmp_path)
    with pytest.raises(ValueError, match="unknown prompt protocol"):
        load_prompts("pickscore", "train")
