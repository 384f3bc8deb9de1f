"""GenEval's decision rules as pure functions over detections, and the GenEval reward.

Everything here follows ``shared/specs/geneval-rules.md`` (official ``djghosh13/geneval`` @ af4902f,
``evaluation/evaluate_images.py``, and the reward server ``yifan123/reward-server`` @ 92ac29f,
``reward_server/gen_eval.py``). Section numbers below refer to that file. Three per-image verdicts:

* ``correct`` -- the official benchmark (§3): at least ``count`` of each included class among the
  kept detections, colour/position checked on the top-``count`` ones, ``exclude`` enforced.
* ``strict_correct`` -- the reward server (§7): exactly ``count``, colour on all of them, position
  as official, ``exclude`` ignored.
* ``score`` -- the reward server's partial credit (§7), the reward Flow-GRPO trains on. It keeps
  the upstream quirks: ``1 - |count - found| / count`` is not clipped (3 found for 1 gives -1), and
  a failed position adds ``[0, 1]`` (so a wrong relation scores 0.75, not 2/3).

The detection stage (§2) is :func:`filter_detections`; colour labels come with each detection
(the official code asks CLIP for them; only the label matters to the rules).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MODES: tuple[str, ...] = ("strict", "partial", "official")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One detected object: class name, box (x1, y1, x2, y2) in pixels (y down), confidence, colour."""

    cls: str
    box: Box
    score: float
    color: str | None = None


@runtime_checkable
class Detector(Protocol):
    """Anything that turns an ``[H, W, 3]`` float image in [0, 1] into detections.

    A detector may also expose ``classes`` (a collection of the class names it can output); the
    reward then rejects metadata that asks for a class the detector can never find.
    """

    def detect(self, image: np.ndarray) -> list[Detection]: ...


@dataclass(frozen=True)
class GenEvalConfig:
    """Detection-stage and position constants; the defaults are GenEval's (§2, §4)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # NMS IoU; 1.0 switches NMS off, as in GenEval
    position_threshold: float = 0.1  # c in the relative-position rule


# ---------------------------------------------------------------------------------------------
# Metadata validation
# ---------------------------------------------------------------------------------------------

_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}


def validate_metadata(metadata: Any, classes: Sequence[str] | None = None) -> None:
    """Raise ValueError naming the problem if ``metadata`` is not a usable GenEval record.

    Stricter than GenEval, which silently ignores misspelled keys (a ``"colour"`` key would
    disable the colour check): unknown clause keys are errors here, as are counts < 1 and
    position references that do not point to an earlier include clause.
    """
    if not isinstance(metadata, Mapping):
        raise ValueError(f"GenEval metadata must be a dict, got {type(metadata).__name__}")
    where = f"metadata for {metadata.get('prompt', '<no prompt>')!r}"
    if metadata.get("tag") not in TAGS:
        raise ValueError(f"{where}: 'tag' must be one of {TAGS}, got {metadata.get('tag')!r}")
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: 'include' must be a non-empty list of clauses")
    if not isinstance(exclude, list):
        raise ValueError(f"{where}: 'exclude' must be a list of clauses")
    for kind, clauses, allowed in (("include", include, _INCLUDE_KEYS), ("exclude", exclude, _EXCLUDE_KEYS)):
        for i, clause in enumerate(clauses):
            at = f"{where}: {kind}[{i}]"
            if not isinstance(clause, Mapping):
                raise ValueError(f"{at} must be a dict, got {clause!r}")
            extra = set(clause) - allowed
            if extra:
                raise ValueError(f"{at} has unknown keys {sorted(extra)}; allowed: {sorted(allowed)}")
            if not isinstance(clause.get("class"), str):
                raise ValueError(f"{at} needs a string 'class'")
            if classes is not None and clause["class"] not in classes:
                raise ValueError(
                    f"{at}: class {clause['class']!r} can never be detected; detector classes: {sorted(classes)}"
                )
            count = clause.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{at} needs an integer 'count' >= 1, got {count!r}")
            if "color" in clause and clause["color"] not in COLORS:
                raise ValueError(f"{at}: colour {clause['color']!r} is not a GenEval colour {COLORS}")
            if "position" in clause:
                pos = clause["position"]
                if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS):
                    raise ValueError(f"{at}: 'position' must be [relation, index], relation in {RELATIONS}: {pos!r}")
                if isinstance(pos[1], bool) or not isinstance(pos[1], int) or not 0 <= pos[1] < i:
                    raise ValueError(f"{at}: position index must point to an earlier include clause, got {pos[1]!r}")


# ---------------------------------------------------------------------------------------------
# Detection stage (§2)
# ---------------------------------------------------------------------------------------------


def box_iou(a: Box, b: Box) -> float:
    """IoU with GenEval's inclusive-pixel ``+1`` convention (used only by NMS)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)


