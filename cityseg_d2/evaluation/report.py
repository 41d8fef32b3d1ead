"""The evaluation report: where a model's Cityscapes AP comes from and where it is lost.

Built from a predictions file (see predictions_file) and the data set's ground truth with the fast evaluator's
own per-image matching (ImageMatchStats), so every AP in it is the official protocol's: the per-class AP equals
the evaluator's. On top of the protocol it measures, at IoU 0.5 and for the detections scoring at least a
threshold, what each detection is (true positive, duplicate, wrong class, poor localisation, background, or
ignored by the protocol) and which ground-truth instances are missed, by size and by occlusion.

Sizes are COCO's pixel-area ranges. Occlusion is measured with the polygons: an instance's visible pixels (its
instanceIds region) over the pixels its own polygon covers in the image (drawn alone, as json2instanceImg
draws it); an instance nothing covers is 100% visible. Without gtFine_polygons.json files it is left out.
"""

import json
import os
from dataclasses import dataclass

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from cityscapesscripts.helpers.labels import name2label
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image, ImageDraw

from ..data import gt_instance_ids_path
from ..errors import UserError
from .base import quiet_nanmean
from .fast_cityscapes import (
    ImageMatchStats,
    cityscapes_average_precisions,
    class_examples,
    concatenate_stats,
    matchable_regions,
    precision_recall_curve,
)
from .ground_truth import GroundTruthRegions
from .protocol import INSTANCE_ID_OFFSET, IOU_THRESHOLDS, EvaluatedClasses, ImageOverlaps

MATCH_IOU = 0.5
# A false positive overlapping an instance of its class by more than this (and at most MATCH_IOU) is poorly
# localised rather than on the background.
LOCALISATION_IOU = 0.1
# Points kept of each precision-recall curve for the plots and report.json (a curve has a point per distinct score).
CURVE_POINTS = 500
SIZE_RANGES = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, np.inf)}
VISIBLE_RANGES = {"< 25% visible": (0, 0.25), "25-50%": (0.25, 0.5), "50-75%": (0.5, 0.75), ">= 75%": (0.75, 2)}
# What a detection is at IoU 0.5, in report order.
OUTCOMES = ("true positive", "duplicate", "wrong class", "poor localisation", "background", "ignored")
FALSE_POSITIVES = OUTCOMES[1:5]


def full_instance_areas(polygons_file, shape):
    """{instance id: pixels of its own polygon inside the image} of a gtFine_polygons.json, with the instance ids
    cityscapesscripts' json2instanceImg gives (label id * 1000 + its count of that label so far)."""
    with open(polygons_file) as f:
        objects = json.load(f)["objects"]
    height, width = shape
    seen = {label.name: 0 for label in CITYSCAPES_LABELS if label.hasInstances}
    areas = {}
    for obj in objects:
        name = obj.get("label", "")
        if obj.get("deleted") or name not in seen:  # groups ("cargroup"), stuff and unknown labels have no id
            continue
        label = name2label[name]
        instance_id = label.id * INSTANCE_ID_OFFSET + seen[name]
        seen[name] += 1
        polygon = np.asarray(obj["polygon"], np.float64).reshape(-1, 2)
        x0, y0 = np.maximum(np.floor(polygon.min(axis=0)).astype(int) - 1, 0)
        x1, y1 = np.minimum(np.ceil(polygon.max(axis=0)).astype(int) + 2, [width, height])
        if x1 <= x0 or y1 <= y0:
            areas[instance_id] = 0
            continue
        canvas = Image.new("L", (int(x1 - x0), int(y1 - y0)))
        ImageDraw.Draw(canvas).polygon([(x - x0, y - y0) for x, y in polygon], fill=1)
        areas[instance_id] = int(np.count_nonzero(np.asarray(canvas)))
    return areas


@dataclass
class ImageInfo:
    """An image of the report: where its files are, its predictions (encoded), and its errors at IoU 0.5."""

    image_id: str
    file_name: str
    gt_path: str
    encoded: object  # EncodedPredictions
    kept: np.ndarray  # positions of the non-empty predicted masks, the ones the protocol sees
    false_positives: int = 0
    false_negatives: int = 0


