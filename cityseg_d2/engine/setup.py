"""One way to make a config for every entry point: load, override, register the datasets, check, freeze.

train_net, predict, tune_net, each Ray Tune trial and the benchmarks all call prepare_config, so a mistake is
caught the same way everywhere, before anything is trained or written. Config files are read with YAML's safe
loader (a tag such as !!python/object/apply, which would run code, is refused), their _BASE_ files too.

train_net's setup adds what only a training run needs: every image of its data sets opened once (check_data),
OUTPUT_DIR claimed (engine/output_dir.py), and only then detectron2's default_setup, the first write.
"""

import logging
import os

import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import get_cityseg_cfg
from ..data import CLASS_SETS, MASK_SOURCES, register_from_config
from ..errors import CityscapesDataError, ConfigError, OutputDirError, first_line
from ..evaluation import check_evaluator_names, reported_metrics
from ..integrations import wandb_mode
from ..modeling import autocast_dtype
from ..modeling.nms import check_nms_method
from .checkpoint import eval_only_fit_error, resume_candidates, resume_point, untrusted_pickle_error, weights_fit
from .output_dir import check_output_dir, claim_output_dir

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
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(
            f"{config_file}: refused: {first_line(e)} ({e.problem_mark.name}, line {e.problem_mark.line + 1}); a "
            "YAML tag can run code, and configs hold plain values only"
        ) from e
    except OSError as e:  # a _BASE_ file (the config file itself exists)
        raise ConfigError(f"{config_file}: cannot read its _BASE_ {e.filename} ({e.strerror})") from e
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
    for key, value, allowed in [
        ("CLASS_SET", options.CLASS_SET, CLASS_SETS),
        ("MASK_SOURCE", options.MASK_SOURCE, MASK_SOURCES),
    ]:
        if value not in allowed:
            raise ConfigError(f"DATASETS.CITYSCAPES.{key} is {value!r}: use one of {', '.join(allowed)}")
    if options.MASK_SOURCE == "instance_ids" and cfg.INPUT.MASK_FORMAT != "bitmask":
        raise ConfigError(
            "DATASETS.CITYSCAPES.MASK_SOURCE instance_ids gives masks as RLE, which needs INPUT.MASK_FORMAT bitmask "
            f"(it is {cfg.INPUT.MASK_FORMAT!r})"
        )


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
        ("SOLVER.CHECKPOINT_PERIOD", solver.CHECKPOINT_PERIOD, 0),
    ]:
        if not value > low:
            raise ConfigError(f"{key} is {value}: it must be > {low}")
    if cfg.TEST.EVAL_PERIOD < 0:
        raise ConfigError(
            f"TEST.EVAL_PERIOD is {cfg.TEST.EVAL_PERIOD}: it must be >= 0 (0: evaluate after training only)"
        )
    if cfg.CITYSEG.BEST_CHECKPOINT_MODE not in ("max", "min"):
        raise ConfigError(f"CITYSEG.BEST_CHECKPOINT_MODE is {cfg.CITYSEG.BEST_CHECKPOINT_MODE!r}: use max or min")
    wandb_mode(cfg)  # WANDB.MODE, else $WANDB_MODE, must be a mode W&B knows


def _check_fast_path(cfg):
    """The fast path's values, which are otherwise read only when the model or the training loop is built (after
    OUTPUT_DIR has been written to)."""
    check_nms_method(cfg.CITYSEG.FAST.NMS)
    autocast_dtype(cfg.CITYSEG.FAST.TEST_PRECISION, "CITYSEG.FAST.TEST_PRECISION")
    if cfg.SOLVER.AMP.ENABLED:
        if cfg.SOLVER.AMP.PRECISION not in ("float16", "bfloat16"):
            raise ConfigError(f"SOLVER.AMP.PRECISION is {cfg.SOLVER.AMP.PRECISION!r}: use float16 or bfloat16")
        if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.PRECISION == "float16":
            raise ConfigError(
                "SOLVER.AMP.PRECISION float16 needs a GPU: use bfloat16 on the CPU (or SOLVER.AMP.ENABLED False)"
            )


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
    _check_fast_path(cfg)
    _check_weights(cfg, resume)


