"""Population-based training: which keys it may perturb, the perturbed values taking effect after a restore (in the
Trainer, and in a real PBT sweep on Ray: the exploiting trial's metrics.json, log.txt and W&B run). Resource checks:
a trial must fit on one node, and an autoscaling cluster queues what no node holds now."""

import glob
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import pytest
import ray
import torch
import yaml

from cityseg_d2 import tune as sweeps
from cityseg_d2.engine import Trainer, prepare_config
from cityseg_d2.engine.setup import load_config
from cityseg_d2.errors import ConfigError
from cityseg_d2.integrations import WANDB_RUN_ID_FILE
from cityseg_d2.tune.pbt import config_hyperparameters
from cityseg_d2.tune.resources import Cluster, NodeShape
from cityseg_d2.tune.trial import (
    checkpoint_report,
    restore_trial_checkpoint,
    save_trial_checkpoint,
    save_untrained_checkpoint,
    trial_dirname,
)
from test_tune_ray import QUICKSTART, TINY_OPTS, WANDB_OPTS, training_starts
from test_ray_cluster import REPO, _end_process_group, _free_ports
from test_wandb import OfflineRun

LR_SPACE = {"SOLVER.BASE_LR": {"loguniform": [1.0e-4, 1.0e-2]}}


def sweep(space=LR_SPACE, **entries):
    return sweeps.parse_sweep({"space": space, "num_samples": 4, "scheduler": {"type": "pbt"}, **entries}, "pbt.yaml")


def test_shipped_pbt_sweep_is_valid_for_the_configs_its_comment_names():
    s = sweeps.load_sweep("configs/sweeps/pbt_optimizer.yaml")
    assert s.scheduler["type"] == "pbt"
    sweeps.validate_sweep(s, load_config("configs/student_project/mask_rcnn_R_101_FPN_cityscapes10.yaml"))
    sweeps.validate_sweep(s, load_config("configs/mask_rcnn_R_50_FPN_coco.yaml", ["TEST.EVAL_PERIOD", "2000"]))


@pytest.mark.parametrize(
    "space, entries, opts, message",
    [
        ({"MODEL.ANCHOR_GENERATOR.SIZES": {"choice": [[[16], [32], [64], [128], [256]]]}}, {}, [],
         "PBT cannot change MODEL.ANCHOR_GENERATOR.SIZES in a running trial"),
        ({**LR_SPACE, "SOLVER.IMS_PER_BATCH": {"choice": [2, 4]}}, {}, [], "PBT cannot change SOLVER.IMS_PER_BATCH"),
        (LR_SPACE, {"scheduler": {"type": "pbt", "perturbation_interval": 150}}, [],
         "perturbation_interval 150 must be a multiple of TEST.EVAL_PERIOD 230"),
        (LR_SPACE, {}, ["TEST.EVAL_PERIOD", "0"], "PBT needs periodic reports"),
    ],  # fmt: skip
)
def test_pbt_refuses_what_a_running_trial_cannot_take_in_one_line(space, entries, opts, message):
    with pytest.raises(ConfigError, match="^pbt.yaml: ") as error:
        sweeps.validate_sweep(sweep(space, **entries), load_config(QUICKSTART, opts))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"search": {"type": "optuna"}}, "pbt perturbs the values itself: use search type random"),
        ({"num_samples": 1}, "pbt needs a population"),
        (
            {"scheduler": {"type": "pbt", "quantile_fraction": 0.7}},
            "quantile_fraction must be a number between 0 and 0.5",
        ),
        ({"scheduler": {"type": "pbt", "perturbation_factors": 1.2}}, "perturbation_factors must be a list"),
        ({"scheduler": {"type": "pbt", "grace_period": 10}}, "unknown entries for pbt: ['grace_period']"),
    ],
)
def test_malformed_pbt_options_fail_in_one_line(entries, message):
    with pytest.raises(ConfigError, match="^pbt.yaml: ") as error:
        sweep(**entries)
    assert message in str(error.value)


