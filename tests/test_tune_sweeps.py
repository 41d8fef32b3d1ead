"""Sweep files, their validation against a base config, the trial config, the address probe and the summary,
without starting Ray."""
import json
import re
import runpy
import socket
import time

import pandas as pd
import pytest
import torch
import ray
import yaml
from ray import tune

from cityseg_d2.engine.setup import load_config
from cityseg_d2.errors import ConfigError
from cityseg_d2.tune import results as summary, runner, sweep as sweeps
from cityseg_d2.tune.halving import halving_rungs
from cityseg_d2.tune.trial import trial_config

QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
TWO_TEST_SETS = '("cityscapes_synthetic_instance_val", "cityscapes_synthetic_instance_test")'


@pytest.fixture(scope="module")
def quickstart_cfg():
    return load_config(QUICKSTART)


def sweep(space, **entries):
    return sweeps.parse_sweep({"space": space, **entries}, source="test_sweep.yaml")


@pytest.mark.parametrize(
    "sweep_file, config_file",
    [
        ("configs/sweeps/student_project_space.yaml", "configs/student_project/mask_rcnn_R_101_FPN_cityscapes10.yaml"),
        ("configs/sweeps/rich_space.yaml", "configs/mask_rcnn_R_50_FPN_coco.yaml"),
    ],
)
def test_shipped_sweeps_are_valid_for_their_configs(sweep_file, config_file):
    s = sweeps.load_sweep(sweep_file)
    sweeps.validate_sweep(s, load_config(config_file))
    assert s.metric == "segm/AP" and s.scheduler["type"] == "asha"
    # Every candidate merges into the config (checked above) and reaches Ray as a search domain.
    assert set(s.param_space()) == set(s.space)


def test_student_project_space_is_the_student_projects_study():
    s = sweeps.load_sweep("configs/sweeps/student_project_space.yaml")
    assert {k: spec.kind for k, spec in s.space.items()} == {
        "SOLVER.BASE_LR": "loguniform",
        "SOLVER.WEIGHT_DECAY": "loguniform",
        "SOLVER.MOMENTUM": "uniform",
    }
    assert (s.num_samples, s.search["type"], s.scheduler["reduction_factor"]) == (20, "random", 3)


def test_list_valued_choices_reach_the_config_as_lists_and_tuples(quickstart_cfg):
    sizes = [[[16], [32], [64], [128], [256]], [[24], [48], [96], [192], [384]]]
    s = sweep({"MODEL.ANCHOR_GENERATOR.SIZES": {"choice": sizes}, "INPUT.MIN_SIZE_TRAIN": {"grid": [[128], [96, 128]]}})
    sweeps.validate_sweep(s, quickstart_cfg)
    domain = s.param_space()["MODEL.ANCHOR_GENERATOR.SIZES"]
    assert isinstance(domain, tune.search.sample.Categorical)
    assert all(isinstance(c, str) for c in domain.categories)  # Optuna takes scalar categories only
    trial = {"MODEL.ANCHOR_GENERATOR.SIZES": domain.categories[1], "INPUT.MIN_SIZE_TRAIN": json.dumps([96, 128])}
    cfg = trial_config(quickstart_cfg, s.overrides(trial), "/tmp/x", cpus=1, use_gpu=False)
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
        sweeps.validate_sweep(sweep(space), quickstart_cfg)
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
        ({"scheduler": {"type": "sha", "brackets": 2}}, "unknown entries for sha: ['brackets']"),
        ({"scheduler": {"type": "sha", "reduction_factor": 1}}, "reduction_factor must be a number >= 2"),
        ({"scheduler": {"type": "sha"}, "max_concurrent_trials": 2}, "max_concurrent_trials cannot be kept with"),
        ({"search": {"type": "optuna"}, "space": {"SOLVER.BASE_LR": {"grid": [0.1, 0.2]}}}, "grid values need search"),
        ({"resources": {"gpus_per_trial": 2}}, "gpus_per_trial must be between 0 and 1"),
    ],
)
def test_malformed_sweep_files_fail_in_one_line(data, message):
    data = {"space": {"SOLVER.BASE_LR": {"loguniform": [1e-4, 1e-2]}}, **data}
    with pytest.raises(ConfigError, match="^test_sweep.yaml: ") as error:
        sweeps.parse_sweep(data, source="test_sweep.yaml")
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
        sweeps.validate_sweep(s, cfg)
    else:
        with pytest.raises(ConfigError, match="metric"):
            sweeps.validate_sweep(s, cfg)


