"""Batched inference on images in memory: detectron2's DefaultPredictor for many images at a time.

`build_batched_predictor(cfg, model)` gives a callable that takes a list of images (HxWxC uint8 BGR numpy arrays, as
cv2 gives them and DefaultPredictor takes them) and returns one {"instances": Instances} per image, on
cfg.MODEL.DEVICE, at the image's own resolution. It runs CITYSEG.FAST.TEST_BATCH_SIZE images per forward pass under
CITYSEG.FAST.TEST_PRECISION autocast, with a model of build_fast_model whose weights the caller loaded
(cityseg_d2.engine.predict.build_predictor does both); with a batch size of 1 and no autocast its outputs are
DefaultPredictor's.
"""

import contextlib

import torch
from detectron2.data import transforms as T

from .model import autocast_dtype


def inference_autocast(cfg):
    """The autocast context of CITYSEG.FAST.TEST_PRECISION on cfg.MODEL.DEVICE (a no-op for fp32)."""
    dtype = autocast_dtype(cfg.CITYSEG.FAST.TEST_PRECISION, "CITYSEG.FAST.TEST_PRECISION")
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(cfg.MODEL.DEVICE).type, dtype=dtype)


class BatchedPredictor:
    """DefaultPredictor over lists of images, CITYSEG.FAST.TEST_BATCH_SIZE at a time."""

    def __init__(self, cfg, model):
        self.cfg = cfg.clone()
        self.model = model.eval()
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        self.batch_size = max(1, cfg.CITYSEG.FAST.TEST_BATCH_SIZE)

    def inputs(self, image):
        """The model input of one image (detectron2's test-time resize), as DefaultPredictor makes it."""
        height, width = image.shape[:2]
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return {"image": tensor.to(self.cfg.MODEL.DEVICE), "height": height, "width": width}

    def __call__(self, images):
        outputs = []
        with torch.no_grad(), inference_autocast(self.cfg):
            for start in range(0, len(images), self.batch_size):
                batch = [self.inputs(image) for image in images[start : start + self.batch_size]]
                outputs.extend(self.model(batch))
        return outputs


def build_batched_predictor(cfg, model):
    """A BatchedPredictor for cfg around `model` (build_fast_model's, its weights loaded: see
    cityseg_d2.engine.predict.build_predictor, which loads MODEL.WEIGHTS safely)."""
    return BatchedPredictor(cfg, model)
