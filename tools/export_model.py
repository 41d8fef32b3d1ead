#!/usr/bin/env python
"""Export a trained Mask R-CNN to TorchScript (DIR/model.ts) or ONNX (DIR/model.onnx), then check on the sample
image that the exported file, run by cityseg_d2.export.ExportedPredictor, detects what the PyTorch model detects.

  python tools/export_model.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml \\
      --format onnx --output output/export --opts MODEL.WEIGHTS output/quickstart/model_final.pth

The graph takes the image resized to the test size and returns boxes, classes, scores and 28x28 mask
probabilities; the resize and the pasting of the masks into the image are done by ExportedPredictor
(`python tools/predict.py --exported DIR/model.onnx ...` runs it).
"""

import argparse
import os

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.utils.logger import setup_logger

from cityseg_d2.engine import prepare_config
from cityseg_d2.errors import run_cli
from cityseg_d2.export import DEFAULT_ONNX_OPSET, EXPORT_METHODS, FORMATS, ExportError, export_model
from cityseg_d2.export.exporter import FILE_NAMES, check_export_options, sample_image
from cityseg_d2.export.parity import check_exported


def main(args):
    setup_logger(name="cityseg_d2")
    check_export_options(args.format, args.export_method, args.opset)
    target = os.path.join(args.output, FILE_NAMES[args.format])
    if os.path.exists(target) and not args.overwrite:
        raise ExportError(f"{target} exists: pass --overwrite to replace it, or choose another --output")
    cfg = prepare_config(args.config_file, args.opts)
    image = sample_image(cfg, args.sample_image)
    path = export_model(cfg, args.format, args.output, args.export_method, image=image, opset=args.opset)
    parity = check_exported(cfg, path, image)
    if not parity.ok:
        raise ExportError(f"{path} was written but does not match the PyTorch model on the sample image: {parity}")
    print(f"wrote {path}; on the sample image: {parity}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, help=" or ".join(FORMATS))
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for model.ts / model.onnx")
    parser.add_argument(
        "--export-method", default="tracing", help=f"{' or '.join(EXPORT_METHODS)} (scripting: TorchScript only)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an exported file of the same format in --output"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_ONNX_OPSET, help="ONNX opset (16..20)")
    parser.add_argument(
        "--sample-image", metavar="IMAGE", help="image to trace and check with (default: the first of DATASETS.TEST)"
    )
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
