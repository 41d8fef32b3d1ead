"""Cityscapes datasets for detectron2: loader, registration, cache, synthetic generator, explorer and the fast
training data path."""
from ..errors import CityscapesDataError
from .cityscapes import MASK_SOURCES, load_cityscapes_instances
from .classes import CLASS_SETS
from .fast_loader import DevicePrefetcher, PolygonEdgesMapper, build_fast_train_loader, pack_polygon_edges
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
    "DevicePrefetcher",
    "MASK_SOURCES",
    "PolygonEdgesMapper",
    "build_fast_train_loader",
    "default_cityscapes_root",
    "default_synthetic_root",
    "gt_instance_ids_path",
    "load_cityscapes_instances",
    "pack_polygon_edges",
    "register_builtin_datasets",
    "register_cityscapes_instances",
    "register_from_config",
]
