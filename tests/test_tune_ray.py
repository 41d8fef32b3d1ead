"""Real Ray Tune sweeps on the CPU with tiny trials on the synthetic data.

A sweep of three trials checks sampling, reporting, ASHA, W&B runs (offline), the summary and best_config.yaml
(trained by train_net); one run serves all those tests (module fixture): trials run one at a time in grid order, so ASHA's
decisions are deterministic. The grid's MODEL.RPN.LOSS_WEIGHT 20 multiplies the RPN losses, so that trial's
total_loss is far above the others' at the first rung (iteration 4) and ASHA stops it there.
"""
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import ray
import yaml

from cityseg_d2.engine.setup import load_config
from cityseg_d2 import tune as sweeps
from cityseg_d2.tune.runner import SAVED_SWEEP
from cityseg_d2.integrations import WANDB_RUN_ID_FILE
from test_wandb import OfflineRun  # reads an offline W&B run with `wandb leet inspect`

pytestmark = pytest.mark.slow

QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
# 8 iterations at 128 px, evaluation (and a Tune report) every 4 on 2 val images; no data-loader processes.
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "256", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "8", "SOLVER.STEPS", "(100,)",
    "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "4", "SOLVER.CHECKPOINT_PERIOD", "1000",
    "DATASETS.CITYSCAPES.TEST_MAX_IMAGES", "2", "DATALOADER.NUM_WORKERS", "0", "CITYSEG.BEST_CHECKPOINT_METRIC", "",
    "SEED", "0", "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
]  # fmt: skip


@pytest.fixture(scope="module")
def detectron2_datasets(synthetic_root, tmp_path_factory):
    """A $DETECTRON2_DATASETS holding the synthetic set as cityscapes_synthetic, the builtin names' root."""
    datasets = tmp_path_factory.mktemp("detectron2_datasets")
    os.symlink(synthetic_root, datasets / "cityscapes_synthetic")
    return str(datasets)


def training_starts(output_dir):
    """The iterations each (re)start of a trial's training began at, from its detectron2 log.txt."""
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [int(line.split()[-1]) for line in f if "Starting training from iteration" in line]


WANDB_OPTS = ["WANDB.ENABLED", "True", "WANDB.NUM_VIS_IMAGES", "0", "WANDB.LOG_DATASET_STATS", "False"]
ANCHORS = [[[16], [32], [64], [128], [256]], [[32], [64], [128], [256], [512]]]
SWEEP = {
    "name": "tiny",
    "metric": "total_loss",
    "mode": "min",
    "max_concurrent_trials": 1,
    "resources": {"cpus_per_trial": 1},
    "scheduler": {"type": "asha", "grace_period": 4, "reduction_factor": 2},
    "search": {"type": "random", "seed": 0},
    "space": {
        "MODEL.RPN.LOSS_WEIGHT": {"grid": [1.0, 20.0, 1.5]},
        "SOLVER.BASE_LR": {"loguniform": [1.0e-4, 3.0e-4]},
        "MODEL.ANCHOR_GENERATOR.SIZES": {"choice": ANCHORS},
    },
}


def run_sweep(data, opts, storage, **environment):
    """Sweep `data` (a sweep file's contents) over the quickstart config with `opts` on a local Ray of 2 CPUs whose
    workers see `environment`; returns (sweep, base cfg, ResultGrid, rows, experiment dir)."""
    cfg = load_config(QUICKSTART, opts)
    sweep = sweeps.parse_sweep(data, source=f"{data['name']}.yaml")
    sweeps.validate_sweep(sweep, cfg)
    experiment_dir = sweeps.new_experiment(storage, sweep.name)
    with pytest.MonkeyPatch.context() as env:
        for name, value in environment.items():  # Ray's workers inherit the environment of the raylet started here
            env.setenv(name, value)
        sweeps.connect_ray(num_cpus=2)
        try:
            sweep = sweeps.resolve_resources(sweep, cfg, ray.cluster_resources())
            results = sweeps.start_sweep(sweep, cfg, experiment_dir)
        finally:
            ray.shutdown()
    return sweep, cfg, results, sweeps.trial_rows(results, sweep, cfg), experiment_dir


