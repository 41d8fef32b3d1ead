"""Evaluators: the official Cityscapes instance evaluation, a fast in-memory one with the same numbers, and COCO.

All report {"segm": {"AP", "AP50", ...}} in percent like detectron2's; the Cityscapes ones add per-class AP and
the seed project's metric, seed_AP50.
"""

from .build import EVALUATORS, build_evaluator
from .fast_cityscapes import FastCityscapesInstanceEvaluator
from .official_cityscapes import CityscapesInstanceEvaluator

__all__ = ["EVALUATORS", "build_evaluator", "CityscapesInstanceEvaluator", "FastCityscapesInstanceEvaluator"]
