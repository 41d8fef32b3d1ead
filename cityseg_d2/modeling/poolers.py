"""ROI pooling over feature pyramid levels with one host sync per call instead of one per level."""

import torch
from detectron2.modeling.poolers import assign_boxes_to_levels, convert_boxes_to_pooler_format
from torch import nn


class LevelSortedPooling(nn.Module):
    """Wraps a detectron2 ROIPooler (which holds no parameters, so checkpoints are unchanged): the boxes are
    sorted by their pyramid level once and split by the level counts, read in one host sync, where ROIPooler
    runs `nonzero` (a host sync) for every level. Same pooling, same output."""

    def __init__(self, pooler):
        super().__init__()
        self.pooler = pooler

    def forward(self, x, box_lists):
        pooler = self.pooler
        levels = len(pooler.level_poolers)
        if levels == 1 or not box_lists or sum(len(b) for b in box_lists) == 0:
            return pooler(x, box_lists)
        boxes = convert_boxes_to_pooler_format(box_lists)
        assignments = assign_boxes_to_levels(
            box_lists, pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level
        )
        order = torch.argsort(assignments, stable=True)
        counts = torch.bincount(assignments, minlength=levels).tolist()  # the one host sync
        size = pooler.output_size[0]
        output = torch.zeros((len(boxes), x[0].shape[1], size, size), dtype=x[0].dtype, device=x[0].device)
        start = 0
        for level, (level_pooler, count) in enumerate(zip(pooler.level_poolers, counts)):
            if count:
                index = order[start : start + count]
                output.index_put_((index,), level_pooler(x[level], boxes[index]))
            start += count
        return output
