"""One trial of a sweep: the base config with the trial's sampled values, trained by our Trainer in a Ray actor.

The trial reports to Tune right after each evaluation with a checkpoint of the detectron2 state, so that ASHA can
stop it there and a failed or interrupted trial goes on from its last report. Its detectron2 OUTPUT_DIR is
`<experiment dir>/<trial>/output`.
"""
import argparse
import contextlib
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass

import ray
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import HookBase, default_setup
from ray import tune

from ..engine import Trainer, prepare_config
from .sweep import Sweep

TRIAL_OUTPUT = "output"  # a trial's OUTPUT_DIR, inside its trial directory
# A Tune checkpoint: the detectron2 checkpoint (named apart from PeriodicCheckpointer's model_*.pth, as it is
# copied back into OUTPUT_DIR on restore), last_checkpoint naming it, the metrics reported with it, and every
# wandb_run_id file of OUTPUT_DIR (the W&B run a restored trial continues, also on another node).
TUNE_CHECKPOINT = "tune_checkpoint"
CHECKPOINT_METRICS = "tune_metrics.json"
WANDB_RUN_ID = "wandb_run_id"


def trial_dirname(trial_id):
    """A trial's folder in the experiment dir, and its name in tables, logs and W&B."""
    return f"trial_{trial_id}"


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a sweep is made from; it travels to the trials' Ray workers once (tune.with_parameters).

    `hooks` extend every trial's Trainer: callables that take the trial's config and return a detectron2 hook
    (a HookBase subclass whose __init__ takes the config will do), registered after the report hook. They are
    pickled to Ray's workers, so they must be importable there or defined in the driver's __main__.
    """

    sweep: Sweep
    base_cfg: CfgNode
    experiment_dir: str
    hooks: tuple = ()


def trial_config(base_cfg, overrides, output_dir, cpus, use_gpu, wandb_group="", wandb_name=""):
    """The base config with a trial's sampled values and what the trial's process dictates, prepared."""
    trial_keys = [
        "OUTPUT_DIR", output_dir,
        "MODEL.DEVICE", "cuda" if use_gpu else "cpu",
        # The trial's CPUs: one for the training process, the rest for data loading.
        "DATALOADER.NUM_WORKERS", min(base_cfg.DATALOADER.NUM_WORKERS, max(0, int(cpus) - 1)),
    ]  # fmt: skip
    if not use_gpu:
        trial_keys += ["SOLVER.AMP.ENABLED", False]
    if wandb_group:
        trial_keys += ["WANDB.GROUP", wandb_group, "WANDB.NAME", wandb_name]
    return prepare_config(base=base_cfg, opts=[*overrides, *trial_keys], resume=True)


class TuneReportHook(HookBase):
    """Reports to Ray Tune right after each evaluation (EvalHook's schedule), with a checkpoint to resume from.

    The reported metrics are the event storage's latest scalars (losses smoothed as PeriodicWriter prints
    them, evaluation results as EvalHook stored them, e.g. "segm/AP") plus "iteration", the detectron2
    iterations done, which is ASHA's time attribute. When Tune stops the trial, tune.report raises SystemExit,
    which ends training through every hook's after_train.
    """

    def __init__(self, eval_period):
        self._period = eval_period

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            self._report(next_iter)

    def after_train(self):
        if self.trainer.iter >= self.trainer.max_iter:  # training finished (not an exception)
            self._report(self.trainer.iter)

    def _report(self, iteration):
        metrics = {k: float(v) for k, (v, _) in self.trainer.storage.latest_with_smoothing_hint(20).items()}
        metrics["iteration"] = iteration
        output_dir = self.trainer.cfg.OUTPUT_DIR
        run_ids = glob.glob(os.path.join(glob.escape(output_dir), "**", WANDB_RUN_ID), recursive=True)
        # Staged in OUTPUT_DIR (on the storage Tune copies it to, rather than a small /tmp).
        with tempfile.TemporaryDirectory(prefix="tune_checkpoint_", dir=output_dir) as folder:
            # The trainer's own checkpointables (model, optimizer, scheduler, iteration) in a fresh folder.
            checkpointer = DetectionCheckpointer(self.trainer.model, folder, **self.trainer.checkpointer.checkpointables)
            checkpointer.save(TUNE_CHECKPOINT)
            with open(os.path.join(folder, CHECKPOINT_METRICS), "w") as f:
                json.dump(metrics, f)
            for path in run_ids:
                staged = os.path.join(folder, os.path.relpath(path, output_dir))
                os.makedirs(os.path.dirname(staged), exist_ok=True)
                shutil.copy2(path, staged)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def restore_checkpoint(checkpoint, output_dir):
    """Put a Tune checkpoint's files into OUTPUT_DIR (so resume_or_load picks them); returns its metrics."""
    with checkpoint.as_directory() as folder:
        shutil.copytree(folder, output_dir, ignore=shutil.ignore_patterns(CHECKPOINT_METRICS), dirs_exist_ok=True)
        with open(os.path.join(folder, CHECKPOINT_METRICS)) as f:
            return json.load(f)


