"""Ray Tune sweeps over detectron2 config keys: the sweep file, the trial function and the summary.

A sweep file (configs/sweeps/*.yaml) names the search space over config keys, the metric, the scheduler
(ASHA or FIFO), the search algorithm (random/grid or Optuna TPE), the trial budget and per-trial resources.
Each trial trains our detectron2 `Trainer` in its own Ray actor, reports at every evaluation (with a
checkpoint, so ASHA can stop it and a failed trial restarts where it was) and writes its detectron2 output to
`<storage>/<sweep name>/<trial>/output`. tools/tune_net.py is the command line.
"""
import argparse
import contextlib
import csv
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field, replace

import ray
import torch
import wandb
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import HookBase, default_setup
from ray import tune
from ray.tune.trainable.function_trainable import wrap_function

from ..config import get_cityseg_cfg
from ..engine import Trainer, prepare_config
from ..errors import ConfigError
from ..evaluation import reported_metrics

logger = logging.getLogger(__name__)

SPEC_KINDS = ("loguniform", "uniform", "choice", "grid")
SCHEDULERS = ("asha", "fifo")
SEARCH_ALGORITHMS = ("random", "optuna")
# Set by every trial itself, so a sweep may not sample them.
TRIAL_OWNED_KEYS = ("OUTPUT_DIR", "MODEL.DEVICE")
TRIAL_OUTPUT = "output"  # a trial's OUTPUT_DIR, inside its trial directory
# The sweep (resources resolved) and the base config a sweep started with, in its experiment dir for --resume.
SAVED_SWEEP = "sweep.yaml"
SAVED_BASE_CONFIG = "base_config.yaml"
# A Tune checkpoint: the detectron2 checkpoint (named apart from PeriodicCheckpointer's model_*.pth, as it is
# copied back into OUTPUT_DIR on restore), last_checkpoint naming it, and the metrics reported with it.
TUNE_CHECKPOINT = "tune_checkpoint"
CHECKPOINT_METRICS = "tune_metrics.json"
# Test-only failure injection: when this environment variable holds an iteration N, every trial raises once
# after iteration N (a marker file in its OUTPUT_DIR makes it once), to test retries from checkpoints.
FAIL_ONCE_ENV = "CITYSEG_TUNE_TEST_FAIL_AT_ITER"
FAIL_ONCE_MARKER = "injected_failure"
# Clear in a trial's process while train_trial runs (see _WaitForTrialEnd); how many seconds a stopped trial
# gets to unwind before its actor exits.
_no_trial_running = threading.Event()
_no_trial_running.set()
STOP_GRACE_S = 120
# Trials run in the driver's working directory (local) or where `ray start` ran (cluster), as train_net
# would, so relative paths in configs (datasets, weights) mean the same thing.
RAY_RUNTIME_ENV = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}


@dataclass(frozen=True)
class ParamSpec:
    """One searched config key: `kind` is one of SPEC_KINDS; `values` are the bounds or the candidates."""

    key: str
    kind: str
    values: tuple

    @property
    def encoded(self):
        # Optuna's categorical values must be scalars: list-valued candidates travel as JSON text.
        return self.kind in ("choice", "grid") and any(isinstance(v, (list, dict)) for v in self.values)

    def domain(self):
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        values = [json.dumps(v) for v in self.values] if self.encoded else list(self.values)
        return tune.choice(values) if self.kind == "choice" else tune.grid_search(values)

    def decode(self, sampled):
        return json.loads(sampled) if self.encoded else sampled

    def to_yaml(self):
        return {self.kind: list(self.values)}


@dataclass
class Sweep:
    """A parsed sweep file. Scheduler and search options keep the file's spelling (see configs/sweeps)."""

    name: str
    space: dict  # config key -> ParamSpec, in file order
    metric: str = "segm/AP"
    mode: str = "max"
    num_samples: int = 1
    max_failures: int = 0
    max_concurrent_trials: int = 0  # 0 = as many as the resources allow
    cpus_per_trial: float = 0  # 0 = 1 + DATALOADER.NUM_WORKERS, at most the cluster's CPUs
    gpus_per_trial: float = -1  # -1 = 1 if the cluster has GPUs, else 0
    scheduler: dict = field(default_factory=lambda: {"type": "fifo"})
    search: dict = field(default_factory=lambda: {"type": "random"})
    source: str = ""  # the file it came from, for error messages

    def overrides(self, trial_config):
        """The sampled values of a trial as merge_from_list pairs (list-valued candidates decoded)."""
        pairs = []
        for key, spec in self.space.items():
            pairs += [key, spec.decode(trial_config[key])]
        return pairs

    def param_space(self):
        return {key: spec.domain() for key, spec in self.space.items()}

    def to_yaml(self):
        data = {k: v for k, v in asdict(self).items() if k not in ("space", "source", "cpus_per_trial", "gpus_per_trial")}
        data["resources"] = {"cpus_per_trial": self.cpus_per_trial, "gpus_per_trial": self.gpus_per_trial}
        data["space"] = {key: spec.to_yaml() for key, spec in self.space.items()}
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------------------------------------
# Sweep files


