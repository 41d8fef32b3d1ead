"""Export a trained Mask R-CNN to TorchScript or ONNX with detectron2's export machinery.

The exported graph is GeneralizedRCNN.inference without its post-processing: it takes one image already resized
to the test size (a float CHW tensor in the config's INPUT.FORMAT) and returns the detections in that size,
masks as 28x28 probabilities. Resizing the input and pasting the masks into the original image (detectron2's
detector_postprocess) stay outside, in cityseg_d2.export.runtime, as in detectron2's own deployment example;
NMS and ROIAlign are inside the graph (torchvision's ONNX NonMaxSuppression and RoiAlign).

What the runtime needs to use the file (resize sizes, input format, output names, classes) is stored in it:
in the TorchScript archive as an extra file, in the ONNX model as metadata properties.
"""

import contextlib
import json
import logging
import os
import sys
import warnings
from typing import Dict

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes
from torch import Tensor, nn

from ..engine.checkpoint import UNREADABLE, SafeCheckpointer, weights_error
from ..engine.predict import resolve_weights
from ..errors import ExportError, UserError, first_line
from .onnx_group_norm import empty_batch_group_norm

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
EXPORT_METHODS = ("tracing", "scripting")
# RoiAlign with half-pixel coordinates (detectron2's ROIAlignV2, aligned=True) came with opset 16; torch's
# TorchScript-based ONNX exporter writes at most opset 20.
ONNX_OPSETS = range(16, 21)
DEFAULT_ONNX_OPSET = 16
OUTPUT_FIELDS = ("pred_boxes", "pred_classes", "pred_masks", "scores")
METADATA_KEY = "cityseg_d2"
FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def check_export_options(export_format, export_method, opset):
    if export_format not in FORMATS:
        raise ExportError(f"--format {export_format!r}: use one of {', '.join(FORMATS)}")
    if export_method not in EXPORT_METHODS:
        raise ExportError(f"--export-method {export_method!r}: use one of {', '.join(EXPORT_METHODS)}")
    if export_format == "onnx" and export_method != "tracing":
        raise ExportError("--export-method scripting makes TorchScript only; ONNX export uses tracing")
    if export_format == "onnx" and opset not in ONNX_OPSETS:
        raise ExportError(
            f"--opset {opset}: Mask R-CNN's RoiAlign (aligned=True) needs ONNX opset >= {ONNX_OPSETS[0]} and "
            f"torch's exporter writes at most {ONNX_OPSETS[-1]}; use {ONNX_OPSETS[0]}..{ONNX_OPSETS[-1]}"
        )


def load_trained_model(cfg, weights, device="cpu", build=build_model):
    """cfg's Mask R-CNN, made by `build`, on `device` in eval mode with `weights` loaded by the project's
    SafeCheckpointer (tensors only; pickles as CITYSEG.TRUST_PICKLE_WEIGHTS says); one line when it cannot be."""
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or not cfg.MODEL.MASK_ON:
        raise ExportError(
            f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} (MASK_ON {cfg.MODEL.MASK_ON}): supported is "
            "Mask R-CNN (GeneralizedRCNN with MASK_ON True)"
        )
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    model = build(cfg)
    try:
        SafeCheckpointer(model, trust_pickle=cfg.CITYSEG.TRUST_PICKLE_WEIGHTS).load(weights)
    except UNREADABLE as e:
        raise weights_error(weights, e) from e
    return model.eval()


def resize_for_model(image, min_size, max_size):
    """`image` (HWC uint8) resized as DefaultPredictor does, as the float CHW tensor the exported graph takes."""
    resized = T.ResizeShortestEdge([min_size, min_size], max_size).get_transform(image).apply_image(image)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))


def read_split(dataset_name, hint=""):
    """The dataset dicts of a registered split; one line (ending in `hint`) when it cannot be read or is empty."""
    try:
        records = DatasetCatalog.get(dataset_name)
    except UserError as e:
        raise ExportError(f"{dataset_name}: {first_line(e)}{hint}") from e
    if not records:
        raise ExportError(f"{dataset_name} has no images{hint}")
    return records


def sample_image(cfg, path=None):
    """The image (BGR) to trace with: `path`, else the first image of DATASETS.TEST[0]."""
    if path is None:
        if not cfg.DATASETS.TEST:
            raise ExportError("no --sample-image given and DATASETS.TEST is empty: pass --sample-image IMAGE")
        path = read_split(cfg.DATASETS.TEST[0], hint=": pass --sample-image IMAGE")[0]["file_name"]
    if not os.path.isfile(path):
        raise ExportError(f"--sample-image {path}: no such file")
    return read_image(path, format="BGR")


def _inference_without_postprocess(model, image):
    return model.inference([{"image": image}], do_postprocess=False)[0]


class _ScriptableInference(nn.Module):
    """GeneralizedRCNN.inference on one resized image, returning the detections as a dict of tensors."""

    def __init__(self, model: GeneralizedRCNN):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Dict[str, Tensor]:
        instances = self.model.inference([{"image": image}], do_postprocess=False)[0]
        return {
            "pred_boxes": instances.pred_boxes.tensor,
            "pred_classes": instances.pred_classes,
            "pred_masks": instances.pred_masks,
            "scores": instances.scores,
        }


