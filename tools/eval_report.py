#!/usr/bin/env python
"""Write an evaluation report of a trained model: per-class precision-recall curves (IoU 0.5 and 0.5:0.95), AP as a
function of the IoU threshold, AP by instance size, the confusion of the detections, false positives by kind,
missed instances by size and occlusion, and a gallery of the worst images; PNG plots, report.json and one
self-contained report.html in --out, and the same in W&B when the config turns it on.

Run the model once (its predictions are saved to OUT/inference/<dataset>/cityscapes_predictions.npz):

  python tools/eval_report.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml \\
      --weights output/quickstart/model_final.pth --out output/quickstart/report

then report again from the saved predictions, nothing re-run (e.g. with another --score-threshold):

  python tools/eval_report.py --predictions output/quickstart/report/inference/cityscapes_synthetic_instance_val/cityscapes_predictions.npz \\
      --out output/quickstart/report_again
"""

import argparse
import os

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger

from cityseg_d2.engine import Trainer, prepare_config
from cityseg_d2.errors import ConfigError, run_cli
from cityseg_d2.evaluation.predictions_file import PREDICTIONS_FILE, PredictionsFile
from cityseg_d2.evaluation.report_pages import log_report_to_wandb, write_report
from cityseg_d2.integrations import wandb_enabled


def run_model(args):
    """Evaluate --weights on the data set with the fast evaluator saving its predictions; (config, file)."""
    if not args.config_file:
        raise ConfigError("--weights needs the model's --config-file")
    opts = [
        *args.opts,
        "MODEL.WEIGHTS", args.weights,
        "OUTPUT_DIR", args.out,
        "TEST.EVALUATORS", '["cityscapes_fast"]',
        "TEST.CITYSCAPES.SAVE_PREDICTIONS", "True",
    ]  # fmt: skip
    if args.dataset:
        opts += ["DATASETS.TEST", f"('{args.dataset}',)"]
    cfg = prepare_config(args.config_file, opts)
    if not cfg.DATASETS.TEST:
        raise ConfigError(f"{args.config_file} names no DATASETS.TEST: pass --dataset NAME")
    dataset = cfg.DATASETS.TEST[0]
    if not DatasetCatalog.get(dataset):
        raise ConfigError(
            f"data set {dataset} has no images: nothing to evaluate (check its root and DATASETS.CITYSCAPES)"
        )
    Trainer.evaluate_weights(cfg)
    return cfg, os.path.join(args.out, "inference", dataset, PREDICTIONS_FILE)


def main(args):
    setup_logger(name="cityseg_d2")
    if args.predictions and args.weights:
        raise ConfigError("give --weights (run the model) or --predictions (report a saved run), not both")
    if args.predictions:
        cfg = prepare_config(args.config_file, args.opts) if args.config_file else None
        predictions_file = args.predictions
    elif args.weights:
        cfg, predictions_file = run_model(args)
    else:
        raise ConfigError("no weights: pass --weights W (with --config-file), or --predictions FILE saved by a run")
    predictions = PredictionsFile.load(predictions_file)
    report, figures, gallery, page = write_report(
        predictions, args.out, args.dataset, args.score_threshold, args.gallery
    )
    if cfg is not None and wandb_enabled(cfg):
        from cityseg_d2.integrations.wandb import init_wandb_run

        run = init_wandb_run(cfg, extra_config={"eval_report": {"predictions": predictions_file}})
        if run is not None:
            log_report_to_wandb(run, report, figures, gallery)
            run.finish()
    print(f"AP {report['AP']:.2f}, AP50 {report['AP50']:.2f} on {report['dataset']} ({report['images']} images)")
    print(f"report: {page} (plots, report.json and gallery/ beside it); predictions: {predictions_file}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", metavar="FILE", help="the model's config (registers its data sets)")
    parser.add_argument("--weights", metavar="W", help="trained weights to run on the data set")
    parser.add_argument("--predictions", metavar="FILE", help="a saved cityscapes_predictions.npz (nothing is run)")
    parser.add_argument("--dataset", help="data set to report on (default: DATASETS.TEST[0], or the predictions')")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="detections counted as errors or hits")
    parser.add_argument("--gallery", type=int, default=6, help="worst images shown")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
