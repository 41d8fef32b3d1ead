"""The W&B integration through the real cityseg_d2 Trainer, with real wandb in offline mode.

What an offline run recorded is read with `wandb leet inspect` (`--json`: one JSON object per record of the run's
.wandb log; `--summary --json`: its state, exit code, config and summary), W&B's documented command-line reader of
local runs, and with the media files the records point to. W&B has no Python reader of local runs (wandb.Api reads
the server only).
"""
import contextlib
import glob
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict

import cv2
import numpy as np
import pytest
import wandb
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase, default_argument_parser
from detectron2.utils import logger as d2_logger
from detectron2.utils.env import seed_all_rng

from cityseg_d2.data.analysis import registered_dataset_stats
from cityseg_d2.engine import Trainer, prepare_config
from cityseg_d2.errors import ConfigError, TrainingInterrupted, TrainingStopped
from cityseg_d2.integrations import WANDB_RUN_ID_FILE, wandb_enabled
from cityseg_d2.integrations import wandb as cityseg_wandb
from cityseg_d2.integrations.wandb import PANEL_KEY, PER_CLASS_KEY, init_wandb_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(REPO, "configs", "Base-MaskRCNN-FPN-Cityscapes.yaml")
# 21 iterations: detectron2's PeriodicWriter writes every 20 iterations and at the last one (iterations 19 and 20);
# EvalHook evaluates after iteration 14 and in the last iteration, MAX_ITER - 1.
MAX_ITER = 21
EVAL_PERIOD = 15
WRITE_STEPS = [19, 20]
EVAL_STEPS = [14, MAX_ITER - 1]
SECRET = "secret-abc"
# The project's Cityscapes base shrunk to a CPU-sized Mask R-CNN (a ResNet-50 FPN a few channels wide, trainable BN
# for random init, 128x64 images): about a million parameters, so that checkpoints and artifacts stay small.
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.PIXEL_STD", [57.375, 57.120, 58.395],
    "MODEL.RESNETS.NORM", "BN", "MODEL.RESNETS.STEM_OUT_CHANNELS", 16,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
    "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ANCHOR_GENERATOR.SIZES", [[8], [16], [32], [64], [128]],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 100, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
    "TEST.DETECTIONS_PER_IMAGE", 10,
    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 128,
    "DATASETS.TRAIN", ("wandb_train",), "DATASETS.TEST", ("wandb_val",), "DATASETS.CITYSCAPES.TEST_MAX_IMAGES", 2,
    "DATALOADER.NUM_WORKERS", 0,
    "SOLVER.IMS_PER_BATCH", 2, "SOLVER.BASE_LR", 0.001, "SOLVER.STEPS", (), "SOLVER.WARMUP_ITERS", 0,
    "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.CHECKPOINT_PERIOD", 1000,
    "TEST.EVAL_PERIOD", EVAL_PERIOD, "TEST.EVALUATORS", ["cityscapes_fast"], "CITYSEG.BEST_CHECKPOINT_METRIC", "segm/AP",
    "WANDB.ENABLED", True, "WANDB.MODE", "offline", "WANDB.LOG_CHECKPOINTS", True, "WANDB.NUM_VIS_IMAGES", 2,
]
# A short training without evaluations or panels, for what only needs a run and a few iterations.
SHORT = ["SOLVER.MAX_ITER", 2, "DATASETS.TEST", (), "WANDB.LOG_DATASET_STATS", False]


# ---- reading an offline run -------------------------------------------------------------------------------------


def _leet_inspect(*args):
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


_NON_FINITE = ("NaN", "Infinity", "-Infinity")  # how leet's JSON writes these numbers


def _history_row(item):
    """A history record's values, with leet's dotted keys of nested values ("eval/predictions.captions") nested."""
    row = {}
    for key, value in item.items():
        *parents, last = key.split(".")
        target = row
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = float(value) if value in _NON_FINITE else value
    return row


