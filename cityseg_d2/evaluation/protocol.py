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

    @classmethod
    def official(cls):
        """The classes cityscapesscripts evaluates: its labels with instances that are not ignoreInEval."""
        labels = [label for label in CITYSCAPES_LABELS if label.hasInstances and not label.ignoreInEval]
        return cls(tuple(label.name for label in labels), tuple(label.id for label in labels))

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
    """Predicted instances of one image: (N, H, W) bool masks, float64 scores and int64 classes as numpy, and
    optionally the (N, 4) XYXY boxes the model gave, which the CPU overlap count takes as a hint.

    `masks` may instead be a torch tensor on the device the model left it on (from_output with on_host=False):
    the fast evaluator reduces the masks there, so that full masks never cross to the host.
    """

    masks: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    boxes: np.ndarray = None

    @classmethod
    def from_output(cls, output, image_id, gt_shape, gt_path, num_classes, on_host=True):
        if "instances" not in output:
            raise ValueError(f"model output of image {image_id} has no 'instances'")
        instances = output["instances"]
        if len(instances) == 0:
            return cls(np.zeros((0, *gt_shape), bool), np.zeros(0), np.zeros(0, np.int64))
        if not instances.has("pred_masks"):
            raise ValueError(f"predictions of image {image_id} have no pred_masks; instance evaluation needs masks")
        masks = instances.pred_masks
        if tuple(masks.shape[1:]) != tuple(gt_shape):
            raise ValueError(
                f"predicted masks of image {image_id} are {masks.shape[1]}x{masks.shape[2]} (HxW) but its ground "
                f"truth {gt_path} is {gt_shape[0]}x{gt_shape[1]}"
            )
        classes = instances.pred_classes.cpu().numpy().astype(np.int64)
        if classes.min() < 0 or classes.max() >= num_classes:
            raise ValueError(f"image {image_id} has predicted classes outside 0..{num_classes - 1}")
        masks = masks if masks.dtype == torch.bool else masks >= 0.5
        if on_host or masks.device.type == "cpu":
            masks = masks.cpu().numpy()
        boxes = instances.pred_boxes.tensor.cpu().numpy() if instances.has("pred_boxes") else None
        return cls(masks, instances.scores.cpu().numpy().astype(np.float64), classes, boxes)


def mask_bounding_box(mask):
    """Row and column slices of the smallest box holding a mask's pixels (a non-empty (H, W) uint8 mask)."""
    ys = np.flatnonzero(mask.max(axis=1))
    rows = slice(ys[0], ys[-1] + 1)
    xs = np.flatnonzero(mask[rows].max(axis=0))
    return rows, slice(xs[0], xs[-1] + 1)


def _hinted_box(box, shape):
    """A model's XYXY box as row and column slices, one pixel wider on each side, clipped; None if not finite."""
    if not np.all(np.isfinite(box)):
        return None
    x0, y0, x1, y1 = (int(v) for v in (np.floor(box[0]), np.floor(box[1]), np.ceil(box[2]), np.ceil(box[3])))
    return slice(max(y0 - 1, 0), min(y1 + 1, shape[0])), slice(max(x0 - 1, 0), min(x1 + 1, shape[1]))


def _masked_histogram(region_map, mask, box, num_regions):
    # OpenCV's masked histogram; its float32 counts are exact below 2**24 pixels.
    counts = cv2.calcHist([region_map[box]], [0], mask[box], [num_regions], [0, num_regions])
    return counts.ravel().astype(np.int64)


def intersections_in_boxes(masks, region_map, num_regions, boxes=None):
    """(N, M) pixels of each mask in each region, counted inside a box around each mask (on the CPU).

    A mask's box is the model's box (`boxes`, XYXY, grown by a pixel) when the pixels counted in it are all the
    mask's pixels, else its exact bounding box: the hint saves a second pass over the mask, never exactness.

    Args:
        masks: (N, H, W) bool numpy array.
        region_map: (H, W) uint8 or uint16 region index of every pixel.
        boxes: optional (N, 4) XYXY boxes, e.g. the model's pred_boxes.
    """
    intersections = np.zeros((len(masks), num_regions), np.int64)
    for i, mask in enumerate(np.ascontiguousarray(masks).view(np.uint8)):
        area = cv2.countNonZero(mask)
        if area == 0:
            continue
        box = None if boxes is None else _hinted_box(boxes[i], mask.shape)
        if box is not None:
            intersections[i] = _masked_histogram(region_map, mask, box, num_regions)
            if intersections[i].sum() == area:
                continue
        intersections[i] = _masked_histogram(region_map, mask, mask_bounding_box(mask), num_regions)
    return intersections


# Elements of the int32 running sums intersections_by_runs holds at once (256 MB).
_RUNS_CHUNK_ELEMENTS = 2**26


def intersections_by_runs(masks, regions):
    """(N, M) pixels of each mask in each region (numpy), reduced on the masks' device (for masks on a GPU).

    A running sum of each mask in raster order, read at the starts and ends of the ground truth's runs, gives
    each run's pixels; the runs, ordered by region, are then summed per region: exact integer arithmetic, no
    atomics, and only the (N, M) counts leave the device.
    """
    n, height, width = masks.shape
    size, num_regions = height * width, len(regions.region_ids)
    if n == 0:
        return np.zeros((0, num_regions), np.int64)
    device = masks.device
    order = np.argsort(regions.run_regions, kind="stable")
    ends = np.append(regions.run_starts[1:], size).astype(np.int64)
    run_ends = torch.as_tensor(ends[order] - 1, device=device)
    run_starts = torch.as_tensor(regions.run_starts[order].astype(np.int64), device=device)
    # Runs per region, in that order; a region always has at least one run.
    last_run = torch.as_tensor(np.cumsum(np.bincount(regions.run_regions, minlength=num_regions)) - 1, device=device)
    flat = masks.reshape(n, size)
    intersections = []
    step = max(1, _RUNS_CHUNK_ELEMENTS // size)
    for first in range(0, n, step):
        running = torch.cumsum(flat[first : first + step], dim=1, dtype=torch.int32)
        before = torch.where(run_starts > 0, running[:, (run_starts - 1).clamp(min=0)], 0)
        per_run = (running[:, run_ends] - before).to(torch.int64)
        by_region = per_run.cumsum(dim=1)[:, last_run]
        intersections.append(torch.diff(by_region, dim=1, prepend=torch.zeros_like(by_region[:, :1])))
    return torch.cat(intersections).cpu().numpy()


@dataclass
class ImageOverlaps:
    """Ground-truth regions (distinct instanceIds values) of an image and each predicted mask's pixels in each."""

    region_ids: np.ndarray  # (M,) instanceIds values present in the image
    region_areas: np.ndarray  # (M,) pixels of each region
    intersections: np.ndarray  # (N, M) pixels of prediction n inside region m

    @classmethod
    def compute(cls, regions, predictions):
        """regions: the image's GroundTruthRegions; predictions: its ImagePredictions, masks on the host (numpy)
        or on a device (torch)."""
        masks = predictions.masks
        if isinstance(masks, torch.Tensor):
            intersections = intersections_by_runs(masks, regions)
        else:
            region_map = regions.region_map()
            intersections = intersections_in_boxes(masks, region_map, len(regions.region_ids), predictions.boxes)
        return cls(regions.region_ids, regions.region_areas, intersections)

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
