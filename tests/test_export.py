"""tools/export_model.py and cityseg_d2.export's runtime: the exported TorchScript and ONNX (onnxruntime) models
detect what the PyTorch model detects, within cityseg_d2.export.parity's tolerances; mistakes give one line."""

import glob
import os

import cv2
import numpy as np
import pytest
import torch
from conftest import QUICKSTART
from detectron2.engine import DefaultPredictor
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.structures import Boxes, Instances

from cityseg_d2.engine import prepare_config
from cityseg_d2.errors import UserError
from cityseg_d2.export import ExportedPredictor
from cityseg_d2.export.parity import BOX_ATOL, SCORE_ATOL, compare_detections


@BACKBONE_REGISTRY.register()
def build_fpn_backbone_with_frac(cfg, input_shape):
    """The quickstart backbone (same weights) with an operator ONNX has no symbolic for: what an unsupported op gives."""
    backbone = build_resnet_fpn_backbone(cfg, input_shape)
    features = backbone.forward
    backbone.forward = lambda image: {name: x + torch.frac(x) * 0 for name, x in features(image).items()}
    return backbone


@pytest.fixture(scope="module")
def trained(trained_quickstart):
    """(weights, overrides) of the session's trained quickstart model."""
    output_dir, learning = trained_quickstart
    return os.path.join(output_dir, "model_final.pth"), learning


@pytest.fixture(scope="module")
def images(synthetic_root):
    """The val images (BGR), and the first one transposed: an input of another shape than the traced sample."""
    images = [
        cv2.imread(p) for p in sorted(glob.glob(os.path.join(synthetic_root, "leftImg8bit", "val", "*", "*.png")))
    ]
    return images + [np.ascontiguousarray(images[0].transpose(1, 0, 2))]


@pytest.fixture(scope="module")
def reference(trained, images):
    """The PyTorch model's detections of `images`, by detectron2's DefaultPredictor."""
    weights, learning = trained
    predictor = DefaultPredictor(prepare_config(QUICKSTART, [*learning, "MODEL.WEIGHTS", weights]))
    detections = [predictor(image)["instances"] for image in images]
    assert sum(len(d) for d in detections) >= 10  # enough to compare
    return detections


def export(run_tool, output, *args, overrides=()):
    return run_tool("export_model.py", "--config-file", QUICKSTART, "--output", output, *args, "--opts", *overrides)


@pytest.mark.parametrize(
    "export_format, method, file_name",
    [
        ("torchscript", "tracing", "model.ts"),
        ("torchscript", "scripting", "model.ts"),
        ("onnx", "tracing", "model.onnx"),
    ],
)
def test_exported_model_detects_what_the_pytorch_model_detects(
    export_format, method, file_name, trained, images, reference, run_tool, synthetic_root, tmp_path
):
    weights, learning = trained
    result = export(run_tool, tmp_path, "--format", export_format, "--export-method", method,
                    overrides=[*learning, "MODEL.WEIGHTS", weights])  # fmt: skip
    assert result.code == 0, result.err[-3000:]
    path = tmp_path / file_name
    assert f"wrote {path}; on the sample image: " in result.out
    predictor = ExportedPredictor(str(path))
    assert predictor.format == export_format and predictor.metadata.thing_classes[2] == "car"
    for image, expected in zip(images, reference):
        instances = predictor(image)["instances"]
        assert instances.image_size == image.shape[:2]
        assert instances.pred_masks.dtype == torch.bool and instances.pred_masks.shape[1:] == image.shape[:2]
        parity = compare_detections(expected, instances)
        assert parity.ok, parity
    listed = predictor(images[:2])  # as predict_images calls a predictor
    assert [len(output["instances"]) for output in listed] == [len(r) for r in reference[:2]]
    if export_format == "onnx":  # tools/predict.py runs it as it runs a config and weights
        val = sorted(glob.glob(os.path.join(synthetic_root, "leftImg8bit", "val", "*", "*.png")))
        out = tmp_path / "predictions"
        predicted = run_tool("predict.py", "--exported", path, "--input", val[0], "--output", out, "--no-overlays")
        assert predicted.code == 0, predicted.err[-3000:]
        stem = os.path.basename(val[0])[: -len(".png")]
        assert len((out / "cityscapes" / f"{stem}.txt").read_text().splitlines()) == len(reference[0])