def filter_detections(
    detections: Sequence[Detection], tag: str, config: GenEvalConfig = GenEvalConfig()
) -> dict[str, list[Detection]]:
    """Kept detections per class, most confident first (§2).

    Per class: sort by score, keep ``score > threshold`` (0.9 for every class of a counting image),
    cap at ``max_objects``, then greedy within-class NMS unless ``max_overlap >= 1``. Classes with
    nothing left are absent from the result.
    """
    threshold = config.counting_threshold if tag == "counting" else config.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.cls, []).append(det)
    kept: dict[str, list[Detection]] = {}
    for cls, dets in by_class.items():
        dets = sorted(dets, key=lambda d: -d.score)
        dets = [d for d in dets if d.score > threshold][: config.max_objects]
        if config.max_overlap < 1.0:
            survivors: list[Detection] = []
            for d in dets:
                if all(box_iou(d.box, s.box) < config.max_overlap for s in survivors):
                    survivors.append(d)
            dets = survivors
        if dets:
            kept[cls] = dets
    return kept


# ---------------------------------------------------------------------------------------------
# Relative position (§4)
# ---------------------------------------------------------------------------------------------


def relative_position(box_a: Box, box_b: Box, c: float = 0.1) -> set[str]:
    """Relations that hold for A (subject) relative to B (reference); image y points down.

    Each axis offset of the box centres is shrunk by ``c`` times the summed box extents on that
    axis (clamped at 0), then divided by the norm of the *original* offset; a relation holds if
    its component is beyond 0.5 (strictly). If both shrunk offsets vanish, no relation holds.
    Arithmetic runs in float32, as mmdet's boxes do upstream.
    """
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float32)
    centres = (boxes[:, :2] + boxes[:, 2:]) / np.float32(2)
    extents = np.abs(boxes[:, 2:] - boxes[:, :2])
    offset = centres[0] - centres[1]
    shrunk = np.maximum(np.abs(offset) - np.float32(c) * (extents[0] + extents[1]), np.float32(0)) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _position_holds(found: Sequence[Detection], targets: Sequence[Detection], relation: str, c: float) -> bool:
    """Every found object stands in ``relation`` to every target (all pairs)."""
    return all(relation in relative_position(f.box, t.box, c) for f in found for t in targets)


# ---------------------------------------------------------------------------------------------
# Per-image verdicts (§3 official, §7 reward server)
# ---------------------------------------------------------------------------------------------


def evaluate_official(
    objects: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any], c: float = 0.1
) -> tuple[bool, list[str]]:
    """Official GenEval ``correct`` and the failure reasons (§3). ``objects`` from :func:`filter_detections`."""
    correct = True
    reasons: list[str] = []
    matched: list[Sequence[Detection] | None] = []
    for clause in metadata.get("include", []):
        cls, count = clause["class"], clause["count"]
        found = list(objects.get(cls, []))[:count]  # top-`count` only: extras never fail an include
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                n_color = sum(d.color == clause["color"] for d in found)
                if n_color < count:
                    ok = False
                    reasons.append(f"expected {clause['color']} {cls}>={count}, found {n_color} {clause['color']}")
            if "position" in clause and ok:
                relation, ref = clause["position"]
                if matched[ref] is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {relation}")
                elif not _position_holds(found, matched[ref], relation, c):
                    ok = False
                    reasons.append(f"expected {cls} {relation} target")
        correct = correct and ok
        matched.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        cls, count = clause["class"], clause["count"]
        n_all = len(objects.get(cls, []))  # all kept detections, not the top-`count`
        if n_all >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {n_all}")
    return correct, reasons