def load_sweep(path):
    """Parse a sweep YAML into a Sweep; a ConfigError names the file and the offending entry."""
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping (space:, metric:, scheduler:, ...)")
    return parse_sweep(data, source=path)


def parse_sweep(data, source="<sweep>"):
    def fail(message):
        raise ConfigError(f"{source}: {message}")

    known = {"name", "metric", "mode", "num_samples", "max_failures", "max_concurrent_trials", "resources",
             "scheduler", "search", "space"}  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        fail(f"unknown entries {unknown}; known: {sorted(known)}")
    space = data.get("space") or {}
    if not isinstance(space, dict) or not space:
        fail("space is empty: name at least one config key, e.g. SOLVER.BASE_LR: {loguniform: [1.0e-4, 1.0e-2]}")
    resources = data.get("resources") or {}
    if set(resources) - {"cpus_per_trial", "gpus_per_trial"}:
        fail(f"resources: unknown entries {sorted(set(resources) - {'cpus_per_trial', 'gpus_per_trial'})}")
    sweep = Sweep(
        name=str(data.get("name") or os.path.splitext(os.path.basename(source))[0]),
        space={str(key): _parse_spec(str(key), spec, fail) for key, spec in space.items()},
        metric=str(data.get("metric", "segm/AP")),
        mode=str(data.get("mode", "max")),
        num_samples=data.get("num_samples", 1),
        max_failures=data.get("max_failures", 0),
        max_concurrent_trials=data.get("max_concurrent_trials", 0),
        cpus_per_trial=resources.get("cpus_per_trial", 0),
        gpus_per_trial=resources.get("gpus_per_trial", -1),
        scheduler=dict(data.get("scheduler") or {"type": "fifo"}),
        search=dict(data.get("search") or {"type": "random"}),
        source=source,
    )
    _check_sweep_options(sweep, fail)
    return sweep


