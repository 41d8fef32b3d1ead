"""Predictions made from the ground truth with controlled errors: what the evaluator tests and
tools/benchmark_eval.py feed the evaluators, so the official and the fast numbers can be compared on many cases.
"""

import cv2
import numpy as np
import torch
from detectron2.structures import BitMasks, Instances

from .protocol import INSTANCE_ID_OFFSET

PERTURBATIONS = (
    "exact",  # the ground truth itself
    "erode",
    "dilate",
    "drop",  # some instances not predicted
    "duplicate",  # some instances predicted twice
    "false_positives",  # blobs where there is nothing of the class
    "swap_classes",
    "shuffle_scores",
    "tied_scores",  # few distinct scores: ties across images and classes
    "tiny",  # masks under the 100-pixel minimum region size, and an empty one
    "absent_classes",  # classes the image (maybe the dataset) has no ground truth of
    "group_void",  # masks on group (crowd) and void regions
    "no_predictions",  # every other image has none
    "mixed",  # all of the above at once
)


def _blob(shape, rng, max_size):
    mask = np.zeros(shape, np.uint8)
    height, width = shape
    center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
    axes = (int(rng.integers(1, max_size)), int(rng.integers(1, max_size)))
    cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def _morph(mask, rng, op):
    size = int(rng.integers(2, 6))
    return op(mask.astype(np.uint8), np.ones((size, size), np.uint8)).astype(bool)


def perturbed_predictions(gt_ids, classes, perturbation, rng, image_index=0, num_predictions=0):
    """detectron2 Instances (pred_masks, pred_boxes, scores, pred_classes) from an instanceIds array.

    Args:
        gt_ids: the image's instanceIds array.
        classes (EvaluatedClasses): the dataset's classes.
        perturbation: one of PERTURBATIONS.
        rng: numpy Generator (the only source of randomness).
        image_index: position of the image in the dataset ("no_predictions" empties the even ones).
        num_predictions: 0, or exactly this many predictions, like a detector's output (Mask R-CNN keeps the
            TEST.DETECTIONS_PER_IMAGE = 100 best above score 0.05): the highest-scoring ones, padded with
            low-scoring false-positive blobs (its long tail; also on an image "no_predictions" empties).
    """
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {perturbation!r}; choose one of {PERTURBATIONS}")
    every = perturbation == "mixed"
    num_classes = len(classes.names)
    ids = np.unique(gt_ids)
    region_classes = classes.class_of_labels(np.where(ids < INSTANCE_ID_OFFSET, ids, ids // INSTANCE_ID_OFFSET))
    masks, labels = [], []
    for value, label in zip(ids, region_classes):
        if value >= INSTANCE_ID_OFFSET and label >= 0:
            masks.append(gt_ids == value)
            labels.append(int(label))
    shape = gt_ids.shape
    if perturbation in ("erode", "dilate") or every:
        ops = {"erode": cv2.erode, "dilate": cv2.dilate}
        masks = [_morph(m, rng, ops[perturbation] if not every else ops[rng.choice(list(ops))]) for m in masks]
    if perturbation == "drop" or every:
        kept = rng.random(len(masks)) > 0.3
        masks, labels = [m for m, k in zip(masks, kept) if k], [c for c, k in zip(labels, kept) if k]
    if perturbation == "duplicate" or every:
        for i in np.flatnonzero(rng.random(len(masks)) < 0.4):
            masks.append(np.roll(masks[i], int(rng.integers(0, 4)), axis=int(rng.integers(0, 2))))
            labels.append(labels[i])
    if perturbation == "false_positives" or every:
        for _ in range(int(rng.integers(1, 6))):
            masks.append(_blob(shape, rng, max(shape) // 6))
            labels.append(int(rng.integers(0, num_classes)))
    if perturbation == "swap_classes" or every:
        labels = [int(rng.integers(0, num_classes)) if rng.random() < 0.3 else c for c in labels]
    if perturbation == "tiny" or every:
        for _ in range(int(rng.integers(1, 5))):
            masks.append(_blob(shape, rng, 6))
            labels.append(int(rng.integers(0, num_classes)))
        masks.append(np.zeros(shape, bool))  # an empty mask: the script skips it
        labels.append(int(rng.integers(0, num_classes)))
    if perturbation == "absent_classes" or every:
        absent = sorted(set(range(num_classes)) - set(labels)) or [num_classes - 1]
        for _ in range(int(rng.integers(1, 4))):
            masks.append(_blob(shape, rng, max(shape) // 8))
            labels.append(int(rng.choice(absent)))
    if perturbation == "group_void" or every:
        void = np.isin(gt_ids, classes.void_label_ids)
        for value, label in zip(ids, region_classes):
            if value < INSTANCE_ID_OFFSET and label >= 0:  # a group region: predict it, whole or in part
                masks.append((gt_ids == value) & (_blob(shape, rng, max(shape) // 3) | (rng.random() < 0.5)))
                labels.append(int(label))
        if void.any():
            masks.append(void & _blob(shape, rng, max(shape) // 3))
            labels.append(int(rng.integers(0, num_classes)))
            masks.append(void | _blob(shape, rng, max(shape) // 10))
            labels.append(int(rng.integers(0, num_classes)))
    scores = rng.uniform(0.05, 1.0, len(masks))
    if perturbation == "shuffle_scores" or every:
        scores = rng.permutation(scores)
    if perturbation == "tied_scores" or every:
        scores = rng.choice([0.25, 0.5, 0.75], len(masks))
    if (perturbation == "no_predictions" or every) and image_index % 2 == 0:
        masks, labels, scores = [], [], scores[:0]
    if num_predictions:
        best = np.argsort(-scores, kind="stable")[:num_predictions]
        masks, labels, scores = [masks[i] for i in best], [labels[i] for i in best], scores[best]
        tail = num_predictions - len(masks)
        masks += [_blob(shape, rng, max(shape) // 8) for _ in range(tail)]
        labels += [int(c) for c in rng.integers(0, num_classes, tail)]
        scores = np.concatenate([scores, rng.uniform(0.05, 0.3, tail)])
    instances = Instances(shape)
    pred_masks = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, *shape), dtype=torch.bool)
    instances.pred_masks = pred_masks
    instances.pred_boxes = BitMasks(pred_masks).get_bounding_boxes()
    instances.scores = torch.as_tensor(scores, dtype=torch.float32)
    instances.pred_classes = torch.as_tensor(labels, dtype=torch.int64)
    return instances


def ground_truth_predictions(gt_ids, classes):
    """The ground-truth instances as predictions (random scores): every AP must be 100."""
    return perturbed_predictions(gt_ids, classes, "exact", np.random.default_rng(0))