# Every field the Instances of GeneralizedRCNN's inference hold (proposals, then detections).
_SCRIPTED_INSTANCE_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": Tensor,
    "pred_boxes": Boxes,
    "scores": Tensor,
    "pred_classes": Tensor,
    "pred_masks": Tensor,
}


def _tracing_adapter(model, image):
    adapter = TracingAdapter(model, image, _inference_without_postprocess).eval()
    with torch.no_grad():
        adapter(*adapter.flattened_inputs)  # records the output schema: Instances fields in sorted order, image size
    fields = tuple(adapter.outputs_schema.keys)
    if fields != OUTPUT_FIELDS:
        raise ExportError(f"the model's detections have fields {fields}; export expects {OUTPUT_FIELDS}")
    return adapter


def _export_torchscript(model, image, export_method, path, metadata):
    with _quiet_export():
        if export_method == "scripting":
            exported = scripting_with_instances(_ScriptableInference(model).eval(), _SCRIPTED_INSTANCE_FIELDS)
        else:
            adapter = _tracing_adapter(model, image)
            # check_trace would rerun and compare the trace; the runtime's parity with the model is what we check.
            exported = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        torch.jit.save(exported, path, _extra_files={METADATA_KEY: json.dumps(metadata)})


# torch deprecates TorchScript (jit.trace/script/save/load) in favour of torch.export, which detectron2's inference
# does not pass; said once in README.md rather than at every call.
TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


@contextlib.contextmanager
def _quiet_export():
    """Without the warnings every export of detectron2's Mask R-CNN prints: a TracerWarning at each Python branch
    on a tensor (those branches do not depend on the image for Mask R-CNN), the warning that ONNX advanced
    indexing is wrong for negative indices (detectron2 indexes with non-negative ones), TorchScript's deprecation.
    The parity check after the export runs the exported graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        warnings.filterwarnings("ignore", message=TORCHSCRIPT_DEPRECATION, category=FutureWarning)
        yield


@contextlib.contextmanager
def _stdout_to(path):
    """Send what is written to file descriptor 1 (also by C++ code, which print does not reach) to `path`."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(path, "w") as f:
            os.dup2(f.fileno(), 1)
            yield
            sys.stdout.flush()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _export_onnx(model, image, opset, path, metadata):
    try:
        import onnx
    except ImportError as e:
        raise ExportError(f"--format onnx needs the onnx package ({e}): pip install -e .[export]") from e
    adapter = _tracing_adapter(model, image)
    # On an unsupported operator torch prints the whole TorchScript graph (thousands of lines) to stdout.
    failure_log = os.path.splitext(path)[0] + "_export_failure.log"
    try:
        with _stdout_to(failure_log), empty_batch_group_norm(opset), _quiet_export():
            torch.onnx.export(
                adapter,
                adapter.flattened_inputs,
                path,
                dynamo=False,  # the TorchScript-based exporter: detectron2's inference is not torch.export-able
                opset_version=opset,
                input_names=["image"],
                output_names=[*OUTPUT_FIELDS, "image_size"],
                dynamic_axes={"image": {1: "height", 2: "width"}},
            )
    except torch.onnx.errors.OnnxExporterError as e:
        raise ExportError(f"ONNX export (opset {opset}) failed: {first_line(e)} (torch's graph: {failure_log})") from e
    os.remove(failure_log)
    exported = onnx.load(path)
    onnx.helper.set_model_props(exported, {METADATA_KEY: json.dumps(metadata)})
    onnx.save(exported, path)


def export_model(cfg, export_format, output_dir, export_method="tracing", image=None, opset=DEFAULT_ONNX_OPSET):
    """Export cfg's trained Mask R-CNN (MODEL.WEIGHTS, else OUTPUT_DIR/model_final.pth) to output_dir/model.ts or
    model.onnx; returns the file's path.

    Args:
        image: HWC uint8 BGR image to trace with (sample_image(cfg) when None).
    """
    check_export_options(export_format, export_method, opset)
    weights = resolve_weights(cfg)
    model = load_trained_model(cfg, weights)
    image = sample_image(cfg) if image is None else image
    image = image[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else image
    resized = resize_for_model(image, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    dataset_metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
    metadata = {
        "format": export_format,
        "export_method": export_method,
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "outputs": list(OUTPUT_FIELDS),
        "weights": weights,
        "thing_classes": list(dataset_metadata.get("thing_classes", [])) if dataset_metadata else [],
        "thing_colors": [list(c) for c in dataset_metadata.get("thing_colors", [])] if dataset_metadata else [],
        "thing_label_ids": list(dataset_metadata.get("thing_label_ids", [])) if dataset_metadata else [],
    }
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FILE_NAMES[export_format])
    if export_format == "onnx":
        metadata["opset"] = opset
        _export_onnx(model, resized, opset, path, metadata)
    else:
        _export_torchscript(model, resized, export_method, path, metadata)
    logger.info("exported %s (%s) to %s", export_format, export_method, path)
    return path
