#!/usr/bin/env python
"""Hyperparameter sweeps with Ray Tune: every trial trains cityseg_d2's detectron2 Trainer.

The sweep file (configs/sweeps/*.yaml) holds the search space over config keys, the metric, the scheduler
(ASHA), the search algorithm (random/grid or Optuna TPE), the trial budget and per-trial resources; KEY VALUE
pairs (anywhere on the line) override the base config, as with train_net.py. Results go to STORAGE/NAME (default
output/sweeps/<sweep file name>): one folder per trial (its detectron2 OUTPUT_DIR is trial_*/output),
trials.csv / trials.json (best first) and best_config.yaml, which train_net.py takes as it is.

On this machine (Ray starts here; one GPU per trial if there are GPUs, else the trials run on the CPU):

  python tools/tune_net.py --config-file configs/student_project/mask_rcnn_R_101_FPN_cityscapes10.yaml \\
      --sweep configs/sweeps/student_project_space.yaml
  python tools/tune_net.py --config-file configs/student_project/mask_rcnn_R_101_FPN_cityscapes10.yaml \\
      --sweep configs/sweeps/student_project_space.yaml --resume      # continue it after an interruption

On a Ray cluster with token authentication (see README, "Hyperparameter sweeps"): start the head, then every
worker from the repository root with the same venv and data paths, every machine holding the head's
~/.ray/auth_token, and point --storage at a directory all nodes share (NFS):

  ray get-auth-token --generate                                  # on the head node, once
  RAY_AUTH_MODE=token ray start --head --port=6379               # on the head node
  RAY_AUTH_MODE=token ray start --address=HEAD_IP:6379           # on each worker node
  RAY_AUTH_MODE=token python tools/tune_net.py --address HEAD_IP:6379 --storage /shared/sweeps \\
      --config-file configs/mask_rcnn_R_50_FPN_coco.yaml --sweep configs/sweeps/rich_space.yaml
"""
import argparse
import logging

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)

from cityseg_d2.engine import prepare_config
from cityseg_d2.errors import ConfigError, run_cli
from cityseg_d2.tune import (
    Cluster,
    connect_ray,
    experiment_path,
    load_saved_sweep,
    load_sweep,
    new_experiment,
    print_summary,
    resolve_resources,
    resume_sweep,
    start_sweep,
    trial_rows,
    validate_sweep,
    write_best_config,
    write_summary,
)

logger = logging.getLogger("cityseg_d2.tune_net")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="base detectron2 config")
    parser.add_argument("--sweep", default="", metavar="FILE", help="sweep file, e.g. configs/sweeps/student_project_space.yaml")
    parser.add_argument("--address", default=None, help="join a Ray cluster: auto or HOST:PORT (default: start Ray here)")
    parser.add_argument("--num-samples", type=int, default=None, help="trials to sample (default: the sweep file's)")
    parser.add_argument(
        "--gpus-per-trial", type=float, default=None, help="0..W (default: 1 per worker if there are GPUs, else 0)"
    )
    parser.add_argument(
        "--cpus-per-trial", type=float, default=None, help="default: the sweep's, else 1 + NUM_WORKERS per worker"
    )
    parser.add_argument(
        "--workers-per-trial", type=int, default=None, metavar="W",
        help="train each trial data-parallel on W Ray Train workers (default: the sweep's, else 1: one process)",
    )  # fmt: skip
    parser.add_argument(
        "--gpus-per-worker", type=float, default=None, help="0..1, instead of --gpus-per-trial (W x this)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep STORAGE/NAME with the sweep and config it started with"
    )
    parser.add_argument(
        "--autoscale",
        action="store_true",
        help="the Ray cluster adds nodes (also detected where Ray reports its autoscaler): trials no node holds now "
        "wait for one (PENDING) instead of being refused",
    )
    parser.add_argument("--name", default="", help="experiment name (default: the sweep's name or file name)")
    parser.add_argument("--storage", default="output/sweeps", help="where experiments go (shared by all nodes)")
    parser.add_argument("opts", nargs="*", default=[], metavar="KEY VALUE", help="overrides of the base config")
    return parser


def parse_args(argv=None):
    """Options and KEY VALUE overrides in any order."""
    return build_parser().parse_intermixed_args(argv)


def prepare(args):
    """Everything checkable before Ray starts (base config, sweep file, search space, metric, a free experiment
    dir); returns the sweep, the base config and the experiment dir."""
    if args.resume:
        if not (args.name or args.sweep):
            raise ConfigError("--resume needs --name or --sweep to find the experiment")
        experiment_dir = experiment_path(args.storage, args.name or load_sweep(args.sweep).name)
        sweep, cfg = load_saved_sweep(experiment_dir)
        logger.info("resuming %s with the sweep and base config saved there", experiment_dir)
        return sweep, cfg, experiment_dir
    if not args.sweep:
        raise ConfigError("no sweep file given: pass --sweep, e.g. configs/sweeps/student_project_space.yaml")
    cfg = prepare_config(args.config_file, args.opts)
    sweep = load_sweep(args.sweep)
    if args.name:
        sweep.name = args.name
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise ConfigError(f"--num-samples {args.num_samples}: must be >= 1")
        sweep.num_samples = args.num_samples
    validate_sweep(sweep, cfg)
    return sweep, cfg, new_experiment(args.storage, sweep.name)


def main(args):
    sweep, cfg, experiment_dir = prepare(args)
    connect_ray(args.address)
    if args.resume:
        results = resume_sweep(sweep, cfg, experiment_dir)
    else:
        cluster = Cluster.probe(autoscale=args.autoscale)
        requested = (args.cpus_per_trial, args.gpus_per_trial, args.workers_per_trial, args.gpus_per_worker)
        sweep = resolve_resources(sweep, cfg, cluster.capacity(sweep, *requested), *requested)
        cluster.check(sweep)  # a trial's process must fit on one node
        results = start_sweep(sweep, cfg, experiment_dir)
    rows = trial_rows(results, sweep, cfg)
    write_summary(rows, experiment_dir)
    print_summary(rows, sweep)
    best_config = write_best_config(rows, sweep, cfg, experiment_dir)
    print(f"\nTable: {experiment_dir}/trials.csv, trials.json\nBest config: {best_config}")
    print(f"Train it: python tools/train_net.py --config-file {best_config}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cli(main, parse_args())
