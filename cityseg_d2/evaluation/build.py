"""build_evaluator: the evaluators named in cfg.TEST.EVALUATORS."""

from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, DatasetEvaluators

from .fast_cityscapes import FastCityscapesInstanceEvaluator
from .official_cityscapes import CityscapesInstanceEvaluator

EVALUATORS = {
    "cityscapes": lambda dataset_name, output_dir: CityscapesInstanceEvaluator(dataset_name, output_dir),
    "cityscapes_fast": lambda dataset_name, output_dir: FastCityscapesInstanceEvaluator(dataset_name),
    # detectron2 converts our dataset dicts to a COCO json in output_dir; never reuse one of another subset.
    "coco": lambda dataset_name, output_dir: COCOEvaluator(
        dataset_name, tasks=("bbox", "segm"), output_dir=output_dir, allow_cached_coco=False
    ),
}


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
        return None if results is None else {f"{self._prefix}/{task}": v for task, v in results.items()}


def build_evaluator(cfg, dataset_name, output_dir=None):
    """The evaluator(s) of cfg.TEST.EVALUATORS for a dataset.

    One name gives that evaluator; several give a DatasetEvaluators in which the first keeps detectron2's
    result keys ("segm", "bbox", what CITYSEG.BEST_CHECKPOINT_METRIC names) and each other one's keys are
    prefixed with its name (e.g. "coco/segm"), since several of them report "segm".
    """
    names = list(cfg.TEST.EVALUATORS)
    unknown = [name for name in names if name not in EVALUATORS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"TEST.EVALUATORS = {names} is invalid: give one or more distinct names out of {sorted(EVALUATORS)}"
        )
    evaluators = [EVALUATORS[name](dataset_name, output_dir) for name in names]
    if len(evaluators) == 1:
        return evaluators[0]
    return DatasetEvaluators(
        [evaluators[0]] + [_PrefixedResults(name, e) for name, e in zip(names[1:], evaluators[1:])]
    )
