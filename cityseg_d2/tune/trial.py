"""One trial of a sweep: the base config with the trial's sampled values, trained by our Trainer in a Ray actor, or
data-parallel on several Ray Train workers (resources: workers_per_trial).

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
import tempfile
import threading
from dataclasses import dataclass
from functools import partial

import ray
import ray.train
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import HookBase, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.result import DONE, SHOULD_CHECKPOINT
from ray.util.queue import Empty
from ray.util.queue import Queue as RayQueue

from ..engine import Trainer, prepare_config
from ..errors import TrainingStopped
from ..integrations import WANDB_RUN_ID_FILE
from .distributed import scaling_config, setup_detectron2_comm, wandb_flushed
from .pbt import config_hyperparameters
from .sweep import Sweep

TRIAL_OUTPUT = "output"  # a trial's OUTPUT_DIR, inside its trial directory
# A Tune checkpoint: the detectron2 checkpoint (named apart from PeriodicCheckpointer's model_*.pth, as it is
# copied back into OUTPUT_DIR on restore), last_checkpoint naming it, the metrics reported with it, and every
# wandb_run_id file of OUTPUT_DIR (the W&B run a restored trial continues, also on another node).
TUNE_CHECKPOINT = "tune_checkpoint"
CHECKPOINT_METRICS = "tune_metrics.json"
STOP_GRACE_S = 120  # how long a stopped trial may take to unwind (finish its W&B run) before its actor exits
# A multi-worker trial: its Tune actor drives a Ray Train run (Ray's default resources for a Tune trainable), named
# TRAIN_RUN in its trial dir, which holds the checkpoints rank 0 reports to Ray Train.
TRAIN_DRIVER_CPUS = 1
TRAIN_RUN = "ray_train"
_GO_ON, _STOP = "go on", "stop"  # Tune's decision at a report, sent to a multi-worker trial's rank 0

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


def save_trial_checkpoint(trainer, checkpoint_dir, report):
    """A trial's checkpoint, taken while training is paused at `report`: the trainer's own checkpointables (model,
    optimizer, scheduler, iteration), that report, and every wandb_run_id file of OUTPUT_DIR."""
    checkpointer = DetectionCheckpointer(trainer.model, checkpoint_dir, **trainer.checkpointer.checkpointables)
    checkpointer.save(TUNE_CHECKPOINT)
    _save_report_and_run_ids(trainer.cfg.OUTPUT_DIR, checkpoint_dir, report)


def save_untrained_checkpoint(output_dir, checkpoint_dir, restored_report):
    """The checkpoint of a trial that has not trained since it was set up (Tune may pause, and so save, a trial it
    has just restored): the checkpoint it was restored from, which restore_trial_checkpoint put into OUTPUT_DIR, or,
    never restored, none (its report null: restoring it starts the trial afresh)."""
    if restored_report is not None:
        for name in (f"{TUNE_CHECKPOINT}.pth", "last_checkpoint"):
            shutil.copy2(os.path.join(output_dir, name), checkpoint_dir)
    _save_report_and_run_ids(output_dir, checkpoint_dir, restored_report)


def _save_report_and_run_ids(output_dir, checkpoint_dir, report):
    with open(os.path.join(checkpoint_dir, CHECKPOINT_METRICS), "w") as f:
        json.dump(report, f)
    for path in glob.glob(os.path.join(glob.escape(output_dir), "**", WANDB_RUN_ID_FILE), recursive=True):
        saved = os.path.join(checkpoint_dir, os.path.relpath(path, output_dir))
        os.makedirs(os.path.dirname(saved), exist_ok=True)
        shutil.copy2(path, saved)


def checkpoint_report(checkpoint_dir):
    """The report a trial's checkpoint was saved with."""
    with open(os.path.join(checkpoint_dir, CHECKPOINT_METRICS)) as f:
        return json.load(f)


def restore_trial_checkpoint(checkpoint_dir, output_dir):
    """Put a trial checkpoint's files into OUTPUT_DIR, where resume_or_load finds them; returns its report. A
    wandb_run_id file already in OUTPUT_DIR stays: the checkpoint of a PBT exploit is another trial's, whose W&B run
    this trial does not continue."""

    def kept(folder, names):
        own_run_id = os.path.join(output_dir, os.path.relpath(folder, checkpoint_dir), WANDB_RUN_ID_FILE)
        return [CHECKPOINT_METRICS] + ([WANDB_RUN_ID_FILE] if os.path.exists(own_run_id) else [])

    shutil.copytree(checkpoint_dir, output_dir, ignore=kept, dirs_exist_ok=True)
    return checkpoint_report(checkpoint_dir)