class OfflineRun:
    """One offline run directory (a resumed run has one per training): its run record, state, config, summary,
    history rows by step and model artifacts, as `wandb leet inspect` prints them."""

    def __init__(self, run_dir):
        self.dir = run_dir
        records = [json.loads(line) for line in _leet_inspect("--json", run_dir).splitlines() if line.strip()]
        overview = json.loads(_leet_inspect("--summary", "--json", run_dir))
        self.state, self.exit_code = overview["state"], overview["exit_code"]
        self.config = {k: v for k, v in overview["config"].items() if k != "_wandb"}
        self.summary = overview["summary"]
        runs = [r["run"] for r in records if r["type"] == "run"]
        assert len(runs) == 1, f"{run_dir}: {len(runs)} run records (an unfinished run has none written yet)"
        self.run = runs[0]
        self.history = defaultdict(dict)
        for record in records:
            if record["type"] == "history":
                row = _history_row(record["history"]["item"])
                self.history[row["_step"]].update(row)
        self.artifacts = [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "model"]
        self.record_types = {r["type"] for r in records}

    @classmethod
    def all(cls, runs_dir, run_id="*"):
        """The directories of run `run_id` (default: of every run) in `runs_dir` ($WANDB_DIR), oldest first."""
        return [cls(d) for d in sorted(glob.glob(os.path.join(runs_dir, "wandb", f"offline-run-*-{run_id}")))]

    def steps_of(self, key):
        return sorted(step for step, row in self.history.items() if key in row)

    def media(self, value):
        """The file a history entry of an image, mask or table points to."""
        return os.path.join(self.dir, "files", value["path"])


def _run_id(output_dir):
    with open(os.path.join(output_dir, WANDB_RUN_ID_FILE)) as f:
        return f.read().strip()


# ---- W&B isolated from this machine, and trainings ----------------------------------------------------------------


@contextlib.contextmanager
def isolated_wandb(tmp_path, monkeypatch):
    """W&B with nothing of this machine's: no WANDB_* variables or credentials, its folders in tmp_path, any server
    address a closed loopback port. Gives the folder of the run files ($WANDB_DIR)."""
    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    home = tmp_path / "wandb_home"
    for var, folder in [("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")]:
        monkeypatch.setenv(var, str(home / folder))
    monkeypatch.setenv("NETRC", str(home / "netrc"))  # no such file: no netrc credentials
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(runs))
    wandb.teardown()  # wandb reads its environment once per process: start it again on this one
    try:
        yield str(runs)
    finally:
        wandb.teardown()


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    with isolated_wandb(tmp_path, monkeypatch) as runs:
        yield runs


@pytest.fixture(scope="module")
def datasets(register_synthetic):
    return register_synthetic("wandb_train", "train"), register_synthetic("wandb_val", "val")


def tiny_cfg(output_dir, *opts):
    return prepare_config(BASE_CONFIG, [*TINY, "OUTPUT_DIR", str(output_dir), *opts])


def train(trainer):
    seed_all_rng(0)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datasets):
    """A sweep trial's tiny training, logged to W&B with $WANDB_API_KEY set: (trainer, run, metrics.json rows, the
    run's config file and log text)."""
    tmp_path = tmp_path_factory.mktemp("wandb_training")
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    loggers = [logging.getLogger(), logging.getLogger("detectron2")]  # detectron2's does not propagate
    root_level = loggers[0].level
    with pytest.MonkeyPatch.context() as monkeypatch, isolated_wandb(tmp_path, monkeypatch) as runs:
        monkeypatch.setenv("WANDB_API_KEY", SECRET)
        cfg = tiny_cfg(
            tmp_path / "output", "WANDB.GROUP", "sweep-lr", "WANDB.NAME", "trial-0", "WANDB.TAGS", ["tiny"],
            # Every detection, in the panel too: those of a model trained 21 iterations score low.
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "WANDB.VIS_SCORE_THRESHOLD", 0.0,
        )
        trainer = Trainer(cfg)
        # What a sweep trial adds; secrets in it must not reach W&B.
        trainer.wandb.extra_config["tune"] = {
            "SOLVER.BASE_LR": 0.001, "env": {"WANDB_API_KEY": SECRET, "ray_token": "token-xyz"}, "note": f"key {SECRET}"
        }
        loggers[0].setLevel(logging.DEBUG)
        for log in loggers:
            log.addHandler(handler)
        try:
            train(trainer)
        finally:
            loggers[0].setLevel(root_level)
            for log in loggers:
                log.removeHandler(handler)
        (run,) = OfflineRun.all(runs, _run_id(cfg.OUTPUT_DIR))
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        metrics = [json.loads(line) for line in f]
    log_text = "\n".join(r.getMessage() for r in records)
    return trainer, run, metrics, log_text, runs


