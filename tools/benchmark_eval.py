#!/usr/bin/env python
"""Time the official Cityscapes evaluator (cityscapesscripts, through files) against the fast in-memory one on the
same predictions, and check that they agree.

The predictions are a synthetic val split's ground truth with errors (cityseg_d2.evaluation.perturbations), made
image by image from a seed, so both evaluators see the same ones and the whole set never sits in memory; only
the evaluators' process() and evaluate() are timed. Prints both times and, last, the speed ratio and the
largest absolute difference over all reported APs.

    python tools/benchmark_eval.py --images 500 --width 1024 --height 512
"""

import argparse
import math
import tempfile
import time

import numpy as np
import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

from cityseg_d2.data import gt_instance_ids_path, register_cityscapes_instances
from cityseg_d2.data.synthetic import make_synthetic_cityscapes
from cityseg_d2.evaluation import CityscapesInstanceEvaluator, FastCityscapesInstanceEvaluator
from cityseg_d2.evaluation.protocol import EvaluatedClasses, read_gt_instance_ids
from cityseg_d2.evaluation.perturbations import PERTURBATIONS, perturbed_predictions

DATASET = "cityseg_benchmark_eval_val"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500, help="val images to evaluate")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--mean-instances", type=float, default=15, help="ground-truth instances per image")
    parser.add_argument("--perturbation", default="mixed", choices=PERTURBATIONS)
    parser.add_argument(
        "--detections-per-image",
        type=int,
        default=100,
        help="pad each image's predictions with low-scoring false positives up to this many, as Mask R-CNN's "
        "output usually is (TEST.DETECTIONS_PER_IMAGE); 0 = the perturbed ground truth only",
    )
    parser.add_argument("--class-set", default="cityscapes8", choices=["cityscapes8", "cityscapes10"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", help="where to write the synthetic data set (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=2, help="processes that write the data set")
    return parser.parse_args()


def predictions(dataset_dicts, args):
    """(dataset dict, model-like output) of each image, made when asked for."""
    metadata = MetadataCatalog.get(DATASET)
    classes = EvaluatedClasses.of_dataset(DATASET)
    for index, image in enumerate(dataset_dicts):
        gt = read_gt_instance_ids(gt_instance_ids_path(image, metadata))
        rng = np.random.default_rng([args.seed, index])
        instances = perturbed_predictions(gt, classes, args.perturbation, rng, index, args.detections_per_image)
        yield image, {"instances": instances}


def timed_evaluation(evaluator, dataset_dicts, args):
    """(results, seconds spent in reset/process/evaluate, number of predicted instances)."""
    seconds, num_predictions = 0.0, 0
    start = time.perf_counter()
    evaluator.reset()
    seconds += time.perf_counter() - start
    for image, output in predictions(dataset_dicts, args):
        num_predictions += len(output["instances"])
        start = time.perf_counter()
        evaluator.process([image], [output])
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    results = evaluator.evaluate()
    return results, seconds + time.perf_counter() - start, num_predictions


def largest_difference(official, fast):
    if list(official) != list(fast):
        raise SystemExit(f"the evaluators report different keys: {list(official)} vs {list(fast)}")
    differences = [
        0.0 if math.isnan(a) and math.isnan(b) else abs(a - b) for a, b in zip(official.values(), fast.values())
    ]
    return max(differences)


def main():
    args = parse_args()
    setup_logger(name="cityseg_d2")
    with tempfile.TemporaryDirectory(prefix="cityseg_benchmark_eval_") as temp_root:
        root = args.root or temp_root
        start = time.perf_counter()
        make_synthetic_cityscapes(
            root, {"val": args.images}, args.width, args.height, args.seed, args.mean_instances, args.workers
        )
        print(
            f"synthetic val split: {args.images} images of {args.width}x{args.height} in {root} "
            f"({time.perf_counter() - start:.1f} s to write)"
        )
        register_cityscapes_instances(
            DATASET, root, "val", class_set=args.class_set, mask_source="instance_ids", cache=False
        )
        dataset_dicts = DatasetCatalog.get(DATASET)

        official, official_seconds, num_predictions = timed_evaluation(
            CityscapesInstanceEvaluator(DATASET), dataset_dicts, args
        )
        fast, fast_seconds, _ = timed_evaluation(FastCityscapesInstanceEvaluator(DATASET), dataset_dicts, args)

    n = len(dataset_dicts)
    print(
        f"predictions: {num_predictions} instances ({num_predictions / n:.1f} per image), perturbation "
        f"{args.perturbation!r}, class set {args.class_set}"
    )
    print(
        f"official (cityscapesscripts): {official_seconds:8.2f} s  ({1000 * official_seconds / n:7.1f} ms/image)  "
        f"AP {official['segm']['AP']:.3f}  AP50 {official['segm']['AP50']:.3f}"
    )
    print(
        f"fast (in memory):             {fast_seconds:8.2f} s  ({1000 * fast_seconds / n:7.1f} ms/image)  "
        f"AP {fast['segm']['AP']:.3f}  AP50 {fast['segm']['AP50']:.3f}"
    )
    print(f"speed ratio (official / fast): {official_seconds / fast_seconds:.1f}x")
    print(f"largest absolute AP difference: {largest_difference(official['segm'], fast['segm']):.3g}")


if __name__ == "__main__":
    main()
