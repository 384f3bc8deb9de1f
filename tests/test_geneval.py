"""GenEval rule logic on hand-made detections, and the mini detector on ground-truth renders.

Expected values are derived by hand from shared/specs/geneval-rules.md (section numbers in comments).
"""

import torch

torch.set_num_threads(1)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tmpo.rewards.geneval import (  # noqa: E402
    Detection,
    GenEvalConfig,
    GenEvalReward,
    evaluate_official,
    evaluate_reward,
    filter_detections,
    relative_position,
    summarize,
    validate_metadata,
)
from tmpo.rewards.mini_detector import MiniDetector  # noqa: E402
from tmpo.world import captions  # noqa: E402
from tmpo.world.render import SHAPES, Scene, SceneObject, render  # noqa: E402


def det(cls, x, y, score=0.95, color="red", w=10):
    """A w x w detection with its top-left corner at (x, y)."""
    return Detection(cls, (x, y, x + w, y + w), score, color)


def verdicts(detections, metadata):
    """(official correct, strict_correct, partial score) after the detection stage."""
    objects = filter_detections(detections, metadata["tag"])
    correct, _ = evaluate_official(objects, metadata)
    strict, score, _ = evaluate_reward(objects, metadata)
    return correct, strict, score


# ---------------------------------------------------------------- relative position (§4)


