"""A real OCR engine behind :class:`tmpo.rewards.ocr.TextReader`: RapidOCR (PaddleOCR's PP-OCR models
exported to ONNX; the models ship inside the ``rapidocr-onnxruntime`` wheel, nothing is downloaded).

Flow-GRPO scores OCR with PaddleOCR and joins every recognised line without separators; so does this
reader (``join=""``). ``OCRReward(reader=RapidOCRReader())`` then gives 1 - NED of the quoted text.
"""

from __future__ import annotations

import numpy as np


class RapidOCRReader:
    """``read(image [H, W, 3] float in [0, 1]) -> str``: the recognised lines, in the engine's order.

    Args:
        min_confidence: drop lines the recogniser scores below this.
        join: separator between lines ("" as Flow-GRPO).
    """

    def __init__(self, min_confidence: float = 0.0, join: str = "") -> None:
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()
        self.min_confidence, self.join = float(min_confidence), join

    def read(self, image: np.ndarray) -> str:
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be [H, W, 3], got {image.shape}")
        rgb = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        result, _ = self.engine(np.ascontiguousarray(rgb[..., ::-1]))  # the engine reads arrays as BGR (OpenCV)
        if not result:
            return ""
        return self.join.join(text for _, text, conf in result if float(conf) >= self.min_confidence)
