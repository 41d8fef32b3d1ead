"""detectron2's RPN with anchor labelling, losses and proposal selection done for the whole batch at once.

Same parameters (checkpoints are interchangeable), same rules: anchors matched by detectron2's Matcher, random
positive/negative samples in detectron2's proportions, the same losses, the same proposals (per image and
level top-k, clipping, empty boxes dropped, NMS within each level, the best post-NMS boxes). What changes is
that no step runs once per image or waits for the GPU: one matching over padded ground truth, one sampling, one
loss over masks instead of boolean indexing, and statistics logged through `put_scalars`. NMS is detectron2's
(torchvision, per image) or `grouped_nms` over all images and levels at once (`CITYSEG.FAST.NMS`).
"""

from typing import List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances

from .metrics import put_scalars
from .nms import check_nms_method, grouped_nms
from .sampling import match, pad_boxes, sample


def host_values_to(values, device, dtype=torch.float32):
    """A tensor of host values (e.g. image sizes) on `device`, copied without waiting for the device (a plain
    copy from pageable memory waits for everything queued before it)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@PROPOSAL_GENERATOR_REGISTRY.register()
class BatchedRPN(RPN):
    """RPN whose training targets, losses and proposals are computed for all images of a batch at once."""

    @configurable
    def __init__(self, *, nms_method="torchvision", **kwargs):
        super().__init__(**kwargs)
        self.nms_method = check_nms_method(nms_method)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["nms_method"] = cfg.CITYSEG.FAST.NMS
        return ret

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """(B, A) labels (1 sampled positive, 0 sampled negative, -1 ignored) and (B, A, 4) matched gt boxes."""
        anchors = Boxes.cat(anchors)
        gt, gt_valid = pad_boxes([x.gt_boxes.tensor for x in gt_instances], anchors.device)
        matched, labels = match(gt, gt_valid, anchors.tensor, self.anchor_matcher)
        if self.anchor_boundary_thresh >= 0:
            inside = torch.stack([anchors.inside_box(x.image_size, self.anchor_boundary_thresh) for x in gt_instances])
            labels.masked_fill_(~inside, -1)
        positive, negative = sample(labels == 1, labels == 0, self.batch_size_per_image, self.positive_fraction)
        labels = torch.full_like(labels, -1).masked_fill_(negative, 0).masked_fill_(positive, 1)
        matched_boxes = gt.gather(1, matched[..., None].expand(-1, -1, 4))
        return labels, matched_boxes

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        if self.box_reg_loss_type != "smooth_l1":
            return super().losses(anchors, pred_objectness_logits, list(gt_labels), pred_anchor_deltas, list(gt_boxes))
        num_images = gt_labels.shape[0]
        positive = gt_labels == 1
        valid = gt_labels >= 0
        put_scalars(
            **{
                "rpn/num_pos_anchors": positive.sum() / num_images,
                "rpn/num_neg_anchors": (gt_labels == 0).sum() / num_images,
            }
        )
        anchors = Boxes.cat(anchors).tensor
        targets = self.box2box_transform.get_deltas(anchors.repeat(num_images, 1), gt_boxes.reshape(-1, 4)).view(
            num_images, -1, 4
        )
        deltas = cat(pred_anchor_deltas, dim=1)
        if self.smooth_l1_beta < 1e-5:
            box_loss = (deltas - targets).abs()
        else:
            box_loss = F.smooth_l1_loss(deltas, targets, beta=self.smooth_l1_beta, reduction="none")
        localization_loss = (box_loss * positive[..., None]).sum()
        logits = cat(pred_objectness_logits, dim=1)
        objectness = F.binary_cross_entropy_with_logits(logits, positive.to(logits.dtype), reduction="none")
        objectness_loss = (objectness * valid).sum()
        normalizer = self.batch_size_per_image * num_images
        losses = {"loss_rpn_cls": objectness_loss / normalizer, "loss_rpn_loc": localization_loss / normalizer}
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    @torch.no_grad()
    def predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
        proposals = self._decode_proposals(anchors, pred_anchor_deltas)
        pre_nms_topk = self.pre_nms_topk[self.training]
        boxes, scores, levels, counts = [], [], [], []
        for level, (proposals_i, logits_i) in enumerate(zip(proposals, pred_objectness_logits)):
            k = min(logits_i.shape[1], pre_nms_topk)
            top_scores, top = logits_i.topk(k, dim=1)
            boxes.append(proposals_i.gather(1, top[..., None].expand(-1, -1, 4)))
            scores.append(top_scores)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=top.device))
            counts.append(k)
        boxes, scores, levels = cat(boxes, dim=1), cat(scores, dim=1), cat(levels)
        sizes = host_values_to(image_sizes, boxes.device)  # (B, 2): height, width
        # Boxes.clip, then nonempty(min_box_size); non-finite boxes are dropped as detectron2 does at inference
        # (in training a non-finite prediction also makes the losses non-finite, which stops training).
        height, width = sizes[:, 0, None], sizes[:, 1, None]
        boxes = torch.stack(
            [
                boxes[..., 0].clamp(min=0).minimum(width),
                boxes[..., 1].clamp(min=0).minimum(height),
                boxes[..., 2].clamp(min=0).minimum(width),
                boxes[..., 3].clamp(min=0).minimum(height),
            ],
            dim=-1,
        )
        valid = torch.isfinite(boxes).all(dim=-1) & torch.isfinite(scores)
        valid &= (boxes[..., 2] - boxes[..., 0] > self.min_box_size) & (
            boxes[..., 3] - boxes[..., 1] > self.min_box_size
        )
        boxes = torch.where(valid[..., None], boxes, torch.zeros_like(boxes))
        scores = torch.where(valid, scores, torch.full_like(scores, -float("inf")))
        if self.nms_method == "grouped":
            keep = self._grouped_keep(boxes, valid, counts)
        else:
            keep = self._torchvision_keep(boxes, scores, valid, levels, len(proposals))
        return self._top_kept(boxes, scores, keep, image_sizes)

    def _torchvision_keep(self, boxes, scores, valid, levels, num_levels):
        keep = torch.zeros_like(valid)
        for i in range(boxes.shape[0]):
            groups = torch.where(valid[i], levels, num_levels)  # invalid boxes in a group of their own
            kept = batched_nms(boxes[i], scores[i], groups, self.nms_thresh)
            keep[i, kept] = True
        return keep & valid

    def _grouped_keep(self, boxes, valid, counts):
        """grouped_nms over (image, level) groups; each level's boxes are already sorted by score (top-k)."""
        size = max(counts)
        pad = lambda t, n: torch.nn.functional.pad(t, (0, 0, 0, n) if t.dim() == 3 else (0, n))  # noqa: E731
        grouped_boxes = torch.stack([pad(b, size - b.shape[1]) for b in boxes.split(counts, dim=1)], dim=1)
        grouped_valid = torch.stack([pad(v, size - v.shape[1]) for v in valid.split(counts, dim=1)], dim=1)
        kept = grouped_nms(grouped_boxes.flatten(0, 1), grouped_valid.flatten(0, 1), self.nms_thresh)
        kept = kept.view(boxes.shape[0], len(counts), size)
        return cat([kept[:, level, :count] for level, count in enumerate(counts)], dim=1)

    def _top_kept(self, boxes, scores, keep, image_sizes):
        """Per image, the post_nms_topk kept boxes of highest score, in decreasing score order."""
        post_nms_topk = self.post_nms_topk[self.training]
        scores = torch.where(keep, scores, torch.full_like(scores, -float("inf")))
        k = min(post_nms_topk, scores.shape[1])
        top_scores, top = scores.topk(k, dim=1)
        top_boxes = boxes.gather(1, top[..., None].expand(-1, -1, 4))
        counts = keep.sum(dim=1).clamp(max=k).tolist()  # the one host sync of proposal selection
        results = []
        for i, (image_size, count) in enumerate(zip(image_sizes, counts)):
            result = Instances(image_size)
            result.proposal_boxes = Boxes(top_boxes[i, :count])
            result.objectness_logits = top_scores[i, :count]
            results.append(result)
        return results
