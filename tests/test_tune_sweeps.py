"""Sweep files, their validation against a base config and the trial config, without starting Ray."""
import json
import re
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import ray
import yaml
from ray import tune

from cityseg_d2.engine.setup import load_config
from cityseg_d2.errors import ConfigError
from cityseg_d2.integrations import ray_tune

QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
TWO_TEST_SETS = '("cityscapes_synthetic_instance_val", "cityscapes_synthetic_instance_test")'


@pytest.fixture(scope="module")
def quickstart_cfg():
    return load_config(QUICKSTART)


def sweep(space, **entries):
    return ray_tune.parse_sweep({"space": space, **entries}, source="test_sweep.yaml")


@pytest.mark.parametrize(
    "sweep_file, config_file",
    [
        ("configs/sweeps/student_project_space.yaml", "configs/student_project/mask_rcnn_R_101_FPN_cityscapes10.yaml"),
        ("configs/sweeps/rich_space.yaml", "configs/mask_rcnn_R_50_FPN_coco.yaml"),
    ],
)
def test_shipped_sweeps_are_valid_for_their_configs(sweep_file, config_file):
    s = ray_tune.load_sweep(sweep_file)
    ray_tune.validate_sweep(s, load_config(config_file))
    assert s.metric == "segm/AP" and s.scheduler["type"] == "asha"
    # Every candidate merges into the config (checked above) and reaches Ray as a search domain.
    assert set(s.param_space()) == set(s.space)


def test_student_project_space_is_the_student_projects_study():
    s = ray_tune.load_sweep("configs/sweeps/student_project_space.yaml")
    assert {k: spec.kind for k, spec in s.space.items()} == {
        "SOLVER.BASE_LR": "loguniform",
        "SOLVER.WEIGHT_DECAY": "loguniform",
        "SOLVER.MOMENTUM": "uniform",
    }
    assert (s.num_samples, s.search["type"], s.scheduler["reduction_factor"]) == (20, "random", 3)


def test_list_valued_choices_reach_the_config_as_lists_and_tuples(quickstart_cfg):
    sizes = [[[16], [32], [64], [128], [256]], [[24], [48], [96], [192], [384]]]
    s = sweep({"MODEL.ANCHOR_GENERATOR.SIZES": {"choice": sizes}, "INPUT.MIN_SIZE_TRAIN": {"grid": [[128], [96, 128]]}})
    ray_tune.validate_sweep(s, quickstart_cfg)
    domain = s.param_space()["MODEL.ANCHOR_GENERATOR.SIZES"]
    assert isinstance(domain, tune.search.sample.Categorical)
    assert all(isinstance(c, str) for c in domain.categories)  # Optuna takes scalar categories only
    trial = {"MODEL.ANCHOR_GENERATOR.SIZES": domain.categories[1], "INPUT.MIN_SIZE_TRAIN": json.dumps([96, 128])}
    cfg = ray_tune.trial_config(quickstart_cfg, s.overrides(trial), "/tmp/x", cpus=1, use_gpu=False)
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == sizes[1]
    assert cfg.INPUT.MIN_SIZE_TRAIN == (96, 128)


