"""The student project's metric: Matterport Mask R-CNN's per-image `compute_ap` at mask IoU 0.5.

The student project reported the mean of this per-image AP over the validation images (0.623); the Cityscapes
evaluators report it as `matterport_AP50` so that number compares like for like. It is not the Cityscapes AP: each
image is its own precision/recall curve, a prediction matches a ground-truth instance of the same class with
IoU >= 0.5 (not > 0.5), precision is made monotone (VOC style) and nothing is ignored.
"""

import numpy as np

IOU_THRESHOLD = 0.5


def matterport_ap50(gt_classes, pred_classes, pred_scores, ious):
    """Matterport's compute_ap of one image with at least one ground-truth instance.

    Predictions are taken by decreasing score (ties: the later one first, as Matterport's reversed argsort);
    each matches the unmatched ground-truth instance of its class with the highest IoU, if that IoU >= 0.5.
    An image without predictions scores 0.

    Args:
        gt_classes: (G,) class of each ground-truth instance, G >= 1.
        pred_classes, pred_scores: (N,) of the predictions.
        ious: (N, G) mask IoU of each prediction with each ground-truth instance.
    """
    gt_classes = np.asarray(gt_classes)
    if gt_classes.size == 0:
        raise ValueError("matterport_ap50 needs at least one ground-truth instance")
    order = np.argsort(pred_scores, kind="stable")[::-1]
    gt_matched = np.zeros(len(gt_classes), bool)
    pred_matched = np.zeros(len(order), bool)
    for rank, i in enumerate(order):
        candidates = ~gt_matched & (gt_classes == pred_classes[i]) & (ious[i] >= IOU_THRESHOLD)
        if candidates.any():
            gt_matched[np.argmax(np.where(candidates, ious[i], -1.0))] = True
            pred_matched[rank] = True
    true_positives = np.cumsum(pred_matched)
    precisions = np.concatenate([[0.0], true_positives / np.arange(1, len(order) + 1), [0.0]])
    recalls = np.concatenate([[0.0], true_positives / len(gt_classes), [1.0]])
    precisions = np.maximum.accumulate(precisions[::-1])[::-1]
    steps = np.flatnonzero(recalls[1:] != recalls[:-1]) + 1
    return float(np.sum((recalls[steps] - recalls[steps - 1]) * precisions[steps]))


def matterport_image_ap50(overlaps, predictions, classes):
    """The student project's per-image AP at IoU 0.5 (see matterport_ap50), or None for an image without ground-truth instances.

    Its ground truth: the instances (not group regions) of the evaluated classes, whatever their size.
    """
    gt = np.flatnonzero(overlaps.is_instance & (classes.class_of_labels(overlaps.region_labels) >= 0))
    if gt.size == 0:
        return None
    gt_classes = classes.class_of_labels(overlaps.region_labels[gt])
    return matterport_ap50(gt_classes, predictions.classes, predictions.scores, overlaps.ious()[:, gt])
