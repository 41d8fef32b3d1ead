"""Our Trainer on Ray Train workers (real Ray, CPU, gloo): a sweep's 2-worker trial, and train_net --ray-address
compared with a local run. Resource and option checks first, without Ray.

One local Ray (3 logical CPUs: a 2-worker trial's two workers and its driver) serves the module. Tiny runs: the
quickstart model at 128 px, no data-loader processes.
"""
import glob
import json
import os
import re

import pytest
import ray
import torch
import yaml

from cityseg_d2 import tune as sweeps
from cityseg_d2.engine.setup import load_config
from cityseg_d2.errors import ConfigError
from cityseg_d2.integrations import WANDB_RUN_ID_FILE
from cityseg_d2.tune import runner
from cityseg_d2.tune.trial import TRAIN_RUN
from test_wandb import OfflineRun, isolated_wandb  # W&B isolated from this machine; offline runs read with wandb leet

QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "256", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "(100,)", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.CITYSCAPES.TEST_MAX_IMAGES", "2", "DATALOADER.NUM_WORKERS", "0",
    "CITYSEG.BEST_CHECKPOINT_METRIC", "", "SEED", "0", "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM",
    "128", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
]  # fmt: skip


def sweep(resources, **entries):
    space = {"SOLVER.BASE_LR": {"grid": [1.0e-4]}}
    return sweeps.parse_sweep({"space": space, "resources": resources, **entries}, source="workers.yaml")


@pytest.mark.parametrize(
    "resources, message",
    [
        ({"workers_per_trial": 0}, "workers_per_trial must be an integer >= 1, got 0"),
        ({"workers_per_trial": 2, "gpus_per_worker": 2}, "gpus_per_worker must be between 0 and 1"),
        ({"workers_per_trial": 2, "gpus_per_trial": 3}, "gpus_per_trial must be between 0 and 2"),
        ({"workers_per_trial": 2, "gpus_per_trial": 1, "gpus_per_worker": 1}, "is not workers_per_trial 2 x"),
    ],
)
def test_bad_worker_resources_in_a_sweep_file_fail_in_one_line(resources, message):
    with pytest.raises(ConfigError, match="^workers.yaml: resources: ") as error:
        sweep(resources)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "cluster, cli, file, expected",
    [
        # W workers of 1 + DATALOADER.NUM_WORKERS 2 CPUs and a GPU each; as many trials at once as the cluster holds
        # whole, with the trial's driver CPU (2 x 3 + 1 = 7 CPUs, 2 GPUs: 16 // 7 and 8 // 2).
        ({"CPU": 16, "GPU": 8}, (None, None, 2, None), {}, (6, 2, 2)),
        ({"CPU": 16, "GPU": 8}, (None, None, 4, 1), {}, (12, 4, 1)),  # --gpus-per-worker 1: 4 GPUs
        ({"CPU": 16, "GPU": 8}, (None, None, None, None), {"workers_per_trial": 2, "gpus_per_worker": 0}, (6, 0, 2)),
        ({"CPU": 16, "GPU": 8}, (None, None, 4, None), {"gpus_per_trial": 1}, "1 GPUs per trial for 4 workers"),
        ({"CPU": 16, "GPU": 8}, (None, None, 4, None), {"gpus_per_worker": 1}, (12, 4, 1)),  # the CLI's W
        ({"CPU": 3}, (None, None, 2, None), {}, (2, 0, 1)),  # capped at what fits beside the driver; CPU only
        ({"CPU": 16}, (None, None, 2, 1), {}, "--gpus-per-worker 1: 2 workers need 2 GPUs, the Ray cluster has 0"),
        ({"CPU": 16, "GPU": 2}, (None, 1, 2, 1), {}, "--gpus-per-trial and --gpus-per-worker: give one of them"),
        ({"CPU": 6}, (6, None, 2, None), {}, "6 CPUs per trial (+1 for its Ray Train driver), but the Ray cluster"),
        ({"CPU": 16, "GPU": 8}, (None, None, 1, None), {"workers_per_trial": 4, "gpus_per_trial": 4}, "than one GPU"),
    ],
)
def test_worker_resources_come_from_cli_then_sweep_then_cluster(cluster, cli, file, expected):
    s = sweep(file)
    cfg = load_config(QUICKSTART, ["DATALOADER.NUM_WORKERS", "2"])
    cpus, gpus, workers, gpus_per_worker = cli
    resolve = dict(cpus_per_trial=cpus, gpus_per_trial=gpus, workers_per_trial=workers, gpus_per_worker=gpus_per_worker)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            runner.resolve_resources(s, cfg, cluster, **resolve)
    else:
        resolved = runner.resolve_resources(s, cfg, cluster, **resolve)
        assert (resolved.cpus_per_trial, resolved.gpus_per_trial, resolved.max_concurrent_trials) == expected
        again = sweeps.parse_sweep(yaml.safe_load(resolved.to_yaml()), source="saved.yaml")
        assert (again.workers_per_trial, again.gpus_per_trial) == (resolved.workers_per_trial, resolved.gpus_per_trial)