def test_relative_position_axes():
    # o = (-20, 0), shrink by 0.1 * (10 + 10) = 2 -> (-18, 0), / ||o|| = 20 -> dx = -0.9.
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    # y points down: a smaller y is "above".
    assert relative_position((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert relative_position((0, 20, 10, 30), (0, 0, 10, 10)) == {"below"}


def test_relative_position_margin_rule():
    # Horizontal offset d between two 10-wide boxes: "right of" needs (d - 2) / d > 0.5, i.e. d > 4.
    assert relative_position((5, 0, 15, 10), (0, 0, 10, 10)) == {"right of"}  # d=5: 3/5 = 0.6
    assert relative_position((4, 0, 14, 10), (0, 0, 10, 10)) == set()  # d=4: 2/4 = 0.5, not > 0.5
    assert relative_position((2, 0, 12, 10), (0, 0, 10, 10)) == set()  # d=2: shrunk offset is 0
    # Diagonal o = (20, 20): each axis (20 - 2) / 28.28 = 0.64 -> two relations at once.
    assert relative_position((20, 20, 30, 30), (0, 0, 10, 10)) == {"right of", "below"}
    # Diagonal o = (10, 10) with 20-wide boxes: (10 - 4) / 14.14 = 0.42 on both axes -> none.
    assert relative_position((10, 10, 30, 30), (0, 0, 20, 20)) == set()


# ---------------------------------------------------------------- detection stage (§2)


def test_threshold_is_strict_and_counting_uses_0_9():
    dets = [det("circle", 0, 0, 0.95), det("circle", 20, 0, 0.9), det("circle", 0, 20, 0.5), det("circle", 20, 20, 0.3)]
    assert len(filter_detections(dets, "counting")["circle"]) == 1  # 0.9 is not > 0.9
    assert len(filter_detections(dets, "two_object")["circle"]) == 3  # 0.3 is not > 0.3
    assert "circle" not in filter_detections([det("circle", 0, 0, 0.2)], "single_object")


def test_sorted_capped_and_nms_off_by_default():
    dets = [det("circle", i, 0, score=0.4 + 0.01 * i) for i in range(20)]
    kept = filter_detections(dets, "single_object")["circle"]
    assert len(kept) == 16  # MAX_OBJECTS
    assert [d.score for d in kept] == sorted((d.score for d in dets), reverse=True)[:16]
    twins = [det("circle", 0, 0, 0.8), det("circle", 0, 0, 0.7)]
    assert len(filter_detections(twins, "single_object")["circle"]) == 2  # identical boxes, NMS off
    assert len(filter_detections(twins, "single_object", GenEvalConfig(max_overlap=0.5))["circle"]) == 1


# ---------------------------------------------------------------- the six tags (§3, §7)


def test_single_object():
    md = captions.single_object("circle")
    assert verdicts([det("circle", 0, 0)], md) == (True, True, 1.0)
    assert verdicts([det("square", 0, 0)], md) == (False, False, 0.0)
    # Two circles for "a circle": official passes (at least 1), strict fails, score 1 - 1/1 = 0.
    assert verdicts([det("circle", 0, 0), det("circle", 20, 0)], md) == (True, False, 0.0)
    # Three circles: 1 - |1 - 3| / 1 = -1, unclipped upstream.
    assert verdicts([det("circle", 0, 0), det("circle", 20, 0), det("circle", 0, 20)], md) == (True, False, -1.0)


def test_two_object():
    md = captions.two_object("circle", "square")
    assert verdicts([det("circle", 0, 0), det("square", 20, 0)], md) == (True, True, 1.0)
    # Square missing: rewards [1, 0] -> 0.5.
    assert verdicts([det("circle", 0, 0), det("triangle", 20, 0)], md) == (False, False, 0.5)


def test_counting_with_exclude():
    md = captions.counting("square", 3)
    three = [det("square", 0, 0), det("square", 20, 0), det("square", 0, 20)]
    assert verdicts(three, md) == (True, True, 1.0)
    # A fourth confident square: official fails on exclude {square, 4}; strict fails (4 != 3);
    # score 1 - |3 - 4| / 3 = 2/3.
    correct, strict, score = verdicts(three + [det("square", 20, 20)], md)
    assert (correct, strict) == (False, False) and score == pytest.approx(2 / 3)
    # A fourth square at 0.85 is dropped by the counting threshold, so the image passes.
    assert verdicts(three + [det("square", 20, 20, 0.85)], md) == (True, True, 1.0)
    # Only two confident squares: 1 - 1/3.
    correct, strict, score = verdicts(three[:2] + [det("square", 0, 20, 0.85)], md)
    assert (correct, strict) == (False, False) and score == pytest.approx(2 / 3)


def test_exclude_counts_all_kept_and_strict_ignores_it():
    md = {"tag": "single_object", "prompt": "x", "include": [{"class": "circle", "count": 1}],
          "exclude": [{"class": "square", "count": 1}]}
    # Official: exclude {square, 1} fails on one square. Reward server: exclude ignored (§7).
    assert verdicts([det("circle", 0, 0), det("square", 20, 0)], md) == (False, True, 1.0)


def test_colors():
    md = captions.colors("circle", "blue")
    assert verdicts([det("circle", 0, 0, color="blue")], md) == (True, True, 1.0)
    # Wrong colour: rewards [1, 1 - |1 - 0| / 1] = [1, 0] -> 0.5.
    assert verdicts([det("circle", 0, 0, color="red")], md) == (False, False, 0.5)
    # Official looks only at the top-1: a red top circle fails "blue" even with a blue extra ...
    two = [det("circle", 0, 0, 0.9, color="red"), det("circle", 20, 0, 0.5, color="blue")]
    assert verdicts(two, md) == (False, False, 0.0)  # strict: count 2 != 1 -> [0, 0]
    # ... and the reverse passes officially.
    assert verdicts(two, captions.colors("circle", "red")) == (True, False, 0.0)


def test_colour_uses_top_count_only_in_official():
    md = {"tag": "colors", "prompt": "x", "include": [{"class": "circle", "count": 2, "color": "red"}]}
    dets = [det("circle", 0, 0, 0.9), det("circle", 20, 0, 0.8), det("circle", 0, 20, 0.7, color="blue")]
    # Official: top-2 are red -> pass. Strict: 3 != 2 -> [1 - 1/2, 0.0] -> 0.25.
    assert verdicts(dets, md) == (True, False, 0.25)


def test_position():
    md = captions.position("circle", "left of", "square")
    assert md["include"][1]["position"] == ["left of", 0]
    assert verdicts([det("circle", 0, 0), det("square", 20, 0)], md) == (True, True, 1.0)
    # Wrong relation: rewards [1, 1, 0, 1] -> 0.75 (the upstream quirk, §7).
    assert verdicts([det("circle", 20, 0), det("square", 0, 0)], md) == (False, False, 0.75)
    # Inside the margin (d = 4 for 10-wide boxes): no relation, same 0.75.
    assert verdicts([det("circle", 0, 0), det("square", 4, 0)], md) == (False, False, 0.75)
    # No square: [1 - 1/1, 1, 0.0 (no target)] -> 1/3.
    correct, strict, score = verdicts([det("circle", 0, 0)], md)
    assert (correct, strict) == (False, False) and score == pytest.approx(1 / 3)
    # Two circles: official checks the top one only -> pass; strict [1, 0, 0.0] -> 1/3.
    correct, strict, score = verdicts([det("circle", 0, 0, 0.9), det("circle", 0, 30, 0.8), det("square", 20, 0)], md)
    assert (correct, strict) == (True, False) and score == pytest.approx(1 / 3)


def test_color_attr():
    md = captions.color_attr("circle", "red", "square", "blue")
    good = [det("circle", 0, 0, color="red"), det("square", 20, 0, color="blue")]
    assert verdicts(good, md) == (True, True, 1.0)
    # Colours swapped: rewards [1, 0, 1, 0] -> 0.5.
    swapped = [det("circle", 0, 0, color="blue"), det("square", 20, 0, color="red")]
    assert verdicts(swapped, md) == (False, False, 0.5)


# ---------------------------------------------------------------- validation, summary, reward


@pytest.mark.parametrize(
    "record, message",
    [
        ({"tag": "ocr", "include": [{"class": "circle", "count": 1}]}, "'tag'"),
        ({"tag": "single_object", "include": []}, "non-empty"),
        ({"tag": "single_object", "include": [{"class": "circle", "count": 0}]}, "count"),
        ({"tag": "colors", "include": [{"class": "circle", "count": 1, "colour": "red"}]}, "unknown keys"),
        ({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "teal"}]}, "GenEval colour"),
        ({"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}]}, "earlier"),
        (
            {"tag": "position", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["on", 0]}]},
            "relation",
        ),
    ],
)
def test_validate_metadata_errors(record, message):
    with pytest.raises(ValueError, match=message):
        validate_metadata(record)


