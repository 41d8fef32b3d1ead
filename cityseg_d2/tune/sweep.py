"""Sweep files: the search space over config keys, the metric, the scheduler, the search and the budget.

A sweep file (configs/sweeps/*.yaml) is parsed into a `Sweep` and checked against the base config before Ray starts:
every candidate merges into the config, and the metric is one the configured evaluators report (asked of
`cityseg_d2.evaluation.reported_metrics`) or a training loss.
"""
import json
import os
from dataclasses import asdict, dataclass, field

import yaml
from ray import tune

from ..errors import ConfigError
from ..evaluation import reported_metrics
from .pbt import PBT_DEFAULTS, PBT_KEYS, perturbation_interval

SPEC_KINDS = ("loguniform", "uniform", "choice", "grid")
SCHEDULERS = ("asha", "sha", "pbt", "fifo")
SEARCH_ALGORITHMS = ("random", "optuna")
# Set by every trial itself, so a sweep may not sample them.
TRIAL_OWNED_KEYS = ("OUTPUT_DIR", "MODEL.DEVICE")
RESOURCE_KEYS = ("cpus_per_trial", "gpus_per_trial", "workers_per_trial", "gpus_per_worker")


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
    cpus_per_trial: float = 0  # 0 = 1 + DATALOADER.NUM_WORKERS per worker, at most the cluster's CPUs
    gpus_per_trial: float = -1  # -1 = 1 per worker if the cluster has GPUs, else 0
    workers_per_trial: int = 1  # > 1: the trial trains data-parallel on that many Ray Train workers
    gpus_per_worker: float = -1  # -1 = gpus_per_trial / workers_per_trial; the trial's CPUs are split alike
    scheduler: dict = field(default_factory=lambda: {"type": "fifo"})
    search: dict = field(default_factory=lambda: {"type": "random"})
    source: str = ""  # the file it came from, for error messages

    def sampled_values(self, trial_config):
        """A trial's values by config key (list-valued candidates decoded), from its Tune config."""
        return {key: spec.decode(trial_config[key]) for key, spec in self.space.items()}

    def overrides(self, trial_config):
        """The sampled values of a trial as merge_from_list pairs."""
        return [x for item in self.sampled_values(trial_config).items() for x in item]

    def param_space(self):
        return {key: spec.domain() for key, spec in self.space.items()}

    def to_yaml(self):
        skipped = ("space", "source", *RESOURCE_KEYS)
        data = {k: v for k, v in asdict(self).items() if k not in skipped}
        data["resources"] = {key: getattr(self, key) for key in RESOURCE_KEYS}
        data["space"] = {key: spec.to_yaml() for key, spec in self.space.items()}
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


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
    if set(resources) - set(RESOURCE_KEYS):
        fail(f"resources: unknown entries {sorted(set(resources) - set(RESOURCE_KEYS))}")
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
        workers_per_trial=resources.get("workers_per_trial", 1),
        gpus_per_worker=resources.get("gpus_per_worker", -1),
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
    workers = sweep.workers_per_trial
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        fail(f"resources: workers_per_trial must be an integer >= 1, got {workers!r}")
    if not _is_number(sweep.gpus_per_trial) or sweep.gpus_per_trial > workers or (-1 < sweep.gpus_per_trial < 0):
        fail(
            f"resources: gpus_per_trial must be between 0 and {workers} (workers_per_trial; a worker is one process), "
            f"got {sweep.gpus_per_trial!r}"
        )
    if not _is_number(sweep.gpus_per_worker) or sweep.gpus_per_worker > 1 or (-1 < sweep.gpus_per_worker < 0):
        fail(f"resources: gpus_per_worker must be between 0 and 1 (one process), got {sweep.gpus_per_worker!r}")
    if 0 <= sweep.gpus_per_worker and 0 <= sweep.gpus_per_trial != sweep.gpus_per_worker * workers:
        fail(
            f"resources: gpus_per_trial {sweep.gpus_per_trial:g} is not workers_per_trial {workers} x gpus_per_worker "
            f"{sweep.gpus_per_worker:g}: give one of them"
        )
    scheduler = sweep.scheduler.get("type", "fifo")
    if scheduler not in SCHEDULERS:
        fail(f"scheduler: type must be one of {list(SCHEDULERS)}, got {scheduler!r}")
    allowed = {
        "asha": {"type", "grace_period", "reduction_factor", "max_t", "brackets"},
        "sha": {"type", "grace_period", "reduction_factor", "max_t"},
        "pbt": {"type", *PBT_DEFAULTS},
        "fifo": {"type"},
    }[scheduler]
    if set(sweep.scheduler) - allowed:
        fail(f"scheduler: unknown entries for {scheduler}: {sorted(set(sweep.scheduler) - allowed)}")
    if scheduler == "sha" and sweep.max_concurrent_trials:
        fail(
            "max_concurrent_trials cannot be kept with scheduler sha (Ray counts a trial paused at a rung as running, "
            "so the sweep would wait for ever): leave it out and bound trials at once by resources: cpus_per_trial"
        )
    if scheduler in ("asha", "sha"):
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
    if scheduler == "pbt":
        _check_pbt_options(sweep, fail)