def _check_weights(cfg, resume):
    """MODEL.WEIGHTS exists, is no refused pickle, can be read, and is a checkpoint of this model (most of its
    tensors fit: fine-tuning from other weights skips a few); a warning line when it leaves most of the model at
    random init (e.g. ImageNet weights of another depth). URLs (the model zoo) are checked when loaded."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or (resume and resume_candidates(cfg.OUTPUT_DIR)):
        return
    refusal = untrusted_pickle_error(weights, cfg.CITYSEG.TRUST_PICKLE_WEIGHTS)
    if refusal:
        raise refusal
    if "://" in weights:
        return
    if not os.path.isfile(weights):
        raise ConfigError(f"MODEL.WEIGHTS file not found: {weights}")
    fit = weights_fit(cfg)
    if fit.mostly_skipped:
        raise ConfigError(
            f"MODEL.WEIGHTS {weights} does not fit this model ({fit.describe()}): it is a checkpoint of another "
            "architecture; use the config it was trained with, or weights of this model"
        )
    if fit.loaded_elements < fit.model_elements / 2:
        logger.warning(f"MODEL.WEIGHTS {weights} leaves most of the model at random init: {fit.describe()}")


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


def _check_weights_fit_whole(cfg, resume):
    """--eval-only evaluates the weights as they are: refuse those that leave part of the model at random init."""
    point = resume_point(cfg.OUTPUT_DIR) if resume else None
    weights = point[0] if point else cfg.MODEL.WEIGHTS
    if weights and "://" not in weights:
        refusal = eval_only_fit_error(weights, weights_fit(cfg, weights))
        if refusal:
            raise refusal


def check_data(cfg, training=True):
    """Load every data set the run reads (DATASETS.TEST, and DATASETS.TRAIN when training): on a cold cache each
    image is opened whole and each annotation read, so a broken file is named now, not hours into training."""
    for key in ("TRAIN", "TEST") if training else ("TEST",):
        for name in cfg.DATASETS[key]:
            try:
                dicts = DatasetCatalog.get(name)
            except OSError as e:
                raise CityscapesDataError(
                    f"DATASETS.{key} {name}: {e.filename or ''} cannot be read ({e.strerror})"
                ) from e
            if not dicts:
                raise ConfigError(
                    f"DATASETS.{key}: {name} has no images (check DATASETS.CITYSCAPES.CITIES and *_IMAGE_LIST)"
                )


def setup(args):
    """train_net's set-up from detectron2's default_argument_parser (plus --overwrite and --trust-pickle):
    prepare_config, check_data, OUTPUT_DIR checked and claimed, then default_setup (logs, config.yaml, seed), so
    that nothing is written before every check has passed. The OUTPUT_DIR lock is held until
    output_dir.release_output_dir or the end of the process."""
    opts = list(args.opts) + (["CITYSEG.TRUST_PICKLE_WEIGHTS", "True"] if getattr(args, "trust_pickle", False) else [])
    resume, eval_only = getattr(args, "resume", False), getattr(args, "eval_only", False)
    outputs = dict(resume=resume, overwrite=getattr(args, "overwrite", False), eval_only=eval_only)
    cfg = prepare_config(args.config_file, opts, resume=resume)
    main_process = comm.is_main_process()  # the one that writes OUTPUT_DIR's files
    if main_process:
        check_output_dir(cfg, **outputs)
    if eval_only:
        _check_weights_fit_whole(cfg, resume)
    check_data(cfg, training=not eval_only)
    if main_process:
        claim_output_dir(cfg, **outputs)
    try:
        default_setup(cfg, args)
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="cityseg_d2")
    except OSError as e:
        raise OutputDirError(
            f"cannot write to OUTPUT_DIR {cfg.OUTPUT_DIR} ({e.strerror}): free space there, or choose another"
        ) from e
    return cfg
