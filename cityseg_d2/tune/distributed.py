"""Our Trainer data-parallel on Ray Train workers: train_net on a Ray cluster (launch_on_ray, driven by
runner.train_on_ray), and a sweep's multi-worker trials (trial.DistributedTrialTrainable).

Ray's TorchTrainer starts the workers and the torch process group between them (NCCL with GPUs, gloo without),
where detectron2's launch would start processes itself. Each worker then sets up detectron2's comm on that group
(setup_detectron2_comm) and runs what a process of detectron2's launch runs, so rank 0 is detectron2's main process
(checkpoints, metrics.json, evaluation results, W&B) and SOLVER.IMS_PER_BATCH stays the total batch, which
detectron2 divides by the world size.
"""
import argparse
import contextlib
import os
import sys
import tempfile

import ray
import ray.train
import torch.distributed as dist
from detectron2.utils import comm
from ray.train.torch import TorchTrainer

from ..engine.launch import drop_detectron2_group_references
from ..errors import UserError


def setup_detectron2_comm():
    """detectron2's comm on the process group Ray Train made: its world size and rank are the group's, and its local
    process group (local rank, the device DDP is given) holds the workers on this worker's node. Ray numbers the
    workers node by node; detectron2's own create_local_process_group would assume as many on every node, which Ray
    does not promise (a trial's 8 workers may be placed 5 + 3)."""
    context = ray.train.get_context()
    node_ranks = [None] * context.get_world_size()
    dist.all_gather_object(node_ranks, context.get_node_rank())
    for node in sorted(set(node_ranks)):  # new_group is collective: every rank makes every node's group, in order
        group = dist.new_group([rank for rank, node_rank in enumerate(node_ranks) if node_rank == node])
        if node == context.get_node_rank():
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()


@contextlib.contextmanager
def wandb_flushed():
    """Ray ends a worker's child processes, W&B's service among them, as soon as its training function has returned
    or raised, before W&B has written a run's last records: wait for them (wandb.teardown, which W&B recommends where
    its exit hook does not run). W&B is only imported where a run used it."""
    try:
        yield
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None:
            wandb.teardown()


def scaling_config(num_workers, cpus_per_worker, gpus_per_worker):
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    return ray.train.ScalingConfig(num_workers=num_workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources)


def worker_device_opts(use_gpu):
    """What a worker without a GPU sets, as a trial on the CPU does (it may run on a node whose GPUs it may not use)."""
    return [] if use_gpu else ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", False]


def raise_worker_error(error):
    """A failed Ray Train run's error: the first UserError a worker raised, as it is (one line for run_cli), else the
    run's own error."""
    failures = getattr(error, "worker_failures", {})
    for _, failure in sorted(failures.items()):
        if isinstance(failure, UserError):
            raise failure from error
    raise error


def _run_main(config):
    """One Ray Train worker of launch_on_ray: detectron2's comm, then main(args) as detectron2's launch runs it."""
    setup_detectron2_comm()
    args = argparse.Namespace(**vars(config["args"]))
    args.opts = [*args.opts, *worker_device_opts(config["use_gpu"])]
    with wandb_flushed():
        config["main"](args)
    drop_detectron2_group_references()  # so that Ray's destroy_process_group ends the group's threads


@contextlib.contextmanager
def _workers_stay_in_place():
    """Ray Train moves its workers into its run folder unless RAY_CHDIR_TO_TRIAL_DIR is 0 where fit() is called:
    they stay where the cluster's processes run (the driver's directory on a local Ray), as trials do
    (runner.RAY_RUNTIME_ENV), so that a config's relative paths mean what they mean to train_net."""
    previous = os.environ.get("RAY_CHDIR_TO_TRIAL_DIR")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["RAY_CHDIR_TO_TRIAL_DIR"]
        else:
            os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = previous


def launch_on_ray(main_func, args, num_workers, cpus_per_worker, gpus_per_worker):
    """detectron2's launch on `num_workers` Ray Train workers of the connected cluster: each runs main_func(args)
    (args from detectron2's default_argument_parser), rank 0 being the main process. Ray Train's record of the run
    goes to a temporary folder: its checkpoints are detectron2's, in OUTPUT_DIR."""
    with tempfile.TemporaryDirectory(prefix="ray_train_") as run_record, _workers_stay_in_place():
        trainer = TorchTrainer(
            _run_main,
            train_loop_config={"main": main_func, "args": args, "use_gpu": gpus_per_worker > 0},
            scaling_config=scaling_config(num_workers, cpus_per_worker, gpus_per_worker),
            # Ray Train's own INFO lines (with a worker's traceback when it fails) would bury the training's log and
            # the one line a UserError of a worker ends with.
            run_config=ray.train.RunConfig(
                storage_path=run_record, logging_config=ray.train.LoggingConfig(log_level="WARNING")
            ),
        )
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise_worker_error(e)
