#!/usr/bin/env python
"""Time the official Cityscapes evaluator (cityscapesscripts, through files) against the fast one on the same
predictions, alternating them in rounds, and check that they agree.

The predictions are a synthetic val split's ground truth with errors (cityseg_d2.evaluation.perturbations),
exactly --predictions per image like a detector's output, made image by image from a seed, so every evaluator
sees the same ones and the whole set never sits in memory; only the evaluators' reset(), process() and
evaluate() are timed. Each round runs the official evaluator, then the fast one twice: cold (a new, empty dataset
cache: every ground-truth PNG decoded and cached) and warm (the cache filled, as in every evaluation on a machine
after the first one of the data set). Each round prints its times and ratios; the end prints the median
ratios, the largest AP difference between the evaluators and the load average (os.getloadavg) before and after.

    python tools/benchmark_eval.py --images 20 --width 2048 --height 1024 --predictions 100 --rounds 3
"""

import argparse
import logging
import math
import os
import statistics
import tempfile
import time

import numpy as np
import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

from cityseg_d2.data import gt_instance_ids_path, register_cityscapes_instances
from cityseg_d2.data.synthetic import make_synthetic_cityscapes
from cityseg_d2.evaluation import CityscapesInstanceEvaluator, FastCityscapesInstanceEvaluator
from cityseg_d2.evaluation.perturbations import PERTURBATIONS, perturbed_predictions
from cityseg_d2.evaluation.protocol import EvaluatedClasses, read_gt_instance_ids

DATASET = "cityseg_benchmark_eval_val"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20, help="val images to evaluate")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument(
        "--predictions",
        type=int,
        default=100,
        help="predictions per image: the best-scoring perturbed ground truth, padded with low-scoring false "
        "positives (Mask R-CNN's output is TEST.DETECTIONS_PER_IMAGE = 100 per image)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="official, fast cold, fast warm: this many times")
    parser.add_argument("--mean-instances", type=float, default=15, help="ground-truth instances per image")
    parser.add_argument("--perturbation", default="mixed", choices=PERTURBATIONS)
    parser.add_argument("--class-set", default="cityscapes8", choices=["cityscapes8", "cityscapes10"])
    parser.add_argument("--device", default="cpu", help="where the predicted masks are, as after inference there")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", help="where to write the synthetic data set (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=2, help="processes that write the data set")
    return parser.parse_args(argv)


def predictions(dataset_dicts, args):
    """(dataset dict, model-like output) of each image, made when asked for, on args.device."""
    metadata = MetadataCatalog.get(DATASET)
    classes = EvaluatedClasses.of_dataset(DATASET)
    for index, image in enumerate(dataset_dicts):
        gt = read_gt_instance_ids(gt_instance_ids_path(image, metadata))
        rng = np.random.default_rng([args.seed, index])
        instances = perturbed_predictions(gt, classes, args.perturbation, rng, index, args.predictions)
        yield image, {"instances": instances.to(args.device)}


def timed_evaluation(evaluator, dataset_dicts, args):
    """(results, seconds spent in reset/process/evaluate)."""
    seconds = 0.0
    start = time.perf_counter()
    evaluator.reset()
    seconds += time.perf_counter() - start
    for image, output in predictions(dataset_dicts, args):
        start = time.perf_counter()
        evaluator.process([image], [output])
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    results = evaluator.evaluate()
    return results["segm"], seconds + time.perf_counter() - start


def largest_difference(official, fast):
    if list(official) != list(fast):
        raise SystemExit(f"the evaluators report different keys: {list(official)} vs {list(fast)}")
    differences = [
        0.0 if math.isnan(a) and math.isnan(b) else abs(a - b) for a, b in zip(official.values(), fast.values())
    ]
    return max(differences)


def load_average():
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="cityseg_d2")
    logging.getLogger("cityseg_d2.evaluation").setLevel(logging.WARNING)  # not a results table per evaluation
    with tempfile.TemporaryDirectory(prefix="cityseg_benchmark_eval_") as temp_root:
        root = args.root or os.path.join(temp_root, "data")
        start = time.perf_counter()
        make_synthetic_cityscapes(
            root, {"val": args.images}, args.width, args.height, args.seed, args.mean_instances, args.workers
        )
        print(
            f"synthetic val split: {args.images} images of {args.width}x{args.height} in {root} "
            f"({time.perf_counter() - start:.1f} s to write); {args.predictions} predictions per image "
            f"(perturbation {args.perturbation!r}) on {args.device}, class set {args.class_set}"
        )
        register_cityscapes_instances(
            DATASET, root, "val", class_set=args.class_set, mask_source="instance_ids", cache=False
        )
        dataset_dicts = DatasetCatalog.get(DATASET)
        n = len(dataset_dicts)
        print(f"load average before (1/5/15 min): {load_average()}")
        cold_ratios, warm_ratios, difference = [], [], 0.0
        for round_index in range(args.rounds):
            # Our official evaluator reads the ground truth through the same dataset cache: it gets its own, and the
            # fast one a fresh one, whose first evaluation (cold) decodes every ground-truth PNG.
            os.environ["CITYSEG_D2_CACHE_DIR"] = os.path.join(temp_root, f"cache_{round_index}_official")
            official, official_s = timed_evaluation(CityscapesInstanceEvaluator(DATASET), dataset_dicts, args)
            os.environ["CITYSEG_D2_CACHE_DIR"] = os.path.join(temp_root, f"cache_{round_index}_fast")
            times = {}
            for kind in ("cold", "warm"):
                fast, times[kind] = timed_evaluation(
                    FastCityscapesInstanceEvaluator(DATASET, os.path.join(temp_root, "fast")), dataset_dicts, args
                )
                difference = max(difference, largest_difference(official, fast))
            cold_ratios.append(official_s / times["cold"])
            warm_ratios.append(official_s / times["warm"])
            print(
                f"round {round_index + 1}: official {1000 * official_s / n:8.1f} ms/image, "
                f"fast cold {1000 * times['cold'] / n:6.1f} ms/image ({cold_ratios[-1]:6.1f}x), "
                f"fast warm {1000 * times['warm'] / n:6.1f} ms/image ({warm_ratios[-1]:6.1f}x)"
            )
    print(f"AP {official['AP']:.3f}  AP50 {official['AP50']:.3f}; largest absolute AP difference: {difference:.3g}")
    print(f"load average after (1/5/15 min): {load_average()}")
    print(
        f"median speed ratio (official / fast) over {args.rounds} rounds: cold {statistics.median(cold_ratios):.1f}x, "
        f"warm {statistics.median(warm_ratios):.1f}x"
    )


if __name__ == "__main__":
    main()
