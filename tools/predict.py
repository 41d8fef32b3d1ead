#!/usr/bin/env python
"""Predict instances on images with a trained model: overlay PNGs in Cityscapes colours, Cityscapes-format
result files (the format of the official evaluation) and a JSON per image.

  python tools/predict.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml \\
      --input 'datasets/cityscapes_synthetic/leftImg8bit/val/*/*.png' --output output/predictions \\
      --opts MODEL.WEIGHTS output/quickstart/model_final.pth
"""
import argparse

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.utils.logger import setup_logger

from cityseg_d2.engine import prepare_config
from cityseg_d2.engine.predict import find_images, predict_images
from cityseg_d2.errors import run_cli


def main(args):
    setup_logger(name="cityseg_d2")
    cfg = prepare_config(args.config_file, args.opts)
    images = find_images(args.input)
    predict_images(cfg, images, args.output, args.confidence_threshold)
    print(f"wrote overlays, Cityscapes result files and JSON for {len(images)} images to {args.output}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, help="an image, a folder (recursive) or a glob pattern")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
