"""Run an exported model (TorchScript, or ONNX in onnxruntime) like detectron2's DefaultPredictor.

The file holds the graph from resized image to detections in the resized size (cityseg_d2.export.exporter); this
wrapper does what stays outside it, with detectron2's own code: the test-time resize before, and after it the
boxes scaled and the 28x28 mask probabilities pasted into the original image (detector_postprocess, threshold 0.5).
"""

import json
import os
import warnings
import zipfile

import torch
from detectron2.data.catalog import Metadata
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from ..errors import UserError, first_line
from .exporter import METADATA_KEY, TORCHSCRIPT_DEPRECATION, resize_for_model


class ExportedPredictor:
    """predictor(bgr_image) -> {"instances": Instances} with pred_boxes, scores, pred_classes and pred_masks (bool)
    in the image's size, as DefaultPredictor returns; predictor([bgr_image, ...]) -> a list of those, as the
    batched predictor of cityseg_d2.modeling (and so engine.predict.predict_images) calls it, one image a pass.
    `metadata` holds the classes (and colours and Cityscapes label ids) the model was exported with, for the
    overlays and the Cityscapes result files."""

    batch_size = 1  # images per pass, read by predict_images

    def __init__(self, path):
        if not os.path.isfile(path):
            raise UserError(f"exported model {path} not found")
        # A TorchScript archive is a zip file; anything else is read as ONNX.
        self.format = "torchscript" if zipfile.is_zipfile(path) else "onnx"
        run, info = (self._load_torchscript if self.format == "torchscript" else self._load_onnx)(path)
        if not info:
            raise UserError(f"{path} was not written by tools/export_model.py (no {METADATA_KEY!r} metadata in it)")
        self._run = run
        self.info = json.loads(info)
        self.metadata = Metadata(name=os.path.basename(path)).set(
            thing_classes=self.info["thing_classes"],
            thing_colors=[tuple(c) for c in self.info["thing_colors"]],
            thing_label_ids=self.info["thing_label_ids"],
        )

    def _load_torchscript(self, path):
        extra_files = {METADATA_KEY: ""}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=TORCHSCRIPT_DEPRECATION, category=FutureWarning)
                module = torch.jit.load(path, map_location="cpu", _extra_files=extra_files)
        except RuntimeError as e:
            raise UserError(f"{path} is not a TorchScript model torch.jit.load can read: {first_line(e)}") from e

        def run(image):
            outputs = module(image)
            if isinstance(outputs, dict):  # scripted
                return outputs
            return dict(zip(self.info["outputs"], outputs))  # traced: the fields in order, then the image size

        return run, extra_files[METADATA_KEY]

    def _load_onnx(self, path):
        try:
            import onnxruntime
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf
        except ImportError as e:
            raise UserError(f"{path}: running an ONNX model needs onnxruntime ({e}): pip install -e .[export]") from e

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except (Fail, InvalidGraph, InvalidProtobuf) as e:
            raise UserError(
                f"{path} is neither a TorchScript nor an ONNX model onnxruntime can read: {first_line(e)}"
            ) from e
        names = [output.name for output in session.get_outputs()]

        def run(image):
            outputs = session.run(None, {"image": image.numpy()})
            return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}

        return run, session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)

    def __call__(self, images):
        """images: an HWC uint8 image in BGR order (what cv2.imread and read_image(format="BGR") give), or a list."""
        if isinstance(images, (list, tuple)):
            return [self._predict(image) for image in images]
        return self._predict(images)

    def _predict(self, original_image):
        image = original_image[:, :, ::-1] if self.info["input_format"] == "RGB" else original_image
        height, width = original_image.shape[:2]
        resized = resize_for_model(image, self.info["min_size_test"], self.info["max_size_test"])
        with torch.no_grad():
            outputs = self._run(resized)
        instances = Instances(
            tuple(resized.shape[1:]),
            pred_boxes=Boxes(outputs["pred_boxes"]),
            scores=outputs["scores"],
            pred_classes=outputs["pred_classes"],
            pred_masks=outputs["pred_masks"],
        )
        return {"instances": detector_postprocess(instances, height, width)}