def test_onnx_model_runs_on_an_image_without_detections(trained, images, run_tool, tmp_path):
    """The mask head's GroupNorm gets an empty batch then, which torch's own ONNX GroupNorm fails on in onnxruntime."""
    weights, learning = trained
    overrides = [*learning, "MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"]
    result = export(run_tool, tmp_path, "--format", "onnx", overrides=overrides)
    assert result.code == 0, result.err[-3000:]
    instances = ExportedPredictor(str(tmp_path / "model.onnx"))(images[0])["instances"]
    assert len(instances) == 0 and instances.pred_masks.shape == (0, *images[0].shape[:2])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "tflite"], "error: --format 'tflite': use one of torchscript, onnx"),
        (["--format", "onnx", "--opset", "11"], "error: --opset 11: Mask R-CNN's RoiAlign (aligned=True) needs ONNX opset >= 16"),
        (["--format", "onnx", "--export-method", "scripting"], "error: --export-method scripting makes TorchScript only"),
        (["--format", "onnx"], "error: MODEL.WEIGHTS is empty and no/such/dir/model_final.pth does not exist"),
        (["--format", "onnx", "--opts", "MODEL.WEIGHTS", "no/such/weights.pth"], "error: MODEL.WEIGHTS file not found: no/such/weights.pth"),
    ],
)  # fmt: skip
def test_export_mistakes_give_one_line(args, message, run_tool, tmp_path):
    if "--opts" not in args:
        args = [*args, "--opts"]
    result = run_tool(
        "export_model.py", "--config-file", QUICKSTART, "--output", tmp_path, *args, "OUTPUT_DIR", "no/such/dir"
    )
    assert result.code == 2 and len(result.error_lines()) == 1, result.err[-3000:]
    assert result.error_lines()[0].startswith(message) and "Traceback" not in result.err
    assert os.listdir(tmp_path) == []


def test_an_operator_onnx_lacks_and_an_existing_file_give_one_line(trained, run_tool, tmp_path):
    weights, learning = trained
    overrides = [*learning, "MODEL.WEIGHTS", weights, "MODEL.BACKBONE.NAME", "build_fpn_backbone_with_frac"]
    result = export(run_tool, tmp_path, "--format", "onnx", overrides=overrides)
    log = tmp_path / "model_export_failure.log"
    assert result.code == 2 and result.error_lines() == [
        "error: ONNX export (opset 16) failed: Exporting the operator 'aten::frac' to ONNX opset version 16 is not "
        f"supported (torch's graph: {log})"
    ], result.err[-3000:]
    assert "aten::frac" in log.read_text() and not (tmp_path / "model.onnx").exists()

    (tmp_path / "model.onnx").write_bytes(b"an earlier export")
    result = export(run_tool, tmp_path, "--format", "onnx", overrides=[*learning, "MODEL.WEIGHTS", weights])
    assert result.error_lines() == [
        f"error: {tmp_path / 'model.onnx'} exists: pass --overwrite to replace it, or choose another --output"
    ]
    assert (tmp_path / "model.onnx").read_bytes() == b"an earlier export"


def test_runtime_refuses_files_that_are_no_export(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ExportedPredictor(str(tmp_path / "missing.onnx"))
    (tmp_path / "weights.onnx").write_text("not a model")
    with pytest.raises(UserError, match="neither a TorchScript nor an ONNX model"):
        ExportedPredictor(str(tmp_path / "weights.onnx"))


def _instances(boxes, scores, classes, masks):
    return Instances(
        masks.shape[1:],
        pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
        scores=torch.tensor(scores, dtype=torch.float32),
        pred_classes=torch.tensor(classes),
        pred_masks=torch.from_numpy(masks),
    )


def test_compare_detections_matches_reordered_detections_and_finds_every_difference():
    masks = np.zeros((3, 40, 60), bool)
    masks[0, :20, :20] = masks[1, 10:30, 20:50] = masks[2, 20:, 40:] = True
    boxes, scores, classes = [[0, 0, 20, 20], [20, 10, 50, 30], [40, 20, 60, 40]], [0.9, 0.5, 0.5], [2, 0, 2]
    reference = _instances(boxes, scores, classes, masks)
    assert compare_detections(reference, reference[torch.tensor([2, 0, 1])]).ok

    moved = [list(b) for b in boxes]
    moved[1][0] += 2 * BOX_ATOL
    rescored = [0.9, 0.5 + 2 * SCORE_ATOL, 0.5]
    eroded = masks.copy()
    eroded[0, :, 19] = False  # IoU 0.95
    for other in (
        _instances(moved, scores, classes, masks),
        _instances(boxes, rescored, classes, masks),
        _instances(boxes, scores, [2, 0, 1], masks),
        _instances(boxes, scores, classes, eroded),
        reference[torch.tensor([0, 1])],
    ):
        assert not compare_detections(reference, other).ok