@dataclass
class ReportData:
    """The matched predictions and ground truth of all images.

    stats: the concatenated ImageMatchStats. Per kept prediction: image (its ImageInfo's position),
    instance_iou (best IoU with a matchable instance of its class, 0 if none), other_iou and other_class (best
    IoU with a matchable instance of another class, and that class; -1 if none). Per matchable instance:
    gt_image, gt_region (its instanceIds value) and visible (visible fraction, NaN when its polygons are
    unknown).
    """

    dataset: str
    classes: EvaluatedClasses
    images: list
    stats: ImageMatchStats
    image: np.ndarray
    instance_iou: np.ndarray
    other_iou: np.ndarray
    other_class: np.ndarray
    gt_image: np.ndarray
    gt_region: np.ndarray
    visible: np.ndarray


def _visible_fractions(gt_path, region_ids, region_areas, shape):
    polygons = gt_path.replace("_gtFine_instanceIds.png", "_gtFine_polygons.json")
    if not os.path.isfile(polygons):
        return np.full(len(region_ids), np.nan)
    full = full_instance_areas(polygons, shape)
    return np.array([min(area / full[i], 1.0) if full.get(i) else np.nan for i, area in zip(region_ids, region_areas)])


def collect(predictions, dataset_name=None):
    """ReportData of a PredictionsFile on its data set (or dataset_name's); UserError when they do not fit."""
    dataset_name = dataset_name or predictions.dataset
    if dataset_name not in DatasetCatalog.list():
        raise UserError(
            f"data set {dataset_name!r} of the predictions is not registered: pass the --config-file that registers "
            "it, or --dataset"
        )
    classes = EvaluatedClasses.of_dataset(dataset_name)
    if predictions.class_names != classes.names:
        raise UserError(
            f"the predictions are of the classes {list(predictions.class_names)} but {dataset_name} has "
            f"{list(classes.names)}: use the data set (and DATASETS.CITYSCAPES.CLASS_SET) they were made on"
        )
    metadata = MetadataCatalog.get(dataset_name)
    dicts = {d["image_id"]: d for d in DatasetCatalog.get(dataset_name)}
    images, stats, per_prediction, per_gt = [], [], [], []
    for encoded in predictions.images:
        if encoded.image_id not in dicts:
            raise UserError(f"image {encoded.image_id} of the predictions is not in {dataset_name}")
        gt_path = gt_instance_ids_path(dicts[encoded.image_id], metadata)
        regions = GroundTruthRegions.read(gt_path)
        if tuple(regions.shape) != tuple(encoded.shape):
            raise UserError(
                f"the predictions of {encoded.image_id} are {encoded.shape[0]}x{encoded.shape[1]} but {gt_path} is "
                f"{regions.shape[0]}x{regions.shape[1]}"
            )
        image_predictions = encoded.decode()
        overlaps = ImageOverlaps.compute(regions, image_predictions)
        stats.append(ImageMatchStats.compute(overlaps, image_predictions, classes))
        kept = np.flatnonzero(overlaps.intersections.sum(axis=1) > 0)
        region_classes, matchable = matchable_regions(overlaps, classes)
        ious = overlaps.ious()[kept][:, matchable]
        gt_classes, pred_classes = region_classes[matchable], image_predictions.classes[kept]
        same = gt_classes[None, :] == pred_classes[:, None]
        other = np.where(same, -1.0, ious)
        other_iou = other.max(axis=1, initial=-1.0)
        other_class = gt_classes[np.argmax(other, axis=1)] if len(gt_classes) else np.zeros(len(kept), np.int64)
        per_prediction.append(
            (
                np.full(len(kept), len(images)),
                np.where(same, ious, 0.0).max(axis=1, initial=0.0),
                other_iou,
                np.where(other_iou >= 0, other_class, -1),
            )
        )
        gt_regions = overlaps.region_ids[matchable]
        visible = _visible_fractions(gt_path, gt_regions, overlaps.region_areas[matchable], regions.shape)
        per_gt.append((np.full(len(gt_classes), len(images)), gt_regions, visible))
        images.append(ImageInfo(encoded.image_id, dicts[encoded.image_id]["file_name"], gt_path, encoded, kept))
    if not images:
        raise UserError(f"the predictions file holds no images of {dataset_name}: nothing to report")
    image, instance_iou, other_iou, other_class = (np.concatenate(parts) for parts in zip(*per_prediction))
    gt_image, gt_region, visible = (np.concatenate(parts) for parts in zip(*per_gt))
    return ReportData(
        dataset_name,
        classes,
        images,
        concatenate_stats(stats),
        image,
        instance_iou,
        other_iou,
        other_class.astype(np.int64),
        gt_image,
        gt_region,
        visible,
    )


