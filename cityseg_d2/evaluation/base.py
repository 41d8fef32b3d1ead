"""What the official and the fast Cityscapes instance evaluators share: reading each processed image's ground truth
and predictions, and reporting detectron2-style results.
"""

import logging
import os
import warnings
from collections import OrderedDict

import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from tabulate import tabulate

from cityseg_d2.data import gt_instance_ids_path
from cityseg_d2.data.cache import cache_dir

from .ground_truth import CACHE_DIR, GroundTruthCache, GroundTruthRegions
from .protocol import EvaluatedClasses, ImageOverlaps, ImagePredictions

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
    logger.info(
        f"{title}:\n{table}\nmatterport_AP50 (mean per-image AP@0.5 of the student project, Matterport's "
        f"compute_ap): {segm['matterport_AP50']:.3f}"
    )
    return OrderedDict(segm=segm)


class CityscapesEvaluatorBase(DatasetEvaluator):
    """Reads each processed image's ground truth and predictions; both Cityscapes evaluators build on it.

    With cache_ground_truth, each image's ground truth is decoded once and kept in the dataset cache
    (cityseg_d2.data.cache.cache_dir()/cityscapes_gt_regions, see ground_truth.GroundTruthCache), so every later
    evaluation, of any training or sweep trial on this machine, skips the PNGs.
    """

    def __init__(self, dataset_name, output_dir=None, cache_ground_truth=True):
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._classes = EvaluatedClasses.of_dataset(dataset_name)
        self._output_dir = output_dir
        self._gt_cache = GroundTruthCache(os.path.join(cache_dir(), CACHE_DIR)) if cache_ground_truth else None

    def _images(self, inputs, outputs, on_host=True):
        """(dataset dict, ground-truth path, ImagePredictions, ImageOverlaps) of each processed image; with
        on_host=False the masks stay where the model put them (see ImagePredictions)."""
        for inputs_of_image, output in zip(inputs, outputs):
            gt_path = gt_instance_ids_path(inputs_of_image, self._metadata)
            regions = self._gt_cache.load(gt_path) if self._gt_cache else GroundTruthRegions.read(gt_path)
            predictions = ImagePredictions.from_output(
                output, inputs_of_image["image_id"], regions.shape, gt_path, len(self._classes.names), on_host
            )
            yield inputs_of_image, gt_path, predictions, ImageOverlaps.compute(regions, predictions)

    def _warn_if_empty(self, num_images, num_predictions):
        if num_images == 0:
            logger.warning(f"{type(self).__name__} on {self._dataset_name}: no images were processed; no results")
        elif num_predictions == 0:
            logger.warning(f"{type(self).__name__} on {self._dataset_name}: no predicted instances; AP is 0")
