"""Running a sweep on Ray: joining the cluster, per-trial resources, and starting or resuming the Tune experiment.

An experiment lives in `<storage>/<sweep name>/`: Ray's experiment state, one folder per trial, and the sweep
(resources resolved) and base config it started with, which --resume continues.
"""
import logging
import os
from dataclasses import replace

import grpc
import ray
from ray import tune
from ray.exceptions import AuthenticationError

from ..engine import prepare_config
from ..errors import ConfigError, first_line
from .pbt import build_pbt, checkpoints_to_keep
from .sweep import load_sweep, scheduler_max_t, trial_count
from .distributed import launch_on_ray
from .halving import SynchronousHalvingScheduler
from .trial import TRAIN_DRIVER_CPUS, TrialSpec, trainable, trial_dirname

logger = logging.getLogger(__name__)

SAVED_SWEEP = "sweep.yaml"
SAVED_BASE_CONFIG = "base_config.yaml"
# Trials run in the driver's working directory (local) or where `ray start` ran (cluster), as train_net
# would, so relative paths in configs (datasets, weights) mean the same thing.
RAY_RUNTIME_ENV = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}
# Where a driver finds the token of a cluster whose head has token authentication on (Ray's default since 2.60).
TOKEN_SOURCES = (
    "copy the head's ~/.ray/auth_token to this machine's ~/.ray/auth_token (or point RAY_AUTH_TOKEN_PATH at a copy, "
    "or set RAY_AUTH_TOKEN)"
)
# The address probe speaks gRPC to the Ray head's GCS: the standard gRPC health check answers whoever asks, and
# GetClusterId, the first call of ray.init, is refused (UNAUTHENTICATED) without the cluster's token.
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_GET_CLUSTER_ID = "/ray.rpc.NodeInfoGcsService/GetClusterId"
PROBE_TIMEOUT_S = 3


def _split_address(address):
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: expected auto or HOST:PORT, e.g. 10.0.0.1:6379")
    return host, int(port)


def _token_auth_here():
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def probe_address(address, timeout=PROBE_TIMEOUT_S):
    """Fail in one line, within seconds, unless a Ray head answers at HOST:PORT and lets this driver in (ray.init
    would retry for 20 s, or wait forever on a server that is not Ray's). Returns whether the head wants a token."""
    host, port = _split_address(address)
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            channel.unary_unary(_HEALTH_CHECK)(b"", timeout=timeout)
        except grpc.RpcError as e:
            raise ConfigError(
                f"--address {address}: no Ray head answers there ({e.code().name} within {timeout} s); start one with "
                "`ray start --head --port PORT`, or check HOST:PORT"
            ) from e
        try:
            channel.unary_unary(_GET_CLUSTER_ID)(b"", timeout=timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                return False  # anything else is for ray.init to judge
            if not _token_auth_here():
                fix = f"set RAY_AUTH_MODE=token and {TOKEN_SOURCES}"
                raise ConfigError(f"--address {address}: the Ray head wants a token: {fix}") from e
            return True
    return False


def connect_ray(address=None, num_cpus=None):
    """Join the cluster at `address` ("auto" or HOST:PORT), or start Ray on this machine when it is None."""
    if ray.is_initialized():
        return
    if not address:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=RAY_RUNTIME_ENV)
        return
    wants_token = address != "auto" and probe_address(address)
    try:
        ray.init(address=address, runtime_env=RAY_RUNTIME_ENV)
    except AuthenticationError as e:  # token mode on here, but no token found
        message = f"--address {address}: RAY_AUTH_MODE is token but this machine has no token: {TOKEN_SOURCES}"
        raise ConfigError(message) from e
    except ConnectionError as e:
        if wants_token:
            message = f"--address {address}: the Ray head refused this machine's token: {TOKEN_SOURCES}"
            raise ConfigError(message) from e
        raise ConfigError(f"--address {address}: {first_line(e)}") from e


