#!/usr/bin/env python
"""Training or inference speed of stock detectron2 against the fast path, side by side in one run (ABAB...).

Both sides get the same config (--config-file plus trailing KEY VALUE overrides), the same weights (ours are
copied from stock's model) and the same data: a synthetic Cityscapes train split of --images images at
--width x --height read from files on disk (made once under --data-dir). The full loop is timed:

  train:     stock is detectron2's DefaultTrainer (its SimpleTrainer, or AMPTrainer when SOLVER.AMP.ENABLED on
             a GPU) with its hooks; ours is cityseg_d2's Trainer with the fast path's switches. Data loading (the
             loader workers reading PNGs and polygons, the mapper), forward, backward and optimizer step count.
  inference: stock is detectron2's DefaultPredictor, one image file at a time (read_image, predictor); ours is
             the Trainer's test loop (loader workers, CITYSEG.FAST.TEST_BATCH_SIZE images per forward pass,
             CITYSEG.FAST.TEST_PRECISION autocast). With --evaluate (default) each output also goes through the
             "cityscapes_fast" evaluator's process(), on both sides.

Ours is the config plus cityseg_d2.modeling.fast_path.FAST_PATH_OPTS (unless --no-fast-defaults), plus
--ours-opts "KEY VALUE ...". Each round runs --warmup untimed then --iters timed iterations of stock, then of
ours; a round's ratio is ours/stock in img/s; the median over --rounds is reported with the load average
(os.getloadavg) before and after. Peak GPU memory is torch.cuda.max_memory_allocated during a side's timed
iterations (it includes the other side's resident weights, a few hundred MB). A random-init model (no local
MODEL.WEIGHTS) gets the residual branches' last norm zeroed, so that a FrozenBN ResNet stays finite (timing
only), and SOLVER.BASE_LR 1e-4.

  python tools/benchmark_speed.py --config-file configs/mask_rcnn_R_50_FPN_coco.yaml --mode train --device cuda
  python tools/benchmark_speed.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml \\
      --mode train --device cpu --width 512 --height 256 --batch 2 --iters 4 --warmup 1 --rounds 3
"""

import argparse
import itertools
import json
import logging
import os
import shlex
import statistics
import tempfile
import time

import numpy as np
import torch

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
from detectron2.data.detection_utils import read_image
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultPredictor, DefaultTrainer
from detectron2.utils.events import EventStorage

from cityseg_d2.data import register_cityscapes_instances
from cityseg_d2.data.synthetic import make_synthetic_cityscapes
from cityseg_d2.engine import Trainer, prepare_config
from cityseg_d2.errors import ConfigError, run_cli
from cityseg_d2.evaluation import build_evaluator
from cityseg_d2.modeling import build_fast_model, inference_autocast
from cityseg_d2.modeling.fast_path import fast_path_opts

DATASET = "cityseg_benchmark_speed"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--mode", choices=["train", "inference"], default="train")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (batches) per side and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per side before each round's")
    parser.add_argument("--rounds", type=int, default=3, help="stock then ours, this many times")
    parser.add_argument("--batch", type=int, default=8, help="images per iteration (SOLVER.IMS_PER_BATCH; ours' "
                        "inference batch)")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--instances", type=float, default=20, help="mean instances per image (Cityscapes: ~20)")
    parser.add_argument("--images", type=int, default=32, help="images in the synthetic data set")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "cityseg_benchmark_speed"))
    parser.add_argument("--ours-opts", default="", help='extra overrides for ours, e.g. "CITYSEG.FAST.NMS grouped"')
    parser.add_argument("--no-fast-defaults", action="store_true", help="ours is the config plus --ours-opts only")
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="inference without evaluator")
    parser.add_argument("--json", metavar="OUT", help="write the per-round figures and medians here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides for both sides")
    return parser.parse_args(argv)


def synthetic_data(args):
    """The synthetic train split's root, made once per size, instance count and image count."""
    root = os.path.join(args.data_dir, f"{args.width}x{args.height}_{args.instances:g}_{args.images}")
    if not os.path.isdir(os.path.join(root, "gtFine")):
        logging.getLogger(__name__).warning("writing %d synthetic images to %s", args.images, root)
        make_synthetic_cityscapes(root, {"train": args.images}, args.width, args.height, mean_instances=args.instances,
                                  workers=min(8, os.cpu_count() or 1))  # fmt: skip
    return root


