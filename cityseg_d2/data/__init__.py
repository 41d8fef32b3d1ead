"""Cityscapes datasets for detectron2: loader, registration, cache, synthetic generator and explorer."""
from ..errors import CityscapesDataError
from .cityscapes import MASK_SOURCES, load_cityscapes_instances
from .classes import CLASS_SETS
from .register import (
    default_cityscapes_root,
    default_synthetic_root,
    gt_instance_ids_path,
    register_builtin_datasets,
    register_cityscapes_instances,
    register_from_config,
)

register_builtin_datasets()

__all__ = [
    "CLASS_SETS",
    "CityscapesDataError",
    "MASK_SOURCES",
    "default_cityscapes_root",
    "default_synthetic_root",
    "gt_instance_ids_path",
    "load_cityscapes_instances",
    "register_builtin_datasets",
    "register_cityscapes_instances",
    "register_from_config",
]
