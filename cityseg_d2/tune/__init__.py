"""Ray Tune sweeps over config keys, on top of the engine: every trial trains cityseg_d2's detectron2 Trainer.

- sweep: the sweep file (search space, metric, scheduler, search, budget), checked against the base config;
- trial: one trial in a Ray actor, or on several Ray Train workers (its config through prepare_config, reports with
  checkpoints, restore);
- distributed: our Trainer data-parallel on Ray Train workers (detectron2's comm on Ray's process group);
- runner: joining a Ray cluster, per-trial resources, starting and resuming a sweep, train_net on a Ray cluster;
- resources: whether a trial fits the cluster's nodes (or the nodes an autoscaler adds);
- pbt: population-based training (Ray's PBT; a restored trial keeps its config's optimizer values);
- halving: synchronous successive halving (scheduler sha: every trial ranked at every rung);
- results: the summary from Ray's ResultGrid (trials.csv / trials.json, best_config.yaml).

tools/tune_net.py is the command line.
"""
from .results import format_table, print_summary, trial_rows, write_best_config, write_summary
from .runner import (
    build_scheduler,
    connect_ray,
    experiment_path,
    load_saved_sweep,
    new_experiment,
    probe_address,
    resolve_resources,
    resume_sweep,
    start_sweep,
    train_on_ray,
)
from .resources import Cluster
from .sweep import ParamSpec, Sweep, load_sweep, parse_sweep, validate_sweep
from .trial import TrialSpec, TuneReportHook, trial_config

__all__ = [
    "Cluster",
    "ParamSpec",
    "Sweep",
    "TrialSpec",
    "TuneReportHook",
    "build_scheduler",
    "connect_ray",
    "experiment_path",
    "format_table",
    "load_saved_sweep",
    "load_sweep",
    "new_experiment",
    "parse_sweep",
    "print_summary",
    "probe_address",
    "resolve_resources",
    "resume_sweep",
    "start_sweep",
    "train_on_ray",
    "trial_config",
    "trial_rows",
    "validate_sweep",
    "write_best_config",
    "write_summary",
]