def evaluate_reward(
    objects: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any], c: float = 0.1
) -> tuple[bool, float, list[str]]:
    """Reward-server ``strict_correct``, partial ``score`` and reasons (§7); ``exclude`` is ignored."""
    correct = True
    reasons: list[str] = []
    rewards: list[float] = []
    matched: list[Sequence[Detection] | None] = []
    for clause in metadata.get("include", []):
        cls, count = clause["class"], clause["count"]
        found = list(objects.get(cls, []))  # not truncated: the count must be exact
        rewards.append(1.0 - abs(count - len(found)) / count)  # unclipped, as upstream
        ok = True
        if len(found) != count:
            ok = False
            reasons.append(f"expected {cls}=={count}, found {len(found)}")
            if "color" in clause or "position" in clause:
                rewards.append(0.0)
        else:
            if "color" in clause:
                n_color = sum(d.color == clause["color"] for d in found)
                rewards.append(1.0 - abs(count - n_color) / count)
                if n_color != count:
                    ok = False
                    reasons.append(f"expected {clause['color']} {cls}=={count}, found {n_color} {clause['color']}")
            if "position" in clause and ok:
                relation, ref = clause["position"]
                if matched[ref] is None:
                    ok = False
                    rewards.append(0.0)
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    if not _position_holds(found, matched[ref], relation, c):
                        ok = False
                        rewards.append(0.0)
                        reasons.append(f"expected {cls} {relation} target")
                    rewards.append(1.0)  # upstream appends 1.0 after the pair loop, pass or fail
        correct = correct and ok
        matched.append(found if ok else None)
    score = sum(rewards) / len(rewards) if rewards else 0.0
    return correct, score, reasons


def summarize(correct: Sequence[float], tags: Sequence[str]) -> dict[str, float]:
    """Per-task accuracy and the overall GenEval score = unweighted mean of the task scores (§6).

    Only tasks that occur in ``tags`` enter the overall mean.
    """
    if len(correct) != len(tags):
        raise ValueError(f"{len(correct)} verdicts for {len(tags)} tags")
    per_task: dict[str, float] = {}
    for tag in TAGS:
        values = [float(v) for v, t in zip(correct, tags) if t == tag]
        if values:
            per_task[tag] = sum(values) / len(values)
    if not per_task:
        raise ValueError("no images with a GenEval tag to summarise")
    per_task["overall"] = sum(per_task.values()) / len(per_task)
    return per_task


# ---------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------


class GenEvalReward:
    """GenEval reward: ``reward(images [N,3,H,W] in [0,1], prompts, metadata) -> (Tensor[N], info)``.

    ``mode`` picks the returned reward: ``"strict"`` (reward server ``strict_correct``, 0/1),
    ``"partial"`` (reward server ``score``, <= 1 and possibly negative; Flow-GRPO's training reward)
    or ``"official"`` (GenEval ``correct``, 0/1). ``info`` always holds all three as float32 tensors
    (``correct``, ``strict_correct``, ``score``) plus ``tags`` and the failure ``reasons`` per image
    (of the official check in ``"official"`` mode, of the reward server's otherwise; "" if none).
    """

    def __init__(self, detector: Detector, mode: str = "strict", config: GenEvalConfig = GenEvalConfig()) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown GenEval reward mode {mode!r}; choose one of {MODES}")
        if not callable(getattr(detector, "detect", None)):
            raise ValueError(f"detector {detector!r} has no detect(image) method")
        self.detector = detector
        self.mode = mode
        self.config = config

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        n = images.shape[0]
        if len(prompts) != n or len(metadata) != n:
            # The reward server zips and silently truncates; a mismatch here is always a bug upstream.
            raise ValueError(f"got {n} images, {len(prompts)} prompts and {len(metadata)} metadata records")
        classes = getattr(self.detector, "classes", None)
        for record in metadata:
            validate_metadata(record, classes)
        arrays = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        correct, strict, score, reasons = [], [], [], []
        for image, record in zip(arrays, metadata):
            objects = filter_detections(self.detector.detect(image), record["tag"], self.config)
            ok, why = evaluate_official(objects, record, self.config.position_threshold)
            strict_ok, partial, why_strict = evaluate_reward(objects, record, self.config.position_threshold)
            correct.append(float(ok))
            strict.append(float(strict_ok))
            score.append(partial)
            reasons.append("\n".join(why if self.mode == "official" else why_strict))
        info = {
            "correct": torch.tensor(correct, dtype=torch.float32),
            "strict_correct": torch.tensor(strict, dtype=torch.float32),
            "score": torch.tensor(score, dtype=torch.float32),
            "tags": [r["tag"] for r in metadata],
            "reasons": reasons,
        }
        key = {"strict": "strict_correct", "partial": "score", "official": "correct"}[self.mode]
        return info[key].clone(), info
