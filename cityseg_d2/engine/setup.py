"""One way to make a config for every entry point: load, override, register the datasets, check, freeze.

train_net, predict, tune_net, each Ray Tune trial and the benchmarks all call prepare_config, so a mistake is
caught the same way everywhere, before anything is trained or written.
"""
import logging
import os

import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_setup

from ..config import get_cityseg_cfg
from ..data import CLASS_SETS, MASK_SOURCES, register_from_config
from ..errors import CityscapesDataError, ConfigError, first_line
from ..evaluation import check_evaluator_names, reported_metrics
from ..integrations import WANDB_MODES

logger = logging.getLogger(__name__)


def load_config(config_file, opts=()):
    """detectron2 + cityseg_d2 defaults, then `config_file`, then `KEY VALUE` overrides (not yet checked)."""
    if not config_file:
        raise ConfigError(
            "no config file given: pass --config-file, e.g. configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
        )
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file not found: {config_file}")
    cfg = get_cityseg_cfg()
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, AssertionError, yaml.YAMLError) as e:
        raise ConfigError(f"{config_file}: {first_line(e)}") from e
    return merge_overrides(cfg, opts)


def merge_overrides(cfg, opts):
    """cfg with `KEY VALUE` overrides merged (in place), a bad one named in a ConfigError."""
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"command-line override: {first_line(e)}") from e
    return cfg


def use_cpu_without_cuda(cfg):
    """Run on the CPU, with a warning, when the config asks for CUDA on a machine without it."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %s but no CUDA device is available: running on the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
        cfg.SOLVER.AMP.ENABLED = False


def _check_dataset_options(cfg):
    options = cfg.DATASETS.CITYSCAPES
    for key, value, allowed in [("CLASS_SET", options.CLASS_SET, CLASS_SETS), ("MASK_SOURCE", options.MASK_SOURCE, MASK_SOURCES)]:
        if value not in allowed:
            raise ConfigError(f"DATASETS.CITYSCAPES.{key} is {value!r}: use one of {', '.join(allowed)}")


def _check_datasets(cfg):
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in DatasetCatalog.list():
                # Ours only: detectron2's builtin cityscapes_fine_* use its broken loader.
                ours = sorted(n for n in DatasetCatalog.list() if MetadataCatalog.get(n).get("class_set"))
                raise ConfigError(
                    f"DATASETS.{key}: dataset '{name}' is not registered; registered Cityscapes instance sets: "
                    f"{', '.join(ours)} (register others with cityseg_d2.data.register_cityscapes_instances)"
                )
            classes = MetadataCatalog.get(name).get("thing_classes")
            num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
            if classes is not None and len(classes) != num_classes:
                class_set = MetadataCatalog.get(name).get("class_set", "its class set")
                raise ConfigError(
                    f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} but {name} has {len(classes)} classes "
                    f"({class_set}): set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}"
                )


def _check_ranges(cfg):
    solver = cfg.SOLVER
    for key, value, low in [
        ("SOLVER.BASE_LR", solver.BASE_LR, 0.0),
        ("SOLVER.MAX_ITER", solver.MAX_ITER, 0),
        ("SOLVER.IMS_PER_BATCH", solver.IMS_PER_BATCH, 0),
    ]:
        if not value > low:
            raise ConfigError(f"{key} is {value}: it must be > {low}")
    if cfg.CITYSEG.BEST_CHECKPOINT_MODE not in ("max", "min"):
        raise ConfigError(f"CITYSEG.BEST_CHECKPOINT_MODE is {cfg.CITYSEG.BEST_CHECKPOINT_MODE!r}: use max or min")
    if cfg.WANDB.MODE and cfg.WANDB.MODE not in WANDB_MODES:
        raise ConfigError(f"WANDB.MODE is {cfg.WANDB.MODE!r}: use one of {', '.join(WANDB_MODES)} or leave it empty")


def _check_best_checkpoint_metric(cfg):
    metric = cfg.CITYSEG.BEST_CHECKPOINT_METRIC
    if not metric or cfg.TEST.EVAL_PERIOD <= 0 or not cfg.DATASETS.TEST:
        return
    reported = reported_metrics(cfg)
    if metric not in reported:
        raise ConfigError(
            f"CITYSEG.BEST_CHECKPOINT_METRIC {metric!r} is not reported by TEST.EVALUATORS "
            f"{list(cfg.TEST.EVALUATORS)}: use one of {', '.join(reported[:6])}, ... or '' for no best checkpoint"
        )


def check_config(cfg, resume=False):
    """Fail early, in one line, on what would otherwise crash deep inside training or at its end."""
    try:
        check_evaluator_names(cfg.TEST.EVALUATORS)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _check_datasets(cfg)
    _check_ranges(cfg)
    _check_best_checkpoint_metric(cfg)
    weights = cfg.MODEL.WEIGHTS
    resuming = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if weights and "://" not in weights and not resuming and not os.path.isfile(weights):
        raise ConfigError(f"MODEL.WEIGHTS file not found: {weights}")


def prepare_config(config_file=None, opts=(), base=None, resume=False):
    """The checked, frozen config of an entry point: defaults, `config_file` (or a copy of `base`, a config loaded
    before, e.g. a sweep's base config in a trial), then `KEY VALUE` overrides; CUDA falls back to the CPU where there
    is none; the Cityscapes datasets are registered with the config's options; check_config passes."""
    if base is not None:
        cfg = base.clone()
        cfg.defrost()
        merge_overrides(cfg, opts)
    else:
        cfg = load_config(config_file, opts)
    use_cpu_without_cuda(cfg)
    _check_dataset_options(cfg)
    try:
        register_from_config(cfg)
    except CityscapesDataError:
        raise
    except ValueError as e:
        raise ConfigError(f"DATASETS.CITYSCAPES: {first_line(e)}") from e
    check_config(cfg, resume=resume)
    cfg.freeze()
    return cfg


def setup(args):
    """train_net's set-up from detectron2's default_argument_parser: prepare_config, then default_setup (output
    dir, logs, config.yaml, seed), which runs only once every check has passed."""
    cfg = prepare_config(args.config_file, args.opts, resume=getattr(args, "resume", False))
    default_setup(cfg, args)
    return cfg
