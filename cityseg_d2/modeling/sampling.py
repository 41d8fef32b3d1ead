"""Box matching and label sampling for all images of a batch at once, without host syncs.

The same rules as detectron2's `Matcher` and `subsample_labels`, applied to padded (images, ground truth,
candidates) tensors instead of one image at a time: padding ground truth has IoU -1 (it never wins a match), and
the random subset of each image is drawn by ranking uniform random keys (the same distribution as
`torch.randperm`'s prefix, with a different random stream).
"""

import torch

# Images x ground truth x candidates matched at once: a chunk's IoU temporaries stay under ~1 GB, about what
# detectron2 needs for one image with 60 instances at 1024x2048.
_MATCH_CHUNK_ELEMENTS = 1 << 26


def pad_boxes(boxes_per_image, device):
    """(B, G, 4) boxes zero-padded to the most boxes G of an image, and the (B, G) mask of real ones."""
    most = max((len(b) for b in boxes_per_image), default=0)
    padded = torch.zeros((len(boxes_per_image), max(most, 1), 4), device=device)
    valid = torch.zeros(padded.shape[:2], dtype=torch.bool, device=device)
    for i, boxes in enumerate(boxes_per_image):
        padded[i, : len(boxes)] = boxes
        valid[i, : len(boxes)] = True
    return padded, valid


def pairwise_iou(gt, boxes, gt_valid):
    """(B, G, N) IoU of gt (B, G, 4) with boxes (B, N, 4) or (N, 4), computed as detectron2's pairwise_iou;
    padding ground truth gets -1."""
    if boxes.dim() == 2:
        boxes = boxes[None]
    area_gt = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    area_boxes = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    width_height = torch.min(gt[:, :, None, 2:], boxes[:, None, :, 2:]) - torch.max(
        gt[:, :, None, :2], boxes[:, None, :, :2]
    )
    width_height.clamp_(min=0)
    inter = width_height.prod(dim=3)
    iou = torch.where(
        inter > 0,
        inter / (area_gt[:, :, None] + area_boxes[:, None, :] - inter),
        torch.zeros(1, dtype=inter.dtype, device=inter.device),
    )
    return iou.masked_fill_(~gt_valid[:, :, None], -1.0)


def match(gt, gt_valid, boxes, matcher):
    """(matched ground-truth index, match label) per box, (B, N) each, by detectron2's Matcher rules
    (thresholds, labels, allow_low_quality_matches); images without ground truth get labels[0]."""
    per_image = gt.shape[1] * (boxes.shape[-2])
    step = max(1, _MATCH_CHUNK_ELEMENTS // max(per_image, 1))
    indices, labels = [], []
    for start in range(0, gt.shape[0], step):
        chunk = slice(start, start + step)
        chunk_boxes = boxes if boxes.dim() == 2 else boxes[chunk]
        iou = pairwise_iou(gt[chunk], chunk_boxes, gt_valid[chunk])
        index, label = _match_iou(iou, gt_valid[chunk], matcher)
        indices.append(index)
        labels.append(label)
    return torch.cat(indices), torch.cat(labels)


def _match_iou(iou, gt_valid, matcher):
    matched_vals, matches = iou.max(dim=1)
    match_labels = torch.ones_like(matches, dtype=torch.int8)
    for label, low, high in zip(matcher.labels, matcher.thresholds[:-1], matcher.thresholds[1:]):
        match_labels.masked_fill_((matched_vals >= low) & (matched_vals < high), label)
    if matcher.allow_low_quality_matches:
        # The boxes of highest IoU with each real ground truth (all of them, ties included) are positive.
        highest = iou.max(dim=2, keepdim=True).values
        best = ((iou == highest) & gt_valid[:, :, None]).any(dim=1)
        match_labels.masked_fill_(best, 1)
    return matches, match_labels


def sample(positive, negative, num_samples, positive_fraction):
    """(B, N) masks of the sampled positives and negatives: per image min(#positive, int(num_samples *
    positive_fraction)) random positives, then random negatives up to num_samples, as subsample_labels."""
    positive_quota = int(num_samples * positive_fraction)
    num_positive = positive.sum(dim=1).clamp(max=positive_quota)
    num_negative = negative.sum(dim=1).clamp(max=num_samples - num_positive)
    return _random_subset(positive, num_positive, positive_quota), _random_subset(negative, num_negative, num_samples)


def _random_subset(candidates, count, most):
    """(B, N) mask of `count[b]` (<= most) candidates of each row, uniformly at random."""
    k = min(most, candidates.shape[1])
    chosen = torch.zeros_like(candidates)
    if k == 0:
        return chosen
    keys = torch.rand(candidates.shape, device=candidates.device).masked_fill_(~candidates, -1.0)
    top = keys.topk(k, dim=1).indices
    taken = torch.arange(k, device=candidates.device)[None, :] < count[:, None]
    return chosen.scatter_(1, top, taken)