@pytest.mark.parametrize("scheduler", ["asha", "sha"])
def test_asha_and_sha_need_periodic_evaluation_and_a_grace_period_below_max_t(scheduler):
    options = {"type": scheduler, "grace_period": 500, "reduction_factor": 3}
    s = sweep({"SOLVER.BASE_LR": {"loguniform": [1e-4, 1e-2]}}, scheduler=options)
    budget = ["SOLVER.MAX_ITER", "1500", "TEST.EVAL_PERIOD", "500"]
    sweeps.validate_sweep(s, load_config(QUICKSTART, budget))
    with pytest.raises(ConfigError, match=f"{scheduler.upper()} needs periodic reports: set TEST.EVAL_PERIOD > 0"):
        sweeps.validate_sweep(s, load_config(QUICKSTART, budget + ["TEST.EVAL_PERIOD", "0"]))
    with pytest.raises(ConfigError, match="grace_period 500 must be below max_t 400"):
        sweeps.validate_sweep(s, load_config(QUICKSTART, budget + ["SOLVER.MAX_ITER", "400"]))


def test_sha_ranks_at_reports_and_builds_one_bracket_of_every_trial():
    options = {"type": "sha", "grace_period": 500, "reduction_factor": 3}
    s = sweep({"SOLVER.BASE_LR": {"grid": [0.01, 0.02, 0.04]}}, scheduler=options, num_samples=2)
    with pytest.raises(ConfigError, match="grace_period 500 must be a multiple of TEST.EVAL_PERIOD 300"):
        sweeps.validate_sweep(s, load_config(QUICKSTART, ["SOLVER.MAX_ITER", "4500", "TEST.EVAL_PERIOD", "300"]))
    cfg = load_config(QUICKSTART, ["SOLVER.MAX_ITER", "4500", "TEST.EVAL_PERIOD", "250"])
    sweeps.validate_sweep(s, cfg)
    scheduler = runner.build_scheduler(s, cfg)
    assert halving_rungs(500, 3, 4500) == [500, 1500]
    # Ray's bracket: all 6 trials (3 grid values x 2 samples), ranked first at 500 (time in detectron2 iterations),
    # halved twice (at 500 and 1500), then the last ones run to 4500
    bracket = scheduler._bracket
    expected = (6, 500, 2, 4500, "iteration")
    assert (bracket._n, bracket._r, bracket._halves, bracket._max_t_attr, bracket._time_attr) == expected


def test_saved_sweep_reads_back_the_same(tmp_path):
    s = sweeps.load_sweep("configs/sweeps/rich_space.yaml")
    path = tmp_path / "sweep.yaml"
    path.write_text(s.to_yaml())
    again = sweeps.load_sweep(str(path))
    assert (again.space, again.scheduler, again.search, again.metric, again.num_samples) == (
        s.space, s.scheduler, s.search, s.metric, s.num_samples
    )
    assert (again.cpus_per_trial, again.gpus_per_trial) == (8, 1)


@pytest.mark.parametrize("use_gpu", [False, True])
def test_trial_config_takes_the_trials_resources(quickstart_cfg, use_gpu):
    base = quickstart_cfg.clone()
    base.SOLVER.AMP.ENABLED = True
    base.DATALOADER.NUM_WORKERS = 4
    cfg = trial_config(base, ["SOLVER.BASE_LR", 0.003], "/sweeps/s/trial_1/output", cpus=2, use_gpu=use_gpu)
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
            runner.resolve_resources(s, cfg, cluster, *cli)
    else:
        resolved = runner.resolve_resources(s, cfg, cluster, *cli)
        assert (resolved.cpus_per_trial, resolved.gpus_per_trial) == expected


