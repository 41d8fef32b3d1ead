"""The Cityscapes instance protocol computed in memory: the official numbers, without writing or reading PNGs.

Each image is reduced, while inference runs, to a few numbers per prediction (its best IoU with a ground-truth
region of its class, which region, the fraction of it that is ignored), counting each mask's pixels per
ground-truth region inside its bounding box on the CPU, or on the GPU where the masks are; `evaluate` then replays
evalInstanceLevelSemanticLabeling's evaluateMatches on those arrays. Equality with the script (every AP and AP50,
overall and per class, to 1e-6) is what tests/test_evaluation.py checks.
"""

import itertools
import logging
import os
from dataclasses import dataclass

import numpy as np
from detectron2.utils import comm

from .base import CityscapesEvaluatorBase, quiet_nanmean, segm_results
from .matterport_metric import matterport_image_ap50
from .predictions_file import PREDICTIONS_FILE, EncodedPredictions, PredictionsFile
from .protocol import IOU_THRESHOLDS, MIN_REGION_SIZE

logger = logging.getLogger(__name__)


def matchable_regions(overlaps, classes):
    """(region class, is matchable) of each region of an image: a matchable one is an instance (id >= 1000) of an
    evaluated class with at least MIN_REGION_SIZE pixels; the others of an evaluated class are group or small
    regions, which the protocol ignores."""
    region_classes = classes.class_of_labels(overlaps.region_labels)
    small = overlaps.region_areas < MIN_REGION_SIZE
    return region_classes, overlaps.is_instance & ~small & (region_classes >= 0)


@dataclass
class ImageMatchStats:
    """What the protocol needs of one image.

    gt_classes, gt_areas: class and pixels of each ground-truth instance that can be matched (see
    matchable_regions). For each non-empty predicted mask (`kept`, over all predictions): its class, score and
    pixels; best_iou, its highest IoU with a ground-truth region of its class (group and small regions included,
    -1 when there is none); best_gt, the index in gt_classes of that region, -1 when it is a group or small
    region; ignored_fraction, the part of the mask on void pixels plus on group and small regions of its class
    (a small group region counts twice, as in the script).
    """

    gt_classes: np.ndarray
    gt_areas: np.ndarray
    pred_classes: np.ndarray
    scores: np.ndarray
    pred_areas: np.ndarray
    best_iou: np.ndarray
    best_gt: np.ndarray
    ignored_fraction: np.ndarray

    @classmethod
    def compute(cls, overlaps, predictions, classes):
        region_classes, matchable = matchable_regions(overlaps, classes)
        small = overlaps.region_areas < MIN_REGION_SIZE
        gt_index = np.where(matchable, np.cumsum(matchable) - 1, -1)

        areas = overlaps.intersections.sum(axis=1)
        kept = areas > 0  # the script skips empty masks
        intersections, areas = overlaps.intersections[kept], areas[kept]
        pred_classes = predictions.classes[kept]
        same_class = region_classes[None, :] == pred_classes[:, None]
        ious = np.where(same_class, overlaps.ious()[kept], -1.0)
        best = np.argmax(ious, axis=1)
        void = np.isin(overlaps.region_ids, classes.void_label_ids)
        ignored = (
            intersections[:, void].sum(axis=1)
            + (intersections * (same_class & ~overlaps.is_instance)).sum(axis=1)
            + (intersections * (same_class & small)).sum(axis=1)
        )
        return cls(
            gt_classes=region_classes[matchable],
            gt_areas=overlaps.region_areas[matchable],
            pred_classes=pred_classes,
            scores=predictions.scores[kept],
            pred_areas=areas,
            best_iou=ious[np.arange(len(ious)), best],
            best_gt=gt_index[best],
            ignored_fraction=ignored / areas,
        )