@pytest.fixture(scope="module")
def swept(detectron2_datasets, tmp_path_factory):
    """Run the sweep once, with W&B offline; yields (sweep, base cfg, ResultGrid, rows, experiment dir, W&B dir)."""
    storage = str(tmp_path_factory.mktemp("sweeps"))
    wandb_dir = str(tmp_path_factory.mktemp("wandb"))
    sweep, cfg, results, rows, experiment_dir = run_sweep(
        SWEEP, TINY_OPTS + WANDB_OPTS, storage,
        DETECTRON2_DATASETS=detectron2_datasets, WANDB_MODE="offline", WANDB_DIR=wandb_dir,
    )  # fmt: skip
    sweeps.write_summary(rows, experiment_dir)
    return sweep, cfg, results, rows, experiment_dir, wandb_dir


def test_every_trial_trained_its_own_sampled_values(swept):
    sweep, _, results, rows, _, _ = swept
    assert len(rows) == 3 and not any(r.error for r in results)
    assert sorted(r["MODEL.RPN.LOSS_WEIGHT"] for r in rows) == [1.0, 1.5, 20.0]
    assert len({r["SOLVER.BASE_LR"] for r in rows}) == 3
    for row in rows:
        # The trial's own detectron2 config.yaml (written by default_setup in the trial) holds its values.
        with open(os.path.join(row["output_dir"], "config.yaml")) as f:
            saved = yaml.safe_load(f)
        assert saved["MODEL"]["RPN"]["LOSS_WEIGHT"] == row["MODEL.RPN.LOSS_WEIGHT"]
        assert saved["SOLVER"]["BASE_LR"] == pytest.approx(row["SOLVER.BASE_LR"])
        assert saved["MODEL"]["ANCHOR_GENERATOR"]["SIZES"] == row["MODEL.ANCHOR_GENERATOR.SIZES"]
        assert row["MODEL.ANCHOR_GENERATOR.SIZES"] in ANCHORS
        assert saved["MODEL"]["DEVICE"] == "cpu" and saved["OUTPUT_DIR"] == row["output_dir"]
        assert training_starts(row["output_dir"]) == [0]


def test_trials_report_losses_and_the_fast_evaluators_results_at_each_evaluation(swept):
    _, _, results, _, _, _ = swept
    for result in results:
        history = result.metrics_dataframe
        assert list(history["iteration"]) in ([4], [4, 8])  # detectron2 iterations at each evaluation
        assert {"total_loss", "loss_mask", "segm/AP", "segm/AP50", "segm/matterport_AP50"} <= set(history.columns)
        run_id = [WANDB_RUN_ID_FILE] if os.path.exists(os.path.join(result.path, "output", WANDB_RUN_ID_FILE)) else []
        expected = ["last_checkpoint", "tune_checkpoint.pth", "tune_metrics.json", *run_id]
        assert sorted(os.listdir(result.checkpoint.path)) == sorted(expected)


def test_asha_stops_the_trial_with_the_bad_loss_weight_at_the_first_rung(swept):
    _, _, _, rows, _, _ = swept
    outcome = {r["MODEL.RPN.LOSS_WEIGHT"]: (r["status"], r["iterations"]) for r in rows}
    assert outcome == {1.0: ("finished", 8), 1.5: ("finished", 8), 20.0: ("stopped early", 4)}
    assert rows[-1]["MODEL.RPN.LOSS_WEIGHT"] == 20.0  # worst total_loss ranks last


