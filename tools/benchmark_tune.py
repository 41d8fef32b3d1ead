#!/usr/bin/env python
"""What ASHA saves: one learning-rate grid swept twice, every trial to the end (FIFO) and with ASHA.

Prints, side by side, the trials' compute (iterations trained, allocated CPU- and GPU-seconds, wall clock)
and the best metric each sweep found. Not a test: numbers depend on the machine. On the synthetic data set:

  python tools/benchmark_tune.py                                    # quickstart config, 5 learning rates
  python tools/benchmark_tune.py --lrs 0.005 0.01 0.02 0.04 --max-iter 600 --eval-period 100 --grace 100
"""
import argparse
import os
import time

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
import ray

from cityseg_d2.engine import prepare_config
from cityseg_d2.errors import run_cli
from cityseg_d2.tune import (
    connect_ray,
    format_table,
    new_experiment,
    parse_sweep,
    resolve_resources,
    start_sweep,
    trial_rows,
    validate_sweep,
    write_summary,
)

QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=QUICKSTART)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.0025, 0.005, 0.01, 0.02, 0.04], help="the LR grid")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--eval-period", type=int, default=50)
    parser.add_argument("--grace", type=int, default=50, help="ASHA grace period (iterations)")
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--metric", default="segm/AP")
    parser.add_argument("--mode", default="max")
    parser.add_argument("--cpus-per-trial", type=float, default=None)
    parser.add_argument("--gpus-per-trial", type=float, default=None)
    parser.add_argument("--address", default=None)
    parser.add_argument("--storage", default="output/benchmark_tune")
    parser.add_argument("opts", nargs="*", default=[], metavar="KEY VALUE", help="overrides of the base config")
    return parser


def sweep_of(args, name, scheduler):
    return parse_sweep(
        {
            "name": name,
            "metric": args.metric,
            "mode": args.mode,
            "scheduler": scheduler,
            "space": {"SOLVER.BASE_LR": {"grid": args.lrs}},
        },
        source=f"<{name}>",
    )


def run(args, sweep, cfg):
    sweep = resolve_resources(sweep, cfg, ray.cluster_resources(), args.cpus_per_trial, args.gpus_per_trial)
    experiment_dir = new_experiment(args.storage, sweep.name)
    start = time.perf_counter()
    results = start_sweep(sweep, cfg, experiment_dir)
    wall = time.perf_counter() - start
    rows = trial_rows(results, sweep, cfg)
    write_summary(rows, experiment_dir)
    trial_seconds = sum(r.metrics.get("time_total_s", 0) for r in results if r.metrics)
    best = rows[0]
    return {
        "trials": len(rows),
        "stopped early": sum(r["status"] == "stopped early" for r in rows),
        "iterations trained": sum(r["iterations"] for r in rows),
        "CPU-seconds (allocated)": trial_seconds * sweep.cpus_per_trial,
        "GPU-seconds (allocated)": trial_seconds * sweep.gpus_per_trial,
        "wall clock (s)": wall,
        f"best {sweep.metric}": best[sweep.metric],
        "best SOLVER.BASE_LR": best["SOLVER.BASE_LR"],
    }


def main(args):
    opts = ["SOLVER.MAX_ITER", str(args.max_iter), "TEST.EVAL_PERIOD", str(args.eval_period), *args.opts]
    cfg = prepare_config(args.config_file, opts)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    grid = sweep_of(args, f"grid_{stamp}", {"type": "fifo"})
    asha = sweep_of(
        args, f"asha_{stamp}", {"type": "asha", "grace_period": args.grace, "reduction_factor": args.reduction_factor}
    )
    for sweep in (grid, asha):
        validate_sweep(sweep, cfg)
    connect_ray(args.address)
    figures = {"full grid": run(args, grid, cfg), "ASHA": run(args, asha, cfg)}

    print(f"\n{len(args.lrs)} learning rates, {args.max_iter} iterations, evaluation every {args.eval_period}, "
          f"ASHA grace {args.grace}, reduction factor {args.reduction_factor}; {args.config_file}")  # fmt: skip
    print(format_table([{"": key, **{arm: figures[arm][key] for arm in figures}} for key in figures["full grid"]]))
    print(f"Experiments: {os.path.abspath(args.storage)}/{{{grid.name},{asha.name}}}")
    print("Load average at the end (1, 5, 15 min): " + ", ".join(f"{load:.2f}" for load in os.getloadavg()))


if __name__ == "__main__":
    run_cli(main, build_parser().parse_intermixed_args())