def _parse_spec(key, spec, fail):
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
        fail(f"space: {key}: write one of {{{': ..., '.join(SPEC_KINDS)}: ...}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if key in TRIAL_OWNED_KEYS:
        fail(f"space: {key} is set by each trial and cannot be searched")
    if not isinstance(values, list) or not values:
        fail(f"space: {key}: {kind} needs a non-empty list")
    if kind in ("loguniform", "uniform"):
        if len(values) != 2 or not all(_is_number(v) for v in values) or not values[0] < values[1]:
            fail(f"space: {key}: {kind} needs [lower, upper] with lower < upper, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            fail(f"space: {key}: loguniform needs lower > 0, got {values[0]}")
        values = [float(v) for v in values]
    return ParamSpec(key, kind, tuple(values))


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sweep_options(sweep, fail):
    if sweep.mode not in ("max", "min"):
        fail(f"mode must be max or min, got {sweep.mode!r}")
    for name in ("num_samples", "max_concurrent_trials"):
        value = getattr(sweep, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "num_samples" else 0):
            fail(f"{name} must be an integer >= {1 if name == 'num_samples' else 0}, got {value!r}")
    if not isinstance(sweep.max_failures, int) or sweep.max_failures < -1:
        fail(f"max_failures must be an integer >= 0 (-1 = retry forever), got {sweep.max_failures!r}")
    if not _is_number(sweep.cpus_per_trial) or sweep.cpus_per_trial < 0:
        fail(f"resources: cpus_per_trial must be a number > 0, got {sweep.cpus_per_trial!r}")
    if not _is_number(sweep.gpus_per_trial) or sweep.gpus_per_trial > 1 or (-1 < sweep.gpus_per_trial < 0):
        fail(f"resources: gpus_per_trial must be between 0 and 1 (one process per trial), got {sweep.gpus_per_trial!r}")
    scheduler = sweep.scheduler.get("type", "fifo")
    if scheduler not in SCHEDULERS:
        fail(f"scheduler: type must be one of {list(SCHEDULERS)}, got {scheduler!r}")
    allowed = {"asha": {"type", "grace_period", "reduction_factor", "max_t", "brackets"}, "fifo": {"type"}}[scheduler]
    if set(sweep.scheduler) - allowed:
        fail(f"scheduler: unknown entries for {scheduler}: {sorted(set(sweep.scheduler) - allowed)}")
    if scheduler == "asha":
        for name, minimum in (("grace_period", 1), ("reduction_factor", 2), ("max_t", 0), ("brackets", 1)):
            value = sweep.scheduler.get(name, minimum)
            if not _is_number(value) or value < minimum:
                fail(f"scheduler: {name} must be a number >= {minimum}, got {value!r}")
    search = sweep.search.get("type", "random")
    if search not in SEARCH_ALGORITHMS:
        fail(f"search: type must be one of {list(SEARCH_ALGORITHMS)}, got {search!r}")
    if set(sweep.search) - {"type", "seed"}:
        fail(f"search: unknown entries {sorted(set(sweep.search) - {'type', 'seed'})}")
    if search == "optuna" and any(spec.kind == "grid" for spec in sweep.space.values()):
        fail("space: grid values need search type random (Optuna samples; use choice instead)")


def validate_sweep(sweep, cfg):
    """Check the sweep against the base config before any trial starts: every key and candidate merges,
    the metric is one the configured evaluators (or the training losses) report, and ASHA's budget fits."""
    source = sweep.source
    trial_cfg = cfg.clone()
    trial_cfg.defrost()
    for key, spec in sweep.space.items():
        for value in spec.values:
            try:
                trial_cfg.clone().merge_from_list([key, value])
            except (KeyError, AssertionError) as e:
                raise ConfigError(f"{source}: space: {key} is not a config key of the base config") from e
            except ValueError as e:
                original = _config_value(cfg, key)
                raise ConfigError(
                    f"{source}: space: {key}: {spec.kind} value {value!r} ({type(value).__name__}) does not fit the "
                    f"config's {original!r} ({type(original).__name__})"
                ) from e
    _validate_metric(sweep, cfg)
    if sweep.scheduler.get("type") == "asha":
        if cfg.TEST.EVAL_PERIOD <= 0:
            raise ConfigError(f"{source}: ASHA needs periodic reports: set TEST.EVAL_PERIOD > 0 in the base config")
        max_t = scheduler_max_t(sweep, cfg)
        if sweep.scheduler.get("grace_period", 1) >= max_t:
            raise ConfigError(
                f"{source}: scheduler: grace_period {sweep.scheduler.get('grace_period', 1)} must be below max_t "
                f"{max_t} (iterations)"
            )


def _config_value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _validate_metric(sweep, cfg):
    metric, source = sweep.metric, sweep.source
    if metric == "total_loss" or metric.startswith("loss_"):
        if sweep.mode != "min":
            raise ConfigError(f"{source}: metric {metric} is a training loss: use mode: min")
        return
    reported = reported_metrics(cfg)
    if metric not in reported:
        raise ConfigError(
            f"{source}: metric {metric!r} is not reported with TEST.EVALUATORS {list(cfg.TEST.EVALUATORS)}: use "
            f"one of {', '.join(reported[:6])}, ... (see cityseg_d2.evaluation.reported_metrics), total_loss or a "
            "loss_* term"
        )


def scheduler_max_t(sweep, cfg):
    """ASHA's horizon in detectron2 iterations: the scheduler's max_t, else the base SOLVER.MAX_ITER."""
    return int(sweep.scheduler.get("max_t") or cfg.SOLVER.MAX_ITER)


# ---------------------------------------------------------------------------------------------------------
# Ray cluster and resources


def check_address(address):
    """Fail in one line, within seconds, when no Ray head listens at HOST:PORT (ray.init would wait long)."""
    if not address or address == "auto":
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: expected auto or HOST:PORT, e.g. 10.0.0.1:6379")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise ConfigError(
            f"--address {address}: no Ray head answers there ({e.strerror or e}); start one with `ray start --head`"
        ) from e


def connect_ray(address=None, num_cpus=None):
    """Join the cluster at `address` ("auto" or HOST:PORT), or start Ray on this machine when it is None."""
    if ray.is_initialized():
        return
    check_address(address)
    try:
        if address:
            ray.init(address=address, runtime_env=RAY_RUNTIME_ENV)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=RAY_RUNTIME_ENV)
    except ConnectionError as e:
        raise ConfigError(f"--address {address}: {str(e).splitlines()[0]}") from e