def test_pbt_needs_one_process_trials():
    space = {"SOLVER.BASE_LR": {"loguniform": [1.0e-4, 1.0e-2]}}
    s = sweeps.parse_sweep({"space": space, "num_samples": 2, "scheduler": {"type": "pbt"}}, source="pbt.yaml")
    with pytest.raises(ConfigError, match=re.escape("pbt.yaml: scheduler: pbt needs one-process trials")):
        runner.resolve_resources(s, load_config(QUICKSTART), {"CPU": 16}, workers_per_trial=2)


def test_train_net_refuses_num_workers_without_ray_and_launch_flags_with_it(run_tool):
    run = run_tool("train_net.py", "--config-file", QUICKSTART, "--num-workers", "2")
    assert run.code == 2 and "--num-workers needs --ray-address" in run.err
    run = run_tool("train_net.py", "--config-file", QUICKSTART, "--ray-address", "auto", "--num-gpus", "2")
    assert run.code == 2 and run.error_lines() == [
        "error: --ray-address runs --num-workers Ray Train workers: --num-gpus, --num-machines and --machine-rank "
        "are for detectron2's own launch"
    ]
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def local_ray(synthetic_datasets_dir, tmp_path_factory):
    """(The GCS address of a Ray started here with 3 logical CPUs, the folder of offline W&B runs): Ray's workers
    inherit the raylet's environment, so the synthetic data set and W&B (offline, nothing of this machine's) are set
    before Ray starts."""
    with pytest.MonkeyPatch.context() as env, isolated_wandb(tmp_path_factory.mktemp("wandb"), env) as wandb_runs:
        env.setenv("DETECTRON2_DATASETS", str(synthetic_datasets_dir))
        env.setenv("WANDB_MODE", "offline")
        sweeps.connect_ray(num_cpus=3)
        try:
            yield ray.get_runtime_context().gcs_address, wandb_runs
        finally:
            ray.shutdown()


def training_starts(log_file):
    """The iterations each (re)start of training began at, from a detectron2 log."""
    with open(log_file) as f:
        return [int(line.split()[-1]) for line in f if "Starting training from iteration" in line]


def log_lines(log_file, text):
    with open(log_file) as f:
        return [line for line in f if text in line]


WANDB_OPTS = ["WANDB.ENABLED", "True", "WANDB.NUM_VIS_IMAGES", "0", "WANDB.LOG_DATASET_STATS", "False"]
TWO_WORKERS = {
    "name": "two_workers",
    "metric": "total_loss",
    "mode": "min",
    "max_failures": 1,
    "resources": {"workers_per_trial": 2, "cpus_per_trial": 2},
    "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
    # Run in grid order, one at a time (3 CPUs); RPN.LOSS_WEIGHT 20 makes the second trial's total_loss far worse.
    "space": {"MODEL.RPN.LOSS_WEIGHT": {"grid": [1.0, 20.0]}},
}


