"""Population-based training: which keys it may perturb, the perturbed values taking effect after a restore (in the
Trainer, and in a real PBT sweep on Ray: the exploiting trial's metrics.json, log.txt and W&B run)."""

import glob
import json
import os

import pytest
import ray
import torch

from cityseg_d2 import tune as sweeps
from cityseg_d2.engine import Trainer, prepare_config
from cityseg_d2.engine.setup import load_config
from cityseg_d2.errors import ConfigError
from cityseg_d2.integrations import WANDB_RUN_ID_FILE
from cityseg_d2.tune.pbt import config_hyperparameters
from cityseg_d2.tune.trial import trial_dirname
from test_tune_ray import QUICKSTART, TINY_OPTS, WANDB_OPTS, detectron2_datasets, training_starts  # noqa: F401
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
def test_pbt_exploit_applies_the_perturbed_lr_from_the_next_iteration(detectron2_datasets, tmp_path):  # noqa: F811
    storage, wandb_dir = tmp_path / "sweeps", tmp_path / "wandb"
    cfg = load_config(QUICKSTART, PBT_OPTS)
    s = sweeps.parse_sweep(PBT_SWEEP, source="pbt.yaml")
    sweeps.validate_sweep(s, cfg)
    experiment_dir = sweeps.new_experiment(str(storage), s.name)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DETECTRON2_DATASETS", detectron2_datasets)
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
    assert (continued.state, continued.exit_code) == ("finished", 0)
