"""One trial of a sweep: the base config with the trial's sampled values, trained by our Trainer in a Ray actor.

The trial reports to Tune right after each evaluation and saves a checkpoint of the detectron2 state there, so that
ASHA can stop it at that point and a failed or interrupted trial goes on from its last report. Its detectron2
OUTPUT_DIR is `<experiment dir>/<trial>/output`.
"""
import argparse
import contextlib
import glob
import json
import logging
import os
import queue
import shutil
import sys
import threading
from dataclasses import dataclass

import ray
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import HookBase, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from ray import tune
from ray.tune.result import DONE, SHOULD_CHECKPOINT

from ..engine import Trainer, prepare_config
from ..errors import TrainingStopped
from ..integrations import WANDB_RUN_ID_FILE
from .pbt import config_hyperparameters
from .sweep import Sweep

TRIAL_OUTPUT = "output"  # a trial's OUTPUT_DIR, inside its trial directory
# A Tune checkpoint: the detectron2 checkpoint (named apart from PeriodicCheckpointer's model_*.pth, as it is
# copied back into OUTPUT_DIR on restore), last_checkpoint naming it, the metrics reported with it, and every
# wandb_run_id file of OUTPUT_DIR (the W&B run a restored trial continues, also on another node).
TUNE_CHECKPOINT = "tune_checkpoint"
CHECKPOINT_METRICS = "tune_metrics.json"
STOP_GRACE_S = 120  # how long a stopped trial may take to unwind (finish its W&B run) before its actor exits

logger = logging.getLogger(__name__)


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
    """Reports right after each evaluation (EvalHook's schedule) and at the end of training, through `report`.

    The reported metrics are the event storage's latest scalars (losses smoothed as PeriodicWriter prints them,
    evaluation results as EvalHook stored them, e.g. "segm/AP") plus "iteration", the detectron2 iterations done,
    which is ASHA's time attribute. `report(metrics, final)` returns when training may go on.
    """

    def __init__(self, eval_period, report):
        self._period = eval_period
        self._report = report

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            self._report(self._metrics(next_iter), final=False)

    def after_train(self):
        if self.trainer.iter >= self.trainer.max_iter:  # training finished (not an exception)
            self._report(self._metrics(self.trainer.iter), final=True)

    def _metrics(self, iteration):
        metrics = {k: float(v) for k, (v, _) in self.trainer.storage.latest_with_smoothing_hint(20).items()}
        return {**metrics, "iteration": iteration}


def _setup_trial_logging(cfg, args):
    """detectron2's default_setup (log.txt, config.yaml, seed) with the console left to Tune's progress table:
    the trial's detectron2, fvcore and cityseg_d2 loggers print only warnings there; log.txt has everything. In a
    reused actor the previous trial's handlers (its log.txt) go first."""
    loggers = [logging.getLogger(name) for name in ("detectron2", "fvcore", "cityseg_d2")]
    for trial_logger in loggers:
        for handler in trial_logger.handlers[:]:
            trial_logger.removeHandler(handler)
    setup_logger.cache_clear()  # memoized per OUTPUT_DIR: a trial back in this actor needs its handlers again
    console = sys.stdout
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        default_setup(cfg, args)
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="cityseg_d2")
        for trial_logger in loggers:
            for handler in trial_logger.handlers:
                if getattr(handler, "stream", None) is devnull:
                    handler.setStream(console)
                    handler.setLevel(logging.WARNING)


