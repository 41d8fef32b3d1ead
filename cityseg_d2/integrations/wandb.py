"""Weights & Biases for training runs and Ray Tune trials: one W&B run per training, fed by detectron2's EventStorage.

A trainer (see cityseg_d2.engine.Trainer) wires a WandbSession in four places, on the main process only:

    session = WandbSession(cfg)                             # nothing starts yet
    hooks.insert(0, session)                                # before_train starts (or resumes) the run
    writers.append(session.writer())                        # build_writers: scalars; its close() finishes the run
    hooks[-1:-1] = session.evaluation_hooks(best)           # after EvalHook/BestCheckpointer, before PeriodicWriter
    except BaseException as e: session.finish(error=e)      # around train(): an after_train hook may have raised

When it is on: W&B is on when WANDB.ENABLED is true or $WANDB_PROJECT is set, unless the mode is "disabled".
WANDB.PROJECT/ENTITY/NAME/GROUP/TAGS/MODE each come from the config when not empty, else from $WANDB_PROJECT,
$WANDB_ENTITY, $WANDB_NAME, $WANDB_RUN_GROUP, $WANDB_TAGS (comma-separated) or $WANDB_MODE. Without a mode the run is
online when W&B finds credentials ($WANDB_API_KEY, netrc, `wandb login`) and offline otherwise (`wandb sync` uploads
it later). A W&B failure (init error or timeout, a failing log call) is a warning: training never stops for W&B.

Resume: the run id is kept in OUTPUT_DIR/wandb_run_id, beside the checkpoints; a training resumed from a checkpoint
there continues that run (`resume="allow"`) at the checkpoint's iteration. A training that ends in an exception
finishes its run with exit code 1, which W&B shows as failed; a requested stop (cityseg_d2.errors.TrainingStopped, how
a Ray Tune trial ends when ASHA or PBT stops it, or SystemExit with code 0 or None) finishes it normally.
"""
import copy
import functools
import logging
import os
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Mapping

import cv2
import numpy as np
import torch
import wandb
import yaml
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils
from detectron2.engine import HookBase
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from detectron2.utils.events import EventWriter, get_event_storage
from detectron2.utils.logger import log_first_n
from torch.nn.parallel import DistributedDataParallel

from ..data.analysis import registered_dataset_stats
from ..errors import TrainingInterrupted, TrainingStopped
from . import WANDB_RUN_ID_FILE, wandb_mode

logger = logging.getLogger(__name__)