def configs(args, output_dir):
    """(stock, ours) configs: the same data, batch and device; ours with the fast path."""
    common = [
        "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", f"('{DATASET}',)", "MODEL.DEVICE", args.device,
        "SOLVER.IMS_PER_BATCH", str(args.batch), "SOLVER.MAX_ITER", "1000000", "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "1000000", "TEST.EVAL_PERIOD", "0", "CITYSEG.BEST_CHECKPOINT_METRIC", "",
        "TEST.EVALUATORS", '["cityscapes_fast"]', "OUTPUT_DIR", output_dir, *args.opts,
    ]  # fmt: skip
    stock = prepare_config(args.config_file, common)
    if not os.path.isfile(stock.MODEL.WEIGHTS):
        stock = prepare_config(args.config_file, [*common, "MODEL.WEIGHTS", "", "SOLVER.BASE_LR", "1e-4"])
    ours_opts = [] if args.no_fast_defaults else fast_path_opts(args.batch)
    ours = prepare_config(None, [*ours_opts, *shlex.split(args.ours_opts)], base=stock)
    return stock, ours


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def calm_random_init(model):
    """Zero the last norm of every residual branch (as ../shared/bench/gpu_anchor.py does): a random FrozenBN
    ResNet then keeps finite activations. GroupNorm/BN models are left as they are."""
    from detectron2.layers import FrozenBatchNorm2d

    for name, module in model.named_modules():
        if name.endswith("conv3.norm") and isinstance(module, FrozenBatchNorm2d):
            module.weight.zero_()


class TrainingSide:
    """A trainer driven a few iterations at a time, with its own EventStorage and hooks (TrainerBase.train's loop)."""

    def __init__(self, trainer):
        self.trainer = trainer
        trainer.iter = trainer.start_iter = 0
        trainer.max_iter = 1000000
        trainer.storage = EventStorage(0)
        with trainer.storage:
            trainer.before_train()

    def run(self, iterations):
        trainer = self.trainer
        with trainer.storage:
            for _ in range(iterations):
                trainer.before_step()
                trainer.run_step()
                trainer.after_step()
                trainer.iter += 1
        data_times = [v for v, _ in trainer.storage.history("data_time").values()[-iterations:]] if iterations else []
        return iterations * trainer.cfg.SOLVER.IMS_PER_BATCH, data_times

    def close(self):
        with self.trainer.storage:
            self.trainer.after_train()


class StockInference:
    """detectron2's DefaultPredictor on image files, one at a time, each output evaluated."""

    def __init__(self, cfg, model, dataset_dicts, evaluator):
        self.predictor = DefaultPredictor(cfg)
        self.predictor.model.load_state_dict(model.state_dict())
        self.images = itertools.cycle(dataset_dicts)
        self.evaluator = evaluator
        self.batch = cfg.SOLVER.IMS_PER_BATCH

    def run(self, iterations):
        data_times = []
        for _ in range(iterations):
            data_time = 0.0
            for _ in range(self.batch):
                record = next(self.images)
                start = time.perf_counter()
                image = read_image(record["file_name"], format="BGR")
                data_time += time.perf_counter() - start
                output = self.predictor(image)
                if self.evaluator:
                    self.evaluator.process([record], [output])
            data_times.append(data_time)
        return iterations * self.batch, data_times

    def close(self):
        pass


class FastInference:
    """The Trainer's test loop (test loader with workers, batched, autocast), on a loader that cycles."""

    def __init__(self, cfg, model, dataset_dicts, evaluator):
        self.cfg = cfg
        self.model = build_fast_model(cfg)
        self.model.load_state_dict(model.state_dict())
        self.model.eval()
        loader = build_detection_test_loader(
            dataset_dicts, mapper=DatasetMapper(cfg, False), sampler=TrainingSampler(len(dataset_dicts), shuffle=False),
            batch_size=cfg.CITYSEG.FAST.TEST_BATCH_SIZE, num_workers=cfg.DATALOADER.NUM_WORKERS,
        )  # fmt: skip
        self.batches = iter(loader)
        self.evaluator = evaluator

    def run(self, iterations):
        data_times, images = [], 0
        with torch.no_grad(), inference_autocast(self.cfg):
            for _ in range(iterations):
                start = time.perf_counter()
                inputs = next(self.batches)
                data_times.append(time.perf_counter() - start)
                outputs = self.model(inputs)
                if self.evaluator:
                    self.evaluator.process(inputs, outputs)
                images += len(inputs)
        return images, data_times

    def close(self):
        pass