def _setup_trial_logging(cfg, args):
    """detectron2's default_setup (log.txt, config.yaml, seed) with the console left to Tune's progress table:
    the trial's detectron2 and fvcore loggers print only warnings there; log.txt has everything."""
    console = sys.stdout
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        default_setup(cfg, args)
        for name in ("detectron2", "fvcore"):
            for handler in logging.getLogger(name).handlers:
                if getattr(handler, "stream", None) is devnull:
                    handler.setStream(console)
                    handler.setLevel(logging.WARNING)


def run_trial(config, spec):
    """Ray Tune function trainable: train one trial's sampled `config` of the sweep `spec`.

    Tune stops a trial (ASHA) by raising SystemExit in its training thread and letting the actor's process exit.
    The non-daemon thread below keeps the process (Python waits for such threads before it exits) until training
    has unwound through detectron2's after_train hooks, which finish the trial's W&B run. Ray gives a stopping
    actor actor_graceful_shutdown_timeout_ms (30 s by default) before it kills it.
    """
    unwound = threading.Event()
    threading.Thread(target=unwound.wait, name="trial-unwinding", daemon=False).start()
    try:
        _train_trial(config, spec)
    finally:
        unwound.set()


def _train_trial(config, spec):
    context = tune.get_context()
    trial_name = context.get_trial_name()
    output_dir = os.path.join(spec.experiment_dir, os.path.basename(context.get_trial_dir()), TRIAL_OUTPUT)
    cpus = context.get_trial_resources().required_resources.get("CPU", 1)
    sweep = spec.sweep
    sampled = sweep.sampled_values(config)
    cfg = trial_config(
        spec.base_cfg,
        sweep.overrides(config),
        output_dir,
        cpus,
        use_gpu=bool(ray.get_gpu_ids()),
        wandb_group=sweep.name,
        wandb_name=trial_name,
    )
    torch.set_num_threads(max(1, int(cpus)))
    _setup_trial_logging(cfg, argparse.Namespace(sweep=sweep.name, trial=trial_name, sampled=sampled))

    checkpoint = tune.get_checkpoint()
    if checkpoint:
        metrics = restore_checkpoint(checkpoint, output_dir)
        if metrics["iteration"] >= cfg.SOLVER.MAX_ITER:  # finished before the driver stopped: nothing to redo
            tune.report(metrics)
            return
    trainer = Trainer(cfg)
    if trainer.wandb:  # each trial is one W&B run of the group named after the sweep
        trainer.wandb.extra_config["tune"] = {"sweep": sweep.name, "trial": trial_name, **sampled}
    trainer.register_hooks([TuneReportHook(cfg.TEST.EVAL_PERIOD), *(make_hook(cfg) for make_hook in spec.hooks)])
    trainer.resume_or_load(resume=checkpoint is not None)
    trainer.train()


def trainable(spec):
    """The Tune trainable of a sweep's trials, holding the sweep's per-trial resources."""
    resources = {"cpu": spec.sweep.cpus_per_trial, "gpu": spec.sweep.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)
