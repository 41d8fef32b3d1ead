"""The W&B integration with real wandb in offline mode: what a tiny training run leaves in its run files.

An offline run writes everything it logs to a `run-<id>.wandb` file (a LevelDB-style log of wandb's protobuf
Records: run, config, history, artifact, ...), the records `wandb sync` would upload; `_Run` parses it.
"""
import contextlib
import glob
import json
import os
import struct
import subprocess
import sys
import time
from collections import Counter

import cv2
import numpy as np
import pytest
import wandb
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import logger as d2_logger
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from wandb.proto import wandb_internal_pb2

from cityseg_d2.config import get_cityseg_cfg
from cityseg_d2.data.analysis import registered_dataset_stats
from cityseg_d2.evaluation import build_evaluator
from cityseg_d2.integrations.wandb import (
    PANEL_KEY,
    PER_CLASS_KEY,
    WandbCheckpointHook,
    WandbEvalPanelHook,
    WandbWriter,
    build_wandb_hooks,
    init_wandb_run,
    log_checkpoint_artifact,
    log_dataset_stats,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(REPO, "configs", "Base-MaskRCNN-FPN-Cityscapes.yaml")
MAX_ITER = 3
EVAL_PERIOD = 2  # evaluations after iteration 1 (step 1) and after training (step MAX_ITER)
EVAL_STEPS = [EVAL_PERIOD - 1, MAX_ITER]


# ---- reading an offline run -------------------------------------------------------------------------------------

_BLOCK_SIZE = 32768  # LevelDB log format: 32 KiB blocks of chunks with a 7-byte header (crc32, length, type)
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = 7, b""  # after the file header: ":W&B", magic, version
    while position + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK_SIZE - position % _BLOCK_SIZE
        if left_in_block < _CHUNK_HEADER:  # block trailer padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _CHUNK_HEADER])
        if kind == 0:  # zero padding to the end of the block
            position += left_in_block
            continue
        pending += data[position + _CHUNK_HEADER : position + _CHUNK_HEADER + length]
        position += _CHUNK_HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _set_item(target, item):
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


class _Run:
    """What an offline run recorded: run record, config, history rows by step, artifacts and its files folder."""

    def __init__(self, runs_dir, run_id):
        wandb.teardown()  # wandb-core may still be writing a finished run's file: wait until it has stopped
        (path,) = glob.glob(os.path.join(runs_dir, "wandb", f"*-{run_id}", f"run-{run_id}.wandb"))
        self.dir = os.path.dirname(path)
        self.files_dir = os.path.join(self.dir, "files")
        self.config, self.summary, self.history, self.artifacts = {}, {}, {}, []
        for record in _records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
                for item in record.run.config.update:
                    _set_item(self.config, item)
            elif kind == "config":
                for item in record.config.update:
                    _set_item(self.config, item)
            elif kind == "summary":
                for item in record.summary.update:
                    _set_item(self.summary, item)
            elif kind == "history":
                row = {}
                for item in record.history.item:
                    _set_item(row, item)
                self.history[row["_step"]] = row
            elif kind == "artifact" and record.artifact.type == "model":
                self.artifacts.append(record.artifact)

    def steps_of(self, key):
        return sorted(step for step, row in self.history.items() if key in row)

    def media(self, value):
        """The file a history entry of an image, mask or table points to."""
        return os.path.join(self.files_dir, value["path"])


# ---- a tiny training run ---------------------------------------------------------------------------------------


def tiny_cfg(output_dir, train_name, val_name, max_iter=MAX_ITER, **wandb_keys):
    """The project's Cityscapes base shrunk to a CPU-sized Mask R-CNN (a ResNet-50 FPN a few channels wide, trainable
    BN for random init, 128x64 images): about a million parameters, so checkpoints and artifacts stay small."""
    cfg = get_cityseg_cfg()
    cfg.merge_from_file(BASE_CONFIG)
    cfg.merge_from_list(
        [
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
            "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 128,
            "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 128,
            "DATASETS.TRAIN", (train_name,), "DATASETS.TEST", (val_name,) if val_name else (),
            "DATALOADER.NUM_WORKERS", 0,
            "SOLVER.IMS_PER_BATCH", 2, "SOLVER.BASE_LR", 0.001, "SOLVER.STEPS", (), "SOLVER.WARMUP_ITERS", 0,
            "SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", 1000,
            "TEST.EVAL_PERIOD", EVAL_PERIOD, "TEST.EVALUATORS", ["cityscapes_fast"],
            "OUTPUT_DIR", str(output_dir),
            "WANDB.ENABLED", True, "WANDB.MODE", "offline", "WANDB.LOG_CHECKPOINTS", True,
            "WANDB.NUM_VIS_IMAGES", 2,
        ]
    )
    for key, value in wandb_keys.items():
        cfg.WANDB[key] = value
    return cfg


class TinyWandbTrainer(DefaultTrainer):
    """DefaultTrainer wired to W&B the way the module docstring tells a trainer to, with every scalar written at
    every iteration (PeriodicWriter period 1) and a panel that shows even a random model's low-score detections."""

    def __init__(self, cfg):
        self.wandb_run = init_wandb_run(cfg, config_file="tiny.yaml")
        super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        return build_evaluator(cfg, dataset_name)

    def build_writers(self):
        return [WandbWriter(self.wandb_run)] if self.wandb_run else []

    def build_hooks(self):
        ret = super().build_hooks()
        cfg, run = self.cfg, self.wandb_run
        best = hooks.BestCheckpointer(cfg.TEST.EVAL_PERIOD, self.checkpointer, "segm/AP", mode="max")
        wandb_hooks = []
        if run:
            wandb_hooks = [
                WandbEvalPanelHook(run, cfg, cfg.DATASETS.TEST[0], score_threshold=0.0),
                WandbCheckpointHook(run, cfg, best),
            ]
        assert isinstance(ret[-1], hooks.PeriodicWriter)
        ret[-1:] = [best, *wandb_hooks, hooks.PeriodicWriter(self.build_writers(), period=1)]
        return ret


def train_tiny(output_dir, train_name, val_name, max_iter=MAX_ITER, **wandb_keys):
    os.makedirs(output_dir, exist_ok=True)  # as detectron2's default_setup does
    seed_all_rng(0)
    trainer = TinyWandbTrainer(tiny_cfg(output_dir, train_name, val_name, max_iter, **wandb_keys))
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


# ---- fixtures ---------------------------------------------------------------------------------------------------


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
    return register_synthetic("wandb_train", "train"), register_synthetic("wandb_val", "val", max_images=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datasets):
    """A finished tiny training run logged to W&B: (its run, the trainer)."""
    tmp_path = tmp_path_factory.mktemp("wandb_training")
    with pytest.MonkeyPatch.context() as monkeypatch, isolated_wandb(tmp_path, monkeypatch) as runs:
        trainer = train_tiny(tmp_path / "output", *datasets)
        return _Run(runs, trainer.wandb_run.id), trainer


def _cfg(tmp_path, **wandb_keys):
    cfg = get_cityseg_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "output")
    cfg.WANDB.ENABLED = True
    cfg.WANDB.MODE = "offline"
    for key, value in wandb_keys.items():
        cfg.WANDB[key] = value
    return cfg