def _trainer(register_synthetic, tmp_path, opts):
    train = register_synthetic("pbt_synthetic_train")
    cfg = prepare_config(QUICKSTART, [*TINY_OPTS, "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", "()",
                                      "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(tmp_path), *opts])  # fmt: skip
    return Trainer(cfg)


def test_restored_trainer_takes_its_configs_hyperparameters_not_the_checkpoints(register_synthetic, tmp_path):
    """A checkpoint at iteration 5 (of 20, warm-up 10) saved with one LR, momentum and weight decay, restored by a
    Trainer whose config has others: its optimizer and LR schedule have the config's values at iteration 5."""
    warmup = ["SOLVER.MAX_ITER", "20", "SOLVER.WARMUP_ITERS", "10", "SOLVER.WARMUP_FACTOR", "0.1"]
    saved = _trainer(register_synthetic, tmp_path, [*warmup, "SOLVER.BASE_LR", "0.01", "SOLVER.MOMENTUM", "0.9"])
    sum(p.sum() for p in saved.model.parameters()).backward()
    saved.optimizer.step()  # momentum buffers
    for _ in range(5):
        saved.scheduler.step()
    saved.iter = 4
    saved.checkpointer.save("model_0000004", iteration=4)
    new_values = [*warmup, "SOLVER.BASE_LR", "0.02", "SOLVER.MOMENTUM", "0.95", "SOLVER.WEIGHT_DECAY", "0.0002"]

    plain = _trainer(register_synthetic, tmp_path, new_values)
    plain.resume_or_load(resume=True)  # what a restore alone gives: the checkpoint's values
    assert plain.scheduler.base_lrs[0] == 0.01 and plain.optimizer.param_groups[0]["momentum"] == 0.9

    restored = _trainer(register_synthetic, tmp_path, new_values)
    with config_hyperparameters(restored):
        restored.resume_or_load(resume=True)
    assert restored.start_iter == 5 and restored.scheduler.last_epoch == 5
    warmup_at_5 = 0.1 + (1 - 0.1) * 5 / 10  # detectron2's linear warm-up factor at iteration 5 of 10
    for group in restored.optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.02 * warmup_at_5) and group["momentum"] == 0.95
    assert restored.scheduler.base_lrs == [0.02] * len(restored.optimizer.param_groups)
    assert sorted({g["weight_decay"] for g in restored.optimizer.param_groups}) == [0.0, 0.0002]  # norms: 0
    buffers = [
        t.optimizer.state[t.optimizer.param_groups[0]["params"][0]]["momentum_buffer"] for t in (saved, restored)
    ]
    assert torch.equal(*buffers)  # the checkpoint's momentum buffers
    restored.scheduler.step()
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * (0.1 + 0.9 * 6 / 10))


def test_a_trial_saved_before_it_trains_again_saves_what_it_was_restored_from(register_synthetic, tmp_path):
    """Tune may pause, and so save, a trial it has just restored from another's checkpoint (a PBT exploit) before the
    trial has trained: the saved checkpoint is the donor's, with the trial's own W&B run id, and resumes where the
    donor was. A trial never restored nor trained saves a checkpoint that starts it afresh."""
    donor = _trainer(register_synthetic, tmp_path / "donor", ["SOLVER.MAX_ITER", "20"])
    donor.iter = 9
    donor_checkpoint, trial_output, saved = (tmp_path / name for name in ("donor_checkpoint", "trial", "saved"))
    for folder in (donor_checkpoint, trial_output, saved):
        folder.mkdir()
    (tmp_path / "donor" / WANDB_RUN_ID_FILE).write_text("donor-run")
    save_trial_checkpoint(donor, str(donor_checkpoint), {"iteration": 10, "total_loss": 1.5})
    (trial_output / WANDB_RUN_ID_FILE).write_text("own-run")

    report = restore_trial_checkpoint(str(donor_checkpoint), str(trial_output))
    save_untrained_checkpoint(str(trial_output), str(saved), report)
    assert checkpoint_report(str(saved)) == {"iteration": 10, "total_loss": 1.5}
    assert (saved / "tune_checkpoint.pth").read_bytes() == (donor_checkpoint / "tune_checkpoint.pth").read_bytes()
    assert (saved / WANDB_RUN_ID_FILE).read_text() == "own-run"
    again = tmp_path / "again"
    restore_trial_checkpoint(str(saved), str(again))
    resumed = _trainer(register_synthetic, again, ["SOLVER.MAX_ITER", "20"])
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 10

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    save_untrained_checkpoint(str(trial_output), str(fresh), None)
    assert checkpoint_report(str(fresh)) is None and not (fresh / "tune_checkpoint.pth").exists()