@pytest.mark.parametrize(
    "space, message",
    [
        ({"SOLVER.BASE_LRR": {"loguniform": [1e-4, 1e-2]}}, "SOLVER.BASE_LRR is not a config key"),
        ({"SOLVER.MAX_ITER": {"uniform": [100, 200]}}, "SOLVER.MAX_ITER: uniform value 100.0 (float) does not fit"),
        ({"MODEL.RESNETS.NORM": {"choice": ["GN", 3]}}, "MODEL.RESNETS.NORM: choice value 3 (int) does not fit"),
    ],
)
def test_space_that_does_not_fit_the_base_config_is_named(quickstart_cfg, space, message):
    with pytest.raises(ConfigError, match="^test_sweep.yaml: space: ") as error:
        ray_tune.validate_sweep(sweep(space), quickstart_cfg)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"space": {}}, "space is empty"),
        ({"space": None}, "space is empty"),
        ({"space": {"SOLVER.BASE_LR": [1e-4, 1e-2]}}, "space: SOLVER.BASE_LR: write one of"),
        ({"space": {"SOLVER.BASE_LR": {"loguniform": [0, 1e-2]}}}, "loguniform needs lower > 0"),
        ({"space": {"SOLVER.BASE_LR": {"uniform": [0.1, 0.01]}}}, "lower < upper"),
        ({"space": {"SOLVER.BASE_LR": {"choice": []}}}, "choice needs a non-empty list"),
        ({"space": {"OUTPUT_DIR": {"choice": ["a", "b"]}}}, "OUTPUT_DIR is set by each trial"),
        ({"spaces": {}}, "unknown entries ['spaces']"),
        ({"mode": "maximum"}, "mode must be max or min"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler: type must be one of"),
        ({"scheduler": {"type": "asha", "grace": 3}}, "unknown entries for asha: ['grace']"),
        ({"search": {"type": "optuna"}, "space": {"SOLVER.BASE_LR": {"grid": [0.1, 0.2]}}}, "grid values need search"),
        ({"resources": {"gpus_per_trial": 2}}, "gpus_per_trial must be between 0 and 1"),
    ],
)
def test_malformed_sweep_files_fail_in_one_line(data, message):
    data = {"space": {"SOLVER.BASE_LR": {"loguniform": [1e-4, 1e-2]}}, **data}
    with pytest.raises(ConfigError, match="^test_sweep.yaml: ") as error:
        ray_tune.parse_sweep(data, source="test_sweep.yaml")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "metric, mode, opts, ok",
    [
        ("segm/AP", "max", [], True),
        ("segm/matterport_AP50", "max", [], True),
        ("bbox/AP", "max", [], False),  # the Cityscapes evaluators report masks only
        ("bbox/AP", "max", ["TEST.EVALUATORS", '["coco"]'], True),
        ("coco/bbox/AP", "max", ["TEST.EVALUATORS", '["cityscapes_fast", "coco"]'], True),
        ("total_loss", "min", [], True),
        ("loss_mask", "min", [], True),
        ("total_loss", "max", [], False),
        ("AP", "max", [], False),
        ("segm/APP", "max", [], False),  # a typo is caught before any trial runs
        ("segm/AP-car", "max", [], True),
        ("segm/AP", "max", ["DATASETS.TEST", TWO_TEST_SETS], False),  # results are keyed by data set then
        ("cityscapes_synthetic_instance_val/segm/AP", "max", ["DATASETS.TEST", TWO_TEST_SETS], True),
    ],  # fmt: skip
)
def test_metric_must_be_one_the_trials_report(metric, mode, opts, ok):
    s = sweep({"SOLVER.BASE_LR": {"loguniform": [1e-4, 1e-2]}}, metric=metric, mode=mode)
    cfg = load_config(QUICKSTART, opts)
    if ok:
        ray_tune.validate_sweep(s, cfg)
    else:
        with pytest.raises(ConfigError, match="metric"):
            ray_tune.validate_sweep(s, cfg)


def test_asha_needs_periodic_evaluation_and_a_grace_period_below_max_t():
    asha = {"type": "asha", "grace_period": 500, "reduction_factor": 3}
    s = sweep({"SOLVER.BASE_LR": {"loguniform": [1e-4, 1e-2]}}, scheduler=asha)
    budget = ["SOLVER.MAX_ITER", "1500", "TEST.EVAL_PERIOD", "500"]
    ray_tune.validate_sweep(s, load_config(QUICKSTART, budget))
    with pytest.raises(ConfigError, match="TEST.EVAL_PERIOD > 0"):
        ray_tune.validate_sweep(s, load_config(QUICKSTART, budget + ["TEST.EVAL_PERIOD", "0"]))
    with pytest.raises(ConfigError, match="grace_period 500 must be below max_t 400"):
        ray_tune.validate_sweep(s, load_config(QUICKSTART, budget + ["SOLVER.MAX_ITER", "400"]))