# ---- one training, logged -------------------------------------------------------------------------------------


def test_every_scalar_reaches_wandb_at_the_iteration_detectron2_writes_it(trained):
    trainer, run, metrics, _, _ = trained
    assert trainer.iter == MAX_ITER
    assert run.steps_of("total_loss") == run.steps_of("lr") == run.steps_of("data_time") == WRITE_STEPS
    assert run.steps_of("segm/AP") == run.steps_of("segm/AP50-car") == EVAL_STEPS
    # The same scalars, iterations and (smoothed) values as detectron2's own metrics.json.
    assert sorted({m["iteration"] for m in metrics}) == sorted(set(WRITE_STEPS + EVAL_STEPS))
    for row in metrics:
        logged = run.history[row["iteration"]]
        scalars = {k: math.nan if v is None else v for k, v in row.items() if k != "iteration"}  # NaN is null there
        assert {k: logged[k] for k in scalars} == pytest.approx(scalars, nan_ok=True), row["iteration"]
        others = {k for k in logged if k in (PANEL_KEY, PER_CLASS_KEY) or k.startswith(("_", "dataset/"))}
        assert set(logged) - others == set(scalars)


def test_run_config_holds_the_full_config_the_git_commit_and_the_sweeps_values(trained):
    trainer, run, _, _, _ = trained
    expected = yaml.safe_load(trainer.cfg.dump())
    assert {k: v for k, v in run.config.items() if k not in ("git_commit", "tune")} == expected
    commit = run.config["git_commit"]  # None outside a git checkout
    if commit is not None:
        commit = commit.split("+")[0]
        known = subprocess.run(["git", "-C", REPO, "merge-base", "--is-ancestor", commit, "HEAD"])
        assert len(commit) == 40 and known.returncode == 0
    assert run.config["tune"]["SOLVER.BASE_LR"] == 0.001
    assert (run.run["project"], run.run["run_group"], run.run["display_name"]) == ("cityseg-d2", "sweep-lr", "trial-0")
    assert run.run["tags"] == ["tiny"]
    assert (run.state, run.exit_code) == ("finished", 0)


def test_each_evaluation_logs_a_per_class_table(trained):
    trainer, run, _, _, _ = trained
    classes = MetadataCatalog.get(trainer.cfg.DATASETS.TEST[0]).thing_classes
    assert run.steps_of(PER_CLASS_KEY) == EVAL_STEPS
    for step in EVAL_STEPS:
        with open(run.media(run.history[step][PER_CLASS_KEY])) as f:
            table = json.load(f)
        assert table["columns"] == ["task", "class", "AP", "AP50"]
        assert [row[:2] for row in table["data"]] == [["segm", name] for name in classes]
        car = next(row for row in table["data"] if row[1] == "car")
        logged = [run.history[step]["segm/AP-car"], run.history[step]["segm/AP50-car"]]
        assert car[2:] == pytest.approx(logged, nan_ok=True)


def _panel_layers(run, step, val):
    """Per image of the panel at `step`: (ground-truth boxes, predicted boxes, ground-truth mask or None)."""
    panel = run.history[step][PANEL_KEY]
    assert panel["_type"] == "images/separated" and panel["count"] == len(val)
    assert panel["captions"] == [d["image_id"] for d in val]
    layers = []
    for image_boxes, image_masks in zip(panel["all_boxes"], panel["all_masks"]):
        with open(run.media(image_boxes["ground_truth"])) as f:
            truth = json.load(f)["box_data"]
        with open(run.media(image_boxes["prediction"])) as f:
            predicted = json.load(f)["box_data"]
        assert os.path.isfile(run.media(image_masks["prediction"]))
        truth_mask = image_masks.get("ground_truth")
        layers.append((truth, predicted, cv2.imread(run.media(truth_mask), cv2.IMREAD_UNCHANGED) if truth_mask else None))
    return layers


