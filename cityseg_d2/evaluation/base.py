"""What the official and the fast Cityscapes instance evaluators share: reading each processed image's ground truth
and predictions, and reporting detectron2-style results.
"""

import logging
import warnings
from collections import OrderedDict

import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from tabulate import tabulate

from cityseg_d2.data import gt_instance_ids_path

from .protocol import EvaluatedClasses, ImageOverlaps, ImagePredictions, read_gt_instance_ids

logger = logging.getLogger(__name__)


def quiet_nanmean(values):
    """np.nanmean without its warning when everything is NaN (classes absent from the ground truth)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def segm_results(class_aps, class_ap50s, mean_ap, mean_ap50, matterport_aps, classes, title):
    """detectron2-style {"segm": {...}} in percent, logged as a per-class table.

    Args:
        class_aps, class_ap50s: per class (NaN for a class without ground truth), in [0, 1].
        mean_ap, mean_ap50: their NaN-ignoring means, in [0, 1].
        matterport_aps: the student project's per-image AP50 of the images with ground-truth instances.
    """
    segm = OrderedDict(AP=100 * float(mean_ap), AP50=100 * float(mean_ap50))
    for name, ap, ap50 in zip(classes.names, class_aps, class_ap50s):
        segm[f"AP-{name}"] = 100 * float(ap)
        segm[f"AP50-{name}"] = 100 * float(ap50)
    segm["matterport_AP50"] = 100 * quiet_nanmean(matterport_aps) if len(matterport_aps) else float("nan")
    rows = [(name, segm[f"AP-{name}"], segm[f"AP50-{name}"]) for name in classes.names]
    rows.append(("average", segm["AP"], segm["AP50"]))
    table = tabulate(rows, headers=["class", "AP", "AP50"], tablefmt="pipe", floatfmt=".3f", numalign="left")
    logger.info(f"{title}:\n{table}\nmatterport_AP50 (mean per-image AP@0.5 of the student project, Matterport's compute_ap): {segm['matterport_AP50']:.3f}")
    return OrderedDict(segm=segm)


class CityscapesEvaluatorBase(DatasetEvaluator):
    """Reads each processed image's ground truth and predictions; both Cityscapes evaluators build on it."""

    def __init__(self, dataset_name):
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._classes = EvaluatedClasses.of_dataset(dataset_name)

    def _images(self, inputs, outputs):
        """(dataset dict, ground-truth path, ImagePredictions, ImageOverlaps) of each processed image."""
        for inputs_of_image, output in zip(inputs, outputs):
            gt_path = gt_instance_ids_path(inputs_of_image, self._metadata)
            gt_ids = read_gt_instance_ids(gt_path)
            predictions = ImagePredictions.from_output(
                output, inputs_of_image["image_id"], gt_ids.shape, gt_path, len(self._classes.names)
            )
            yield inputs_of_image, gt_path, predictions, ImageOverlaps.compute(gt_ids, predictions.masks)

    def _warn_if_empty(self, num_images, num_predictions):
        if num_images == 0:
            logger.warning(f"{type(self).__name__} on {self._dataset_name}: no images were processed; no results")
        elif num_predictions == 0:
            logger.warning(f"{type(self).__name__} on {self._dataset_name}: no predicted instances; AP is 0")