def resolve_resources(sweep, cfg, cluster, cpus_per_trial=None, gpus_per_trial=None):
    """The sweep with per-trial CPUs and GPUs settled against `cluster` (ray.cluster_resources()): the CLI's
    values, else the sweep file's, else 1 + DATALOADER.NUM_WORKERS CPUs and a GPU where the cluster has any."""
    cluster_cpus, cluster_gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if cpus_per_trial is not None and cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial {cpus_per_trial:g}: must be > 0")
    cpus = cpus_per_trial or sweep.cpus_per_trial or min(1 + cfg.DATALOADER.NUM_WORKERS, max(1, cluster_cpus))
    if cpus > cluster_cpus:
        raise ConfigError(f"{cpus:g} CPUs per trial, but the Ray cluster has {cluster_cpus:g}: lower --cpus-per-trial")
    if gpus_per_trial is not None:
        if not 0 <= gpus_per_trial <= 1:
            raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g}: must be between 0 and 1 (one process per trial)")
        if gpus_per_trial > cluster_gpus:
            raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g}: the Ray cluster has {cluster_gpus:g} GPUs")
        gpus = gpus_per_trial
    elif sweep.gpus_per_trial >= 0 and cluster_gpus:
        gpus = sweep.gpus_per_trial
    else:
        if sweep.gpus_per_trial > 0:
            logger.warning("the Ray cluster has no GPU: the sweep's trials run on the CPU")
        gpus = 1 if cluster_gpus else 0
    return replace(sweep, cpus_per_trial=cpus, gpus_per_trial=gpus)


