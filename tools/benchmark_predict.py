#!/usr/bin/env python
"""tools/predict.py against detectron2's DefaultPredictor: DefaultPredictor alone (predictions, no files) vs
predict_images (our predictor, plus result files, JSON and overlays), alternated ABAB... on the same images and
weights in one run.

Prints images per second of each round, the median ratio predict_images / DefaultPredictor (>= 1.0: every file a user
asked for comes at no cost over detectron2's bare predictor) and the load average. Not a test: numbers depend on the machine. On the synthetic data set:

  python tools/benchmark_predict.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml \\
      --images 'datasets/cityscapes_synthetic/leftImg8bit/val/*/*.png' --limit 20 --rounds 3 \\
      --opts MODEL.WEIGHTS output/demo/model_final.pth
"""
import argparse
import os
import statistics
import tempfile
import time

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor

from cityseg_d2.engine import prepare_config
from cityseg_d2.engine.predict import build_predictor, find_images, predict_images, resolve_weights
from cityseg_d2.errors import run_cli


def time_predictor(predictor, paths):
    start = time.perf_counter()
    for path in paths:
        predictor(read_image(path, format="BGR"))
    return len(paths) / (time.perf_counter() - start)


def time_predict_images(predictor, metadata, paths, overlays):
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        predict_images(predictor, metadata, paths, out, overlays=overlays)
        return len(paths) / (time.perf_counter() - start)


def main(args):
    cfg = prepare_config(args.config_file, args.opts)
    paths = find_images(args.images)[: args.limit]
    predictor = build_predictor(cfg)
    reference_cfg = cfg.clone()
    reference_cfg.defrost()
    reference_cfg.MODEL.WEIGHTS = resolve_weights(cfg)
    stock = DefaultPredictor(reference_cfg)
    time_predictor(stock, paths[:2])  # warm-up
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    time_predict_images(predictor, metadata, paths[:2], overlays=False)
    load_before = os.getloadavg()
    rows = []
    for round_index in range(args.rounds):
        reference = time_predictor(stock, paths)
        ours = time_predict_images(predictor, metadata, paths, overlays=not args.no_overlays)
        rows.append((reference, ours))
        print(f"round {round_index + 1}: DefaultPredictor {reference:.2f} img/s, predict_images {ours:.2f} img/s, "
              f"ratio {ours / reference:.3f}", flush=True)  # fmt: skip
    load_after = os.getloadavg()
    ratio = statistics.median(ours / reference for reference, ours in rows)
    print(f"{len(paths)} images x {args.rounds} rounds, overlays {'off' if args.no_overlays else 'on'}: median ratio "
          f"predict_images / DefaultPredictor {ratio:.3f}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--images", required=True, help="an image, a folder (recursive) or a glob pattern")
    parser.add_argument("--limit", type=int, default=20, help="images per round")
    parser.add_argument("--rounds", type=int, default=3, help="ABAB rounds")
    parser.add_argument("--no-overlays", action="store_true")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