def test_each_evaluation_logs_the_same_images_with_predictions_and_ground_truth(trained):
    trainer, run, _, _, _ = trained
    val = DatasetCatalog.get(trainer.cfg.DATASETS.TEST[0])
    assert len(val) == 2 and any(a for d in val for a in d["annotations"])
    assert run.steps_of(PANEL_KEY) == EVAL_STEPS
    for step in EVAL_STEPS:
        for record, (truth, predicted, truth_mask) in zip(val, _panel_layers(run, step, val)):
            # Ground truth: one box per non-crowd instance, its class painted in the mask layer.
            annotations = [a for a in record["annotations"] if not a["iscrowd"]]
            assert sorted(b["class_id"] - 1 for b in truth) == sorted(a["category_id"] for a in annotations)
            if annotations:
                assert truth_mask.shape == (record["height"], record["width"])
                assert set(np.unique(truth_mask)) - {0} == {a["category_id"] + 1 for a in annotations}
            # Predictions (VIS_SCORE_THRESHOLD 0): the random model's detections, with scores for W&B's slider.
            assert predicted and all(0 <= b["scores"]["score"] <= 1 for b in predicted)
            assert all(0 <= b["position"][k] <= 1 for b in predicted for k in ("minX", "minY", "maxX", "maxY"))
    assert trainer.model.training  # the panel's inference left the model in training mode


def test_best_and_final_checkpoints_become_model_artifacts(trained):
    trainer, run, _, _, _ = trained
    assert [a["name"] for a in run.artifacts] == [f"model-{run.run['run_id']}"] * len(run.artifacts)
    kinds = [set(a["aliases"]) - {"latest"} for a in run.artifacts]
    assert kinds[0] == {"best"} and kinds[-1] == {"final"} and all(k == {"best"} for k in kinds[1:-1])
    best, final = json.loads(run.artifacts[0]["metadata"]), json.loads(run.artifacts[-1]["metadata"])
    assert best["iteration"] == EVAL_STEPS[0] and best["file"] == "model_best.pth"
    assert best["metrics"]["segm/AP"] == pytest.approx(run.history[EVAL_STEPS[0]]["segm/AP"])
    assert final["iteration"] == MAX_ITER - 1 and final["file"] == "model_final.pth"
    assert final["metrics"]["segm/AP"] == pytest.approx(run.history[MAX_ITER - 1]["segm/AP"])
    assert final["config"]["SOLVER"]["MAX_ITER"] == MAX_ITER
    size = os.path.getsize(os.path.join(trainer.cfg.OUTPUT_DIR, "model_final.pth"))
    contents = run.artifacts[-1]["manifest"]["contents"]
    assert [(c["path"], int(c["size"])) for c in contents] == [("model_final.pth", size)]


def test_training_set_statistics_become_tables_and_summary_values(trained, datasets):
    _, run, _, _, _ = trained
    stats = registered_dataset_stats(datasets[0])
    key = f"dataset/{datasets[0]}"
    (step,) = run.steps_of(f"{key}/per_class")
    assert step <= EVAL_STEPS[0]  # joined the first step logged: never pushed the training's steps back
    row = run.history[step]
    with open(run.media(row[f"{key}/per_class"])) as f:
        per_class = json.load(f)
    assert per_class["columns"] == ["name", *next(iter(stats["per_class"].values()))]
    assert [r[:2] for r in per_class["data"]] == [[name, c["instances"]] for name, c in stats["per_class"].items()]
    with open(run.media(row[f"{key}/image_sizes"])) as f:
        assert json.load(f)["data"] == [[size, n] for size, n in stats["image_sizes"].items()]
    assert run.summary[f"{key}/num_images"] == stats["num_images"] == 6
    assert run.summary[f"{key}/classes"] == stats["classes"]


def test_api_keys_never_reach_configs_artifacts_or_logs(trained):
    trainer, run, _, log_text, runs = trained
    assert run.config["tune"]["env"] == {"WANDB_API_KEY": "<redacted>", "ray_token": "<redacted>"}
    assert run.config["tune"]["note"] == "<redacted>"
    for top in (trainer.cfg.OUTPUT_DIR, runs):
        for folder, _, files in os.walk(top):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    content = f.read()
                assert SECRET.encode() not in content and b"token-xyz" not in content, os.path.join(folder, name)
    assert "W&B run" in log_text and SECRET not in log_text