@pytest.fixture(scope="module")
def two_worker_sweep(local_ray, tmp_path_factory):
    """A sweep of two trials on 2 workers each (4 iterations, a report every 2, W&B offline) whose rank 0 raises
    once after iteration 3, through a hook (TrialSpec.hooks; a class made here travels to the workers by value).
    The first trial is restarted by Ray Train from its iteration-2 checkpoint (max_failures 1) and finishes; ASHA
    stops the second at iteration 2, before the hook's failure. Returns ({loss weight: Result}, W&B runs folder)."""
    from detectron2.engine import HookBase
    from detectron2.utils import comm

    class FailOnceAfterIteration3(HookBase):
        def __init__(self, cfg):
            self._marker = os.path.join(cfg.OUTPUT_DIR, "injected_failure")

        def after_step(self):
            if comm.get_rank() == 0 and self.trainer.iter + 1 == 3 and not os.path.exists(self._marker):
                open(self._marker, "w").close()
                raise RuntimeError("injected failure after iteration 3")

    _, wandb_runs = local_ray
    cfg = load_config(QUICKSTART, [*TINY_OPTS, "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2", *WANDB_OPTS])
    s = sweeps.parse_sweep(TWO_WORKERS, source="two_workers.yaml")
    sweeps.validate_sweep(s, cfg)
    experiment_dir = sweeps.new_experiment(str(tmp_path_factory.mktemp("sweeps")), s.name)
    s = sweeps.resolve_resources(s, cfg, ray.cluster_resources())
    results = sweeps.start_sweep(s, cfg, experiment_dir, hooks=[FailOnceAfterIteration3])
    return {result.config["MODEL.RPN.LOSS_WEIGHT"]: result for result in results}, wandb_runs


def _wandb_runs(wandb_runs, output_dir):
    with open(os.path.join(output_dir, WANDB_RUN_ID_FILE)) as f:
        return OfflineRun.all(wandb_runs, f.read().strip())


@pytest.mark.slow
def test_a_two_worker_trial_trains_with_world_size_2_and_reports_once_per_evaluation(two_worker_sweep):
    result = two_worker_sweep[0][1.0]
    assert result.error is None
    assert list(result.metrics_dataframe["iteration"]) == [2, 4]  # one report per evaluation, from rank 0
    assert {"total_loss", "segm/AP"} <= set(result.metrics_dataframe.columns)
    output = os.path.join(result.path, "output")
    assert log_lines(os.path.join(output, "log.txt"), "World size: 2")
    assert log_lines(os.path.join(output, "log.txt.rank1"), "World size: 2")  # detectron2's log of the second worker
    assert os.path.isfile(os.path.join(output, "model_final.pth"))
    # Rank 0 wrote metrics.json (losses gathered from both workers), evaluated at 2 and at the last iteration.
    with open(os.path.join(output, "metrics.json")) as f:
        evaluated = [row["iteration"] for row in map(json.loads, f) if "segm/AP" in row]
    assert evaluated == [1, 3]
    # One Ray Train checkpoint kept (rank 0's, the last report's): the detectron2 state and that report.
    (checkpoint,) = glob.glob(os.path.join(result.path, TRAIN_RUN, "checkpoint_0*"))
    with open(os.path.join(checkpoint, "tune_metrics.json")) as f:
        assert json.load(f)["iteration"] == 4
    assert {"tune_checkpoint.pth", "last_checkpoint", WANDB_RUN_ID_FILE} <= set(os.listdir(checkpoint))


@pytest.mark.slow
def test_a_failed_two_worker_trial_is_restored_on_both_workers(two_worker_sweep):
    results, wandb_runs = two_worker_sweep
    output = os.path.join(results[1.0].path, "output")
    assert os.path.exists(os.path.join(output, "injected_failure"))
    # Both workers started at 0, failed after 3 (rank 0 raised, rank 1 was ended with it) and resumed from the
    # checkpoint reported at iteration 2, not from scratch.
    assert training_starts(os.path.join(output, "log.txt")) == [0, 2]
    assert training_starts(os.path.join(output, "log.txt.rank1")) == [0, 2]
    # Rank 0's W&B run: failed with the injected error, then continued (same id) to the end.
    runs = _wandb_runs(wandb_runs, output)
    assert [(run.state, run.exit_code) for run in runs] == [("failed", 1), ("finished", 0)]