def test_saved_sweep_reads_back_the_same(tmp_path):
    s = ray_tune.load_sweep("configs/sweeps/rich_space.yaml")
    path = tmp_path / "sweep.yaml"
    path.write_text(s.to_yaml())
    again = ray_tune.load_sweep(str(path))
    assert (again.space, again.scheduler, again.search, again.metric, again.num_samples) == (
        s.space, s.scheduler, s.search, s.metric, s.num_samples
    )
    assert (again.cpus_per_trial, again.gpus_per_trial) == (8, 1)


@pytest.mark.parametrize("use_gpu", [False, True])
def test_trial_config_takes_the_trials_resources(quickstart_cfg, use_gpu):
    base = quickstart_cfg.clone()
    base.SOLVER.AMP.ENABLED = True
    base.DATALOADER.NUM_WORKERS = 4
    cfg = ray_tune.trial_config(base, ["SOLVER.BASE_LR", 0.003], "/sweeps/s/trial_1/output", cpus=2, use_gpu=use_gpu)
    assert cfg.SOLVER.BASE_LR == 0.003 and cfg.OUTPUT_DIR == "/sweeps/s/trial_1/output"
    on_gpu = use_gpu and torch.cuda.is_available()  # prepare_config falls back to the CPU without CUDA
    assert cfg.MODEL.DEVICE == ("cuda" if on_gpu else "cpu") and cfg.SOLVER.AMP.ENABLED == on_gpu
    assert cfg.DATALOADER.NUM_WORKERS == 1  # one CPU trains, the other loads data


@pytest.mark.parametrize(
    "cluster, cli, file, expected",
    [
        ({"CPU": 16, "GPU": 4}, (None, None), {}, (3, 1)),  # 1 + DATALOADER.NUM_WORKERS 2, a GPU each
        ({"CPU": 2}, (None, None), {}, (2, 0)),  # capped at the cluster's CPUs; no GPU: the CPU
        ({"CPU": 16}, (None, None), {"cpus_per_trial": 4, "gpus_per_trial": 1}, (4, 0)),  # the file's GPU, none here
        ({"CPU": 16, "GPU": 2}, (2, 0.5), {"cpus_per_trial": 4, "gpus_per_trial": 1}, (2, 0.5)),  # CLI first
        ({"CPU": 16}, (None, 1), {}, "--gpus-per-trial 1: the Ray cluster has 0 GPUs"),
        ({"CPU": 16, "GPU": 8}, (None, 2), {}, "--gpus-per-trial 2: must be between 0 and 1"),
        ({"CPU": 4}, (8, None), {}, "8 CPUs per trial, but the Ray cluster has 4"),
    ],
)
def test_trial_resources_come_from_cli_then_sweep_then_cluster(cluster, cli, file, expected):
    s = sweep({"SOLVER.BASE_LR": {"loguniform": [1e-4, 1e-2]}}, resources=file)
    cfg = load_config(QUICKSTART, ["DATALOADER.NUM_WORKERS", "2"])
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            ray_tune.resolve_resources(s, cfg, cluster, *cli)
    else:
        resolved = ray_tune.resolve_resources(s, cfg, cluster, *cli)
        assert (resolved.cpus_per_trial, resolved.gpus_per_trial) == expected


def test_address_where_no_head_listens_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"--address 127.0.0.1:1: no Ray head answers there"):
        ray_tune.check_address("127.0.0.1:1")
    assert time.perf_counter() - start < 5
    with pytest.raises(ConfigError, match="expected auto or HOST:PORT"):
        ray_tune.check_address("localhost")


def _result(tmp_path, name, rows, error=None):
    return tune.Result(
        metrics=rows[-1] if rows else {}, checkpoint=None, error=error, path=str(tmp_path / name),
        metrics_dataframe=pd.DataFrame(rows) if rows else None, _storage_filesystem=None,
    )  # fmt: skip