# ---------------------------------------------------------------------------------------------------------
# Trials


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
    iterations done, which is ASHA's time attribute.
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
        # Staged next to OUTPUT_DIR (on the storage Tune copies it to, rather than a small /tmp).
        with tempfile.TemporaryDirectory(prefix="tune_checkpoint_", dir=self.trainer.cfg.OUTPUT_DIR) as folder:
            # The trainer's own checkpointables (model, optimizer, scheduler, iteration) in a fresh folder.
            checkpointer = DetectionCheckpointer(self.trainer.model, folder, **self.trainer.checkpointer.checkpointables)
            checkpointer.save(TUNE_CHECKPOINT)
            with open(os.path.join(folder, CHECKPOINT_METRICS), "w") as f:
                json.dump(metrics, f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class _InjectedFailureHook(HookBase):
    """Test-only (see FAIL_ONCE_ENV): raises once after the given iteration."""

    def __init__(self, iteration, marker):
        self._iteration, self._marker = iteration, marker

    def after_step(self):
        if self.trainer.iter + 1 == self._iteration and not os.path.exists(self._marker):
            open(self._marker, "w").close()
            raise RuntimeError(f"{FAIL_ONCE_ENV}: injected failure after iteration {self._iteration}")


def _restore_checkpoint(checkpoint, output_dir):
    """Put a Tune checkpoint's detectron2 files into OUTPUT_DIR (so resume_or_load picks them); its metrics."""
    os.makedirs(output_dir, exist_ok=True)
    with checkpoint.as_directory() as folder:
        for name in os.listdir(folder):
            if name != CHECKPOINT_METRICS:
                shutil.copy2(os.path.join(folder, name), os.path.join(output_dir, name))
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


def train_trial(config, base_config, sweep, experiment_dir):
    """Ray Tune trainable: train one trial's config with our Trainer, resuming from Tune's checkpoint if any."""
    _no_trial_running.clear()
    try:
        _train_trial(config, base_config, sweep, experiment_dir)
    finally:
        # The trial's process ends with the trial, and Ray ends W&B's service with it before Python's exit
        # handlers would shut it down: do that now (a no-op when the trial logged nothing to W&B).
        wandb.teardown()
        _no_trial_running.set()


def _train_trial(config, base_config, sweep, experiment_dir):
    context = tune.get_context()
    trial_name = context.get_trial_name()
    output_dir = os.path.join(experiment_dir, os.path.basename(context.get_trial_dir()), TRIAL_OUTPUT)
    base_cfg = get_cityseg_cfg()
    base_cfg.merge_from_other_cfg(CfgNode.load_cfg(base_config))
    cpus = context.get_trial_resources().required_resources.get("CPU", 1)
    sampled = sweep.overrides(config)
    cfg = trial_config(
        base_cfg, sampled, output_dir, cpus, use_gpu=bool(ray.get_gpu_ids()), wandb_group=sweep.name, wandb_name=trial_name
    )
    torch.set_num_threads(max(1, int(cpus)))
    _setup_trial_logging(cfg, argparse.Namespace(sweep=sweep.name, trial=trial_name, sampled=sampled))

    checkpoint = tune.get_checkpoint()
    if checkpoint:
        metrics = _restore_checkpoint(checkpoint, output_dir)
        if metrics["iteration"] >= cfg.SOLVER.MAX_ITER:  # finished before the driver stopped: nothing to redo
            tune.report(metrics)
            return
    # With W&B on, each trial is one run of the group named after the sweep, logged by its own Trainer.
    tune_info = {"sweep": sweep.name, "trial": trial_name, **dict(zip(sampled[0::2], sampled[1::2]))}
    trainer = Trainer(cfg)
    if trainer.wandb:
        trainer.wandb.extra_config["tune"] = tune_info
    trainer.register_hooks([TuneReportHook(cfg.TEST.EVAL_PERIOD)])
    if os.environ.get(FAIL_ONCE_ENV):
        marker = os.path.join(output_dir, FAIL_ONCE_MARKER)
        trainer.register_hooks([_InjectedFailureHook(int(os.environ[FAIL_ONCE_ENV]), marker)])
    trainer.resume_or_load(resume=checkpoint is not None)
    trainer.train()


def trial_dirname(trial):
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------------------
# Running a sweep


def experiment_path(storage, name):
    return os.path.join(os.path.abspath(storage), name)


def build_scheduler(sweep, cfg):
    if sweep.scheduler.get("type") != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    options = sweep.scheduler
    return ASHAScheduler(
        time_attr="iteration",
        max_t=scheduler_max_t(sweep, cfg),
        grace_period=options.get("grace_period", 1),
        reduction_factor=options.get("reduction_factor", 4),
        brackets=options.get("brackets", 1),
    )


def build_search_algorithm(sweep):
    seed = sweep.search.get("seed")
    if sweep.search.get("type") == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=seed)
        return ConcurrencyLimiter(searcher, sweep.max_concurrent_trials) if sweep.max_concurrent_trials else searcher
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=sweep.max_concurrent_trials)


class _WaitForTrialEnd:
    """Trainable mixin: when Tune stops a trial (ASHA), its training thread unwinds through detectron2's
    after_train hooks, which close the writers and so finish the trial's W&B run; the actor waits for that
    before it exits (Ray ends a worker's child processes, W&B's service among them, when the worker exits)."""

    def cleanup(self):
        super().cleanup()
        _no_trial_running.wait(timeout=STOP_GRACE_S)


def _trainable(sweep, base_config, experiment_dir):
    function = tune.with_parameters(train_trial, base_config=base_config, sweep=sweep, experiment_dir=experiment_dir)
    trainable = type("TrialTrainable", (_WaitForTrialEnd, wrap_function(function, name="train_trial")), {})
    return tune.with_resources(trainable, {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})


def check_new_experiment(storage, name):
    """The experiment dir of a new sweep; a ConfigError if a sweep is there already."""
    experiment_dir = experiment_path(storage, name)
    if os.path.exists(experiment_dir) and os.listdir(experiment_dir):
        raise ConfigError(f"{experiment_dir} already holds a sweep: pass --resume to continue it, or another --name")
    return experiment_dir


