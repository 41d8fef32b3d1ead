"""The fast training data path (CITYSEG.FAST.DATA): work moved into the loader workers, batches on the device
before the model asks for them.

- `PolygonEdgesMapper`: detectron2's DatasetMapper (same decoding, augmentation and annotations) that also
  packs each instance's polygons into the edge tensor the tensor mask targets use (`gt_polygon_edges`), in the
  worker; when the mask head is TensorTargetsMaskHead (and draws no training visualisations), the polygon lists
  are then not sent to the training process at all.
- pinned memory and a deeper worker queue for the DataLoader, on a GPU.
- `DevicePrefetcher`: copies the next batch (images and ground truth) to the GPU on a side stream with
  non-blocking copies while the current step runs.
"""

import numpy as np
import torch
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.structures import Boxes, Instances, PolygonMasks

# Mask heads that train from gt_polygon_edges alone (cityseg_d2.modeling.mask_head).
EDGE_MASK_HEADS = ("TensorTargetsMaskHead",)


def pack_polygon_edges(polygons_per_instance):
    """Polygons as the tensor mask targets (cityseg_d2.modeling.mask_targets) rasterise them: a (N, P, V, 4)
    float64 tensor of the edges (x0, y0, x1, y1) of each instance's polygons, P the most polygons of an instance,
    V the most vertices of a polygon; padding edges are single points, which cross nothing.

    polygons_per_instance: detectron2's PolygonMasks.polygons, a list (one per instance) of lists of flat
    [x0, y0, x1, y1, ...] arrays."""
    most_polygons = max((len(p) for p in polygons_per_instance), default=0)
    most_vertices = max((len(flat) // 2 for p in polygons_per_instance for flat in p), default=0)
    packed = np.zeros((len(polygons_per_instance), max(most_polygons, 1), max(most_vertices, 1), 4))
    for i, polygons in enumerate(polygons_per_instance):
        for j, flat in enumerate(polygons):
            points = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
            packed[i, j, : len(points), :2] = points
            packed[i, j, : len(points), 2:] = np.roll(points, -1, axis=0)
    return torch.from_numpy(packed)


class PolygonEdgesMapper(DatasetMapper):
    """DatasetMapper that adds `gt_polygon_edges` (pack_polygon_edges) to the training instances, and drops `gt_masks` when nothing else needs them."""

    def __init__(self, cfg, is_train=True):
        super().__init__(cfg, is_train)
        self.keep_polygons = cfg.MODEL.ROI_MASK_HEAD.NAME not in EDGE_MASK_HEADS or cfg.VIS_PERIOD > 0

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        instances = dataset_dict["instances"]
        if instances.has("gt_masks") and isinstance(instances.gt_masks, PolygonMasks):
            instances.gt_polygon_edges = pack_polygon_edges(instances.gt_masks.polygons)
            if not self.keep_polygons:
                instances.remove("gt_masks")


class DevicePrefetcher:
    """Iterable over a loader's batches (lists of dicts) whose tensors are already on `device`.

    On CUDA the copies of batch i+1 are issued on a side stream while the model runs on batch i; the consumer's
    stream waits for them before use, and the tensors are recorded on it so their memory is not reused early.
    Elsewhere batches pass through unchanged (the model moves them itself)."""

    def __init__(self, loader, device):
        self.loader = loader
        self.device = torch.device(device)

    def __iter__(self):
        batches = iter(self.loader)
        if self.device.type != "cuda":
            yield from batches
            return
        stream = torch.cuda.Stream(self.device)
        upcoming = self._copy(next(batches, None), stream)
        while upcoming is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            batch = upcoming
            _record_stream(batch, torch.cuda.current_stream(self.device))
            upcoming = self._copy(next(batches, None), stream)
            yield batch

    def _copy(self, batch, stream):
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            moved = []
            for item in batch:
                item = dict(item)
                item["image"] = item["image"].to(self.device, non_blocking=True)
                if "instances" in item:
                    item["instances"] = _instances_to(item["instances"], self.device)
                moved.append(item)
        return moved


def _instances_to(instances, device):
    """Instances.to(device) with non-blocking copies (Boxes.to takes no such argument)."""
    moved = Instances(instances.image_size)
    for name, value in instances.get_fields().items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
        elif isinstance(value, Boxes):
            value = type(value)(value.tensor.to(device, non_blocking=True))
        elif hasattr(value, "to"):
            value = value.to(device)
        moved.set(name, value)
    return moved


def _record_stream(batch, stream):
    for item in batch:
        item["image"].record_stream(stream)
        for value in item["instances"].get_fields().values() if "instances" in item else ():
            tensor = getattr(value, "tensor", value)
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                tensor.record_stream(stream)


def build_fast_train_loader(cfg, mapper=None):
    """detectron2's training loader with PolygonEdgesMapper, wrapped in a DevicePrefetcher for cfg.MODEL.DEVICE;
    for a GPU also pinned memory and a deeper queue (4 images per worker instead of 2), which absorbs slow images
    when a step takes less time than a worker needs for a batch. On the CPU the workers share the cores with the
    model, so they queue no more than detectron2's."""
    on_gpu = cfg.MODEL.DEVICE.startswith("cuda")
    deeper_queue = {"prefetch_factor": 4} if on_gpu and cfg.DATALOADER.NUM_WORKERS > 0 else {}
    loader = build_detection_train_loader(
        cfg, mapper=mapper or PolygonEdgesMapper(cfg, True), pin_memory=on_gpu, **deeper_queue
    )
    return DevicePrefetcher(loader, cfg.MODEL.DEVICE)
