"""The evaluators TEST.EVALUATORS can name, what each reports, and build_evaluator.

What an evaluator reports is declared here, next to how it is built, so that whatever reads a metric by name
(the best checkpoint, a sweep's metric) is checked against this one list before training starts.
"""

from dataclasses import dataclass
from typing import Callable

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, DatasetEvaluators

from .fast_cityscapes import FastCityscapesInstanceEvaluator
from .official_cityscapes import CityscapesInstanceEvaluator

CITYSCAPES_METRICS = ("AP", "AP50", "matterport_AP50")
CITYSCAPES_CLASS_METRICS = ("AP", "AP50")
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COCO_CLASS_METRICS = ("AP",)


@dataclass(frozen=True)
class EvaluatorSpec:
    """How to build one evaluator (from the config, a dataset name and an output folder) and the results it
    reports: {task: {metric: value}}, with `metrics` for the whole set and `class_metrics` as "<metric>-<class>"."""

    build: Callable[[object, str, str], DatasetEvaluator]
    tasks: tuple
    metrics: tuple
    class_metrics: tuple


EVALUATORS = {
    "cityscapes": EvaluatorSpec(
        lambda cfg, dataset_name, output_dir: CityscapesInstanceEvaluator(
            dataset_name, output_dir, cache_ground_truth=cfg.TEST.CITYSCAPES.CACHE_GROUND_TRUTH
        ),
        ("segm",),
        CITYSCAPES_METRICS,
        CITYSCAPES_CLASS_METRICS,
    ),
    "cityscapes_fast": EvaluatorSpec(
        lambda cfg, dataset_name, output_dir: FastCityscapesInstanceEvaluator(
            dataset_name,
            output_dir,
            cache_ground_truth=cfg.TEST.CITYSCAPES.CACHE_GROUND_TRUTH,
            save_predictions=cfg.TEST.CITYSCAPES.SAVE_PREDICTIONS,
        ),
        ("segm",),
        CITYSCAPES_METRICS,
        CITYSCAPES_CLASS_METRICS,
    ),
    # detectron2 converts our dataset dicts to a COCO json in output_dir; never reuse one of another subset.
    "coco": EvaluatorSpec(
        lambda cfg, dataset_name, output_dir: COCOEvaluator(
            dataset_name, tasks=("bbox", "segm"), output_dir=output_dir, allow_cached_coco=False
        ),
        ("bbox", "segm"),
        COCO_METRICS,
        COCO_CLASS_METRICS,
    ),
}


def check_evaluator_names(names):
    """ValueError unless `names` is a non-empty list of distinct registered evaluator names."""
    names = list(names)
    unknown = [name for name in names if name not in EVALUATORS]
    if not names or unknown or len(set(names)) != len(names):
        problem = f"unknown {unknown}" if unknown else ("empty" if not names else "a name appears twice")
        raise ValueError(
            f"TEST.EVALUATORS {names}: {problem}; give one or more distinct names out of {sorted(EVALUATORS)}"
        )
    return names


def result_prefix(position, name):
    """The prefix of the results of the evaluator at `position` in TEST.EVALUATORS: none for the first, which keeps
    detectron2's keys ("segm/AP"), "<name>/" for the others ("coco/segm/AP"), since several report "segm"."""
    return "" if position == 0 else f"{name}/"


def reported_metrics(cfg):
    """Every result key periodic evaluation stores for cfg, as EvalHook flattens them ("segm/AP", "segm/AP-car",
    "coco/bbox/AP75"; "<dataset>/segm/AP" when DATASETS.TEST has several data sets). What BestCheckpointer and a
    sweep's metric may name."""
    keys = []
    for position, name in enumerate(check_evaluator_names(cfg.TEST.EVALUATORS)):
        spec = EVALUATORS[name]
        for dataset in cfg.DATASETS.TEST:
            classes = MetadataCatalog.get(dataset).get("thing_classes", [])
            dataset_prefix = f"{dataset}/" if len(cfg.DATASETS.TEST) > 1 else ""
            for task in spec.tasks:
                prefix = f"{dataset_prefix}{result_prefix(position, name)}{task}/"
                keys += [prefix + metric for metric in spec.metrics]
                keys += [f"{prefix}{metric}-{c}" for metric in spec.class_metrics for c in classes]
    return list(dict.fromkeys(keys))


class _PrefixedResults(DatasetEvaluator):
    """Another evaluator whose result keys get a prefix, so that two evaluators' "segm" can coexist."""

    def __init__(self, prefix, evaluator):
        self._prefix = prefix
        self._evaluator = evaluator

    def reset(self):
        self._evaluator.reset()

    def process(self, inputs, outputs):
        self._evaluator.process(inputs, outputs)

    def evaluate(self):
        results = self._evaluator.evaluate()
        return None if results is None else {f"{self._prefix}{task}": v for task, v in results.items()}


def build_evaluator(cfg, dataset_name, output_dir=None):
    """The evaluator(s) of cfg.TEST.EVALUATORS for a dataset: one evaluator, or a DatasetEvaluators whose results
    are keyed as result_prefix says."""
    names = check_evaluator_names(cfg.TEST.EVALUATORS)
    evaluators = []
    for position, name in enumerate(names):
        evaluator = EVALUATORS[name].build(cfg, dataset_name, output_dir)
        prefix = result_prefix(position, name)
        evaluators.append(_PrefixedResults(prefix, evaluator) if prefix else evaluator)
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