# ---- tests ------------------------------------------------------------------------------------------------------


def test_training_logs_every_scalar_at_its_iteration(trained):
    run, trainer = trained
    assert trainer.iter == MAX_ITER
    iterations = list(range(MAX_ITER))
    for key in ["total_loss", "loss_mask", "loss_rpn_cls", "lr", "data_time"]:
        assert run.steps_of(key) == iterations, key
    assert run.steps_of("segm/AP") == EVAL_STEPS
    assert run.steps_of("segm/AP50-car") == EVAL_STEPS
    storage_loss = trainer.storage.history("total_loss").values()
    assert [run.history[i]["total_loss"] for i in iterations] == pytest.approx(
        [float(np.median([v for v, it in storage_loss if it <= i])) for i in iterations]
    )


def test_run_config_holds_the_full_config_file_name_and_git_commit(trained):
    run, _ = trained
    assert run.run.project == "cityseg-d2"
    config = {k: v for k, v in run.config.items() if k != "_wandb"}
    assert config["MODEL"]["RESNETS"]["RES2_OUT_CHANNELS"] == 32
    assert config["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 8
    assert config["SOLVER"]["MAX_ITER"] == MAX_ITER
    assert config["WANDB"]["NUM_VIS_IMAGES"] == 2
    assert config["config_file"] == "tiny.yaml"
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert (config["git_commit"] or "").split("+")[0] == head  # None outside a git checkout


def test_each_evaluation_logs_a_per_class_table(trained):
    run, trainer = trained
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


def test_each_evaluation_logs_the_same_images_with_predictions_and_ground_truth(trained):
    run, trainer = trained
    val = DatasetCatalog.get(trainer.cfg.DATASETS.TEST[0])[:2]
    assert run.steps_of(PANEL_KEY) == EVAL_STEPS
    for step in EVAL_STEPS:
        panel = run.history[step][PANEL_KEY]
        assert panel["_type"] == "images/separated" and panel["count"] == 2
        assert panel["captions"] == [d["image_id"] for d in val]
        boxes = panel["all_boxes"]
        masks = panel["all_masks"]
        assert any(a for d in val for a in d["annotations"])
        for record, image_boxes, image_masks in zip(val, boxes, masks):
            # Ground truth: one box per non-crowd instance, its class painted in the mask layer.
            annotations = [a for a in record["annotations"] if not a["iscrowd"]]
            with open(run.media(image_boxes["ground_truth"])) as f:
                truth_boxes = json.load(f)["box_data"]
            assert sorted(b["class_id"] - 1 for b in truth_boxes) == sorted(a["category_id"] for a in annotations)
            if annotations:
                truth_mask = cv2.imread(run.media(image_masks["ground_truth"]), cv2.IMREAD_UNCHANGED)
                assert truth_mask.shape == (record["height"], record["width"])
                assert set(np.unique(truth_mask)) - {0} == {a["category_id"] + 1 for a in annotations}
            # Predictions: the random model's detections, with their scores for W&B's score slider.
            with open(run.media(image_boxes["prediction"])) as f:
                predicted = json.load(f)["box_data"]
            assert predicted and all(0 <= b["scores"]["score"] <= 1 for b in predicted)
            assert all(0 <= b["position"][k] <= 1 for b in predicted for k in ("minX", "minY", "maxX", "maxY"))
            assert os.path.isfile(run.media(image_masks["prediction"]))
    assert trainer.model.training  # the panel's inference left the model in training mode


def test_best_and_final_checkpoints_become_model_artifacts(trained):
    run, trainer = trained
    assert [a.name for a in run.artifacts] == [f"model-{run.run.run_id}"] * len(run.artifacts)
    kinds = [set(a.aliases) - {"latest"} for a in run.artifacts]
    assert kinds[0] == {"best"} and kinds[-1] == {"final"} and all(k == {"best"} for k in kinds[1:-1])
    best, final = json.loads(run.artifacts[0].metadata), json.loads(run.artifacts[-1].metadata)
    assert best["iteration"] == EVAL_STEPS[0] and best["file"] == "model_best.pth"
    assert best["metrics"]["segm/AP"] == pytest.approx(run.history[EVAL_STEPS[0]]["segm/AP"])
    assert final["iteration"] == MAX_ITER and final["file"] == "model_final.pth"
    assert final["metrics"]["segm/AP"] == pytest.approx(run.history[MAX_ITER]["segm/AP"])
    assert final["config"]["SOLVER"]["MAX_ITER"] == MAX_ITER
    size = os.path.getsize(os.path.join(trainer.cfg.OUTPUT_DIR, "model_final.pth"))
    assert [(c.path, c.size) for c in run.artifacts[-1].manifest.contents] == [("model_final.pth", size)]


def test_sweep_trials_are_runs_of_one_group_with_their_sampled_values(tmp_path, wandb_env):
    cfg = _cfg(tmp_path, GROUP="not-the-sweep")
    run_ids = []
    for trial, lr in enumerate([0.01, 0.02]):
        run = init_wandb_run(cfg, group="sweep-lr", name=f"trial-{trial}", extra_config={"tune": {"lr": lr}})
        run_ids.append(run.id)
        run.finish()
    runs = [_Run(wandb_env, run_id) for run_id in run_ids]
    assert [r.run.run_group for r in runs] == ["sweep-lr", "sweep-lr"]
    assert [r.run.display_name for r in runs] == ["trial-0", "trial-1"]
    assert [r.config["tune"] for r in runs] == [{"lr": 0.01}, {"lr": 0.02}]
    with pytest.raises(ValueError, match="SOLVER"):
        init_wandb_run(cfg, extra_config={"SOLVER": {}})


def test_config_keys_win_and_environment_variables_fill_what_is_empty(tmp_path, wandb_env, monkeypatch):
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


def test_wandb_is_off_unless_enabled_and_a_bad_mode_is_a_clear_error(tmp_path, wandb_env, monkeypatch):
    assert init_wandb_run(_cfg(tmp_path, ENABLED=False)) is None
    assert init_wandb_run(_cfg(tmp_path, MODE="disabled")) is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert init_wandb_run(_cfg(tmp_path, MODE="")) is None
    assert build_wandb_hooks(None, _cfg(tmp_path)) == []
    with pytest.raises(ValueError, match=r"^WANDB.MODE must be one of online, offline, disabled or empty, got 'cloud'$"):
        init_wandb_run(_cfg(tmp_path, MODE="cloud"))
    assert not glob.glob(os.path.join(wandb_env, "wandb", "*"))


def test_hooks_follow_the_config(tmp_path, wandb_env):
    cfg = _cfg(tmp_path, LOG_CHECKPOINTS=True)
    cfg.DATASETS.TEST = ("wandb_val",)
    run = init_wandb_run(cfg)
    assert [type(h) for h in build_wandb_hooks(run, cfg)] == [WandbEvalPanelHook, WandbCheckpointHook]
    cfg.WANDB.LOG_CHECKPOINTS = False
    cfg.DATASETS.TEST = ()
    assert build_wandb_hooks(run, cfg) == []
    run.finish()


def test_without_an_api_key_runs_are_offline_and_say_so_once(tmp_path, wandb_env, monkeypatch, caplog):
    monkeypatch.setattr(d2_logger, "_LOG_COUNTER", Counter())  # detectron2's log_first_n memory, fresh
    cfg = _cfg(tmp_path, MODE="")
    for _ in range(2):
        run = init_wandb_run(cfg)
        assert run.settings.mode == "offline"
        run.finish()
    said = [r for r in caplog.records if r.levelname == "WARNING" and "no API key" in r.getMessage()]
    assert len(said) == 1 and "wandb sync" in said[0].getMessage()


def test_api_keys_never_reach_configs_artifacts_or_logs(tmp_path, wandb_env, monkeypatch, caplog):
    secret = "secret-abc"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    cfg = _cfg(tmp_path)
    extra = {"trial": {"env": {"WANDB_API_KEY": secret, "ray_token": "token-xyz"}, "note": f"key {secret}", "lr": 0.1}}
    run = init_wandb_run(cfg, extra_config=extra)
    checkpoint = tmp_path / "model_best.pth"
    checkpoint.write_bytes(b"weights")
    assert log_checkpoint_artifact(run, str(checkpoint), "best", 3, {"segm": {"AP": 1.0}}, cfg) is not None
    run.finish()
    trial = _Run(wandb_env, run.id).config["trial"]
    assert trial == {"env": {"WANDB_API_KEY": "<redacted>", "ray_token": "<redacted>"}, "note": "<redacted>", "lr": 0.1}
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                content = f.read()
            assert secret.encode() not in content and b"token-xyz" not in content, os.path.join(folder, name)
    assert secret not in caplog.text


def test_wandb_failures_while_training_are_warnings_once(tmp_path, wandb_env, monkeypatch, caplog):
    monkeypatch.setattr(d2_logger, "_LOG_COUNTER", Counter())
    run = init_wandb_run(_cfg(tmp_path))
    run.finish()  # from now on every log call of W&B raises
    writer = WandbWriter(run)
    with EventStorage() as storage:
        for iteration in range(3):
            storage.iter = iteration
            storage.put_scalar("total_loss", 1.0)
            writer.write()
    assert log_checkpoint_artifact(run, str(tmp_path / "missing.pth"), "final", 3) is None
    failures = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("W&B logging scalars failed, training goes on: UsageError" in m for m in failures) == 1
    assert sum("W&B logging a checkpoint artifact failed" in m for m in failures) == 1


def test_dataset_statistics_become_tables_and_summary_values(tmp_path, wandb_env, datasets):
    stats = registered_dataset_stats(datasets[0])  # the data layer's explorer
    run = init_wandb_run(_cfg(tmp_path))
    log_dataset_stats(run, stats, prefix="dataset/train")
    run.log({"total_loss": 1.0}, step=0)  # the trainer's first step is not pushed back by the tables
    run.finish()
    logged = _Run(wandb_env, run.id)
    row = logged.history[0]
    assert row["total_loss"] == 1.0
    with open(logged.media(row["dataset/train/per_class"])) as f:
        per_class = json.load(f)
    assert per_class["columns"] == ["name", *next(iter(stats["per_class"].values()))]
    assert [r[:2] for r in per_class["data"]] == [[name, c["instances"]] for name, c in stats["per_class"].items()]
    with open(logged.media(row["dataset/train/image_sizes"])) as f:
        assert json.load(f)["data"] == [[size, n] for size, n in stats["image_sizes"].items()]
    assert logged.summary["dataset/train/num_images"] == stats["num_images"] == 6
    assert logged.summary["dataset/train/classes"] == stats["classes"]


def test_training_goes_on_when_wandb_cannot_be_reached(tmp_path, synthetic_root):
    """Online, with a key, against a loopback port where nothing listens: init gives up after INIT_TIMEOUT."""
    init_timeout = 5
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_BASE_URL="http://127.0.0.1:9",
        WANDB_API_KEY="local-" + "0" * 40,
        WANDB_DIR=str(tmp_path),
        WANDB_CONFIG_DIR=str(tmp_path / "config"),
        WANDB_CACHE_DIR=str(tmp_path / "cache"),
        WANDB_DATA_DIR=str(tmp_path / "data"),
        NETRC=str(tmp_path / "netrc"),
    )
    script = f"""
import sys, time
sys.path.insert(0, {os.path.dirname(__file__)!r})
from cityseg_d2.data import register_cityscapes_instances
import test_wandb
register_cityscapes_instances("wandb_train", {synthetic_root!r}, "train")
start = time.monotonic()
trainer = test_wandb.train_tiny(
    {str(tmp_path / "output")!r}, "wandb_train", None, max_iter=2, MODE="online", INIT_TIMEOUT={init_timeout}
)
print(f"RESULT run={{trainer.wandb_run}} iter={{trainer.iter}} seconds={{time.monotonic() - start:.0f}}")
"""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT run=None iter=2" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    assert "W&B init failed, training goes on without W&B" in done.stderr
    # Bounded, not a speed test: init's timeout plus a generous margin for start-up and 2 tiny iterations.
    assert time.monotonic() - start < init_timeout + 120
    assert os.path.isfile(tmp_path / "output" / "model_final.pth")