def resolve_resources(
    sweep, cfg, cluster, cpus_per_trial=None, gpus_per_trial=None, workers_per_trial=None, gpus_per_worker=None
):
    """The sweep with per-trial CPUs and GPUs settled against `cluster` (ray.cluster_resources()): the CLI's
    values, else the sweep file's, else 1 + DATALOADER.NUM_WORKERS CPUs and a GPU where the cluster has any, for
    each of the trial's workers (workers_per_trial; gpus_per_worker is gpus_per_trial / workers_per_trial)."""
    sweep = _with_workers(sweep, workers_per_trial, gpus_per_worker, gpus_per_trial)
    workers = sweep.workers_per_trial
    cluster_cpus, cluster_gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if cpus_per_trial is not None and cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial {cpus_per_trial:g}: must be > 0")
    default_cpus = workers * min(1 + cfg.DATALOADER.NUM_WORKERS, max(1, cluster_cpus // workers))
    cpus = cpus_per_trial or sweep.cpus_per_trial or default_cpus
    driver_cpus = TRAIN_DRIVER_CPUS if workers > 1 else 0
    if cpus + driver_cpus > cluster_cpus:
        driver = f" (+{driver_cpus:g} for its Ray Train driver)" if driver_cpus else ""
        raise ConfigError(
            f"{cpus:g} CPUs per trial{driver}, but the Ray cluster has {cluster_cpus:g}: lower --cpus-per-trial"
        )
    if gpus_per_worker is not None:
        gpus = workers * gpus_per_worker
        if gpus > cluster_gpus:
            raise ConfigError(
                f"--gpus-per-worker {gpus_per_worker:g}: {workers} workers need {gpus:g} GPUs, the Ray cluster has "
                f"{cluster_gpus:g}"
            )
    elif gpus_per_trial is not None:
        if not 0 <= gpus_per_trial <= workers:
            raise ConfigError(
                f"--gpus-per-trial {gpus_per_trial:g}: must be between 0 and {workers} (one GPU at most per training "
                "process)"
            )
        if gpus_per_trial > cluster_gpus:
            raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g}: the Ray cluster has {cluster_gpus:g} GPUs")
        gpus = gpus_per_trial
    elif sweep.gpus_per_trial >= 0 and cluster_gpus:
        gpus = sweep.gpus_per_trial
    else:
        if sweep.gpus_per_trial > 0:
            logger.warning("the Ray cluster has no GPU: the sweep's trials run on the CPU")
        gpus = workers if cluster_gpus else 0
    if workers > 1 and gpus not in (0, workers):
        raise ConfigError(
            f"{gpus:g} GPUs per trial for {workers} workers: a worker takes a whole GPU (NCCL runs one process per "
            "GPU) or none; set gpus_per_worker 1 or 0"
        )
    resolved = replace(sweep, cpus_per_trial=cpus, gpus_per_trial=gpus)
    if workers > 1 and not sweep.max_concurrent_trials:
        # A trial that waits for its workers holds its driver's CPU: start no more trials than the cluster holds.
        fits = [cluster_cpus // (cpus + driver_cpus)] + ([cluster_gpus // gpus] if gpus else [])
        resolved.max_concurrent_trials = max(1, int(min(fits)))
        logger.info(f"{workers} workers per trial: at most {resolved.max_concurrent_trials} trials at once")
    return resolved


def _with_workers(sweep, workers_per_trial, gpus_per_worker, gpus_per_trial):
    """The sweep with the CLI's --workers-per-trial, and the sweep file's GPUs as gpus_per_trial (gpus_per_worker
    left to mean gpus_per_trial / workers_per_trial); the CLI's GPU options checked like the file's."""
    if workers_per_trial is not None and (isinstance(workers_per_trial, bool) or workers_per_trial < 1):
        raise ConfigError(f"--workers-per-trial {workers_per_trial}: must be >= 1")
    if gpus_per_worker is not None:
        if gpus_per_trial is not None:
            raise ConfigError("--gpus-per-trial and --gpus-per-worker: give one of them")
        if not 0 <= gpus_per_worker <= 1:
            raise ConfigError(f"--gpus-per-worker {gpus_per_worker:g}: must be between 0 and 1 (one process)")
    workers = workers_per_trial or sweep.workers_per_trial
    if workers > 1 and sweep.scheduler.get("type") == "pbt":
        # An exploit restores another trial's checkpoint, and a multi-worker trial restores its own Ray Train run's.
        raise ConfigError(f"{sweep.source}: scheduler: pbt needs one-process trials: set workers_per_trial 1")
    file_gpus = sweep.gpus_per_trial
    if sweep.gpus_per_worker >= 0:
        file_gpus = workers * sweep.gpus_per_worker
    if file_gpus > workers:
        raise ConfigError(f"{sweep.source}: resources: gpus_per_trial {file_gpus:g} is more than one GPU per worker")
    return replace(sweep, workers_per_trial=workers, gpus_per_trial=file_gpus, gpus_per_worker=-1)


def experiment_path(storage, name):
    return os.path.join(os.path.abspath(storage), name)


def new_experiment(storage, name):
    """The experiment dir of a new sweep; a ConfigError if a sweep is there already."""
    experiment_dir = experiment_path(storage, name)
    if os.path.exists(experiment_dir) and os.listdir(experiment_dir):
        raise ConfigError(f"{experiment_dir} already holds a sweep: pass --resume to continue it, or another --name")
    return experiment_dir


def build_scheduler(sweep, cfg):
    options = sweep.scheduler
    if options.get("type") == "pbt":
        return build_pbt(sweep, cfg)
    if options.get("type") == "sha":
        return SynchronousHalvingScheduler(
            trial_count(sweep),
            grace_period=options.get("grace_period", 1),
            reduction_factor=options.get("reduction_factor", 4),
            max_t=scheduler_max_t(sweep, cfg),
        )
    if options.get("type") != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

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


def _trial_dirname(trial):
    return trial_dirname(trial.trial_id)


def start_sweep(sweep, cfg, experiment_dir, hooks=()):
    """Run a new sweep in `experiment_dir` (from new_experiment; Ray connected, resources resolved) and return
    its ResultGrid. `hooks` extend every trial's Trainer (see TrialSpec)."""
    os.makedirs(experiment_dir, exist_ok=True)
    with open(os.path.join(experiment_dir, SAVED_SWEEP), "w") as f:
        f.write(sweep.to_yaml())
    with open(os.path.join(experiment_dir, SAVED_BASE_CONFIG), "w") as f:
        f.write(cfg.dump())
    tuner = tune.Tuner(
        trainable(TrialSpec(sweep, cfg, experiment_dir, tuple(hooks))),
        param_space=sweep.param_space(),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=build_scheduler(sweep, cfg),
            search_alg=build_search_algorithm(sweep),
            num_samples=sweep.num_samples,
            # A finished or stopped trial's actor takes the next trial (TrialTrainable.reset_config): no process
            # start, imports or Ray worker set-up per trial.
            reuse_actors=sweep.workers_per_trial == 1,
            trial_name_creator=_trial_dirname,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=os.path.basename(experiment_dir),
            storage_path=os.path.dirname(experiment_dir),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            # Each is a full training state. ASHA's decisions and restarts need the latest only; PBT's exploits
            # need those of a perturbation interval.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=checkpoints_to_keep(sweep, cfg) if sweep.scheduler.get("type") == "pbt" else 1
            ),
        ),
    )
    return tuner.fit()


