"""Cityscapes instance segmentation for Detectron2: datasets, evaluators, trainer and integrations."""

__version__ = "0.1.0"

from . import data  # noqa: E402,F401  registers the builtin Cityscapes datasets