def test_validate_metadata_unknown_class_for_detector():
    with pytest.raises(ValueError, match="can never be detected"):
        validate_metadata(captions.single_object("circles"), classes=("circle", "square"))


def test_summarize_is_unweighted_mean_of_tasks():
    out = summarize([1, 0, 1, 1], ["single_object", "single_object", "counting", "position"])
    assert out["single_object"] == 0.5 and out["counting"] == 1.0
    assert out["overall"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)  # not 3/4 over images


class _FixedDetector:
    classes = ("circle", "square")

    def __init__(self, per_image):
        self.per_image = list(per_image)

    def detect(self, image):
        return self.per_image.pop(0)


def test_reward_modes_and_info():
    md = [captions.position("circle", "left of", "square")] * 2
    dets = [[det("circle", 0, 0), det("square", 20, 0)], [det("circle", 20, 0), det("square", 0, 0)]]
    images = torch.zeros(2, 3, 8, 8)
    prompts = [m["prompt"] for m in md]
    partial, info = GenEvalReward(_FixedDetector(dets), mode="partial")(images, prompts, md)
    assert partial.dtype == torch.float32 and partial.tolist() == [1.0, 0.75]
    assert info["strict_correct"].tolist() == [1.0, 0.0] and info["correct"].tolist() == [1.0, 0.0]
    assert info["reasons"][0] == "" and "left of" in info["reasons"][1]
    strict, _ = GenEvalReward(_FixedDetector(dets), mode="strict")(images, prompts, md)
    assert strict.tolist() == [1.0, 0.0]


def test_reward_rejects_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        GenEvalReward(_FixedDetector([]), mode="lenient")
    reward = GenEvalReward(_FixedDetector([[]]))
    md = captions.single_object("circle")
    with pytest.raises(ValueError, match="1 images, 2 prompts"):
        reward(torch.zeros(1, 3, 8, 8), ["a", "b"], [md, md])
    with pytest.raises(ValueError, match="can never be detected"):
        reward(torch.zeros(1, 3, 8, 8), ["a"], [captions.single_object("triangle")])


# ---------------------------------------------------------------- the mini detector


def test_detector_finds_box_class_and_colour():
    objects = (
        SceneObject("triangle", "purple", (0.3, 0.6), 6 / 32),
        SceneObject("cross", "green", (0.75, 0.28), 6 / 32),
    )
    scene = Scene(objects, "cream")
    found = sorted(MiniDetector().detect(render(scene, 32)), key=lambda d: d.box[0])
    assert [(d.cls, d.color) for d in found] == [("triangle", "purple"), ("cross", "green")]
    for d, obj in zip(found, scene.objects):
        assert np.allclose(d.box, np.array(obj.box()) * 32, atol=0.5)
        assert d.score > 0.95
    assert MiniDetector().detect(render(Scene((), "pale blue"), 32)) == []


@pytest.mark.parametrize("tag", captions.GENEVAL_TAGS)
def test_detector_accuracy_on_ground_truth(tag):
    """>= 98% of ground-truth renders of each tag are strict-correct (and officially correct)."""
    rng = np.random.default_rng(1234)
    options = captions.enumerate_geneval(tag)
    metadata = [options[i] for i in rng.integers(len(options), size=50)]
    images = torch.stack(
        [torch.from_numpy(render(captions.sample_scene_for_prompt(m, rng), 32)).permute(2, 0, 1) for m in metadata]
    )
    strict, info = GenEvalReward(MiniDetector(), mode="strict")(images, [m["prompt"] for m in metadata], metadata)
    assert strict.mean().item() >= 0.98, info["reasons"]
    assert info["correct"].mean().item() >= 0.98
    assert info["score"].mean().item() >= 0.98


def test_detector_rejects_renders_of_a_different_prompt():
    """The detector-based reward is not trivially 1: renders of a contradicting prompt fail."""
    rng = np.random.default_rng(99)
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    pairs = []
    for _ in range(15):
        a, b = (str(s) for s in rng.choice(SHAPES, 2, replace=False))
        rel = str(rng.choice(captions.RELATIONS))
        pairs.append((captions.position(a, rel, b), captions.position(a, opposite[rel], b)))
        pairs.append((captions.counting(a, 2), captions.counting(a, 3)))
        pairs.append((captions.color_attr(a, "red", b, "blue"), captions.color_attr(a, "blue", b, "red")))
    images = torch.stack(
        [torch.from_numpy(render(captions.sample_scene_for_prompt(drawn, rng), 32)).permute(2, 0, 1) for drawn, _ in pairs]
    )
    asked = [claimed for _, claimed in pairs]
    strict, info = GenEvalReward(MiniDetector())(images, [m["prompt"] for m in asked], asked)
    assert strict.sum().item() == 0 and info["correct"].sum().item() == 0