def _check_pbt_options(sweep, fail):
    options = {**PBT_DEFAULTS, **sweep.scheduler}
    for name, low, high in (("perturbation_interval", 0, None), ("burn_in_period", 0, None),
                            ("quantile_fraction", 0, 0.5), ("resample_probability", 0, 1)):  # fmt: skip
        value = options[name]
        if not _is_number(value) or value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            fail(f"scheduler: {name} must be a number {bounds}, got {value!r}")
    factors = options["perturbation_factors"]
    if not isinstance(factors, list) or not factors or not all(_is_number(f) and f > 0 for f in factors):
        fail(f"scheduler: perturbation_factors must be a list of numbers > 0, e.g. [1.2, 0.8], got {factors!r}")
    if not isinstance(options["synch"], bool):
        fail(f"scheduler: synch must be true or false, got {options['synch']!r}")
    if sweep.search.get("type", "random") != "random":
        fail("scheduler: pbt perturbs the values itself: use search type random (its start values)")
    if trial_count(sweep) < 2:
        fail("scheduler: pbt needs a population: num_samples (times the grid values) of at least 2")


def validate_sweep(sweep, cfg):
    """Check the sweep against the base config before any trial starts: every key and candidate merges,
    the metric is one the configured evaluators (or the training losses) report, and ASHA's or SHA's rungs fit."""
    source = sweep.source
    mergeable = cfg.clone()
    mergeable.defrost()
    for key, spec in sweep.space.items():
        for value in spec.values:
            try:
                mergeable.clone().merge_from_list([key, value])
            except (KeyError, AssertionError) as e:
                raise ConfigError(f"{source}: space: {key} is not a config key of the base config") from e
            except ValueError as e:
                original = _config_value(cfg, key)
                raise ConfigError(
                    f"{source}: space: {key}: {spec.kind} value {value!r} ({type(value).__name__}) does not fit the "
                    f"config's {original!r} ({type(original).__name__})"
                ) from e
    _validate_metric(sweep, cfg)
    if sweep.scheduler.get("type") == "pbt":
        _validate_pbt(sweep, cfg)
    scheduler = sweep.scheduler.get("type")
    if scheduler in ("asha", "sha"):
        name = scheduler.upper()
        if cfg.TEST.EVAL_PERIOD <= 0:
            raise ConfigError(f"{source}: {name} needs periodic reports: set TEST.EVAL_PERIOD > 0 in the base config")
        max_t, grace = scheduler_max_t(sweep, cfg), sweep.scheduler.get("grace_period", 1)
        if grace >= max_t:
            raise ConfigError(f"{source}: scheduler: grace_period {grace} must be below max_t {max_t} (iterations)")
        if scheduler == "sha" and grace % cfg.TEST.EVAL_PERIOD:
            raise ConfigError(
                f"{source}: scheduler: sha ranks the trials at reports: grace_period {grace} must be a multiple of "
                f"TEST.EVAL_PERIOD {cfg.TEST.EVAL_PERIOD}"
            )


def _validate_pbt(sweep, cfg):
    """PBT changes values in running trials: only keys a trial takes from its config without a new model, at reports."""
    source = sweep.source
    for key in sweep.space:
        if key not in PBT_KEYS:
            raise ConfigError(
                f"{source}: space: PBT cannot change {key} in a running trial (a new model or data pipeline would be "
                f"needed): search it with scheduler asha or fifo; PBT perturbs {', '.join(PBT_KEYS)}"
            )
    period = cfg.TEST.EVAL_PERIOD
    if period <= 0:
        raise ConfigError(f"{source}: PBT needs periodic reports: set TEST.EVAL_PERIOD > 0 in the base config")
    interval = perturbation_interval(sweep, cfg)
    if interval % period or interval >= cfg.SOLVER.MAX_ITER:
        raise ConfigError(
            f"{source}: scheduler: perturbation_interval {interval} must be a multiple of TEST.EVAL_PERIOD {period} "
            f"(trials report there) below SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}"
        )


def _config_value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _is_training_loss(metric):
    """total_loss and the loss_* terms, as detectron2's models name them in the event storage."""
    return metric == "total_loss" or metric.startswith("loss_")


def _validate_metric(sweep, cfg):
    metric, source = sweep.metric, sweep.source
    if _is_training_loss(metric):
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


def trial_count(sweep):
    """How many trials the sweep starts: num_samples times the number of grid combinations."""
    count = sweep.num_samples
    for spec in sweep.space.values():
        count *= len(spec.values) if spec.kind == "grid" else 1
    return count


def scheduler_max_t(sweep, cfg):
    """ASHA's or SHA's horizon in detectron2 iterations: the scheduler's max_t, else the base SOLVER.MAX_ITER."""
    return int(sweep.scheduler.get("max_t") or cfg.SOLVER.MAX_ITER)