class TrialTrainable(tune.Trainable):
    """One trial as a Tune Trainable (Tune's class API): our Trainer on the base config with the trial's values.

    detectron2's train() runs to the end, so it runs in a thread that pauses at each report until Tune asks for the
    next one (step); meanwhile Tune saves a checkpoint (save_checkpoint) and its scheduler decides. When Tune stops
    the trial (ASHA), cleanup() ends training at the report it paused at and waits until it has unwound through
    detectron2's after_train hooks, which finish the trial's W&B run, before Ray ends the actor's process.
    """

    def setup(self, config, spec):
        sweep = spec.sweep
        output_dir = os.path.join(spec.experiment_dir, trial_dirname(self.trial_id), TRIAL_OUTPUT)
        cpus = self.trial_resources.required_resources.get("CPU", 1)
        self.cfg = trial_config(
            spec.base_cfg,
            sweep.overrides(config),
            output_dir,
            cpus,
            use_gpu=bool(ray.get_gpu_ids()),
            wandb_group=sweep.name,
            wandb_name=self.trial_name,
        )
        self._sampled = sweep.sampled_values(config)
        self._sweep_name = sweep.name
        self._hooks = spec.hooks
        torch.set_num_threads(max(1, int(cpus)))
        args = argparse.Namespace(sweep=sweep.name, trial=self.trial_name, sampled=self._sampled)
        _setup_trial_logging(self.cfg, args)
        self._trainer = None
        self._thread = None
        self._restored_report = None  # the report saved with the checkpoint the trial was restored from
        self._last_report = None
        self._reports = queue.Queue()  # from the training thread: a report, or the exception training ended with
        self._go_on = threading.Semaphore(0)
        self._stopping = False

    def step(self):
        if self._thread is None:
            restored = self._restored_report
            if restored and restored["iteration"] >= self.cfg.SOLVER.MAX_ITER:
                return {**restored, DONE: True}  # it had finished before the driver stopped: nothing to redo
            self._start_training()
        else:
            self._go_on.release()
        report = self._reports.get()
        if isinstance(report, BaseException):
            raise report
        self._last_report = report
        return {**report, SHOULD_CHECKPOINT: True, DONE: report["iteration"] >= self.cfg.SOLVER.MAX_ITER}

    def _start_training(self):
        self._trainer = Trainer(self.cfg)
        if self._trainer.wandb:  # each trial is one W&B run of the group named after the sweep
            tune_info = {"sweep": self._sweep_name, "trial": self.trial_name, **self._sampled}
            self._trainer.wandb.extra_config["tune"] = tune_info
        report_hook = TuneReportHook(self.cfg.TEST.EVAL_PERIOD, self._report)
        self._trainer.register_hooks([report_hook, *(make_hook(self.cfg) for make_hook in self._hooks)])
        with config_hyperparameters(self._trainer):  # after a PBT exploit, the checkpoint is another trial's
            self._trainer.resume_or_load(resume=self._restored_report is not None)
        self._thread = threading.Thread(target=self._train, name="trial-training", daemon=True)
        self._thread.start()

    def _train(self):
        try:
            self._trainer.train()
        except TrainingStopped:
            pass
        except BaseException as e:  # step() raises it in Tune's thread: the trial failed
            self._reports.put(e)

    def _report(self, metrics, final):
        """In the training thread: hand the report to step() and wait until Tune wants the next one."""
        self._reports.put(metrics)
        self._go_on.acquire()
        if self._stopping and not final:
            raise TrainingStopped(f"{self.trial_name} stopped by Ray Tune at a report")

    def save_checkpoint(self, checkpoint_dir):
        # Training is paused at the report step() returned: the trainer's own checkpointables (model, optimizer,
        # scheduler, iteration), that report, and every wandb_run_id file of OUTPUT_DIR.
        trainer, output_dir = self._trainer, self.cfg.OUTPUT_DIR
        checkpointer = DetectionCheckpointer(trainer.model, checkpoint_dir, **trainer.checkpointer.checkpointables)
        checkpointer.save(TUNE_CHECKPOINT)
        with open(os.path.join(checkpoint_dir, CHECKPOINT_METRICS), "w") as f:
            json.dump(self._last_report, f)
        for path in glob.glob(os.path.join(glob.escape(output_dir), "**", WANDB_RUN_ID_FILE), recursive=True):
            saved = os.path.join(checkpoint_dir, os.path.relpath(path, output_dir))
            os.makedirs(os.path.dirname(saved), exist_ok=True)
            shutil.copy2(path, saved)

    def load_checkpoint(self, checkpoint_dir):
        """Put a checkpoint's files into OUTPUT_DIR, where resume_or_load finds them. A wandb_run_id file already in
        OUTPUT_DIR stays: the checkpoint of a PBT exploit is another trial's, whose W&B run this trial does not
        continue."""
        output_dir = self.cfg.OUTPUT_DIR

        def kept(folder, names):
            own_run_id = os.path.join(output_dir, os.path.relpath(folder, checkpoint_dir), WANDB_RUN_ID_FILE)
            return [CHECKPOINT_METRICS] + ([WANDB_RUN_ID_FILE] if os.path.exists(own_run_id) else [])

        shutil.copytree(checkpoint_dir, output_dir, ignore=kept, dirs_exist_ok=True)
        with open(os.path.join(checkpoint_dir, CHECKPOINT_METRICS)) as f:
            self._restored_report = json.load(f)

    def cleanup(self):
        if self._thread is not None and self._thread.is_alive():
            self._stopping = True
            self._go_on.release()
            self._thread.join(timeout=STOP_GRACE_S)
            if self._thread.is_alive():
                logger.warning("%s: training did not end within %d s of the stop", self.trial_name, STOP_GRACE_S)

    def reset_config(self, new_config):
        """Actor reuse (reuse_actors): the actor's last trial, if still paused at a report (ASHA stopped it, PBT
        paused it), ends as cleanup() ends it; then the next trial is set up in this process, which saves starting
        one, imports and all."""
        self.cleanup()
        self.setup(new_config)  # tune.with_parameters's setup passes the spec again
        return True


def trainable(spec):
    """The Tune trainable of a sweep's trials, holding the sweep's per-trial resources."""
    resources = {"cpu": spec.sweep.cpus_per_trial, "gpu": spec.sweep.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(TrialTrainable, spec=spec), resources)
