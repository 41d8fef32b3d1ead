#!/usr/bin/env python
"""`make demo`: the whole pipeline on the built-in synthetic Cityscapes-format data set, on the CPU in minutes.

1. makes the synthetic data set (datasets/cityscapes_synthetic, or $DETECTRON2_DATASETS/...) if it is missing;
2. trains configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml (continues if output/demo has a checkpoint);
3. evaluates the final model with the official Cityscapes evaluation (cityscapesscripts), and with the fast
   evaluator, which saves the predictions;
4. writes the evaluation report of those predictions (plots, gallery, report.html) and overlays for a few val
   images; prints AP, AP50, matterport_AP50 and where everything is.

  python tools/demo.py                          # as make demo
  python tools/demo.py SOLVER.MAX_ITER 1000     # KEY VALUE config overrides, e.g. a longer training
"""
import argparse
import os
import shutil
import time

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from cityseg_d2.data import default_synthetic_root
from cityseg_d2.data.synthetic import make_synthetic_cityscapes
from cityseg_d2.engine import Trainer, setup
from cityseg_d2.engine.predict import build_predictor, predict_images
from cityseg_d2.errors import run_cli
from cityseg_d2.evaluation.predictions_file import PREDICTIONS_FILE, PredictionsFile
from cityseg_d2.evaluation.report_pages import write_report

CONFIG = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
OUTPUT_DIR = "output/demo"
SYNTHETIC_SPLITS = {"train": 300, "val": 50}
NUM_OVERLAYS = 4
# One evaluation after the last iteration (periodic ones would not fit 10 CPU minutes): the official one, whose
# numbers are reported, and the fast one (the same numbers), which saves the predictions the report reads.
EVALUATION = [
    "TEST.EVAL_PERIOD", "0", "TEST.EVALUATORS", '["cityscapes", "cityscapes_fast"]',
    "TEST.CITYSCAPES.SAVE_PREDICTIONS", "True",
]  # fmt: skip


def ensure_synthetic_dataset(root):
    """Generate into a temporary folder and rename, so an interrupted run never leaves half a data set."""
    if os.path.isdir(os.path.join(root, "gtFine")):
        print(f"[demo] synthetic data set found at {root}")
        return
    start = time.perf_counter()
    partial = root + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    make_synthetic_cityscapes(partial, SYNTHETIC_SPLITS, width=512, height=256, seed=0, workers=os.cpu_count() or 1)
    os.replace(partial, root)
    print(f"[demo] made the synthetic data set {SYNTHETIC_SPLITS} at {root} in {time.perf_counter() - start:.0f} s")


def main(overrides):
    ensure_synthetic_dataset(default_synthetic_root())
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, "OUTPUT_DIR", OUTPUT_DIR, *EVALUATION, *overrides]
    )
    args.resume = True
    cfg = setup(args)

    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    print(f"[demo] trained {cfg.SOLVER.MAX_ITER} iterations and evaluated in {time.perf_counter() - start:.0f} s")
    # The evaluation of the final model (a finished training is evaluated again when resumed).
    segm = {key: trainer.storage.latest()[f"segm/{key}"][0] for key in ("AP", "AP50", "matterport_AP50")}

    val_name = cfg.DATASETS.TEST[0]
    evaluation_dir = os.path.join(OUTPUT_DIR, "inference", val_name)
    report_dir = os.path.join(OUTPUT_DIR, "report")
    *_, page = write_report(PredictionsFile.load(os.path.join(evaluation_dir, PREDICTIONS_FILE)), report_dir)

    images = [d["file_name"] for d in DatasetCatalog.get(val_name)[:NUM_OVERLAYS]]
    predictions_dir = os.path.join(OUTPUT_DIR, "predictions")
    predict_cfg = cfg.clone()
    predict_cfg.defrost()
    predict_cfg.MODEL.WEIGHTS = os.path.join(OUTPUT_DIR, "model_final.pth")
    predict_images(build_predictor(predict_cfg), MetadataCatalog.get(val_name), images, predictions_dir)

    print(f"\n[demo] official Cityscapes evaluation of {val_name} (cityscapesscripts):")
    print(f"[demo]   AP {segm['AP']:.1f}   AP50 {segm['AP50']:.1f}   matterport_AP50 {segm['matterport_AP50']:.1f}")
    print(f"[demo] checkpoints, metrics.json, config.yaml, log.txt: {OUTPUT_DIR}/")
    print(f"[demo] evaluation files and saved predictions: {evaluation_dir}/")
    print(f"[demo] evaluation report (PR curves, errors, worst images): {page}")
    print(f"[demo] overlays of {len(images)} val images: {predictions_dir}/overlays/")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args()


if __name__ == "__main__":
    run_cli(main, parse_args().overrides)