def concatenate_stats(stats):
    """One ImageMatchStats for all images; best_gt indexes the concatenated gt_classes."""
    offsets = np.cumsum([0] + [len(s.gt_classes) for s in stats[:-1]])
    best_gt = [np.where(s.best_gt >= 0, s.best_gt + offset, -1) for s, offset in zip(stats, offsets)]
    fields = ("gt_classes", "gt_areas", "pred_classes", "scores", "pred_areas", "best_iou", "ignored_fraction")
    joined = {f: np.concatenate([getattr(s, f) for s in stats]) for f in fields}
    return ImageMatchStats(best_gt=np.concatenate(best_gt).astype(np.int64), **joined)


def precision_recall_curve(is_true, scores, hard_false_negatives):
    """evaluateMatches' precision/recall curve, replicated operation for operation: (precision, recall).

    One point per distinct score t (precision and recall of the examples scoring >= t; the ground truth never
    matched counts as missed), by increasing score, then the point (recall 0, precision 1).
    """
    order = np.argsort(scores)
    sorted_scores, cumulative_true = scores[order], np.cumsum(is_true[order])
    _, first_index = np.unique(sorted_scores, return_index=True)
    true_before = np.append(cumulative_true, 0)[first_index - 1]
    tp = cumulative_true[-1] - true_before
    fp = len(scores) - first_index - tp
    fn = true_before + hard_false_negatives
    return np.append(tp / (tp + fp), 1.0), np.append(tp / (tp + fn), 0.0)


def curve_average_precision(is_true, scores, hard_false_negatives):
    """evaluateMatches' area under precision_recall_curve: sum_i p_i * (r_{i-1} - r_{i+1}) / 2 over the points by
    increasing score (r_{-1} = r_0, last r = 0). No examples (every prediction ignored, nothing matched) scores 0,
    where the script would raise an IndexError.
    """
    if len(scores) == 0:
        return 0.0
    precision, recall = precision_recall_curve(is_true, scores, hard_false_negatives)
    step_widths = np.convolve(np.concatenate([recall[:1], recall, [0.0]]), [-0.5, 0, 0.5], "valid")
    return float(np.dot(precision, step_widths))


def class_examples(s, c, threshold, gt_kept=None, pred_kept=None):
    """What evaluateMatches ranks for class c at an IoU threshold: (is_true, scores, hard false negatives, num_gt).

    At threshold t a prediction whose best IoU exceeds t belongs to that region: the best-scoring one of a
    matchable instance is a true positive, the others false positives, and one on a group or small region is
    dropped. Any other prediction is a false positive unless its ignored fraction exceeds t.

    Args:
        s: the concatenated ImageMatchStats.
        gt_kept: bool over s.gt_classes, None for all; the instances left out are treated like small regions
            (AP over a subset of the ground truth, e.g. one size range).
        pred_kept: bool over the predictions, None for all; an unmatched prediction left out is not a false
            positive (e.g. one outside the size range).
    """
    gt_kept = np.ones(len(s.gt_classes), bool) if gt_kept is None else gt_kept
    of_class = s.pred_classes == c
    scores, best_iou, best_gt = s.scores[of_class], s.best_iou[of_class], s.best_gt[of_class]
    matched = best_iou > threshold
    on_gt = matched & (best_gt >= 0)
    on_gt[on_gt] = gt_kept[best_gt[on_gt]]
    gt_of_match, match_scores = best_gt[on_gt], scores[on_gt]
    # Per instance, the highest score is the true positive (lexsort: by instance, then by score).
    order = np.lexsort((match_scores, gt_of_match))
    is_true = np.ones(len(order))
    is_true[order[:-1]] = gt_of_match[order[:-1]] != gt_of_match[order[1:]]
    false_positives = ~matched & (s.ignored_fraction[of_class] <= threshold)
    if pred_kept is not None:
        false_positives &= pred_kept[of_class]
    num_gt = np.count_nonzero((s.gt_classes == c) & gt_kept)
    return (
        np.concatenate([is_true, np.zeros(np.count_nonzero(false_positives))]),
        np.concatenate([match_scores, scores[false_positives]]),
        num_gt - len(np.unique(gt_of_match)),
        num_gt,
    )


