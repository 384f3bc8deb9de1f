"""Rewards: one protocol ``reward(samples, prompts, metadata) -> (Tensor[N], info)``.

For images, ``samples`` is ``[N, 3, H, W]`` in [0, 1]:

* :mod:`tmpo.rewards.geneval` -- GenEval's rules over detections, :class:`GenEvalReward`.
* :mod:`tmpo.rewards.ocr` -- 1 - normalised edit distance, :class:`OCRReward`.
* :mod:`tmpo.rewards.mini_detector`, :mod:`tmpo.rewards.mini_ocr` -- the mini world's detector and
  text reader (imported from their modules; they pull in the world definition).
"""

from tmpo.rewards.geneval import Detection, Detector, GenEvalReward
from tmpo.rewards.ocr import OCRReward, TextReader, normalized_edit_distance

__all__ = ["Detection", "Detector", "GenEvalReward", "OCRReward", "TextReader", "normalized_edit_distance"]