def outcomes(data):
    """(what each kept prediction is at IoU 0.5, as an index into OUTCOMES; for each matchable instance, the
    position of its true positive among the predictions, -1 when none matches it)."""
    s = data.stats
    matched = s.best_iou > MATCH_IOU
    on_gt = matched & (s.best_gt >= 0)
    positions = np.flatnonzero(on_gt)
    # Per instance, the highest score is the true positive (the order class_examples ranks them in).
    order = positions[np.lexsort((s.scores[positions], s.best_gt[positions]))]
    last_of_instance = np.ones(len(order), bool)
    last_of_instance[:-1] = s.best_gt[order][1:] != s.best_gt[order][:-1]
    true_positive = np.full(len(s.gt_classes), -1)
    true_positive[s.best_gt[order[last_of_instance]]] = order[last_of_instance]
    result = np.full(len(s.scores), OUTCOMES.index("background"))
    result[positions] = OUTCOMES.index("duplicate")
    result[true_positive[true_positive >= 0]] = OUTCOMES.index("true positive")
    ignored = (matched & (s.best_gt < 0)) | (~matched & (s.ignored_fraction > MATCH_IOU))
    result[ignored] = OUTCOMES.index("ignored")
    false_positive = ~matched & ~ignored
    result[false_positive & (data.instance_iou > LOCALISATION_IOU)] = OUTCOMES.index("poor localisation")
    result[false_positive & (data.other_iou > MATCH_IOU)] = OUTCOMES.index("wrong class")
    return result, true_positive


def _percent(values):
    return [None if np.isnan(v) else 100 * float(v) for v in values]


def _range_mask(values, value_range):
    low, high = value_range
    return (values >= low) & (values < high)