def load_saved_sweep(experiment_dir):
    """The sweep and prepared base config a sweep started with (what --resume continues)."""
    sweep_file = os.path.join(experiment_dir, SAVED_SWEEP)
    if not tune.Tuner.can_restore(experiment_dir) or not os.path.isfile(sweep_file):
        raise ConfigError(f"--resume: {experiment_dir} holds no sweep Ray can resume (pass the same --name/--storage)")
    return load_sweep(sweep_file), prepare_config(os.path.join(experiment_dir, SAVED_BASE_CONFIG))


def resume_sweep(sweep, cfg, experiment_dir, hooks=()):
    """Continue an interrupted sweep (from load_saved_sweep): unfinished and errored trials go on from their
    checkpoints, finished ones are kept. Returns the ResultGrid."""
    spec = TrialSpec(sweep, cfg, experiment_dir, tuple(hooks))
    tuner = tune.Tuner.restore(experiment_dir, trainable(spec), resume_unfinished=True, resume_errored=True)
    return tuner.fit()


def train_on_ray(main_func, args):
    """train_net --ray-address: main_func(args) on args.num_workers Ray Train workers of the cluster at
    args.ray_address, each with 1 + DATALOADER.NUM_WORKERS CPUs and a GPU where the cluster has GPUs. The config is
    checked here first (as on a CPU: the device is each worker's), so that its mistakes are one line before Ray
    starts; OUTPUT_DIR is checked and claimed by rank 0, as in a local run."""
    if args.num_gpus != 1 or args.num_machines != 1 or args.machine_rank != 0:
        raise ConfigError(
            "--ray-address runs --num-workers Ray Train workers: --num-gpus, --num-machines and --machine-rank are "
            "for detectron2's own launch"
        )
    if args.num_workers < 1:
        raise ConfigError(f"--num-workers {args.num_workers}: must be >= 1")
    cfg = prepare_config(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"], resume=args.resume)
    connect_ray(args.ray_address)
    cluster = ray.cluster_resources()
    cpus, gpus = 1 + cfg.DATALOADER.NUM_WORKERS, 1 if cluster.get("GPU", 0) else 0
    for resource, per_worker in (("CPU", cpus), ("GPU", gpus)):
        if args.num_workers * per_worker > cluster.get(resource, 0):
            raise ConfigError(
                f"--num-workers {args.num_workers}: {per_worker} {resource} per worker, the Ray cluster has "
                f"{cluster.get(resource, 0):g}: lower --num-workers (or DATALOADER.NUM_WORKERS)"
            )
    logger.info(f"Training on {args.num_workers} Ray Train workers, {cpus} CPUs and {gpus} GPU each")
    launch_on_ray(main_func, args, args.num_workers, cpus, gpus)