def _tag_wandb_run(trainer, sweep_name, trial_name, sampled):
    """Each trial is one W&B run of the group named after the sweep, with its values under `tune`."""
    if trainer.wandb:
        trainer.wandb.extra_config["tune"] = {"sweep": sweep_name, "trial": trial_name, **sampled}


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
    detectron2's after_train hooks, which finish the trial's W&B run, before Ray ends the actor's process; when Ray
    keeps the actor for another trial instead, reset_config() does the same first.
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
        _tag_wandb_run(self._trainer, self._sweep_name, self.trial_name, self._sampled)
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
        if self._trainer is None:
            save_untrained_checkpoint(self.cfg.OUTPUT_DIR, checkpoint_dir, self._restored_report)
        else:
            save_trial_checkpoint(self._trainer, checkpoint_dir, self._last_report)  # paused at step()'s report

    def load_checkpoint(self, checkpoint_dir):
        self._restored_report = restore_trial_checkpoint(checkpoint_dir, self.cfg.OUTPUT_DIR)

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


class DistributedTrialTrainable(tune.Trainable):
    """A trial on sweep.workers_per_trial Ray Train workers, as Ray runs Train in Tune: the trial builds and fits a
    TorchTrainer whose run is named after it (TRAIN_RUN in its trial dir), to which rank 0 reports a checkpoint at
    each evaluation. Ray Train restarts a failed worker group from the latest one (max_failures), and a restarted or
    resumed trial's run of the same name starts from it again; every worker restores it.

    Rank 0's reports reach step() through a Ray queue (not Ray's TuneReportCallback, which does not wait for Tune),
    so that, as in TrialTrainable, training pauses at each report until Tune wants the next one, and a stopped trial
    ends there on every worker, its W&B run finished, before cleanup() returns.
    """

    def setup(self, config, spec):
        sweep = spec.sweep
        trial_dir = os.path.join(spec.experiment_dir, trial_dirname(self.trial_id))
        self._reports = RayQueue(actor_options={"num_cpus": 0})  # (metrics, final) from rank 0
        self._decisions = RayQueue(actor_options={"num_cpus": 0})  # _GO_ON or _STOP, to rank 0
        workers = sweep.workers_per_trial
        self._trainer = TorchTrainer(
            _train_trial_worker,
            train_loop_config={
                "spec": spec,
                "config": config,
                "trial_name": self.trial_name,
                "output_dir": os.path.join(trial_dir, TRIAL_OUTPUT),
                "reports": self._reports,
                "decisions": self._decisions,
            },
            scaling_config=scaling_config(workers, sweep.cpus_per_trial / workers, sweep.gpus_per_trial / workers),
            run_config=ray.train.RunConfig(
                name=TRAIN_RUN,
                storage_path=trial_dir,
                failure_config=ray.train.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            ),
        )
        self._train_run = os.path.join(trial_dir, TRAIN_RUN)
        self._thread = None
        self._failure = None  # what ended the Ray Train run, if it failed
        self._last_report = None

    def step(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._fit, name="trial-ray-train", daemon=True)
            self._thread.start()
        else:
            self._decisions.put(_GO_ON)
        while True:
            try:
                metrics, final = self._reports.get(timeout=1)
                self._last_report = metrics
                return {**metrics, DONE: final}
            except Empty:
                if not self._thread.is_alive() and self._reports.empty():
                    raise self._failure or RuntimeError(f"{self.trial_name}: training ended without its last report")

    def _fit(self):
        try:
            self._trainer.fit()
        except BaseException as e:  # step() raises it in Tune's thread: the trial failed
            self._failure = e

    def save_checkpoint(self, checkpoint_dir):
        """Tune's checkpoint names the Ray Train checkpoint of the report step() returned, which holds the state."""
        path = os.path.join(self._train_run, train_checkpoint_name(self._last_report["iteration"]))
        return {"ray_train_checkpoint": path, "report": self._last_report}

    def load_checkpoint(self, checkpoint):
        """Nothing to load here: the trial's Ray Train run, of the same name, starts from its latest checkpoint."""

    def cleanup(self):
        if self._thread is not None and self._thread.is_alive():
            self._decisions.put(_STOP)
            self._thread.join(timeout=STOP_GRACE_S)
            if self._thread.is_alive():
                logger.warning("%s: training did not end within %d s of the stop", self.trial_name, STOP_GRACE_S)