def analyze(data, score_threshold=0.5, gallery_size=6):
    """The report's numbers as a JSON-able dict (APs in percent, like the evaluators' results)."""
    s, names = data.stats, list(data.classes.names)
    num_classes = len(names)
    aps = cityscapes_average_precisions([s], num_classes)
    report = {
        "dataset": data.dataset,
        "images": len(data.images),
        "predictions": int(len(s.scores)),
        "ground_truth_instances": int(len(s.gt_classes)),
        "score_threshold": score_threshold,
        "iou_thresholds": [round(float(t), 2) for t in IOU_THRESHOLDS],
        "classes": names,
        "AP": 100 * quiet_nanmean(aps),
        "AP50": 100 * quiet_nanmean(aps[:, 0]),
        "per_class": {
            name: {"AP": _percent([quiet_nanmean(aps[c])])[0], "AP50": _percent([aps[c, 0]])[0]}
            for c, name in enumerate(names)
        },
        "ap_by_iou": {
            "mean": _percent([quiet_nanmean(aps[:, t]) for t in range(len(IOU_THRESHOLDS))]),
            **{name: _percent(aps[c]) for c, name in enumerate(names)},
        },
    }
    curves = {}
    for c, name in enumerate(names):
        curves[name] = {}
        for t, threshold in enumerate(IOU_THRESHOLDS):
            is_true, scores, hard_false_negatives, num_gt = class_examples(s, c, threshold)
            if num_gt and len(scores):
                precision, recall = precision_recall_curve(is_true, scores, hard_false_negatives)
                points = np.unique(np.linspace(0, len(precision) - 1, min(len(precision), CURVE_POINTS)).astype(int))
                curves[name][f"{threshold:.2f}"] = {
                    "precision": precision[points].tolist(),
                    "recall": recall[points].tolist(),
                }
    report["pr_curves"] = curves
    report["ap_by_size"] = {}
    for size, size_range in SIZE_RANGES.items():
        gt_kept, pred_kept = _range_mask(s.gt_areas, size_range), _range_mask(s.pred_areas, size_range)
        size_aps = cityscapes_average_precisions([s], num_classes, gt_kept, pred_kept)
        report["ap_by_size"][size] = {
            "pixels": [size_range[0], None if np.isinf(size_range[1]) else size_range[1]],
            "instances": int(gt_kept.sum()),
            "AP": 100 * quiet_nanmean(size_aps),
            "AP50": 100 * quiet_nanmean(size_aps[:, 0]),
            "per_class": {name: _percent([quiet_nanmean(size_aps[c])])[0] for c, name in enumerate(names)},
        }

    outcome, true_positive = outcomes(data)
    shown = s.scores >= score_threshold
    found = np.zeros(len(s.gt_classes), bool)
    found[true_positive >= 0] = shown[true_positive[true_positive >= 0]]
    report["detections"] = {
        name: {kind: int(np.sum(shown & (s.pred_classes == c) & (outcome == k))) for k, kind in enumerate(OUTCOMES)}
        for c, name in enumerate(names)
    }
    columns = [*names, "ignored", "background"]
    confusion = np.zeros((num_classes, len(columns)), np.int64)
    on_own = data.instance_iou > MATCH_IOU
    on_other = (data.other_iou > MATCH_IOU) & (data.other_iou > data.instance_iou)
    column = np.where(outcome == OUTCOMES.index("ignored"), num_classes, num_classes + 1)
    column = np.where(on_own, s.pred_classes, column)
    column = np.where(on_other, data.other_class, column)
    np.add.at(confusion, (s.pred_classes[shown], column[shown]), 1)
    report["confusion"] = {"rows": names, "columns": columns, "counts": confusion.tolist()}

    missed = ~found
    report["false_negatives"] = {
        "per_class": {
            name: {"missed": int(np.sum(missed & (s.gt_classes == c))), "instances": int(np.sum(s.gt_classes == c))}
            for c, name in enumerate(names)
        },
        "by_size": {
            size: {"missed": int(np.sum(missed & in_range)), "instances": int(np.sum(in_range))}
            for size, in_range in ((k, _range_mask(s.gt_areas, r)) for k, r in SIZE_RANGES.items())
        },
        "by_visibility": {
            bucket: {"missed": int(np.sum(missed & in_range)), "instances": int(np.sum(in_range))}
            for bucket, in_range in ((k, _range_mask(data.visible, r)) for k, r in VISIBLE_RANGES.items())
        },
        "visibility_unknown": int(np.sum(np.isnan(data.visible))),
    }

    is_false_positive = shown & np.isin(outcome, [OUTCOMES.index(k) for k in FALSE_POSITIVES])
    fp_per_image = np.bincount(data.image[is_false_positive], minlength=len(data.images))
    fn_per_image = np.bincount(data.gt_image[missed], minlength=len(data.images))
    for info, fp, fn in zip(data.images, fp_per_image, fn_per_image):
        info.false_positives, info.false_negatives = int(fp), int(fn)
    worst = sorted(range(len(data.images)), key=lambda i: -(fp_per_image[i] + fn_per_image[i]))
    report["worst_images"] = [
        {
            "image_id": data.images[i].image_id,
            "false_positives": int(fp_per_image[i]),
            "false_negatives": int(fn_per_image[i]),
        }
        for i in worst[:gallery_size]
        if fp_per_image[i] + fn_per_image[i] > 0
    ]
    return report, outcome, found
