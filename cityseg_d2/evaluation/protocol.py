"""The Cityscapes instance protocol's ground truth and predictions: its constants, the evaluated classes, an image's
instanceIds, its predicted masks and their overlaps with its ground-truth regions.

The protocol is cityscapesscripts' evalInstanceLevelSemanticLabeling: AP averaged over mask IoU thresholds
0.5:0.95, ground-truth instances under 100 pixels and group regions (instance id < 1000) are not matched, and an
unmatched prediction that mostly covers void, group or small regions is not a false positive.
"""

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from detectron2.data import MetadataCatalog

# evalInstanceLevelSemanticLabeling's args.overlaps and args.minRegionSizes[0] (without distances).
IOU_THRESHOLDS = np.arange(0.5, 1.0, 0.05)
MIN_REGION_SIZE = 100
# Cityscapes instance ids: label_id * 1000 + index; a smaller value is a group (crowd) region or a stuff label.
INSTANCE_ID_OFFSET = 1000


@dataclass(frozen=True)
class EvaluatedClasses:
    """The dataset's thing classes, which are the evaluated ones, and the ground-truth values that are void.

    Void is every cityscapesscripts label with ignoreInEval except the evaluated labels: for "cityscapes8" that
    is exactly the official set; "cityscapes10" evaluates caravan and trailer like the other classes instead of as void.
    """

    names: tuple
    label_ids: tuple

    @classmethod
    def of_dataset(cls, dataset_name):
        metadata = MetadataCatalog.get(dataset_name)
        for key in ("gt_dir", "thing_classes", "thing_label_ids"):
            if not hasattr(metadata, key):
                raise ValueError(
                    f"dataset {dataset_name!r} has no {key!r} metadata; the Cityscapes evaluators need a dataset "
                    "registered with cityseg_d2.data.register_cityscapes_instances"
                )
        return cls(tuple(metadata.thing_classes), tuple(int(i) for i in metadata.thing_label_ids))

    @property
    def void_label_ids(self):
        return tuple(
            label.id
            for label in CITYSCAPES_LABELS
            if label.ignoreInEval and label.id >= 0 and label.id not in self.label_ids
        )

    def class_of_labels(self, label_ids):
        """Contiguous class of each Cityscapes label id, -1 for labels that are not evaluated."""
        lookup = np.full(max(max(self.label_ids), int(np.max(label_ids, initial=0))) + 1, -1, np.int64)
        lookup[list(self.label_ids)] = np.arange(len(self.label_ids))
        return lookup[label_ids]


def read_gt_instance_ids(path):
    """The instanceIds PNG as a 2-D integer array (the pixels cityscapesscripts reads with PIL)."""
    gt_ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if gt_ids is None:
        raise FileNotFoundError(f"ground-truth instance image {path} not found or unreadable (metadata gt_dir wrong?)")
    if gt_ids.ndim != 2 or gt_ids.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"ground-truth instance image {path} is not a single-channel 8- or 16-bit PNG")
    return gt_ids


@dataclass
class ImagePredictions:
    """Predicted instances of one image as numpy: (N, H, W) bool masks, float64 scores, int64 classes."""

    masks: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @classmethod
    def from_output(cls, output, image_id, gt_shape, gt_path, num_classes):
        if "instances" not in output:
            raise ValueError(f"model output of image {image_id} has no 'instances'")
        instances = output["instances"].to(torch.device("cpu"))
        if len(instances) == 0:
            return cls(np.zeros((0, *gt_shape), bool), np.zeros(0), np.zeros(0, np.int64))
        if not instances.has("pred_masks"):
            raise ValueError(f"predictions of image {image_id} have no pred_masks; instance evaluation needs masks")
        masks = instances.pred_masks.numpy()
        if masks.shape[1:] != tuple(gt_shape):
            raise ValueError(
                f"predicted masks of image {image_id} are {masks.shape[1]}x{masks.shape[2]} (HxW) but its ground "
                f"truth {gt_path} is {gt_shape[0]}x{gt_shape[1]}"
            )
        classes = instances.pred_classes.numpy().astype(np.int64)
        if classes.min() < 0 or classes.max() >= num_classes:
            raise ValueError(f"image {image_id} has predicted classes outside 0..{num_classes - 1}")
        masks = masks if masks.dtype == bool else masks >= 0.5
        return cls(masks, instances.scores.numpy().astype(np.float64), classes)


@dataclass
class ImageOverlaps:
    """Ground-truth regions (distinct instanceIds values) of an image and each predicted mask's pixels in each."""

    region_ids: np.ndarray  # (M,) instanceIds values present in the image
    region_areas: np.ndarray  # (M,) pixels of each region
    intersections: np.ndarray  # (N, M) pixels of prediction n inside region m

    @classmethod
    def compute(cls, gt_ids, masks):
        # Pixels per instanceIds value by OpenCV's histogram (several times faster than np.bincount; its float32
        # counts are exact below 2**24 pixels), then each pixel's region index through a lookup table.
        if gt_ids.size < 2**24:
            counts = cv2.calcHist([gt_ids], [0], None, [65536], [0, 65536]).ravel().astype(np.int64)
        else:
            counts = np.bincount(gt_ids.ravel(), minlength=65536)
        region_ids = np.flatnonzero(counts)
        lookup = np.zeros(len(counts), np.int32)
        lookup[region_ids] = np.arange(len(region_ids))
        region_map = np.take(lookup, gt_ids)
        intersections = np.zeros((len(masks), len(region_ids)), np.int64)
        # Counting inside each mask's bounding box keeps the work proportional to the masks, not the image.
        rows, cols = masks.any(axis=2), masks.any(axis=1)
        for i, mask in enumerate(masks):
            ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
            if ys.size:
                box = slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1)
                intersections[i] = np.bincount(region_map[box][mask[box]], minlength=len(region_ids))
        return cls(region_ids, counts[region_ids], intersections)

    @property
    def region_labels(self):
        return np.where(self.region_ids < INSTANCE_ID_OFFSET, self.region_ids, self.region_ids // INSTANCE_ID_OFFSET)

    @property
    def is_instance(self):
        return self.region_ids >= INSTANCE_ID_OFFSET

    def ious(self):
        """(N, M) mask IoU of each prediction with each region."""
        areas = self.intersections.sum(axis=1)
        return self.intersections / (self.region_areas[None, :] + areas[:, None] - self.intersections)