def _train_trial_worker(loop_config):
    """One Ray Train worker of a DistributedTrialTrainable: detectron2's comm, the trial's config with this worker's
    share of the trial's CPUs, the latest checkpoint of the trial's Ray Train run restored, then training that reports
    at each evaluation (_report_to_ray_and_tune)."""
    setup_detectron2_comm()
    with wandb_flushed():
        _train_trial(loop_config)


def _train_trial(loop_config):
    spec, config, trial_name = loop_config["spec"], loop_config["config"], loop_config["trial_name"]
    sweep = spec.sweep
    cpus, use_gpu = sweep.cpus_per_trial / sweep.workers_per_trial, sweep.gpus_per_trial > 0
    cfg = trial_config(
        spec.base_cfg, sweep.overrides(config), loop_config["output_dir"], cpus, use_gpu, sweep.name, trial_name
    )
    sampled = sweep.sampled_values(config)
    torch.set_num_threads(max(1, int(cpus)))
    _setup_trial_logging(cfg, argparse.Namespace(sweep=sweep.name, trial=trial_name, sampled=sampled))
    restored = _restore_on_every_worker(cfg)
    reports, decisions = loop_config["reports"], loop_config["decisions"]
    if restored and restored["iteration"] >= cfg.SOLVER.MAX_ITER:  # it had finished: nothing to redo
        if comm.is_main_process():
            reports.put((restored, True))
        return
    trainer = Trainer(cfg)
    _tag_wandb_run(trainer, sweep.name, trial_name, sampled)
    report = partial(_report_to_ray_and_tune, trainer, reports, decisions, trial_name)
    trainer.register_hooks([TuneReportHook(cfg.TEST.EVAL_PERIOD, report), *(make(cfg) for make in spec.hooks)])
    trainer.resume_or_load(resume=restored is not None)
    try:
        trainer.train()
    except TrainingStopped:
        pass


def _restore_on_every_worker(cfg):
    """The latest checkpoint of the trial's Ray Train run, put into OUTPUT_DIR by rank 0 for every worker's
    resume_or_load (unless training had finished); returns its report (None when the run has none: training starts
    afresh)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as checkpoint_dir:
        report = checkpoint_report(checkpoint_dir)
        if comm.is_main_process() and report["iteration"] < cfg.SOLVER.MAX_ITER:
            restore_trial_checkpoint(checkpoint_dir, cfg.OUTPUT_DIR)
    comm.synchronize()
    return report


def _report_to_ray_and_tune(trainer, reports, decisions, trial_name, metrics, final):
    """TuneReportHook's report on every worker: rank 0 reports a checkpoint to Ray Train (all workers report, a
    barrier), then hands the metrics to the trial's step() and waits for Tune's decision, which every worker follows."""
    if comm.is_main_process():
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            save_trial_checkpoint(trainer, checkpoint_dir, metrics)
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
            ray.train.report(metrics, checkpoint, checkpoint_dir_name=train_checkpoint_name(metrics["iteration"]))
        reports.put((metrics, final))
        decision = None if final else decisions.get()
    else:
        ray.train.report(metrics)
        decision = None
    if not final and comm.all_gather(decision)[0] == _STOP:
        raise TrainingStopped(f"{trial_name} stopped by Ray Tune at a report")


def train_checkpoint_name(iteration):
    """The Ray Train checkpoint a multi-worker trial reports at `iteration` (one lineage: each iteration once)."""
    return f"checkpoint_{iteration:07d}"


def trainable(spec):
    """The Tune trainable of a sweep's trials, holding the sweep's per-trial resources (with several workers per
    trial, those of the trial's driver: the workers are Ray Train's)."""
    sweep = spec.sweep
    if sweep.workers_per_trial > 1:
        trainable_cls, resources = DistributedTrialTrainable, {"cpu": TRAIN_DRIVER_CPUS}
    else:
        trainable_cls, resources = TrialTrainable, {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(trainable_cls, spec=spec), resources)