@pytest.fixture
def silent_server():
    """HOST:PORT of a TCP server that accepts connections and never answers (not a Ray head)."""
    server = socket.create_server(("127.0.0.1", 0))  # the kernel completes connections; nothing reads or writes
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_address_where_no_head_listens_fails_in_one_line():
    with pytest.raises(ConfigError, match=r"^--address 127.0.0.1:1: no Ray head answers there \(UNAVAILABLE"):
        runner.probe_address("127.0.0.1:1")
    with pytest.raises(ConfigError, match="expected auto or HOST:PORT"):
        runner.probe_address("localhost")


def test_a_server_that_is_not_ray_at_the_address_fails_within_the_probe_timeout(run_tool, silent_server, tmp_path):
    sweep_file = tmp_path / "lr.yaml"
    sweep_file.write_text(yaml.safe_dump({"space": {"SOLVER.BASE_LR": {"grid": [0.01, 0.02]}}}))
    start = time.monotonic()
    run = run_tool(
        "tune_net.py", "--config-file", QUICKSTART, "--sweep", sweep_file, "--storage", tmp_path / "sweeps",
        "--address", silent_server,
    )  # fmt: skip
    assert time.monotonic() - start < 3 * runner.PROBE_TIMEOUT_S  # not ray.init's 20 s, nor forever
    assert run.code == 2 and run.error_lines() == [
        f"error: --address {silent_server}: no Ray head answers there (DEADLINE_EXCEEDED within 3 s); start one "
        "with `ray start --head --port PORT`, or check HOST:PORT"
    ]
    assert "Traceback" not in run.err and not ray.is_initialized()


def _trial_result(tmp_path, trial_id, error=None):
    """A trial's Result as the ResultGrid holds it (reports are read from get_dataframe, not from here)."""
    path = tmp_path / f"trial_{trial_id}"
    path.mkdir()
    return tune.Result(metrics={}, checkpoint=None, error=error, path=str(path), _storage_filesystem=None)


def test_summary_ranks_by_best_report_and_best_config_holds_the_winner(tmp_path, quickstart_cfg):
    s = sweep({"SOLVER.BASE_LR": {"grid": [0.01, 0.02, 0.04]}}, metric="segm/AP")
    max_iter = quickstart_cfg.SOLVER.MAX_ITER
    half = max_iter // 2
    trials = {f"trial_{i}": _trial_result(tmp_path, i) for i in "abc"}
    trials["trial_d"] = _trial_result(tmp_path, "d", error=RuntimeError("failed before its first report"))
    (tmp_path / "trial_d" / "params.json").write_text(json.dumps({"SOLVER.BASE_LR": 0.01}))
    # ResultGrid.get_dataframe(filter_metric="segm/AP", filter_mode="max") and get_dataframe() (last reports);
    # trial_d failed before its first report and is in neither.
    best = pd.DataFrame([
        {"trial_id": "a", "iteration": max_iter, "segm/AP": 5.0, "config/SOLVER.BASE_LR": 0.01},
        {"trial_id": "b", "iteration": half, "segm/AP": 7.0, "config/SOLVER.BASE_LR": 0.02},
        {"trial_id": "c", "iteration": half, "segm/AP": 1.0, "config/SOLVER.BASE_LR": 0.04},
    ])  # fmt: skip
    last = pd.DataFrame([
        {"trial_id": "a", "iteration": max_iter, "segm/AP": 5.0, "config/SOLVER.BASE_LR": 0.01},
        {"trial_id": "b", "iteration": max_iter, "segm/AP": 6.0, "config/SOLVER.BASE_LR": 0.02},
        {"trial_id": "c", "iteration": half, "segm/AP": 1.0, "config/SOLVER.BASE_LR": 0.04},
    ])  # fmt: skip
    rows = summary.rank_trials(best, last, trials, s, quickstart_cfg)
    assert [(r["trial"], r["SOLVER.BASE_LR"], r["segm/AP"], r["iterations"], r["status"]) for r in rows] == [
        ("trial_b", 0.02, 7.0, max_iter, "finished"),
        ("trial_a", 0.01, 5.0, max_iter, "finished"),
        ("trial_c", 0.04, 1.0, half, "stopped early"),
        ("trial_d", 0.01, None, 0, "error"),
    ]
    assert rows[0]["output_dir"] == str(tmp_path / "trial_b" / "output")
    summary.write_summary(rows, str(tmp_path))
    assert [r["trial"] for r in json.loads((tmp_path / "trials.json").read_text())] == [
        "trial_b", "trial_a", "trial_c", "trial_d"
    ]  # fmt: skip
    assert (tmp_path / "trials.csv").read_text().splitlines()[1].startswith("1,trial_b,0.02,7,")
    best = load_config(summary.write_best_config(rows, s, quickstart_cfg, str(tmp_path)))
    assert best.SOLVER.BASE_LR == 0.02 and best.OUTPUT_DIR == str(tmp_path / "best")
    table = summary.format_table(rows).splitlines()
    assert table[0].split()[:4] == ["rank", "trial", "SOLVER.BASE_LR", "segm/AP"]
    assert table[2].split()[:4] == ["1", "trial_b", "0.02", "7"] and table[-1].split()[3] == "-"


