"""Cityscapes instance evaluation by cityscapesscripts' own evalInstanceLevelSemanticLabeling.

detectron2's CityscapesInstanceEvaluator is broken on upstream main, and the script's evaluateImgLists writes
matches.json into the working directory and fails on numpy-2 integers; so this evaluator writes the prediction
files the script reads and runs its steps itself (setInstanceLabels, getGtInstances, matchGtWithPreds,
evaluateMatches, computeAverages), restoring the module state it changes. evaluate_results_folder does the same
for a folder of result files, as the script's command line would (tools/cityscapes_evaluate.py).
"""

import fnmatch
import glob
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import warnings

import numpy as np
from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as script
from cityscapesscripts.helpers.labels import id2label
from detectron2.utils import comm
from PIL import Image

from ..errors import UserError
from .base import CityscapesEvaluatorBase, segm_results
from .matterport_metric import matterport_image_ap50
from .protocol import EvaluatedClasses

logger = logging.getLogger(__name__)

RESULTS_FILE = "cityscapes_instance_results.json"
PREDICTIONS_DIR = "cityscapes_instance_predictions"


def write_prediction_files(prediction_dir, image_id, predictions, label_ids):
    """The script's input for one image: `<image_id>.txt`, a line `masks/<png> <labelId> <score>` per instance.

    Scores are written with repr, so the script reads back exactly the float the fast evaluator uses.
    """
    lines = []
    for i, (mask, class_index, score) in enumerate(zip(predictions.masks, predictions.classes, predictions.scores)):
        mask_file = f"masks/{image_id}_{i}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(prediction_dir, mask_file))
        lines.append(f"{mask_file} {label_ids[class_index]} {float(score)!r}\n")
    text_file = os.path.join(prediction_dir, f"{image_id}.txt")
    with open(text_file, "w") as f:
        f.writelines(lines)
    return text_file


def _sentinel_image(label_names):
    """A match entry with one false positive of score -inf per class and no ground truth.

    evaluateMatches raises an IndexError when a class has ground truth and predictions but every prediction is
    ignored at some IoU threshold (no examples to rank). This entry gives every curve one more point below all
    real scores, at the curve's highest recall, whose step width is 0: the APs are unchanged, and that case
    becomes AP 0.
    """
    prediction = {"confidence": -math.inf, "pixelCount": 1, "voidIntersection": 0, "matchedGt": []}
    return {
        "groundTruth": {name: [] for name in label_names},
        "prediction": {name: [dict(prediction)] for name in label_names},
    }


def run_official_evaluation(gt_files, prediction_files, prediction_dir, classes, print_table=False):
    """evalInstanceLevelSemanticLabeling's result dict (the JSON the script exports) for these files.

    Evaluates the labels of `classes` (EvaluatedClasses); the ignoreInEval labels other than those are void, so
    "cityscapes10" evaluates caravan and trailer instead of treating them as void. Masks must lie under
    prediction_dir, as the script requires. The script's ground-truth cache (gtInstances.json) is made afresh
    in a temporary folder; with print_table, the script's own printResults prints its table. The module's
    `args` and `labels` are restored afterwards.
    """
    args = script.args
    saved_args, saved_labels = dict(vars(args)), script.labels
    try:
        with tempfile.TemporaryDirectory(prefix="cityseg_gt_instances_") as gt_instances_dir:
            script.labels = [
                label._replace(ignoreInEval=False) if label.id in classes.label_ids else label for label in saved_labels
            ]
            args.predictionPath = os.path.abspath(prediction_dir)
            args.predictionWalk = None
            args.gtInstancesFile = os.path.join(gt_instances_dir, "gtInstances.json")
            args.distanceAvailable = False
            args.JSONOutput = False
            args.quiet = True
            script.setInstanceLabels(args)
            evaluated = {id2label[label_id].name for label_id in classes.label_ids}
            args.instLabels = [name for name in args.instLabels if name in evaluated]
            gt_instances = script.getGtInstances(list(gt_files), args)
            matches = script.matchGtWithPreds(list(prediction_files), list(gt_files), gt_instances, args)
        matches["<sentinel>"] = _sentinel_image(args.instLabels)
        aps = script.evaluateMatches(matches, args)
        with warnings.catch_warnings():  # nanmean of classes absent from the ground truth
            warnings.simplefilter("ignore", RuntimeWarning)
            averages = script.computeAverages(aps, args)
        if print_table:
            script.printResults(averages, args)
        return script.prepareJSONDataForResults(averages, aps, args)
    finally:
        script.labels = saved_labels
        vars(args).clear()
        vars(args).update(saved_args)


def script_folders():
    """(Cityscapes root, results root) where evalInstanceLevelSemanticLabeling looks: $CITYSCAPES_DATASET (else
    two folders above the script), and $CITYSCAPES_RESULTS, else <Cityscapes root>/results."""
    default_root = os.path.join(os.path.dirname(os.path.realpath(script.__file__)), "..", "..")
    dataset_root = os.environ.get("CITYSCAPES_DATASET", default_root)
    return dataset_root, os.environ.get("CITYSCAPES_RESULTS", os.path.join(dataset_root, "results"))


