"""Cityscapes instance segmentation for Detectron2: datasets, evaluators, trainer and integrations."""

__version__ = "0.1.0"