def test_a_metric_no_trial_reported_is_an_error_at_the_end(tmp_path, quickstart_cfg):
    s = sweep({"SOLVER.BASE_LR": {"grid": [0.01]}}, metric="segm/AP")
    reports = pd.DataFrame([{"trial_id": "a", "iteration": 8, "total_loss": 2.0, "config/SOLVER.BASE_LR": 0.01}])
    rows = summary.rank_trials(reports, reports, {"trial_a": _trial_result(tmp_path, "a")}, s, quickstart_cfg)
    with pytest.raises(ConfigError, match="no trial reported the metric 'segm/AP'"):
        summary.write_best_config(rows, s, quickstart_cfg, str(tmp_path))


def test_cli_checks_the_sweep_before_it_connects_to_ray(run_tool, tmp_path):
    sweep_file = tmp_path / "bad.yaml"
    sweep_file.write_text(yaml.safe_dump({"space": {"SOLVER.NOPE": {"choice": [1, 2]}}}))
    # Options and overrides in any order: an override before --sweep.
    run = run_tool(
        "tune_net.py", "--config-file", QUICKSTART, "SOLVER.MAX_ITER", "10", "--sweep", sweep_file,
        "--storage", tmp_path / "sweeps", "--address", "127.0.0.1:1",
    )  # fmt: skip
    assert run.code == 2 and run.error_lines() == [
        f"error: {sweep_file}: space: SOLVER.NOPE is not a config key of the base config"
    ]
    assert not (tmp_path / "sweeps").exists()  # nothing started


def test_tune_net_takes_options_and_overrides_in_any_order():
    tune_net = runpy.run_path("tools/tune_net.py")
    args = tune_net["parse_args"](
        ["SOLVER.BASE_LR", "0.01", "--sweep", "s.yaml", "MODEL.RPN.NMS_THRESH", "-1", "--resume", "--name", "n"]
    )
    assert (args.sweep, args.resume, args.name) == ("s.yaml", True, "n")
    assert args.opts == ["SOLVER.BASE_LR", "0.01", "MODEL.RPN.NMS_THRESH", "-1"]


def test_optuna_tpe_samples_the_rich_space_including_list_values(quickstart_cfg):
    s = sweeps.load_sweep("configs/sweeps/rich_space.yaml")
    searcher = runner.build_search_algorithm(s)
    assert searcher.set_search_properties(s.metric, s.mode, s.param_space())
    for number in range(3):
        overrides = s.overrides(searcher.suggest(f"trial_{number}"))
        sampled = dict(zip(overrides[0::2], overrides[1::2]))
        assert sampled["MODEL.ANCHOR_GENERATOR.SIZES"] in s.space["MODEL.ANCHOR_GENERATOR.SIZES"].values
        assert 1e-3 <= sampled["SOLVER.BASE_LR"] <= 4e-2
        cfg = trial_config(quickstart_cfg, overrides, "/tmp/x", cpus=1, use_gpu=False)
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(sampled["INPUT.MIN_SIZE_TRAIN"])