def test_sha_pauses_every_trial_at_the_rung_and_only_the_best_go_on_from_checkpoints(detectron2_datasets, tmp_path):
    """Synchronous successive halving, one trial at a time (by resources: Ray's max_concurrent_trials would count
    paused trials): each trial pauses at the rung (iteration 4) until all three have reached it; then the worst (RPN
    loss weight 20) stops and the other two go on to 8, the first one restored from its checkpoint at 4 (its training
    starts again there), the last one (running when the rung was decided) without a pause."""
    sha = {**SWEEP, "name": "sha", "scheduler": {"type": "sha", "grace_period": 4, "reduction_factor": 2}}
    sha.update(max_concurrent_trials=0, resources={"cpus_per_trial": 2})  # one trial at a time on Ray's 2 CPUs
    _, _, _, rows, _ = run_sweep(sha, TINY_OPTS, str(tmp_path), DETECTRON2_DATASETS=detectron2_datasets)
    outcome = {r["MODEL.RPN.LOSS_WEIGHT"]: (r["status"], r["iterations"]) for r in rows}
    assert outcome == {1.0: ("finished", 8), 1.5: ("finished", 8), 20.0: ("stopped early", 4)}
    starts = {r["MODEL.RPN.LOSS_WEIGHT"]: training_starts(r["output_dir"]) for r in rows}
    assert starts == {1.0: [0, 4], 20.0: [0], 1.5: [0]}


def test_summary_files_rank_trials_best_first(swept):
    sweep, _, _, rows, experiment_dir, _ = swept
    losses = [r["total_loss"] for r in rows]
    assert losses == sorted(losses)
    with open(os.path.join(experiment_dir, "trials.csv")) as f:
        header, *lines = f.read().splitlines()
    assert header.split(",")[:3] == ["rank", "trial", "MODEL.RPN.LOSS_WEIGHT"]
    assert [line.split(",")[1] for line in lines] == [r["trial"] for r in rows]
    with open(os.path.join(experiment_dir, SAVED_SWEEP)) as f:
        assert yaml.safe_load(f)["space"] == SWEEP["space"]


