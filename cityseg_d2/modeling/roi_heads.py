"""detectron2's StandardROIHeads with proposal labelling, sampling and box losses done for the whole batch.

Same parameters and rules as detectron2's: proposals (with the ground-truth boxes appended) matched by its
Matcher, random foreground/background samples in its proportions, its box losses and statistics. Each image's
sample comes back foreground first (as detectron2's), so the mask head takes the first `num_foreground` of each
image without another selection. The batch costs one host sync for sampling (the sample sizes) instead of
several per image, each ROI pooling one instead of one per pyramid level (LevelSortedPooling), and the
statistics go through `put_scalars`.
"""

import torch
from detectron2.layers import cat, cross_entropy
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances

from .metrics import put_scalars
from .nms import check_nms_method, grouped_nms
from .poolers import LevelSortedPooling
from .rpn import host_values_to
from .sampling import match, pad_boxes, sample


class BatchedFastRCNNOutputLayers(FastRCNNOutputLayers):
    """FastRCNNOutputLayers (same layers) with sync-free losses and statistics, and with `nms_method`
    "grouped", inference whose per-class NMS runs for all images at once."""

    def __init__(self, cfg, input_shape):
        super().__init__(cfg, input_shape)
        self.nms_method = check_nms_method(cfg.CITYSEG.FAST.NMS)

    def losses(self, predictions, proposals):
        if self.box_reg_loss_type != "smooth_l1" or self.use_sigmoid_ce or not len(proposals):
            return super().losses(predictions, proposals)
        scores, deltas = predictions
        gt_classes = cat([p.gt_classes for p in proposals])
        _log_classification_stats(scores, gt_classes)
        proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals])
        gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals])
        losses = {
            "loss_cls": cross_entropy(scores, gt_classes, reduction="mean"),
            "loss_box_reg": self._box_reg_loss(proposal_boxes, gt_boxes, deltas, gt_classes),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _box_reg_loss(self, proposal_boxes, gt_boxes, deltas, gt_classes):
        """detectron2's smooth-L1 box_reg_loss, summed over a foreground mask instead of indexed foreground."""
        foreground = (gt_classes >= 0) & (gt_classes < self.num_classes)
        if deltas.shape[1] != 4:  # class-specific: the deltas of each proposal's ground-truth class
            index = gt_classes.clamp(0, self.num_classes - 1)
            deltas = deltas.view(-1, self.num_classes, 4)[torch.arange(len(index), device=deltas.device), index]
        targets = self.box2box_transform.get_deltas(proposal_boxes, gt_boxes)
        if self.smooth_l1_beta < 1e-5:
            loss = (deltas - targets).abs()
        else:
            loss = torch.nn.functional.smooth_l1_loss(deltas, targets, beta=self.smooth_l1_beta, reduction="none")
        return (loss * foreground[:, None]).sum() / max(gt_classes.numel(), 1.0)

    def predict_probs(self, predictions, proposals):
        """Class probabilities in float32 also under autocast (CPU autocast keeps softmax in bfloat16)."""
        scores, deltas = predictions
        return super().predict_probs((scores.float(), deltas), proposals)

    def inference(self, predictions, proposals):
        if self.nms_method != "grouped" or not any(len(p) for p in proposals):
            return super().inference(predictions, proposals)
        boxes = self.predict_boxes(predictions, proposals)
        scores = self.predict_probs(predictions, proposals)
        return batched_fast_rcnn_inference(
            boxes,
            scores,
            [x.image_size for x in proposals],
            self.test_score_thresh,
            self.test_nms_thresh,
            self.test_topk_per_image,
        )


def _log_classification_stats(pred_logits, gt_classes, prefix="fast_rcnn"):
    """fast_rcnn/cls_accuracy, fg_cls_accuracy and false_negative, as detectron2 logs them."""
    if gt_classes.numel() == 0:
        return
    pred_classes = pred_logits.argmax(dim=1)
    background = pred_logits.shape[1] - 1
    foreground = (gt_classes >= 0) & (gt_classes < background)
    num_foreground = foreground.sum()
    values = {f"{prefix}/cls_accuracy": (pred_classes == gt_classes).sum() / gt_classes.numel()}
    # detectron2 logs the foreground ratios only when there is foreground; NaN (not logged) says so here
    # without waiting for the count.
    has_foreground = num_foreground > 0
    nan = torch.full((), float("nan"), device=pred_logits.device)
    values[f"{prefix}/fg_cls_accuracy"] = torch.where(
        has_foreground, ((pred_classes == gt_classes) & foreground).sum() / num_foreground.clamp(min=1), nan
    )
    values[f"{prefix}/false_negative"] = torch.where(
        has_foreground, ((pred_classes == background) & foreground).sum() / num_foreground.clamp(min=1), nan
    )
    put_scalars(**values)


def batched_fast_rcnn_inference(boxes, scores, image_shapes, score_thresh, nms_thresh, topk_per_image):
    """detectron2's fast_rcnn_inference (clip, score threshold, per-class NMS, top-k) for all images at once,
    with grouped_nms over (image, class) groups. Returns (instances, kept proposal indices) per image."""
    num_images = len(image_shapes)
    counts = [len(b) for b in boxes]
    most = max(counts)
    num_classes = scores[0].shape[1] - 1
    device = scores[0].device
    padded_scores = torch.zeros((num_images, most, num_classes + 1), device=device)
    padded_boxes = torch.zeros((num_images, most, num_classes, 4), device=device)
    for i, (b, s) in enumerate(zip(boxes, scores)):
        padded_scores[i, : len(s)] = s
        padded_boxes[i, : len(b)] = b.view(len(b), b.shape[1] // 4, 4)  # class-agnostic: broadcast to every class
    real = torch.arange(most, device=device)[None, :] < host_values_to(counts, device, torch.int64)[:, None]
    finite = torch.isfinite(padded_boxes).all(dim=(2, 3)) & torch.isfinite(padded_scores).all(dim=2)
    padded_scores = padded_scores[..., :-1]
    sizes = host_values_to(image_shapes, device)
    height, width = sizes[:, 0, None, None], sizes[:, 1, None, None]
    x0, y0, x1, y1 = padded_boxes.unbind(-1)
    padded_boxes = torch.stack(
        [
            x0.clamp(min=0).minimum(width),
            y0.clamp(min=0).minimum(height),
            x1.clamp(min=0).minimum(width),
            y1.clamp(min=0).minimum(height),
        ],
        dim=-1,
    )
    candidate = ((padded_scores > score_thresh) & (finite & real)[..., None]).transpose(1, 2)  # (B, C, R)
    # Groups of (image, class), candidates first, by decreasing score; cut to the most candidates of a group.
    group_scores = torch.where(
        candidate, padded_scores.transpose(1, 2), torch.full_like(candidate, -float("inf"), dtype=padded_scores.dtype)
    )
    order = group_scores.argsort(dim=2, descending=True, stable=True)
    width_needed = max(int(candidate.sum(dim=2).max()), 1)  # a host sync, which spares NMS the non-candidates
    order = order[..., :width_needed]
    sorted_scores = group_scores.gather(2, order)
    sorted_valid = candidate.gather(2, order)
    sorted_boxes = padded_boxes.transpose(1, 2).gather(2, order[..., None].expand(-1, -1, -1, 4))
    keep = grouped_nms(sorted_boxes.flatten(0, 1), sorted_valid.flatten(0, 1), nms_thresh).view(sorted_valid.shape)
    kept_scores = torch.where(keep, sorted_scores, torch.full_like(sorted_scores, -float("inf"))).flatten(1)
    k = kept_scores.shape[1] if topk_per_image < 0 else min(topk_per_image, kept_scores.shape[1])
    top_scores, top = kept_scores.topk(k, dim=1)
    num_kept = keep.flatten(1).sum(dim=1).clamp(max=k).tolist()
    classes = torch.div(top, width_needed, rounding_mode="floor")
    proposal_index = order.flatten(1).gather(1, top)
    top_boxes = sorted_boxes.flatten(1, 2).gather(1, top[..., None].expand(-1, -1, 4))
    results, indices = [], []
    for i, (shape, n) in enumerate(zip(image_shapes, num_kept)):
        result = Instances(shape)
        result.pred_boxes = Boxes(top_boxes[i, :n])
        result.scores = top_scores[i, :n]
        result.pred_classes = classes[i, :n]
        results.append(result)
        indices.append(proposal_index[i, :n])
    return results, indices


@ROI_HEADS_REGISTRY.register()
class BatchedROIHeads(StandardROIHeads):
    """StandardROIHeads whose proposal labelling, sampling and box losses run for the whole batch at once."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_pooler"] = LevelSortedPooling(ret["box_pooler"])
        ret["box_predictor"] = BatchedFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if ret.get("mask_pooler") is not None:
            ret["mask_pooler"] = LevelSortedPooling(ret["mask_pooler"])
        return ret

    def forward(self, images, features, proposals, targets=None):
        if not self.training:
            return super().forward(images, features, proposals, targets)
        proposals, num_foreground = self.sample_proposals(proposals, targets)
        losses = self._forward_box(features, proposals)
        if self.mask_on:
            foreground = [p[:n] for p, n in zip(proposals, num_foreground)]
            losses.update(self._forward_mask_of_foreground(features, foreground))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def label_and_sample_proposals(self, proposals, targets):
        return self.sample_proposals(proposals, targets)[0]

    @torch.no_grad()
    def sample_proposals(self, proposals, targets):
        """(sampled proposals per image, foreground first, with their gt_* fields; foreground count per image)."""
        if self.proposal_append_gt:
            proposals = add_ground_truth_to_proposals(targets, proposals)
        device = proposals[0].proposal_boxes.device
        boxes, box_valid = pad_boxes([p.proposal_boxes.tensor for p in proposals], device)
        gt, gt_valid = pad_boxes([t.gt_boxes.tensor for t in targets], device)
        matched, labels = match(gt, gt_valid, boxes, self.proposal_matcher)
        gt_classes = torch.full(gt.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        for i, t in enumerate(targets):
            gt_classes[i, : len(t)] = t.gt_classes
        classes = gt_classes.gather(1, matched)
        classes = classes.masked_fill(labels == 0, self.num_classes).masked_fill(labels == -1, -1)
        positive = (classes != -1) & (classes != self.num_classes) & box_valid
        negative = (classes == self.num_classes) & box_valid
        positive, negative = sample(positive, negative, self.batch_size_per_image, self.positive_fraction)
        # Foreground first, then background, each in proposal order.
        order = (positive.to(torch.int8) * 2 + negative.to(torch.int8)).argsort(dim=1, descending=True, stable=True)
        sizes = torch.stack([positive.sum(dim=1), negative.sum(dim=1)], dim=1)
        put_scalars(
            **{
                "roi_head/num_fg_samples": sizes[:, 0].float().mean(),
                "roi_head/num_bg_samples": sizes[:, 1].float().mean(),
            }
        )
        sizes = sizes.tolist()  # the one host sync of sampling
        sampled, num_foreground = [], []
        host_matched = None
        for i, (p, t, (num_fg, num_bg)) in enumerate(zip(proposals, targets, sizes)):
            index = order[i, : num_fg + num_bg]
            p = p[index]
            p.gt_classes = classes[i, index]
            if len(t):
                target_index = matched[i, index]
                for name, value in t.get_fields().items():
                    if not name.startswith("gt_") or p.has(name):
                        continue
                    if not isinstance(value, torch.Tensor):  # e.g. PolygonMasks: index on the host, one copy
                        if host_matched is None:
                            host_matched = [
                                m[o[: a + b]].tolist() for m, o, (a, b) in zip(matched.cpu(), order.cpu(), sizes)
                            ]
                        p.set(name, value[host_matched[i]])
                    else:
                        p.set(name, value[target_index])
            sampled.append(p)
            num_foreground.append(num_fg)
        return sampled, num_foreground

    def _forward_mask_of_foreground(self, features, instances):
        """The mask head's loss on the given foreground proposals (StandardROIHeads._forward_mask selects them
        itself, with a host sync per image)."""
        if self.mask_pooler is not None:
            features = self.mask_pooler(
                [features[f] for f in self.mask_in_features], [x.proposal_boxes for x in instances]
            )
        else:
            features = {f: features[f] for f in self.mask_in_features}
        return self.mask_head(features, instances)