def cityscapes_average_precisions(stats, num_classes, gt_kept=None, pred_kept=None):
    """(num_classes, len(IOU_THRESHOLDS)) AP as evalInstanceLevelSemanticLabeling.evaluateMatches computes it.

    `stats`: the ImageMatchStats of the images; gt_kept and pred_kept: see class_examples (over the
    concatenated stats). A class without ground truth is NaN, a class with ground truth but no prediction 0.
    """
    s = concatenate_stats(stats)
    aps = np.full((num_classes, len(IOU_THRESHOLDS)), np.nan)
    for c in range(num_classes):
        for t, threshold in enumerate(IOU_THRESHOLDS):
            is_true, scores, hard_false_negatives, num_gt = class_examples(s, c, threshold, gt_kept, pred_kept)
            if num_gt == 0:
                break
            if not np.any(s.pred_classes == c):
                aps[c] = 0.0
                break
            aps[c, t] = curve_average_precision(is_true, scores, hard_false_negatives)
    return aps


class FastCityscapesInstanceEvaluator(CityscapesEvaluatorBase):
    """Cityscapes instance AP (the official protocol and numbers) computed in memory; a detectron2 evaluator.

    process() reduces each image to ImageMatchStats where the masks are (on the GPU when the model left them
    there; only (N, M) pixel counts come to the host), reading the ground truth through the evaluator's cache
    (see CityscapesEvaluatorBase). With save_predictions, evaluate() also writes the predictions to
    output_dir/cityscapes_predictions.npz (see predictions_file) for tools/eval_report.py.

    Works under inference_on_dataset with several processes (the main one gathers and evaluates). Returns
    {"segm": {"AP", "AP50", "AP-<class>", "AP50-<class>", "matterport_AP50"}} in percent; NaN for a class that has no
    ground truth in the dataset, which the means leave out, as the script does.
    """

    def __init__(self, dataset_name, output_dir=None, cache_ground_truth=True, save_predictions=False):
        super().__init__(dataset_name, output_dir, cache_ground_truth)
        if save_predictions and not output_dir:
            raise ValueError("FastCityscapesInstanceEvaluator: save_predictions needs an output_dir to save them in")
        self._save_predictions = save_predictions

    def reset(self):
        self._stats = []
        self._matterport_aps = []
        self._encoded = []

    def process(self, inputs, outputs):
        for image, _, predictions, overlaps in self._images(inputs, outputs, on_host=False):
            self._stats.append(ImageMatchStats.compute(overlaps, predictions, self._classes))
            self._matterport_aps.append(matterport_image_ap50(overlaps, predictions, self._classes))
            if self._save_predictions:
                self._encoded.append(EncodedPredictions.encode(image["image_id"], predictions))

    def evaluate(self):
        comm.synchronize()
        stats = list(itertools.chain(*comm.gather(self._stats, dst=0)))
        matterport_aps = [ap for ap in itertools.chain(*comm.gather(self._matterport_aps, dst=0)) if ap is not None]
        encoded = list(itertools.chain(*comm.gather(self._encoded, dst=0)))
        if not comm.is_main_process():
            return {}
        self._warn_if_empty(len(stats), sum(len(s.scores) for s in stats))
        if not stats:
            return {}
        if self._save_predictions:
            path = os.path.join(self._output_dir, PREDICTIONS_FILE)
            classes = self._classes
            PredictionsFile(self._dataset_name, classes.names, classes.label_ids, encoded).save(path)
            logger.info(f"saved the predictions of {len(encoded)} images to {path}")
        aps = cityscapes_average_precisions(stats, len(self._classes.names))
        return segm_results(
            class_aps=aps.mean(axis=1),
            class_ap50s=aps[:, 0],
            mean_ap=quiet_nanmean(aps),
            mean_ap50=quiet_nanmean(aps[:, 0]),
            matterport_aps=matterport_aps,
            classes=self._classes,
            title=f"Cityscapes instance AP (fast) on {self._dataset_name}",
        )