def test_every_trial_is_a_wandb_run_of_the_sweeps_group_stopped_ones_too(swept):
    _, _, _, rows, _, wandb_dir = swept
    runs = [OfflineRun(path) for path in glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*"))]
    runs = {run.run["display_name"]: run for run in runs}
    assert sorted(runs) == sorted(r["trial"] for r in rows)
    for row in rows:
        run = runs[row["trial"]]
        assert run.run["run_group"] == "tiny"
        # Finished normally, also when ASHA stopped the trial: a stopped trial is no failure.
        assert (run.state, run.exit_code) == ("finished", 0), row
        assert run.config["tune"]["MODEL.RPN.LOSS_WEIGHT"] == row["MODEL.RPN.LOSS_WEIGHT"]


def test_best_config_trains_with_train_net_as_it_is(swept, detectron2_datasets):
    sweep, cfg, _, rows, experiment_dir, _ = swept
    path = sweeps.write_best_config(rows, sweep, cfg, experiment_dir)
    best = load_config(path)
    assert best.SOLVER.BASE_LR == pytest.approx(rows[0]["SOLVER.BASE_LR"])
    assert best.MODEL.RPN.LOSS_WEIGHT == rows[0]["MODEL.RPN.LOSS_WEIGHT"]
    assert best.OUTPUT_DIR == os.path.join(experiment_dir, "best")
    run = subprocess.run(
        [sys.executable, "tools/train_net.py", "--config-file", path, "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "DETECTRON2_DATASETS": detectron2_datasets},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.path.isfile(os.path.join(best.OUTPUT_DIR, "model_final.pth"))


def _starts_of(experiment, pattern):
    logs = list(experiment.glob(f"{pattern}/output/log.txt"))
    return training_starts(logs[0].parent) if logs else []


def _tune_net(args, env, **kwargs):
    return [sys.executable, "tools/tune_net.py", "--config-file", QUICKSTART, *args, *TINY_OPTS], dict(
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


# A driver that starts a sweep whose every trial raises once after iteration 6, through a hook the trials take
# (TrialSpec.hooks); defined in the driver's __main__, so it travels to Ray's workers by value.
FAILING_SWEEP_DRIVER = textwrap.dedent(
    """
    import os
    import sys

    import ray
    from detectron2.engine import HookBase

    from cityseg_d2.engine import prepare_config
    from cityseg_d2.tune import connect_ray, load_sweep, new_experiment, resolve_resources, start_sweep, validate_sweep

    class FailOnceAfterIteration6(HookBase):
        def __init__(self, cfg):
            self._marker = os.path.join(cfg.OUTPUT_DIR, "injected_failure")  # makes it once per trial

        def after_step(self):
            if self.trainer.iter + 1 == 6 and not os.path.exists(self._marker):
                open(self._marker, "w").close()
                raise RuntimeError("injected failure after iteration 6")

    config_file, sweep_file, storage, *opts = sys.argv[1:]
    cfg = prepare_config(config_file, opts)
    sweep = load_sweep(sweep_file)
    validate_sweep(sweep, cfg)
    experiment_dir = new_experiment(storage, sweep.name)
    connect_ray()
    sweep = resolve_resources(sweep, cfg, ray.cluster_resources())
    start_sweep(sweep, cfg, experiment_dir, hooks=[FailOnceAfterIteration6])
    """
)


def test_killed_sweep_resumes_without_rerunning_finished_trials_and_failed_trials_retry(
    detectron2_datasets, tmp_path
):
    """Every trial raises once after iteration 6 (a hook of the test's driver) and is retried from its
    iteration-4 checkpoint (max_failures 1). The driver is killed (SIGKILL, with its local Ray) during the second
    trial's retry; tune_net --resume then finishes that trial from its checkpoint and leaves the finished first one
    alone."""
    sweep_file = tmp_path / "resumable.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "max_failures": 1, "max_concurrent_trials": 1, "resources": {"cpus_per_trial": 1},
        "space": {"SOLVER.BASE_LR": {"grid": [1.0e-4, 2.0e-4]}},
    }))  # fmt: skip
    storage = tmp_path / "sweeps"
    experiment = storage / "resumable"
    env = {**os.environ, "DETECTRON2_DATASETS": detectron2_datasets}

    driver = subprocess.Popen(
        [sys.executable, "-c", FAILING_SWEEP_DRIVER, QUICKSTART, str(sweep_file), str(storage), *TINY_OPTS],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        # Kill once the second trial's retry has begun from its checkpoint: by then Ray's experiment state,
        # saved right after each reported checkpoint, knows that checkpoint.
        deadline = time.monotonic() + 400
        while len(_starts_of(experiment, "trial_*_00001")) < 2:
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the second trial never restarted"
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone when the driver failed
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        driver.wait()
    first, second = sorted(experiment.glob("trial_*"))
    assert not (experiment / "trials.json").exists()  # the sweep did not get to its end
    assert training_starts(first / "output") == [0, 4]  # failed once after 6, retried from the checkpoint at 4

    command, options = _tune_net(["--sweep", str(sweep_file), "--storage", str(storage), "--resume"], env, timeout=400)
    resumed = subprocess.run(command, **options)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    with open(experiment / "trials.json") as f:
        rows = {row["trial"]: row for row in json.load(f)}
    assert {name: (row["status"], row["iterations"]) for name, row in rows.items()} == {
        first.name: ("finished", 8),
        second.name: ("finished", 8),
    }
    assert training_starts(first / "output") == [0, 4]  # not trained again
    starts = training_starts(second / "output")
    assert starts[:2] == [0, 4] and starts[2:] == [4]  # resumed from its checkpoint, not from scratch
    assert (second / "output" / "injected_failure").exists()
    assert (experiment / "best_config.yaml").exists()