# ---- resumed and failed trainings -------------------------------------------------------------------------------


@pytest.fixture
def stats_spy(monkeypatch):
    """The data sets whose statistics the W&B session computes."""
    computed = []

    def stats(name):
        computed.append(name)
        return registered_dataset_stats(name)

    monkeypatch.setattr(cityseg_wandb, "registered_dataset_stats", stats)
    return computed


def test_train_net_resume_continues_the_same_run_at_later_steps(trained, tmp_path, wandb_env, stats_spy):
    trainer, first, _, _, _ = trained
    output_dir = tmp_path / "output"
    shutil.copytree(trainer.cfg.OUTPUT_DIR, output_dir)  # the finished training, to train 2 iterations further
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "tools", "train_net.py"))
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    opts = [*TINY, "OUTPUT_DIR", output_dir, "SOLVER.MAX_ITER", MAX_ITER + 2, "WANDB.VIS_SCORE_THRESHOLD", 1.0]
    args = default_argument_parser().parse_args(["--config-file", BASE_CONFIG, "--resume", *map(str, opts)])
    train_net.main(args)

    run_id = first.run["run_id"]
    assert _run_id(output_dir) == run_id
    (resumed,) = OfflineRun.all(wandb_env, run_id)  # synced after the first part, continuing it
    assert resumed.run["resume"] is True and "resume" not in first.run
    assert (resumed.state, resumed.config["SOLVER"]["MAX_ITER"]) == ("finished", MAX_ITER + 2)
    assert min(resumed.history) > max(first.history)
    assert resumed.steps_of("total_loss") == [MAX_ITER + 1]  # the last iteration, written by PeriodicWriter
    assert resumed.steps_of("segm/AP") == resumed.steps_of(PANEL_KEY) == [MAX_ITER + 1]
    # Statistics are not computed again; VIS_SCORE_THRESHOLD 1 leaves no prediction in the panel.
    assert stats_spy == [] and not [k for k in resumed.summary if k.startswith("dataset/")]
    val = DatasetCatalog.get(trainer.cfg.DATASETS.TEST[0])
    layers = _panel_layers(resumed, MAX_ITER + 1, val)
    assert [predicted for _, predicted, _ in layers] == [[], []] and any(truth for truth, _, _ in layers)


class _Raise(HookBase):
    def __init__(self, where, error):
        self.where, self.error = where, error

    def after_step(self):
        if self.where == "iteration" and self.trainer.iter == 0:
            raise self.error

    def after_train(self):
        if self.where == "after_train":
            raise self.error


class RaisingTrainer(Trainer):
    """The Trainer with a hook that raises, placed before PeriodicWriter (the last hook, which closes the writers)."""

    def __init__(self, cfg, where, error):
        self.raising = _Raise(where, error)
        super().__init__(cfg)

    def build_hooks(self):
        hooks = super().build_hooks()
        hooks.insert(-1, self.raising)
        return hooks


@pytest.mark.parametrize(
    "where, error, state",
    [
        pytest.param("iteration", RuntimeError("injected"), ("failed", 1), id="error-in-an-iteration"),
        pytest.param("after_train", RuntimeError("injected"), ("failed", 1), id="error-after-training"),
        pytest.param("iteration", SystemExit(0), ("finished", 0), id="requested-exit"),
        # How a sweep trial ends when ASHA or PBT stops it: a normal end.
        pytest.param("iteration", TrainingStopped(), ("finished", 0), id="scheduler-stop"),
        # SIGTERM or Ctrl-C after a checkpoint (StopOnSignal): a run to resume, marked preempting (the server shows
        # it preempted; offline, its record and the signal's exit code are what there is to see).
        pytest.param("iteration", TrainingInterrupted("stopped", signal.SIGTERM), ("failed", 143), id="signal"),
    ],
)
def test_a_training_that_raises_is_a_failed_run_and_a_new_training_a_new_run(
    where, error, state, tmp_path, wandb_env, datasets
):
    cfg = tiny_cfg(tmp_path / "output", *SHORT)
    os.makedirs(cfg.OUTPUT_DIR)
    with open(os.path.join(cfg.OUTPUT_DIR, WANDB_RUN_ID_FILE), "w") as f:
        f.write("earlier\n")  # an earlier training's run: one that does not resume starts its own
    trainer = RaisingTrainer(cfg, where, error)
    with pytest.raises(type(error)):
        train(trainer)
    assert trainer.iter == (0 if where == "iteration" else 2)
    run_id = _run_id(cfg.OUTPUT_DIR)
    (run,) = OfflineRun.all(wandb_env, run_id)
    assert run_id != "earlier" and (run.state, run.exit_code) == state
    assert ("preempting" in run.record_types) == isinstance(error, TrainingInterrupted), run.record_types


