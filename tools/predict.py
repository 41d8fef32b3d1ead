#!/usr/bin/env python
"""Predict instances on images with a trained model: Cityscapes-format result files (what the official evaluation
reads; every detection kept), a JSON per image (every detection, masks as RLE) and overlay PNGs in Cityscapes colours
(detections scoring at least --confidence-threshold).

  python tools/predict.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml \\
      --input 'datasets/cityscapes_synthetic/leftImg8bit/val/*/*.png' --output output/predictions \\
      --opts MODEL.WEIGHTS output/quickstart/model_final.pth
  python tools/predict.py --exported output/export/model.onnx --input photos/ --output output/predictions_onnx

With --exported (a model.ts or model.onnx from tools/export_model.py) the file holds everything needed: no config
or weights. An image that cannot be read is skipped with a warning naming it; the others carry on.
"""
import argparse

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

from cityseg_d2.engine import prepare_config
from cityseg_d2.engine.predict import build_predictor, find_images, predict_images
from cityseg_d2.errors import ConfigError, run_cli


def predictor_and_metadata(args):
    if args.exported:
        if args.config_file or args.opts:
            raise ConfigError("--exported FILE holds the model and its config: drop --config-file and --opts")
        from cityseg_d2.export import ExportedPredictor

        predictor = ExportedPredictor(args.exported)
        return predictor, predictor.metadata
    if not args.config_file:
        raise ConfigError("no model given: pass --config-file (and --opts MODEL.WEIGHTS ...), or --exported FILE")
    cfg = prepare_config(args.config_file, args.opts)
    return build_predictor(cfg), MetadataCatalog.get(cfg.DATASETS.TEST[0])


def main(args):
    setup_logger(name="cityseg_d2")
    if not 0 <= args.confidence_threshold <= 1:
        raise ConfigError(f"--confidence-threshold {args.confidence_threshold}: must be between 0 and 1")
    images = find_images(args.input)
    predictor, metadata = predictor_and_metadata(args)
    summary = predict_images(
        predictor, metadata, images, args.output, args.confidence_threshold, overlays=not args.no_overlays
    )
    if not summary.written:
        raise ConfigError(f"--input {args.input}: none of the {len(images)} files could be read as an image")
    what = "Cityscapes result files and JSON" + ("" if args.no_overlays else " and overlays")
    skipped = f"; skipped {len(summary.skipped)} unreadable (see the warnings)" if summary.skipped else ""
    print(f"wrote {what} for {len(summary.written)} images to {args.output}{skipped}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE")
    parser.add_argument("--exported", default="", metavar="FILE", help="model.ts or model.onnx of tools/export_model.py")
    parser.add_argument("--input", required=True, help="an image, a folder (recursive) or a glob pattern")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="score an overlay shows from (files keep everything)"
    )
    parser.add_argument("--no-overlays", action="store_true", help="write only the result files and JSON")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