PANEL_KEY = "eval/predictions"
PER_CLASS_KEY = "eval/per_class_AP"
DEFAULT_PROJECT = "cityseg-d2"
# Keys whose values never reach W&B (run config, artifact metadata), whatever a caller puts in extra_config.
_SECRET_KEY = re.compile(r"api[_-]?key|token|secret|passw(or)?d|credential", re.IGNORECASE)
_REDACTED = "<redacted>"
# Longest side of panel images: full-size Cityscapes frames (2048x1024) would make every panel tens of MB.
_PANEL_MAX_SIZE = 1024


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _never_raises(what):
    """Turn any exception of the wrapped W&B call into one warning per distinct error: W&B must not stop training."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                message = f"W&B {what} failed, training goes on: {type(e).__name__}: {_first_line(e)}"
                log_first_n(logging.WARNING, message, key="message", name=__name__)
                return None

        return wrapper

    return decorate


def _config_or_env(value, env_var):
    return value if value else os.environ.get(env_var, "")


def _has_credentials():
    """Whether W&B finds credentials (env, settings, netrc, identity token), asking W&B itself, without prompting."""
    try:
        return wandb.login(prompt=False, verify=False)
    except Exception as e:  # e.g. a malformed $WANDB_API_KEY
        logger.warning("W&B credentials unusable (%s)", _first_line(e))
        return False


def _run_options(cfg):
    """wandb.init's project, entity, name, group, tags and mode; None when W&B is off. A ConfigError for a bad mode."""
    w = cfg.WANDB
    mode = wandb_mode(cfg)
    if mode == "disabled" or not (w.ENABLED or os.environ.get("WANDB_PROJECT")):
        return None
    if not mode:
        mode = "online" if _has_credentials() else "offline"
        if mode == "offline":
            log_first_n(
                logging.WARNING,
                "W&B: no API key ($WANDB_API_KEY, netrc or `wandb login`): runs are offline; "
                "upload them later with `wandb sync <run dir>`",
                key="message",
                name=__name__,
            )
    env_tags = [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {
        "project": _config_or_env(w.PROJECT, "WANDB_PROJECT") or DEFAULT_PROJECT,
        "entity": _config_or_env(w.ENTITY, "WANDB_ENTITY") or None,
        "name": _config_or_env(w.NAME, "WANDB_NAME") or None,
        "group": _config_or_env(w.GROUP, "WANDB_RUN_GROUP") or None,
        "tags": list(w.TAGS) or env_tags or None,
        "mode": mode,
    }


def _scrub(value, secrets):
    """value with secret-named keys and any string containing a secret replaced by a placeholder."""
    if isinstance(value, Mapping):
        return {k: _REDACTED if _SECRET_KEY.search(str(k)) else _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, str) and any(secret in value for secret in secrets):
        return _REDACTED
    return value


def _public(value):
    return _scrub(value, [s for s in (os.environ.get("WANDB_API_KEY"),) if s])


def _config_dict(cfg):
    return yaml.safe_load(cfg.dump())


def _git_commit():
    """The commit of the cityseg_d2 sources, "+dirty" with uncommitted changes; None outside a git checkout."""
    source_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(
            ["git", "-C", source_dir, *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _run_config(cfg, extra_config):
    config = {**_config_dict(cfg), "git_commit": _git_commit()}
    clashes = sorted(set(config) & set(extra_config or {}))
    if clashes:
        raise ValueError(f"extra_config keys {clashes} clash with the run config's own keys")
    return _public({**config, **(extra_config or {})})


def init_wandb_run(cfg, extra_config=None, run_id=None):
    """Start the W&B run of a training or Ray Tune trial; None off the main process, when W&B is off or fails.

    The run config holds the full config (nested) and the git commit; `extra_config` (e.g. a trial's sampled values)
    joins them at the top level. A sweep sets WANDB.GROUP and WANDB.NAME of its trials, so that they form one W&B
    group. With `run_id` the run of that id is continued (created when W&B has none). Run files go to $WANDB_DIR,
    else OUTPUT_DIR. Raises ConfigError for a bad mode and ValueError for clashing extra_config keys.
    """
    if not comm.is_main_process():
        return None
    options = _run_options(cfg)
    if options is None:
        return None
    config = _run_config(cfg, extra_config)
    run_dir = os.environ.get("WANDB_DIR") or cfg.OUTPUT_DIR or "."
    os.makedirs(run_dir, exist_ok=True)
    try:
        run = wandb.init(
            **options,
            **({"id": run_id, "resume": "allow"} if run_id else {}),
            dir=run_dir,
            config=config,
            reinit="finish_previous",  # a Ray worker may run several trials, one run each
            settings=wandb.Settings(init_timeout=float(cfg.WANDB.INIT_TIMEOUT)),
        )
    except Exception as e:
        logger.warning("W&B init failed, training goes on without W&B: %s: %s", type(e).__name__, _first_line(e))
        return None
    logger.info(
        "W&B run %s %s(%s) in project %s%s, files in %s",
        run.name or run.id,  # offline runs get their name when synced
        "continued " if run_id else "",
        options["mode"],
        options["project"],
        f", group {options['group']}" if options["group"] else "",
        os.path.dirname(run.dir),
    )
    return run


def read_run_id(output_dir):
    """The W&B run id kept in `output_dir`, or None."""
    try:
        with open(os.path.join(output_dir, WANDB_RUN_ID_FILE)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


class WandbSession(HookBase):
    """The W&B run of one training, and the writer and hooks that feed it.

    Building it starts nothing: the run starts in before_train (this hook goes first). A training resumed from a
    checkpoint (start_iter > 0) continues the run whose id OUTPUT_DIR/wandb_run_id holds; any other training starts a
    new run and writes its id there. The training set's statistics are computed, only when WANDB.LOG_DATASET_STATS,
    when a new run starts. The writer's close(), which PeriodicWriter calls last in after_train, finishes the run:
    failed when an exception other than a requested stop ended training early. `extra_config` (e.g. a sweep trial's sampled values) joins
    the run config; `run` is None before training, off the main process, or when W&B failed to start.
    """

    def __init__(self, cfg):
        self._cfg = cfg
        self.extra_config = {}
        self.run = None
        self._finished = False

    def before_train(self):
        run_id = read_run_id(self._cfg.OUTPUT_DIR) if self.trainer.start_iter > 0 else None
        self.run = init_wandb_run(self._cfg, extra_config=self.extra_config, run_id=run_id)
        if self.run is None:
            return
        os.makedirs(self._cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(self._cfg.OUTPUT_DIR, WANDB_RUN_ID_FILE), "w") as f:
            f.write(self.run.id + "\n")
        if run_id is None and self._cfg.WANDB.LOG_DATASET_STATS:
            for name in self._cfg.DATASETS.TRAIN:
                log_dataset_stats(self.run, registered_dataset_stats(name), prefix=f"dataset/{name}")

    def log(self, data, step):
        """run.log at `step`, except below the step a continued run starts at: W&B would drop it, with a warning."""
        if self.run is not None and step >= self.run.starting_step:
            self.run.log(data, step=step)

    @_never_raises("finishing the run")
    def finish(self, error=None):
        """Finish the run, once. A training that ended in `error` is a failed run (exit code 1), unless `error` is a
        requested stop: TrainingStopped (a Ray Tune scheduler stopped the trial) or SystemExit with code 0 or None.
        One that SIGTERM or SIGINT stopped after saving a checkpoint (TrainingInterrupted) is marked preempting, W&B's
        state for a run that will be resumed, with the signal's exit code."""
        if self.run is not None and not self._finished:
            self._finished = True
            if isinstance(error, TrainingInterrupted):
                self.run.mark_preempting()
                self.run.finish(exit_code=error.exit_code)
                return
            requested = isinstance(error, TrainingStopped) or (isinstance(error, SystemExit) and error.code in (0, None))
            failed = error is not None and not requested
            self.run.finish(exit_code=1 if failed else 0)

    def writer(self):
        return WandbWriter(self)

    def evaluation_hooks(self, best_checkpointer=None):
        """The hooks that go after EvalHook and BestCheckpointer, before PeriodicWriter: the evaluation panel (when
        DATASETS.TEST names a data set) and, with WANDB.LOG_CHECKPOINTS, checkpoint artifacts."""
        hooks = []
        if self._cfg.DATASETS.TEST:
            hooks.append(WandbEvalPanelHook(self, self._cfg, self._cfg.DATASETS.TEST[0]))
        if self._cfg.WANDB.LOG_CHECKPOINTS:
            hooks.append(WandbCheckpointHook(self, self._cfg, best_checkpointer))
        return hooks


class WandbWriter(EventWriter):
    """Every scalar of the EventStorage (losses, lr, time, data_time, evaluation results), with its iteration as step.

    Noisy scalars are smoothed over `window_size` iterations, as by detectron2's JSON and TensorBoard writers.
    close() finishes the run: PeriodicWriter calls it last in after_train, after the final results are written.
    """

    def __init__(self, session, window_size=20):
        self._session = session
        self._window_size = window_size
        self._last_iteration = {}  # scalar name -> iteration last sent

    @_never_raises("logging scalars")
    def write(self):
        if self._session.run is None:
            return
        by_iteration = defaultdict(dict)
        for key, (value, iteration) in get_event_storage().latest_with_smoothing_hint(self._window_size).items():
            if iteration > self._last_iteration.get(key, -1):
                by_iteration[iteration][key] = value
                self._last_iteration[key] = iteration
        for iteration in sorted(by_iteration):  # W&B drops a step lower than one it has seen
            self._session.log(by_iteration[iteration], step=iteration)

    def close(self):
        trainer = self._session.trainer
        if trainer.iter >= trainer.max_iter:
            self._session.finish()
        else:
            # PeriodicWriter closes its writers in after_train, which TrainerBase.train calls from a `finally`
            # block: the exception that left the training loop early is the one being handled.
            self._session.finish(error=sys.exc_info()[1] or RuntimeError("training stopped early"))


def per_class_table(results):
    """Per-class AP and AP50 of detectron2-style results ({"segm": {"AP-car": .., "AP50-car": ..}}) as a W&B table,
    None without per-class results. The scalars themselves reach W&B through WandbWriter."""
    rows = []
    for task, metrics in results.items():
        if isinstance(metrics, Mapping):
            for key, ap in metrics.items():
                if key.startswith("AP-"):
                    class_name = key[len("AP-") :]
                    rows.append([task, class_name, ap, metrics.get(f"AP50-{class_name}")])
    return wandb.Table(columns=["task", "class", "AP", "AP50"], data=rows) if rows else None


def _eval_results_at(storage, iteration):
    """The results EvalHook put in the storage at `iteration`, nested again: {"segm": {"AP": .., "AP-car": ..}}.

    EvalHook stores flattened "task/metric" keys without smoothing, which tells them from losses and lr.
    """
    hints = storage.smoothing_hints()
    results = defaultdict(dict)
    for key, (value, key_iteration) in storage.latest().items():
        if key_iteration == iteration and "/" in key and not hints[key]:
            task, metric = key.split("/", 1)
            results[task][metric] = value
    return dict(results)


def _class_map(masks, classes, size):
    """One W&B mask layer: 1 + class id where an instance is (later instances on top), 0 elsewhere."""
    class_map = np.zeros(masks.shape[1:], dtype=np.uint8)
    for mask, class_id in zip(masks.numpy(), classes.tolist()):
        class_map[mask] = class_id + 1
    if class_map.shape[::-1] != size:
        class_map = cv2.resize(class_map, size, interpolation=cv2.INTER_NEAREST)
    return class_map


def _box_data(boxes, classes, scores, width, height, class_names):
    """W&B boxes in fractions of the image, so that they need no rescaling with the image."""
    data = []
    for i, ((x0, y0, x1, y1), class_id) in enumerate(zip(boxes.tolist(), classes.tolist())):
        box = {
            "position": {"minX": x0 / width, "minY": y0 / height, "maxX": x1 / width, "maxY": y1 / height},
            "class_id": class_id + 1,
            "box_caption": class_names[class_id],
        }
        if scores is not None:
            box["box_caption"] += f" {scores[i]:.2f}"
            box["scores"] = {"score": float(scores[i])}
        data.append(box)
    return data


def _overlay_image(sample, predictions, class_names):
    """The image with a "prediction" and a "ground_truth" layer of masks and of boxes, switchable in W&B."""
    image = sample["image"]
    height, width = image.shape[:2]
    scale = min(1.0, _PANEL_MAX_SIZE / max(height, width))
    size = (round(width * scale), round(height * scale))
    if scale < 1:
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    order = predictions.scores.argsort()  # higher scores painted last, on top
    predictions = predictions[order]
    layers = {
        "prediction": (
            predictions.pred_masks if predictions.has("pred_masks") else None,
            predictions.pred_boxes.tensor,
            predictions.pred_classes,
            predictions.scores,
        )
    }
    truth = sample["ground_truth"]
    if truth is not None:
        layers["ground_truth"] = (
            truth.gt_masks.tensor if truth.has("gt_masks") else None,
            truth.gt_boxes.tensor,
            truth.gt_classes,
            None,
        )
    labels = {0: "background", **{i + 1: name for i, name in enumerate(class_names)}}
    masks, boxes = {}, {}
    for layer, (layer_masks, layer_boxes, classes, scores) in layers.items():
        if layer_masks is not None:
            masks[layer] = {"mask_data": _class_map(layer_masks, classes, size), "class_labels": labels}
        boxes[layer] = {
            "box_data": _box_data(layer_boxes, classes, scores, width, height, class_names),
            "class_labels": labels,
        }
    return wandb.Image(image, masks=masks, boxes=boxes, caption=sample["caption"])


class WandbEvalPanelHook(HookBase):
    """After each evaluation: the per-class AP table, and the first NUM_VIS_IMAGES images of `dataset_name` (the same
    ones every time) with the model's masks and boxes (scores from VIS_SCORE_THRESHOLD up) next to the ground truth,
    as W&B image overlays.

    Runs when cityseg_d2's EvalHook does (every TEST.EVAL_PERIOD, in the last iteration, and in after_train of a
    resumed training with nothing left to train) and reads its results from the EventStorage, so it goes after
    EvalHook, and before PeriodicWriter, whose after_train finishes the run.
    """

    def __init__(self, session, cfg, dataset_name):
        self._session = session
        self._cfg = cfg.clone()
        self._dataset_name = dataset_name
        self._period = cfg.TEST.EVAL_PERIOD
        self._num_images = cfg.WANDB.NUM_VIS_IMAGES
        self._score_threshold = cfg.WANDB.VIS_SCORE_THRESHOLD
        self._samples = None  # read at the first evaluation, kept for the next ones

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self._period > 0 and next_iter % self._period == 0):
            self._log_evaluation(self.trainer.storage.iter)

    def after_train(self):
        if self.trainer.start_iter >= self.trainer.max_iter:  # nothing trained: EvalHook evaluated here
            self._log_evaluation(self.trainer.max_iter - 1)

    def _log_evaluation(self, iteration):
        if self._session.run is None:
            return
        self._log_per_class_table(iteration)
        if self._num_images > 0:
            self._log_panel(iteration)

    @_never_raises("logging the per-class table")
    def _log_per_class_table(self, iteration):
        table = per_class_table(_eval_results_at(self.trainer.storage, iteration))
        if table is not None:
            self._session.log({PER_CLASS_KEY: table}, step=iteration)

    def _load_samples(self):
        mapper = DatasetMapper(self._cfg, is_train=False)
        samples = []
        for record in DatasetCatalog.get(self._dataset_name)[: self._num_images]:
            image = detection_utils.read_image(record["file_name"], format="RGB")
            truth = None
            if "annotations" in record:
                annotations = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
                truth = detection_utils.annotations_to_instances(annotations, image.shape[:2], mask_format="bitmask")
            samples.append(
                {
                    "inputs": mapper(copy.deepcopy(record)),
                    "image": image,
                    "ground_truth": truth,
                    "caption": str(record.get("image_id", os.path.basename(record["file_name"]))),
                }
            )
        return samples

    @_never_raises("logging the prediction panel")
    def _log_panel(self, iteration):
        if self._samples is None:
            self._samples = self._load_samples()
        class_names = MetadataCatalog.get(self._dataset_name).thing_classes
        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):  # only this process runs it: no collective calls
            model = model.module
        # Not detectron2's inference_context: it would leave the model in eval mode if inference raised.
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                images = []
                for sample in self._samples:
                    predictions = model([sample["inputs"]])[0]["instances"].to("cpu")
                    predictions = predictions[predictions.scores >= self._score_threshold]
                    images.append(_overlay_image(sample, predictions, class_names))
        finally:
            model.train(was_training)
        self._session.log({PANEL_KEY: images}, step=iteration)


@_never_raises("logging a checkpoint artifact")
def log_checkpoint_artifact(run, path, kind, iteration, metrics=None, cfg=None):
    """The checkpoint at `path` as a new version of the run's model artifact "model-<run id>", with alias `kind`
    ("best" or "final") and metadata: kind, iteration, metrics (flattened) and the config (nested).

    Returns the logged artifact, or None when run is None or W&B failed.
    """
    if run is None:
        return None
    metadata = {
        "kind": kind,
        "iteration": iteration,
        "file": os.path.basename(path),
        "metrics": flatten_results_dict(metrics or {}),
    }
    if cfg is not None:
        metadata["config"] = _public(_config_dict(cfg))
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
    artifact.add_file(path)
    return run.log_artifact(artifact, aliases=[kind])


class WandbCheckpointHook(HookBase):
    """Each checkpoint `best_checkpointer` (detectron2's BestCheckpointer) saves, and model_final, as model artifacts.

    Goes after BestCheckpointer (whose best_iter it watches) and before PeriodicWriter.
    """

    def __init__(self, session, cfg, best_checkpointer=None):
        self._session = session
        self._cfg = cfg
        self._best_checkpointer = best_checkpointer
        self._logged_best_iter = None

    def after_step(self):
        self._log_new_best()

    def after_train(self):
        self._log_new_best()
        final = os.path.join(self._cfg.OUTPUT_DIR, "model_final.pth")  # PeriodicCheckpointer's at the last iteration
        if self.trainer.iter >= self.trainer.max_iter and os.path.isfile(final):
            last = self.trainer.max_iter - 1  # where the final checkpoint and its evaluation are logged
            metrics = _eval_results_at(self.trainer.storage, last)
            log_checkpoint_artifact(self._session.run, final, "final", last, metrics, self._cfg)

    def _log_new_best(self):
        best = self._best_checkpointer
        if best is None or best.best_iter is None or best.best_iter == self._logged_best_iter:
            return
        self._logged_best_iter = best.best_iter
        path = os.path.join(self._cfg.OUTPUT_DIR, "model_best.pth")  # BestCheckpointer's default file_prefix
        metrics = _eval_results_at(self.trainer.storage, best.best_iter)
        log_checkpoint_artifact(self._session.run, path, "best", best.best_iter, metrics, self._cfg)


@_never_raises("logging dataset statistics")
def log_dataset_stats(run, stats, prefix="dataset"):
    """A data explorer's statistics at the start of a run: each mapping (name -> number, or name -> record) and each
    list of records becomes a W&B table "<prefix>/<key>", each other value a summary entry "<prefix>/<key>".

    Logged without committing a step, so that they join the run's current step and never push the steps of the
    training iterations back (W&B drops steps lower than one it has seen).
    """
    if run is None:
        return
    tables = {}
    for name, value in stats.items():
        key = f"{prefix}/{name}"
        if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            columns = list(dict.fromkeys(column for record in value.values() for column in record))
            data = [[row, *(record.get(c) for c in columns)] for row, record in value.items()]
            tables[key] = wandb.Table(columns=["name", *columns], data=data)
        elif isinstance(value, Mapping):
            tables[key] = wandb.Table(columns=["name", name], data=[[k, v] for k, v in value.items()])
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            columns = list(dict.fromkeys(column for record in value for column in record))
            tables[key] = wandb.Table(columns=columns, data=[[record.get(c) for c in columns] for record in value])
        else:
            run.summary[key] = value
    if tables:
        run.log(tables, commit=False)