PBT_SWEEP = {
    "name": "pbt",
    "metric": "total_loss",
    "mode": "min",
    "num_samples": 2,
    "resources": {"cpus_per_trial": 1},
    # synch: both trials pause at iteration 10, then the worse one exploits the better one's checkpoint there.
    "scheduler": {"type": "pbt", "quantile_fraction": 0.5, "resample_probability": 0.0, "synch": True},
    "search": {"type": "random", "seed": 0},
    "space": {"SOLVER.BASE_LR": {"loguniform": [1.0e-4, 1.0e-3]}},
}
# 20 iterations, a report (and PBT's perturbation point) at 10; metrics.json has lr at 19 (PeriodicWriter, 20).
PBT_OPTS = [*TINY_OPTS, *WANDB_OPTS, "SOLVER.MAX_ITER", "20", "TEST.EVAL_PERIOD", "10"]


@pytest.mark.slow
def test_pbt_exploit_applies_the_perturbed_lr_from_the_next_iteration(synthetic_datasets_dir, tmp_path):
    storage, wandb_dir = tmp_path / "sweeps", tmp_path / "wandb"
    cfg = load_config(QUICKSTART, PBT_OPTS)
    s = sweeps.parse_sweep(PBT_SWEEP, source="pbt.yaml")
    sweeps.validate_sweep(s, cfg)
    experiment_dir = sweeps.new_experiment(str(storage), s.name)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DETECTRON2_DATASETS", str(synthetic_datasets_dir))
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(wandb_dir))
        sweeps.connect_ray(num_cpus=2)
        try:
            results = sweeps.start_sweep(sweeps.resolve_resources(s, cfg, ray.cluster_resources()), cfg, experiment_dir)
        finally:
            ray.shutdown()
    assert not any(r.error for r in results)
    # Ray's record of the exploit: pbt_policy_<exploiting trial>.txt, lines [.., .., .., .., donor config, new config].
    (policy_file,) = glob.glob(os.path.join(experiment_dir, "pbt_policy_*.txt"))
    trial_id = os.path.basename(policy_file)[len("pbt_policy_") : -len(".txt")]
    with open(policy_file) as f:
        *_, donor_config, new_config = json.loads(f.readlines()[-1])
    donor_lr, new_lr = donor_config["SOLVER.BASE_LR"], new_config["SOLVER.BASE_LR"]
    assert new_lr in (pytest.approx(donor_lr * 1.2), pytest.approx(donor_lr * 0.8))

    output_dir = os.path.join(experiment_dir, trial_dirname(trial_id), "output")
    with open(os.path.join(output_dir, "metrics.json")) as f:
        lrs = {row["iteration"]: row["lr"] for row in map(json.loads, f) if "lr" in row}
    # Iteration 9 (written when PBT paused it) ran at its own LR; from 10 on it trains at the new one (no warm-up).
    assert set(lrs) == {9, 19} and lrs[19] == pytest.approx(new_lr, rel=1e-6) != lrs[9]
    with open(os.path.join(output_dir, "log.txt")) as f:
        log = f.read()
    assert training_starts(output_dir) == [0, 10]
    assert f"replace the checkpoint's from iteration 10: lr {donor_lr:.6g} -> {new_lr:.6g}" in log

    # Its W&B run goes on (its own, not the donor's) and shows the new LR at iteration 19.
    with open(os.path.join(output_dir, WANDB_RUN_ID_FILE)) as f:
        run_id = f.read().strip()
    first, continued = OfflineRun.all(str(wandb_dir), run_id)
    assert continued.history[19]["lr"] == pytest.approx(new_lr, rel=1e-6)
    assert continued.config["SOLVER"]["BASE_LR"] == pytest.approx(new_lr) != first.config["SOLVER"]["BASE_LR"]
    assert continued.config["tune"]["SOLVER.BASE_LR"] == pytest.approx(new_lr)
    assert (continued.state, continued.exit_code) == ("finished", 0)


NODES = [NodeShape("10.0.0.1", 4, 0), NodeShape("10.0.0.2", 8, 1)]


def resolved(cpus, gpus=0, workers=1):
    """A sweep whose per-trial resources are settled (as resolve_resources leaves them)."""
    return replace(sweep(), cpus_per_trial=cpus, gpus_per_trial=gpus, workers_per_trial=workers)


@pytest.mark.parametrize("cpus, gpus, workers", [(8, 1, 1), (4, 0, 1), (16, 2, 2)])
def test_trials_that_fit_on_one_node_pass(cpus, gpus, workers, caplog):
    Cluster(NODES).check(resolved(cpus, gpus, workers))
    assert "PENDING" not in caplog.text