def test_wandb_failures_while_training_are_warnings_once(tmp_path, wandb_env, datasets, monkeypatch, caplog, stats_spy):
    class FinishTheRun(HookBase):
        def before_train(self):
            self.trainer.wandb.run.finish()  # from now on every log call of W&B raises

    monkeypatch.setattr(d2_logger, "_LOG_COUNTER", Counter())  # detectron2's log_first_n memory, fresh
    trainer = Trainer(tiny_cfg(tmp_path / "output", *SHORT))
    trainer.register_hooks([FinishTheRun()])
    train(trainer)
    assert trainer.iter == 2 and os.path.isfile(os.path.join(trainer.cfg.OUTPUT_DIR, "model_final.pth"))
    failures = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # PeriodicWriter writes at the last iteration and again after training: one warning.
    assert sum("W&B logging scalars failed, training goes on: UsageError" in m for m in failures) == 1
    assert sum("W&B logging a checkpoint artifact failed" in m for m in failures) == 1
    assert stats_spy == []  # WANDB.LOG_DATASET_STATS False: not computed


# ---- options and environment ------------------------------------------------------------------------------------


def _cfg(tmp_path, **wandb_keys):
    cfg = tiny_cfg(tmp_path / "output")
    cfg.defrost()
    for key, value in wandb_keys.items():
        cfg.WANDB[key] = value
    return cfg


def test_config_keys_win_and_environment_variables_fill_what_is_empty(tmp_path, wandb_env, monkeypatch, datasets):
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-group")
    monkeypatch.setenv("WANDB_TAGS", "env-a, env-b")
    monkeypatch.setenv("WANDB_NAME", "env-name")
    cfg = _cfg(tmp_path, ENABLED=False, PROJECT="", GROUP="cfg-group")  # $WANDB_PROJECT switches W&B on
    run = init_wandb_run(cfg)
    assert (run.project, run.group, run.tags, run.name) == ("env-project", "cfg-group", ("env-a", "env-b"), "env-name")
    run.finish()
    cfg = _cfg(tmp_path, PROJECT="cfg-project", TAGS=["cfg-tag"], NAME="cfg-name")
    run = init_wandb_run(cfg)
    assert (run.project, run.tags, run.name) == ("cfg-project", ("cfg-tag",), "cfg-name")
    run.finish()
    with pytest.raises(ValueError, match="SOLVER"):
        init_wandb_run(cfg, extra_config={"SOLVER": {}})


def test_wandb_is_off_unless_enabled_and_a_bad_mode_is_a_clear_error(tmp_path, wandb_env, monkeypatch, datasets):
    assert not wandb_enabled(_cfg(tmp_path, ENABLED=False)) and init_wandb_run(_cfg(tmp_path, ENABLED=False)) is None
    assert not wandb_enabled(_cfg(tmp_path, MODE="disabled")) and init_wandb_run(_cfg(tmp_path, MODE="disabled")) is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert init_wandb_run(_cfg(tmp_path, MODE="")) is None
    with pytest.raises(ConfigError, match=r"^WANDB.MODE is 'cloud': use one of online, offline, disabled or leave it"):
        prepare_config(BASE_CONFIG, ["WANDB.ENABLED", True, "WANDB.MODE", "cloud"])
    monkeypatch.setenv("WANDB_MODE", "cloud")
    with pytest.raises(ConfigError, match=r"^\$WANDB_MODE is 'cloud': use one of online, offline, disabled or leave"):
        Trainer(tiny_cfg(tmp_path / "output", *SHORT, "WANDB.MODE", ""))  # before training starts
    assert not glob.glob(os.path.join(wandb_env, "wandb", "*"))