def build_sides(args, stock_cfg, ours_cfg):
    if args.mode == "train":
        stock = DefaultTrainer(stock_cfg)
        if not stock_cfg.MODEL.WEIGHTS:
            calm_random_init(stock.model)
        ours = Trainer(ours_cfg)
        ours.model.load_state_dict(stock.model.state_dict())
        return TrainingSide(stock), TrainingSide(ours)
    dicts = DatasetCatalog.get(DATASET)
    reference = build_fast_model(stock_cfg)
    if stock_cfg.MODEL.WEIGHTS:
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(reference).load(stock_cfg.MODEL.WEIGHTS)
    else:
        calm_random_init(reference)
    evaluators = [build_evaluator(cfg, DATASET, os.path.join(cfg.OUTPUT_DIR, name)) if args.evaluate else None
                  for cfg, name in ((stock_cfg, "stock"), (ours_cfg, "ours"))]  # fmt: skip
    for evaluator in evaluators:
        if evaluator:
            evaluator.reset()
    stock_cfg = stock_cfg.clone()
    stock_cfg.defrost()
    stock_cfg.MODEL.WEIGHTS = ""
    return StockInference(stock_cfg, reference, dicts, evaluators[0]), FastInference(
        ours_cfg, reference, dicts, evaluators[1]
    )


def timed(side, iterations, device):
    """img/s, s/iter, median data_time and peak GPU memory (GiB) of `iterations` iterations of a side."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    images, data_times = side.run(iterations)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else float("nan")
    return {"img_per_s": images / seconds, "s_per_iter": seconds / iterations,
            "data_time": statistics.median(data_times), "peak_gib": peak}  # fmt: skip


def summary(rounds, name):
    return {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}


def main(args):
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("d2").setLevel(logging.WARNING)
    if args.iters < 1 or args.rounds < 1 or args.warmup < 0:
        raise ConfigError("--iters and --rounds must be >= 1 and --warmup >= 0")
    torch.manual_seed(0)
    np.random.seed(0)
    root = synthetic_data(args)
    register_cityscapes_instances(DATASET, root, "train")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cityseg_benchmark_speed_") as output_dir:
        stock_cfg, ours_cfg = configs(args, output_dir)
        sides = build_sides(args, stock_cfg, ours_cfg)
        rounds = []
        try:
            for index in range(args.rounds):
                figures = {}
                for name, side in zip(("stock", "ours"), sides):
                    side.run(args.warmup)
                    figures[name] = timed(side, args.iters, args.device)
                figures["ratio"] = figures["ours"]["img_per_s"] / figures["stock"]["img_per_s"]
                rounds.append(figures)
                print(f"round {index + 1}: stock {figures['stock']['img_per_s']:.2f} img/s, ours "
                      f"{figures['ours']['img_per_s']:.2f} img/s, ratio {figures['ratio']:.2f}", flush=True)  # fmt: skip
        finally:
            for side in sides:
                side.close()
    load_after = os.getloadavg()
    result = {
        "mode": args.mode, "device": args.device, "config": args.config_file, "size": [args.width, args.height],
        "batch": args.batch, "iters": args.iters, "warmup": args.warmup, "rounds": rounds,
        "stock": summary(rounds, "stock"), "ours": summary(rounds, "ours"),
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "ours_opts": [] if args.no_fast_defaults else fast_path_opts(args.batch), "ours_extra_opts": args.ours_opts,
        "load_average_before": load_before, "load_average_after": load_after,
    }  # fmt: skip
    print(f"\n{args.mode} on {args.device}, {args.width}x{args.height}, batch {args.batch}, {args.rounds} rounds "
          f"of {args.iters} timed iterations (medians)")  # fmt: skip
    print(f"{'':6} {'img/s':>8} {'s/iter':>8} {'data_time':>10} {'peak GiB':>9}")
    for name in ("stock", "ours"):
        s = result[name]
        print(f"{name:6} {s['img_per_s']:8.2f} {s['s_per_iter']:8.3f} {s['data_time']:10.4f} {s['peak_gib']:9.2f}")
    print(f"ratio ours/stock (median of rounds): {result['median_ratio']:.2f}")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    run_cli(main, parse_args())
