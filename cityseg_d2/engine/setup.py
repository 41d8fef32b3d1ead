"""Turn command-line arguments into a checked, frozen config, with one-line errors for what a user got wrong."""
import logging
import os

import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_setup

from ..config import get_cityseg_cfg
from ..data import register_from_config

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config, its file or what it names (datasets, weights) is wrong; the message says what and where."""


def load_config(config_file, opts=()):
    """detectron2 + cityseg_d2 defaults, then `config_file`, then `KEY VALUE` overrides."""
    if not config_file:
        raise ConfigError("no config file given: pass --config-file, e.g. configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml")
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file not found: {config_file}")
    cfg = get_cityseg_cfg()
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, AssertionError, yaml.YAMLError) as e:
        raise ConfigError(f"{config_file}: {_first_line(e)}") from e
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"command-line override: {_first_line(e)}") from e
    return cfg


def _first_line(error):
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def check_config(cfg, resume=False):
    """Fail early, in one line, on what would otherwise crash deep inside training."""
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in DatasetCatalog.list():
                # Ours only: detectron2's builtin cityscapes_fine_* use its broken loader.
                ours = sorted(n for n in DatasetCatalog.list() if MetadataCatalog.get(n).get("class_set"))
                raise ConfigError(
                    f"DATASETS.{key}: dataset '{name}' is not registered; registered Cityscapes instance sets: "
                    f"{', '.join(ours)} (register others with cityseg_d2.data.register_cityscapes_instances)"
                )
    weights = cfg.MODEL.WEIGHTS
    resuming = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if weights and "://" not in weights and not resuming and not os.path.isfile(weights):
        raise ConfigError(f"MODEL.WEIGHTS file not found: {weights}")


def use_cpu_without_cuda(cfg):
    """Run on the CPU, with a warning, when the config asks for CUDA on a machine without it."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %s but no CUDA device is available: running on the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
        cfg.SOLVER.AMP.ENABLED = False


def setup(args):
    """Config from `args` (detectron2's default_argument_parser), datasets registered, output dir and logs set up."""
    cfg = load_config(args.config_file, args.opts)
    use_cpu_without_cuda(cfg)
    register_from_config(cfg)
    check_config(cfg, resume=getattr(args, "resume", False))
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