def test_without_an_api_key_runs_are_offline_and_say_so_once(tmp_path, wandb_env, monkeypatch, caplog, datasets):
    monkeypatch.setattr(d2_logger, "_LOG_COUNTER", Counter())
    cfg = _cfg(tmp_path, MODE="")
    for _ in range(2):
        run = init_wandb_run(cfg)
        assert run.settings.mode == "offline"
        run.finish()
    said = [r for r in caplog.records if r.levelname == "WARNING" and "no API key" in r.getMessage()]
    assert len(said) == 1 and "wandb sync" in said[0].getMessage()


# ---- in a fresh process -----------------------------------------------------------------------------------------

_FRESH_PROCESS = """
import json, os, sys, time
from cityseg_d2.data import register_cityscapes_instances
from cityseg_d2.data.analysis import registered_dataset_stats
from cityseg_d2.engine import Trainer, prepare_config

register_cityscapes_instances("wandb_train", sys.argv[1], "train")
base, opts = json.loads(sys.argv[2])


def train(*more):
    trainer = Trainer(prepare_config(base, opts + list(more)))
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


off = train("WANDB.ENABLED", False, "OUTPUT_DIR", sys.argv[3] + "/off")
print("OFF", json.dumps({"iter": off.iter, "session": off.wandb is not None,
      "imported": sorted(m for m in sys.modules if m == "wandb" or m.startswith(("wandb.", "cityseg_d2.integrations.")))}))
start = time.monotonic()
on = train("WANDB.MODE", "online", "WANDB.INIT_TIMEOUT", 5, "OUTPUT_DIR", sys.argv[3] + "/unreachable")
print("UNREACHABLE", json.dumps({"iter": on.iter, "run": on.wandb.run is not None, "seconds": time.monotonic() - start}))
"""


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory, synthetic_root):
    """A new Python process that trains 2 iterations with W&B off, then 2 with W&B online against a server that is
    not there (a key, and a loopback port where nothing listens): (its results by phase, its stderr, its folder)."""
    tmp_path = tmp_path_factory.mktemp("wandb_fresh_process")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_BASE_URL="http://127.0.0.1:9",
        WANDB_API_KEY="local-" + "0" * 40,
        WANDB_DIR=str(tmp_path),
        WANDB_CONFIG_DIR=str(tmp_path / "config"),
        WANDB_CACHE_DIR=str(tmp_path / "cache"),
        WANDB_DATA_DIR=str(tmp_path / "data"),
        NETRC=str(tmp_path / "netrc"),
        OMP_NUM_THREADS="1",
    )
    opts = [*TINY, *SHORT]
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, synthetic_root, json.dumps([BASE_CONFIG, opts]), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    results = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("OFF ", "UNREACHABLE ")))
    return {phase: json.loads(result) for phase, result in results.items()}, done.stderr, tmp_path


def test_wandb_is_not_imported_when_off(fresh_process):
    results, _, _ = fresh_process
    assert results["OFF"] == {"iter": 2, "session": False, "imported": []}


def test_training_goes_on_when_wandb_cannot_be_reached(fresh_process):
    """Online, with a key, against a loopback port where nothing listens: init gives up after INIT_TIMEOUT."""
    results, stderr, tmp_path = fresh_process
    assert results["UNREACHABLE"]["iter"] == 2 and not results["UNREACHABLE"]["run"]
    assert "W&B init failed, training goes on without W&B" in stderr
    # Bounded, not a speed test: init's timeout plus a generous margin for 2 tiny iterations.
    assert results["UNREACHABLE"]["seconds"] < 5 + 120
    assert os.path.isfile(tmp_path / "unreachable" / "model_final.pth")
    assert not os.path.exists(tmp_path / "unreachable" / WANDB_RUN_ID_FILE)