def find_result_files(gt_files, results_root):
    """The result text file of each ground-truth file, found as the script's getPrediction does: the one file
    `<city>_<sequence>_<frame>*.txt` anywhere under results_root. UserError when there is none or several."""
    if not os.path.isdir(results_root):
        raise UserError(
            f"results folder {results_root} not found: set CITYSCAPES_RESULTS (or put the results in "
            "$CITYSCAPES_DATASET/results)"
        )
    text_files = [(root, [f for f in files if f.endswith(".txt")]) for root, _, files in os.walk(results_root)]
    found = []
    for gt_file in gt_files:
        pattern = script.getCoreImageFileName(gt_file) + "*.txt"
        matches = [os.path.join(root, f) for root, files in text_files for f in fnmatch.filter(files, pattern)]
        if len(matches) != 1:
            problem = "no prediction" if not matches else f"{len(matches)} predictions ({matches[0]}, ...)"
            raise UserError(f"found {problem} in {results_root} for the ground truth {gt_file}")
        found.append(matches[0])
    return found


def evaluate_results_folder():
    """csEvalInstanceLevelSemanticLabeling run without arguments, with our dependencies: every val image's
    instanceIds under $CITYSCAPES_DATASET against its result file under $CITYSCAPES_RESULTS, the script's table
    printed and its result JSON written to <Cityscapes root>/evaluationResults/resultInstanceLevelSemanticLabeling.json.
    Returns (result dict, JSON path)."""
    dataset_root, results_root = script_folders()
    search = os.path.join(dataset_root, "gtFine", "val", "*", "*_gtFine_instanceIds.png")
    gt_files = sorted(glob.glob(search))
    if not gt_files:
        raise UserError(f"no ground-truth images found as {search}: set CITYSCAPES_DATASET to the Cityscapes root")
    prediction_files = find_result_files(gt_files, results_root)
    result = run_official_evaluation(
        gt_files, prediction_files, results_root, EvaluatedClasses.official(), print_table=True
    )
    export_file = os.path.join(dataset_root, "evaluationResults", "resultInstanceLevelSemanticLabeling.json")
    os.makedirs(os.path.dirname(export_file), exist_ok=True)
    script.writeDict2JSON(result, export_file)
    return result, export_file


class CityscapesInstanceEvaluator(CityscapesEvaluatorBase):
    """Cityscapes instance AP by the official cityscapesscripts code; a detectron2 evaluator.

    Each process writes its images' prediction files into one shared folder (output_dir/
    cityscapes_instance_predictions, or a temporary folder removed after evaluate when output_dir is None); the
    main process evaluates the dataset's images (those processed, so a registered subset is evaluated as such)
    and, with an output_dir, saves the script's result JSON there. Returns {"segm": {"AP", "AP50",
    "AP-<class>", "AP50-<class>", "matterport_AP50"}} in percent. Single machine only (the folder is shared on disk).
    """

    def __init__(self, dataset_name, output_dir=None, cache_ground_truth=True):
        super().__init__(dataset_name, output_dir, cache_ground_truth)
        self._temp_dir = None

    def reset(self):
        self._files = []  # (ground-truth file, prediction text file) per image
        self._matterport_aps = []
        self._num_predictions = 0
        prediction_dir = None
        if comm.is_main_process():
            if self._output_dir:
                prediction_dir = os.path.join(self._output_dir, PREDICTIONS_DIR)
                shutil.rmtree(prediction_dir, ignore_errors=True)
            else:
                self._temp_dir = tempfile.TemporaryDirectory(prefix="cityseg_cityscapes_eval_")
                prediction_dir = self._temp_dir.name
            os.makedirs(os.path.join(prediction_dir, "masks"), exist_ok=True)
        # Also a barrier: no process writes before the main one has prepared the folder.
        self._prediction_dir = comm.all_gather(prediction_dir)[0]

    def process(self, inputs, outputs):
        label_ids = self._classes.label_ids
        for image, gt_file, predictions, overlaps in self._images(inputs, outputs):
            text_file = write_prediction_files(self._prediction_dir, image["image_id"], predictions, label_ids)
            self._files.append((gt_file, text_file))
            self._matterport_aps.append(matterport_image_ap50(overlaps, predictions, self._classes))
            self._num_predictions += len(predictions.scores)

    def evaluate(self):
        comm.synchronize()
        files = list(itertools.chain(*comm.gather(self._files, dst=0)))
        matterport_aps = [ap for ap in itertools.chain(*comm.gather(self._matterport_aps, dst=0)) if ap is not None]
        num_predictions = sum(comm.gather(self._num_predictions, dst=0))
        if not comm.is_main_process():
            return {}
        try:
            self._warn_if_empty(len(files), num_predictions)
            if not files:
                return {}
            logger.info(f"Evaluating {len(files)} images with cityscapesscripts in {self._prediction_dir} ...")
            result = run_official_evaluation(*zip(*files), self._prediction_dir, self._classes)
            if self._output_dir:
                with open(os.path.join(self._output_dir, RESULTS_FILE), "w") as f:
                    json.dump(result, f, indent=2)
        finally:
            if self._temp_dir is not None:
                self._temp_dir.cleanup()
                self._temp_dir = None
        averages = result["averages"]
        by_label = [averages["classes"][id2label[label_id].name] for label_id in self._classes.label_ids]
        return segm_results(
            class_aps=[c["ap"] for c in by_label],
            class_ap50s=[c["ap50%"] for c in by_label],
            mean_ap=averages["allAp"],
            mean_ap50=averages["allAp50%"],
            matterport_aps=matterport_aps,
            classes=self._classes,
            title=f"Cityscapes instance AP (cityscapesscripts) on {self._dataset_name}",
        )