@pytest.mark.parametrize(
    "cpus, gpus, workers, need",
    [(12, 0, 1, "each trial needs 12 CPUs"), (4, 2, 1, "each trial needs 4 CPUs and 2 GPUs"),
     (20, 0, 2, "each of a trial's 2 workers needs 10 CPUs")],  # fmt: skip
)
def test_trials_no_node_can_hold_are_refused_in_one_line(cpus, gpus, workers, need):
    with pytest.raises(ConfigError) as error:
        Cluster(NODES).check(resolved(cpus, gpus, workers))
    message = str(error.value)
    assert message.startswith(f"{need} on one node") and "\n" not in message
    assert "no node of the Ray cluster has that (largest 10.0.0.2: 8 CPUs, 1 GPUs)" in message
    assert "--autoscale" in message


def test_an_autoscaling_cluster_queues_what_its_node_types_hold_and_refuses_the_rest(caplog):
    types = [NodeShape("cpu_node", 32, 0), NodeShape("gpu_node", 16, 2)]
    Cluster(NODES, types, autoscaling=True).check(resolved(12, 2))
    pending = [r.getMessage() for r in caplog.records if "PENDING" in r.getMessage()]
    assert pending == [
        "Trials PENDING: each trial needs 12 CPUs and 2 GPUs on one node, and no node has that now (largest "
        "10.0.0.2: 8 CPUs, 1 GPUs); they start when the autoscaler adds a gpu_node node"
    ]
    with pytest.raises(ConfigError, match="no node type of the cluster's autoscaler has that"):
        Cluster(NODES, types, autoscaling=True).check(resolved(12, 4))


def test_where_node_types_are_unknown_an_autoscaling_cluster_queues_what_is_asked(caplog):
    cluster = Cluster(NODES, autoscaling=True)
    s = sweep()
    assert cluster.capacity(s, cpus_per_trial=24) == {"CPU": 24, "GPU": 1}  # asked for; the GPUs follow the nodes
    assert Cluster(NODES).capacity(s, cpus_per_trial=24) == {"CPU": 12, "GPU": 1}  # resolve_resources refuses 24
    cluster.check(resolved(24, 4))
    assert "they start when the autoscaler adds a node that holds them" in caplog.text