def test_summary_ranks_by_best_report_and_best_config_holds_the_winner(tmp_path, quickstart_cfg):
    s = sweep({"SOLVER.BASE_LR": {"grid": [0.01, 0.02, 0.04]}}, metric="segm/AP")
    max_iter = quickstart_cfg.SOLVER.MAX_ITER
    half = max_iter // 2
    results = [
        _result(tmp_path, "trial_a", [{"iteration": half, "segm/AP": 3.0}, {"iteration": max_iter, "segm/AP": 5.0}]),
        _result(tmp_path, "trial_b", [{"iteration": half, "segm/AP": 7.0}, {"iteration": max_iter, "segm/AP": 6.0}]),
        _result(tmp_path, "trial_c", [{"iteration": half, "segm/AP": 1.0}]),
    ]
    for result, lr in zip(results, [0.01, 0.02, 0.04]):
        (tmp_path / result.path).mkdir()
        (tmp_path / result.path / "params.json").write_text(json.dumps({"SOLVER.BASE_LR": lr}))
    rows = ray_tune.trial_rows(results, s, quickstart_cfg)
    assert [(r["trial"], r["segm/AP"], r["status"]) for r in rows] == [
        ("trial_b", 7.0, "finished"),
        ("trial_a", 5.0, "finished"),
        ("trial_c", 1.0, "stopped early"),
    ]
    ray_tune.write_summary(rows, str(tmp_path))
    assert [r["trial"] for r in json.loads((tmp_path / "trials.json").read_text())] == ["trial_b", "trial_a", "trial_c"]
    assert (tmp_path / "trials.csv").read_text().splitlines()[1].startswith("1,trial_b,0.02,7,")
    best = load_config(ray_tune.write_best_config(rows, s, quickstart_cfg, str(tmp_path)))
    assert best.SOLVER.BASE_LR == 0.02 and best.OUTPUT_DIR == str(tmp_path / "best")


def test_a_metric_no_trial_reported_is_an_error_at_the_end(tmp_path, quickstart_cfg):
    s = sweep({"SOLVER.BASE_LR": {"grid": [0.01]}}, metric="segm/AP")
    (tmp_path / "trial_a").mkdir()
    (tmp_path / "trial_a" / "params.json").write_text(json.dumps({"SOLVER.BASE_LR": 0.01}))
    rows = ray_tune.trial_rows([_result(tmp_path, "trial_a", [{"iteration": 8, "total_loss": 2.0}])], s, quickstart_cfg)
    with pytest.raises(ConfigError, match="no trial reported the metric 'segm/AP'"):
        ray_tune.write_best_config(rows, s, quickstart_cfg, str(tmp_path))


def test_cli_checks_the_sweep_before_it_connects_to_ray(tmp_path):
    sweep_file = tmp_path / "bad.yaml"
    sweep_file.write_text(yaml.safe_dump({"space": {"SOLVER.NOPE": {"choice": [1, 2]}}}))
    run = subprocess.run(
        [sys.executable, "tools/tune_net.py", "--config-file", QUICKSTART, "--sweep", str(sweep_file),
         "--storage", str(tmp_path / "sweeps"), "--address", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line == f"error: {sweep_file}: space: SOLVER.NOPE is not a config key of the base config"
    assert not (tmp_path / "sweeps").exists()  # nothing started


def test_connecting_to_an_address_where_no_head_listens_fails_before_ray_init():
    with pytest.raises(ConfigError, match="no Ray head answers there"):
        ray_tune.connect_ray("127.0.0.1:1")
    assert not ray.is_initialized()


def test_optuna_tpe_samples_the_rich_space_including_list_values(quickstart_cfg):
    s = ray_tune.load_sweep("configs/sweeps/rich_space.yaml")
    searcher = ray_tune.build_search_algorithm(s)
    assert searcher.set_search_properties(s.metric, s.mode, s.param_space())
    for trial in range(3):
        overrides = s.overrides(searcher.suggest(f"trial_{trial}"))
        sampled = dict(zip(overrides[0::2], overrides[1::2]))
        assert sampled["MODEL.ANCHOR_GENERATOR.SIZES"] in s.space["MODEL.ANCHOR_GENERATOR.SIZES"].values
        assert 1e-3 <= sampled["SOLVER.BASE_LR"] <= 4e-2
        cfg = ray_tune.trial_config(quickstart_cfg, overrides, "/tmp/x", cpus=1, use_gpu=False)
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(sampled["INPUT.MIN_SIZE_TRAIN"])
