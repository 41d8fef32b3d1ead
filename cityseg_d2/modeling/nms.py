"""Greedy non-maximum suppression of many independent groups at once, on the device, with few host syncs.

torchvision's NMS handles one list of boxes per call and ends in a host sync (its output length). detectron2's
RPN calls it once per image (its levels separated by a coordinate offset, which also makes it compare boxes of
different levels that can never suppress each other). Here all (image, level) groups are suppressed together:
the IoU > threshold relation of each group is one (K, K) block, and the greedy result is the unique fixed point
of "a box is kept when no kept box scored higher suppresses it", reached by iterating that rule from "all kept".
The iteration is exact (each round fixes at least the next box of every group), and the host checks for the
fixed point after 4, 8, 16, ... rounds, so a batch costs a few syncs instead of one per image.
"""

import torch

from ..errors import ConfigError

# CITYSEG.FAST.NMS: detectron2's torchvision call per image, or grouped_nms over the whole batch.
NMS_METHODS = ("torchvision", "grouped")


def check_nms_method(name):
    if name not in NMS_METHODS:
        raise ConfigError(f"CITYSEG.FAST.NMS is {name!r}: use one of {', '.join(NMS_METHODS)}")
    return name


# Groups x K x K IoU elements computed at once (float32 temporaries of a chunk stay under ~1 GB).
_CHUNK_ELEMENTS = 1 << 26


def suppression_matrix(boxes, valid, iou_threshold):
    """(G, K, K) bool: [g, j, i] when box j of group g scores higher than box i (j < i: boxes are sorted by
    score) and their IoU exceeds the threshold; invalid boxes suppress nothing."""
    groups, k = boxes.shape[:2]
    step = max(1, _CHUNK_ELEMENTS // max(k * k, 1))
    earlier = torch.ones((k, k), dtype=torch.bool, device=boxes.device).triu_(diagonal=1)
    chunks = []
    for start in range(0, groups, step):
        b = boxes[start : start + step]
        area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
        width_height = torch.min(b[:, :, None, 2:], b[:, None, :, 2:]) - torch.max(b[:, :, None, :2], b[:, None, :, :2])
        inter = width_height.clamp_(min=0).prod(dim=3)
        iou = inter / (area[:, :, None] + area[:, None, :] - inter)
        chunks.append((iou > iou_threshold) & earlier & valid[start : start + step, :, None])
    return torch.cat(chunks)


def grouped_nms(boxes, valid, iou_threshold):
    """(G, K) bool mask of the boxes greedy NMS keeps in each group; boxes (G, K, 4) sorted by decreasing score
    within each group, valid (G, K) marks real boxes (padding and invalid boxes are never kept)."""
    suppresses = suppression_matrix(boxes, valid, iou_threshold).to(
        torch.float32 if boxes.device.type == "cpu" else torch.float16
    )
    keep = valid.clone()
    rounds = 4
    while True:
        for _ in range(rounds):
            previous = keep
            keep = valid & ~(torch.bmm(keep[:, None, :].to(suppresses.dtype), suppresses)[:, 0] > 0)
        if torch.equal(keep, previous):
            return keep
        rounds *= 2