@pytest.fixture(scope="module")
def two_node_cluster(synthetic_datasets_dir, tmp_path_factory):
    """(HOST:PORT, environment) of a Ray cluster of two 1-CPU nodes on 127.0.0.1, started as README says (token auth,
    own ports and temp dir); its processes are ended by their process groups, never by `ray stop`."""
    token = tmp_path_factory.mktemp("ray_token") / "auth_token"
    token.write_text(secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="ray2n_")  # short: Ray's socket paths may not exceed 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TMPDIR": temp_dir,
           "DETECTRON2_DATASETS": str(synthetic_datasets_dir)}  # fmt: skip
    port, client_port, dashboard_port, head_agent_port, worker_agent_port = _free_ports(5)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    commands = [
        [ray_cli, "start", "--head", "--port", str(port), "--temp-dir", temp_dir, "--include-dashboard", "false",
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port),
         "--dashboard-agent-listen-port", str(head_agent_port), *common],
        [ray_cli, "start", "--address", f"127.0.0.1:{port}", "--dashboard-agent-listen-port", str(worker_agent_port),
         *common],
    ]  # fmt: skip
    started = []
    try:
        for command in commands:
            node = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)  # fmt: skip
            started.append(node.pid)
            output, _ = node.communicate(timeout=180)  # `ray start` returns once the node runs
            assert node.returncode == 0, output[-3000:]
        yield f"127.0.0.1:{port}", env
    finally:
        for pgid in reversed(started):  # a node's processes stay in the group of the `ray start` that began them
            _end_process_group(pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _tune_net_command(address, tmp_path, *options):
    sweep_file = tmp_path / "two_cpus.yaml"
    sweep_file.write_text(yaml.safe_dump({"metric": "total_loss", "mode": "min", "space": LR_SPACE}))
    return [sys.executable, "tools/tune_net.py", "--address", address, "--config-file", QUICKSTART, "--sweep",
            str(sweep_file), "--storage", str(tmp_path / "sweeps"), "--cpus-per-trial", "2", *options, *TINY_OPTS]  # fmt: skip


@pytest.mark.slow
def test_a_trial_no_node_can_hold_is_refused_before_the_sweep_starts(two_node_cluster, tmp_path):
    address, env = two_node_cluster  # 2 CPUs in all, 1 on each node
    run = subprocess.run(_tune_net_command(address, tmp_path), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert re.fullmatch(
        r"error: each trial needs 2 CPUs on one node, and no node of the Ray cluster has that \(largest \S+: 1 CPUs, "
        r"0 GPUs\): lower --cpus-per-trial / --gpus-per-trial \(or the sweep's resources:\), or pass --autoscale if "
        r"the cluster adds nodes",
        run.stderr.splitlines()[-1],
    )
    assert not (tmp_path / "sweeps").exists()  # nothing started, nothing written


@pytest.mark.slow
def test_with_autoscale_the_same_trial_waits_pending_for_a_node(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    driver = subprocess.Popen(_tune_net_command(address, tmp_path, "--autoscale"), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        lines = []
        for line in driver.stdout:  # until Tune's status table shows the trial waiting
            lines.append(line)
            if "Trial status: 1 PENDING" in line:
                break
        output = "".join(lines)
        assert "Trial status: 1 PENDING" in output, output[-3000:]  # the sweep runs, its trial waits
        assert re.search(
            r"\nTrials PENDING: each trial needs 2 CPUs on one node, and no node has that now \(largest \S+: 1 CPUs, 0 "
            r"GPUs\); they start when the autoscaler adds a node that holds them\n",
            output,
        )
        assert not glob.glob(str(tmp_path / "sweeps" / "*" / "trial_*" / "output" / "log.txt"))  # no trial started
    finally:
        _end_process_group(driver.pid)
        driver.wait()


# A v1 autoscaler (Ray's fake multi-node provider, which starts nodes as local processes) whose one worker node type
# holds 1 CPU: a trial of 2 CPUs waits for a node forever, and the autoscaler never starts one.
FAKE_AUTOSCALING_CONFIG = {
    "cluster_name": "fake",
    "max_workers": 1,
    "provider": {"type": "fake_multinode"},
    "auth": {"ssh_user": "ubuntu"},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "one_cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
    },
    "head_node_type": "ray.head.default",
    "upscaling_speed": 1,
    "idle_timeout_minutes": 1,
    **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                           "setup_commands", "head_setup_commands", "worker_setup_commands",
                           "head_start_ray_commands", "worker_start_ray_commands")},  # fmt: skip
    "file_mounts": {},
    "file_mounts_sync_continuously": False,
}


@pytest.mark.slow
def test_an_autoscaler_ray_reports_is_detected_and_the_trial_waits_for_it(synthetic_datasets_dir, tmp_path):
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(FAKE_AUTOSCALING_CONFIG))
    temp_dir = tempfile.mkdtemp(prefix="rayas_")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TMPDIR": temp_dir,
           "DETECTRON2_DATASETS": str(synthetic_datasets_dir), "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1"}  # fmt: skip
    port, client_port, dashboard_port, agent_port = _free_ports(4)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--autoscaling-config", str(config), "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "1", "--temp-dir", temp_dir, "--include-dashboard", "false",
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port),
         "--dashboard-agent-listen-port", str(agent_port), "--disable-usage-stats"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    driver = None
    try:
        output, _ = head.communicate(timeout=180)
        assert head.returncode == 0, output[-3000:]
        address = f"127.0.0.1:{port}"
        # Until the autoscaler's first status report is out, Ray cannot tell that the cluster grows.
        deadline = time.monotonic() + 120
        while "Node status" not in subprocess.run([ray_cli, "status", "--address", address], env=env,
                                                  capture_output=True, text=True, timeout=120).stdout:  # fmt: skip
            assert time.monotonic() < deadline, "the autoscaler published no status"
        driver = subprocess.Popen(_tune_net_command(address, tmp_path), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        lines = []
        for line in driver.stdout:  # no --autoscale: Ray said the cluster grows
            lines.append(line)
            if "Trial status: 1 PENDING" in line:
                break
        output = "".join(lines)
        assert "Trial status: 1 PENDING" in output, output[-3000:]  # the sweep runs, its trial waits
        assert "they start when the autoscaler adds a node that holds them" in output
    finally:
        if driver is not None:
            _end_process_group(driver.pid)
            driver.wait()
        _end_process_group(head.pid)  # the head, its monitor and any node the autoscaler started
        shutil.rmtree(temp_dir, ignore_errors=True)
