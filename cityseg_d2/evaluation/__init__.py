"""Evaluators: the official Cityscapes instance evaluation, a fast in-memory one with the same numbers, and COCO.

All report {"segm": {"AP", "AP50", ...}} in percent like detectron2's; the Cityscapes ones add per-class AP and
the student project's metric, matterport_AP50.
"""

from .build import EVALUATORS, build_evaluator, check_evaluator_names, reported_metrics
from .fast_cityscapes import FastCityscapesInstanceEvaluator
from .official_cityscapes import CityscapesInstanceEvaluator

__all__ = [
    "EVALUATORS",
    "CityscapesInstanceEvaluator",
    "FastCityscapesInstanceEvaluator",
    "build_evaluator",
    "check_evaluator_names",
    "reported_metrics",
]