@pytest.mark.slow
def test_a_two_worker_trial_that_asha_stops_ends_at_the_report_on_both_workers(two_worker_sweep):
    results, wandb_runs = two_worker_sweep
    stopped = results[20.0]
    assert list(stopped.metrics_dataframe["iteration"]) == [2]
    output = os.path.join(stopped.path, "output")
    assert not os.path.exists(os.path.join(output, "injected_failure"))  # paused at 2: iteration 3 never ran
    assert not os.path.exists(os.path.join(output, "model_final.pth"))
    for log in ("log.txt", "log.txt.rank1"):  # each worker unwound through detectron2's after_train hooks
        assert training_starts(os.path.join(output, log)) == [0]
        assert log_lines(os.path.join(output, log), "Total training time")
    (run,) = _wandb_runs(wandb_runs, output)
    assert (run.state, run.exit_code) == ("finished", 0)
    # W&B runs come from rank 0 only: three (the first trial's two, this one).
    assert len(OfflineRun.all(wandb_runs)) == 3


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def _outputs(output_dir):
    """OUTPUT_DIR's files, the TensorBoard event file's host- and time-stamped name as a pattern."""
    files = set()
    for path in glob.glob(os.path.join(output_dir, "**", "*"), recursive=True):
        name = os.path.relpath(path, output_dir)
        files.add("events.out.tfevents.*" if name.startswith("events.out.tfevents.") else name)
    return files


TRAIN_NET_OPTS = [*TINY_OPTS, "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0"]


def _untimed(rows):
    """metrics.json rows without what measures time (time, data_time, eta_seconds, ...)."""
    return [{k: v for k, v in row.items() if "time" not in k and k != "eta_seconds"} for row in rows]


@pytest.mark.slow
def test_train_net_on_ray_writes_what_a_local_run_writes(local_ray, run_tool, tmp_path):
    """One Ray Train worker against a local run, both one process of world size 1 with the same SEED and one torch
    thread (Ray gives a 1-CPU worker one; set here for the local run): the same Trainer on the same data in the same
    order must give the same losses, bit for bit, and the same files."""
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = run_tool("train_net.py", "--config-file", QUICKSTART, *TRAIN_NET_OPTS, "OUTPUT_DIR", local)
    finally:
        torch.set_num_threads(threads)
    assert run.code == 0, run.err[-3000:]
    address, _ = local_ray
    args = ["--ray-address", address, "--num-workers", "1", "--config-file", QUICKSTART, *TRAIN_NET_OPTS]
    run = run_tool("train_net.py", *args, "OUTPUT_DIR", on_ray)
    assert run.code == 0, run.err[-3000:]
    assert _outputs(on_ray) == _outputs(local)
    assert {"model_final.pth", "last_checkpoint", "metrics.json", "config.yaml", "log.txt"} <= _outputs(local)
    assert _untimed(_metrics(on_ray)) == _untimed(_metrics(local))
    assert any("segm/AP" in row for row in _metrics(local))  # the evaluation after training

    # OUTPUT_DIR's rules hold on rank 0: no overwrite without --resume, and --resume continues the training.
    run = run_tool("train_net.py", *args, "OUTPUT_DIR", on_ray)
    assert run.code == 2 and len(run.error_lines()) == 1
    assert run.error_lines()[0].startswith(f"error: OUTPUT_DIR {on_ray} holds a finished training")
    run = run_tool("train_net.py", "--resume", *args, "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", on_ray)
    assert run.code == 0, run.err[-3000:]
    assert training_starts(on_ray / "log.txt") == [0, 2]
