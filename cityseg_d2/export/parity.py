"""Whether an exported model detects what the PyTorch model detects, within stated tolerances.

Detections are matched one to one rather than compared by rank: scores that tie to 1e-7 (common in a barely
trained model) may come out of onnxruntime's sort and NMS in another order than out of torch's.
"""

from dataclasses import dataclass

import numpy as np
from detectron2.engine import DefaultPredictor

from ..engine.predict import resolve_weights
from .runtime import ExportedPredictor

# Box corners in pixels of the original image and scores: onnxruntime's float32 arithmetic differs from torch's by
# about 1e-4 px and 1e-7; pasted masks by a few pixels where a mask probability is within 1e-6 of 0.5.
BOX_ATOL = 1e-2
SCORE_ATOL = 1e-4
MIN_MASK_IOU = 0.99


@dataclass
class Parity:
    reference: int  # detections of the PyTorch model
    exported: int  # detections of the exported model
    matched: int  # pairs of the same class with boxes and scores within BOX_ATOL / SCORE_ATOL
    max_box_diff: float  # over matched pairs (0 without any)
    max_score_diff: float
    min_mask_iou: float  # 1 without any

    @property
    def ok(self):
        return self.reference == self.exported == self.matched and self.min_mask_iou >= MIN_MASK_IOU

    def __str__(self):
        return (
            f"{self.matched} of {self.reference} PyTorch detections matched by the {self.exported} exported ones "
            f"(largest box difference {self.max_box_diff:.2g} px, score {self.max_score_diff:.2g}, smallest mask "
            f"IoU {self.min_mask_iou:.4f}; tolerances {BOX_ATOL} px, {SCORE_ATOL}, IoU {MIN_MASK_IOU})"
        )


def compare_detections(reference, exported):
    """Parity of two detectron2 Instances of one image (pred_boxes, scores, pred_classes, pred_masks in image size)."""
    boxes = [i.pred_boxes.tensor.numpy().astype(np.float64) for i in (reference, exported)]
    scores = [i.scores.numpy().astype(np.float64) for i in (reference, exported)]
    classes = [i.pred_classes.numpy() for i in (reference, exported)]
    masks = [i.pred_masks.numpy().astype(bool) for i in (reference, exported)]
    free = np.ones(len(exported), bool)
    box_diffs, score_diffs, ious = [0.0], [0.0], [1.0]
    for i in range(len(reference)):
        box_diff = np.abs(boxes[1] - boxes[0][i]).max(axis=1, initial=0.0)
        score_diff = np.abs(scores[1] - scores[0][i])
        candidates = np.flatnonzero(
            free & (classes[1] == classes[0][i]) & (box_diff <= BOX_ATOL) & (score_diff <= SCORE_ATOL)
        )
        if not candidates.size:
            continue
        j = candidates[np.argmin(box_diff[candidates])]
        free[j] = False
        union = np.logical_or(masks[0][i], masks[1][j]).sum()
        ious.append(np.logical_and(masks[0][i], masks[1][j]).sum() / union if union else 1.0)
        box_diffs.append(box_diff[j])
        score_diffs.append(score_diff[j])
    return Parity(len(reference), len(exported), int((~free).sum()), max(box_diffs), max(score_diffs), min(ious))


def check_exported(cfg, exported_path, image):
    """Parity of the exported file with cfg's PyTorch model (trained weights, on the CPU) on one BGR image."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = resolve_weights(cfg)
    cfg.MODEL.DEVICE = "cpu"
    reference = DefaultPredictor(cfg)(image)["instances"]
    return compare_detections(reference, ExportedPredictor(exported_path)(image)["instances"])
