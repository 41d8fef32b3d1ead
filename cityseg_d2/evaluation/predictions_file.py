"""A model's predictions on a data set, saved so that they can be analysed again without running the model.

The fast evaluator writes one with TEST.CITYSCAPES.SAVE_PREDICTIONS (`<output dir>/cityscapes_predictions.npz`),
and tools/eval_report.py reads it. It is a .npz read with allow_pickle=False: the data set's name and classes;
per image its id and size; per prediction its image (by position), class, score and mask. A mask is its bounding
box and the pixels inside it as COCO compressed RLE (pycocotools), which keeps a 100-prediction 2048x1024 image
at some hundred kilobytes and is exact: the evaluator's numbers are recomputed from the file to the last digit.
"""

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_util
import torch

from ..errors import UserError, first_line
from ..file_io import atomic_write
from .protocol import ImagePredictions, mask_bounding_box

FORMAT = "cityseg_d2.cityscapes_predictions.v1"
PREDICTIONS_FILE = "cityscapes_predictions.npz"
_ARRAYS = {
    "format": "U",
    "dataset": "U",
    "class_names": "U",
    "label_ids": "i",
    "image_ids": "U",
    "image_shapes": "i",
    "image_counts": "i",
    "scores": "f",
    "classes": "i",
    "boxes": "i",
    "rle_lengths": "i",
    "rle_bytes": "u",
}


@dataclass
class EncodedPredictions:
    """One image's predictions with their masks encoded: boxes (N, 4) as x0, y0, x1, y1 (exclusive; all 0 for an
    empty mask) and rles, the COCO RLE counts (bytes) of each mask inside its box."""

    image_id: str
    shape: tuple
    scores: np.ndarray
    classes: np.ndarray
    boxes: np.ndarray
    rles: list

    @classmethod
    def encode(cls, image_id, predictions):
        """From ImagePredictions (masks as numpy or as a tensor on any device)."""
        masks = predictions.masks
        masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        boxes, rles = np.zeros((len(masks), 4), np.int64), []
        for i, mask in enumerate(masks):
            if mask.any():
                rows, cols = mask_bounding_box(mask)
                boxes[i] = cols.start, rows.start, cols.stop, rows.stop
                rles.append(mask_util.encode(np.asfortranarray(mask[rows, cols], dtype=np.uint8))["counts"])
            else:
                rles.append(b"")
        return cls(image_id, tuple(masks.shape[1:]), predictions.scores, predictions.classes, boxes, rles)

    def decode(self):
        """ImagePredictions with (N, H, W) bool numpy masks (and their boxes, the overlap count's hint)."""
        masks = np.zeros((len(self.scores), *self.shape), bool)
        for mask, (x0, y0, x1, y1), rle in zip(masks, self.boxes, self.rles):
            if x1 > x0:
                crop = {"size": [int(y1 - y0), int(x1 - x0)], "counts": rle}
                mask[y0:y1, x0:x1] = mask_util.decode(crop).astype(bool)
        return ImagePredictions(masks, self.scores, self.classes, self.boxes.astype(np.float64))


@dataclass
class PredictionsFile:
    """What a predictions file holds: the data set, its classes (EvaluatedClasses order) and EncodedPredictions
    per image."""

    dataset: str
    class_names: tuple
    label_ids: tuple
    images: list

    def save(self, path):
        """Write atomically (a reader never sees half a file); returns path."""
        counts = [len(image.scores) for image in self.images]
        rles = [rle for image in self.images for rle in image.rles]
        arrays = {
            "format": np.array(FORMAT),
            "dataset": np.array(self.dataset),
            "class_names": np.array(self.class_names, dtype=str),
            "label_ids": np.array(self.label_ids, np.int64),
            "image_ids": np.array([image.image_id for image in self.images], dtype=str),
            "image_shapes": np.array([image.shape for image in self.images], np.int64).reshape(-1, 2),
            "image_counts": np.array(counts, np.int64),
            "scores": np.concatenate([np.zeros(0)] + [image.scores for image in self.images]).astype(np.float64),
            "classes": np.concatenate([np.zeros(0, np.int64)] + [image.classes for image in self.images]),
            "boxes": np.concatenate([np.zeros((0, 4), np.int64)] + [image.boxes for image in self.images]),
            "rle_lengths": np.array([len(rle) for rle in rles], np.int64),
            "rle_bytes": np.frombuffer(b"".join(rles), np.uint8),
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_write(path) as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path):
        """UserError naming the file when it is missing or not a predictions file (never unpickles anything)."""
        if not os.path.isfile(path):
            raise UserError(
                f"predictions file {path} not found: make one with tools/eval_report.py --weights, or evaluate with "
                "TEST.CITYSCAPES.SAVE_PREDICTIONS True"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [key for key in _ARRAYS if key not in data.files]
                arrays = {key: data[key] for key in _ARRAYS if key not in missing}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f"predictions file {path} is not a readable .npz file: {first_line(e)}") from e
        if missing:
            raise UserError(f"predictions file {path} is not a cityseg_d2 predictions file (no {missing[0]!r} array)")
        if str(arrays["format"]) != FORMAT or any(arrays[k].dtype.kind != kind for k, kind in _ARRAYS.items()):
            raise UserError(f"predictions file {path} is not in the format {FORMAT}")
        counts = arrays["image_counts"]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        rle_offsets = np.concatenate([[0], np.cumsum(arrays["rle_lengths"])])
        consistent = (
            len(arrays["image_ids"]) == len(counts) == len(arrays["image_shapes"])
            and len(arrays["scores"]) == len(arrays["classes"]) == len(arrays["boxes"]) == offsets[-1]
            and len(arrays["rle_lengths"]) == offsets[-1]
            and len(arrays["rle_bytes"]) == rle_offsets[-1]
            and len(arrays["class_names"]) == len(arrays["label_ids"])
            and np.all((arrays["classes"] >= 0) & (arrays["classes"] < len(arrays["class_names"])))
        )
        if not consistent:
            raise UserError(f"predictions file {path} is damaged: its arrays have inconsistent lengths")
        rle_bytes = arrays["rle_bytes"].tobytes()
        images = []
        for i, image_id in enumerate(arrays["image_ids"]):
            first, last = offsets[i], offsets[i + 1]
            images.append(
                EncodedPredictions(
                    str(image_id),
                    tuple(int(v) for v in arrays["image_shapes"][i]),
                    arrays["scores"][first:last],
                    arrays["classes"][first:last],
                    arrays["boxes"][first:last],
                    [rle_bytes[rle_offsets[j] : rle_offsets[j + 1]] for j in range(first, last)],
                )
            )
        return cls(
            str(arrays["dataset"]),
            tuple(str(n) for n in arrays["class_names"]),
            tuple(int(i) for i in arrays["label_ids"]),
            images,
        )
