"""detectron2's mask head with its training targets rasterised on the model's device (mask_targets.py)."""

import torch
import torch.nn.functional as F
from detectron2.layers import cat
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead, mask_rcnn_loss
from detectron2.structures import PolygonMasks

from ..data.fast_loader import pack_polygon_edges
from .mask_targets import concat_padded, rasterize_polygons_in_boxes
from .metrics import put_scalars


def mask_targets(instances, mask_size, device):
    """(R, M, M) bool targets of the foreground proposals of all images, equal to detectron2's
    `gt_masks.crop_and_resize(proposal_boxes, M)`. Uses the `gt_polygon_edges` the fast data path packs in its
    workers; otherwise packs `gt_masks` polygons here, or crops bitmasks as detectron2 does."""
    instances = [x for x in instances if len(x)]
    if not instances:
        return torch.zeros((0, mask_size, mask_size), dtype=torch.bool, device=device)
    boxes = cat([x.proposal_boxes.tensor for x in instances])
    if all(x.has("gt_polygon_edges") for x in instances):
        edges = concat_padded([x.gt_polygon_edges for x in instances])
        return rasterize_polygons_in_boxes(edges, boxes, mask_size)
    if all(isinstance(x.gt_masks, PolygonMasks) for x in instances):
        edges = concat_padded([pack_polygon_edges(x.gt_masks.polygons) for x in instances])
        return rasterize_polygons_in_boxes(edges, boxes, mask_size)
    return cat([x.gt_masks.crop_and_resize(x.proposal_boxes.tensor, mask_size).to(device) for x in instances])


@ROI_MASK_HEAD_REGISTRY.register()
class TensorTargetsMaskHead(MaskRCNNConvUpsampleHead):
    """MaskRCNNConvUpsampleHead (same layers and weights) whose training targets are rasterised with tensor
    operations for all ROIs at once, and whose accuracy statistics cost no host sync. Same loss as
    detectron2's mask_rcnn_loss; with VIS_PERIOD > 0 it uses detectron2's (which draws the masks)."""

    def forward(self, x, instances):
        if not self.training or self.vis_period > 0:
            return super().forward(x, instances)
        logits = self.layers(x)
        if logits.shape[0] == 0:
            return {"loss_mask": mask_rcnn_loss(logits, instances) * self.loss_weight}
        targets = mask_targets(instances, logits.shape[2], logits.device)
        if logits.shape[1] > 1:  # class-specific masks: the mask of each proposal's ground-truth class
            classes = cat([x.gt_classes for x in instances if len(x)]).to(torch.int64)
            logits = logits[torch.arange(logits.shape[0], device=logits.device), classes]
        else:
            logits = logits[:, 0]
        _log_mask_accuracy(logits, targets)
        loss = F.binary_cross_entropy_with_logits(logits, targets.to(torch.float32), reduction="mean")
        return {"loss_mask": loss * self.loss_weight}


def _log_mask_accuracy(logits, targets):
    """mask_rcnn/accuracy, false_positive and false_negative, as detectron2 logs them."""
    incorrect = (logits > 0.0) != targets
    num_positive = targets.sum()
    put_scalars(
        **{
            "mask_rcnn/accuracy": 1 - incorrect.sum() / max(incorrect.numel(), 1.0),
            "mask_rcnn/false_positive": (incorrect & ~targets).sum() / (targets.numel() - num_positive).clamp(min=1),
            "mask_rcnn/false_negative": (incorrect & targets).sum() / num_positive.clamp(min=1),
        }
    )