def start_sweep(sweep, cfg, storage):
    """Launch a new sweep (Ray connected, resources resolved); returns the ResultGrid when it ends."""
    experiment_dir = check_new_experiment(storage, sweep.name)
    os.makedirs(experiment_dir, exist_ok=True)
    with open(os.path.join(experiment_dir, SAVED_SWEEP), "w") as f:
        f.write(sweep.to_yaml())
    with open(os.path.join(experiment_dir, SAVED_BASE_CONFIG), "w") as f:
        f.write(cfg.dump())
    tuner = tune.Tuner(
        _trainable(sweep, cfg.dump(), experiment_dir),
        param_space=sweep.param_space(),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=build_scheduler(sweep, cfg),
            search_alg=build_search_algorithm(sweep),
            num_samples=sweep.num_samples,
            trial_name_creator=trial_dirname,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=os.path.dirname(experiment_dir),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            # Only the latest checkpoint matters (ASHA's decisions, restarts); each is a full training state.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    return tuner.fit()


def load_saved_sweep(experiment_dir):
    """The sweep and base config a sweep started with (what --resume continues)."""
    sweep_file = os.path.join(experiment_dir, SAVED_SWEEP)
    if not tune.Tuner.can_restore(experiment_dir) or not os.path.isfile(sweep_file):
        raise ConfigError(f"--resume: {experiment_dir} holds no sweep Ray can resume (pass the same --name/--storage)")
    sweep = load_sweep(sweep_file)
    cfg = prepare_config(os.path.join(experiment_dir, SAVED_BASE_CONFIG))
    return sweep, cfg


def resume_sweep(experiment_dir):
    """Continue an interrupted sweep: unfinished and errored trials go on from their checkpoints."""
    sweep, cfg = load_saved_sweep(experiment_dir)
    tuner = tune.Tuner.restore(
        experiment_dir, _trainable(sweep, cfg.dump(), experiment_dir), resume_unfinished=True, resume_errored=True
    )
    return tuner.fit()


# ---------------------------------------------------------------------------------------------------------
# Summary


def _trial_params(result):
    # A trial that failed before its first report has no config in its metrics; Ray's params.json has it.
    if result.config:
        return result.config
    with open(os.path.join(result.path, "params.json")) as f:
        return json.load(f)


def trial_rows(results, sweep, cfg):
    """One row per trial, best first: sampled values, best reported metric, iterations, status."""
    rows = []
    for result in results:
        overrides = sweep.overrides(_trial_params(result))
        sampled = dict(zip(overrides[0::2], overrides[1::2]))
        history = result.metrics_dataframe
        values = []
        if history is not None and sweep.metric in history:
            values = [v for v in history[sweep.metric].tolist() if isinstance(v, (int, float)) and not math.isnan(v)]
        iterations = int(history["iteration"].max()) if history is not None and "iteration" in history else 0
        max_iter = sampled.get("SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER)
        status = "error" if result.error else ("finished" if iterations >= max_iter else "stopped early")
        best = (max if sweep.mode == "max" else min)(values) if values else None
        rows.append(
            {
                "trial": os.path.basename(result.path),
                **sampled,
                sweep.metric: best,
                "iterations": iterations,
                "status": status,
                "output_dir": os.path.join(result.path, TRIAL_OUTPUT),
            }
        )
    sign = -1 if sweep.mode == "max" else 1
    rows.sort(key=lambda r: (r[sweep.metric] is None, sign * (r[sweep.metric] or 0), r["trial"]))
    return [{"rank": i + 1, **row} for i, row in enumerate(rows)]


def cell_text(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def format_table(rows):
    columns = [c for c in rows[0] if c != "output_dir"] if rows else []
    cells = [[cell_text(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def write_summary(rows, experiment_dir):
    """trials.csv (table cells) and trials.json (raw values) in the experiment dir."""
    with open(os.path.join(experiment_dir, "trials.json"), "w") as f:
        json.dump(rows, f, indent=2)
    if rows:
        with open(os.path.join(experiment_dir, "trials.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: cell_text(v) for k, v in row.items()} for row in rows)


def write_best_config(rows, sweep, cfg, experiment_dir):
    """best_config.yaml: the base config with the best trial's values, training into experiment_dir/best."""
    if not rows or rows[0][sweep.metric] is None:
        reported = sorted({k for row in rows for k in row if k not in ("rank", "trial")})
        raise ConfigError(
            f"no trial reported the metric {sweep.metric!r} (check metric: in {sweep.source} and the trials' "
            f"output/log.txt; table columns: {reported})"
        )
    best = rows[0]
    best_cfg = cfg.clone()
    best_cfg.defrost()
    best_cfg.merge_from_list([x for key in sweep.space for x in (key, best[key])])
    best_cfg.OUTPUT_DIR = os.path.join(experiment_dir, "best")
    path = os.path.join(experiment_dir, "best_config.yaml")
    with open(path, "w") as f:
        f.write(f"# Sweep {sweep.name}, best trial {best['trial']}: {sweep.metric} = {best[sweep.metric]:.4g}\n")
        f.write(best_cfg.dump())
    return path
