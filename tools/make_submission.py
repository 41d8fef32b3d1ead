#!/usr/bin/env python
"""Predict a Cityscapes split and pack the result files as the Cityscapes benchmark server expects them.

  python tools/make_submission.py --config-file configs/mask_rcnn_R_50_FPN_coco.yaml \\
      --weights output/mask_rcnn_R_50_FPN_coco/model_final.pth --output submission.zip

The zip holds `<city>_<seq>_<frame>.txt` per image, a line `masks/<png> <label id> <confidence>` per instance,
and the mask PNGs in masks/: every detection the model returns (MODEL.ROI_HEADS.SCORE_THRESH_TEST and
TEST.DETECTIONS_PER_IMAGE apply, no display threshold). --dataset cityscapes_instance_val --evaluate packs the
val split and scores the zip's contents with cityscapesscripts' own evaluation, which must agree with
`train_net.py --eval-only`.
"""

import argparse

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.utils.logger import setup_logger

from cityseg_d2.engine import prepare_config
from cityseg_d2.engine.predict import resolve_weights
from cityseg_d2.errors import run_cli
from cityseg_d2.export.exporter import load_trained_model
from cityseg_d2.export.submission import check_output, evaluate_submission, ground_truth_files, write_submission
from cityseg_d2.modeling import build_fast_model


def main(args):
    setup_logger(name="cityseg_d2")
    check_output(args.output, args.overwrite)
    opts = list(args.opts) + ["DATASETS.TEST", f"('{args.dataset}',)"]
    cfg = prepare_config(args.config_file, opts + (["MODEL.WEIGHTS", args.weights] if args.weights else []))
    if args.evaluate:
        ground_truth_files(args.dataset)
    model = load_trained_model(cfg, resolve_weights(cfg), cfg.MODEL.DEVICE, build_fast_model)
    images, instances = write_submission(cfg, model, args.dataset, args.output)
    print(f"wrote {args.output}: result files of {images} images of {args.dataset}, {instances} instances")
    if args.evaluate:
        averages = evaluate_submission(args.output, args.dataset, print_table=True)["averages"]
        print(
            f"cityscapesscripts on {args.output}: AP {100 * averages['allAp']:.3f}, AP50 {100 * averages['allAp50%']:.3f}"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--weights", metavar="FILE", help="trained model (default: MODEL.WEIGHTS, else OUTPUT_DIR/model_final.pth)"
    )
    parser.add_argument("--output", required=True, metavar="ZIP")
    parser.add_argument(
        "--dataset", default="cityscapes_instance_test", help="a registered split (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--evaluate", action="store_true", help="score the zip with cityscapesscripts (needs the split's ground truth)"
    )
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
