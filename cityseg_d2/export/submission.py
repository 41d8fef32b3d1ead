"""A Cityscapes benchmark submission: the instance-level result files of a split, packed in a zip.

The format is the one cityscapesscripts' evalInstanceLevelSemanticLabeling reads (its header says the server
reads what its getPrediction finds): per image, a text file whose name starts with the image's
`<city>_<sequence>_<frame>` and holds a line `<mask png> <label id> <confidence>` per instance, the mask path
relative to the text file, the PNG of the image's size and nonzero inside the instance. Here: `<image id>.txt` at
the top of the zip and the masks in `masks/`, written by the evaluators' own write_prediction_files. Every
detection the model returns is kept (no display threshold).
"""

import contextlib
import io
import logging
import os
import tempfile
import zipfile

import numpy as np
from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as script
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset

from ..data import gt_instance_ids_path
from ..errors import SubmissionError
from ..evaluation.official_cityscapes import run_official_evaluation, write_prediction_files
from ..evaluation.protocol import EvaluatedClasses, ImagePredictions
from .exporter import read_split

logger = logging.getLogger(__name__)


class ResultFileWriter(DatasetEvaluator):
    """Writes each image's Cityscapes result files (text file and mask PNGs) into `folder` during inference."""

    def __init__(self, folder, label_ids):
        self._folder = folder
        self._label_ids = label_ids
        os.makedirs(os.path.join(folder, "masks"), exist_ok=True)

    def reset(self):
        self.num_images = 0
        self.num_instances = 0

    def process(self, inputs, outputs):
        for record, output in zip(inputs, outputs):
            instances = output["instances"].to("cpu")
            predictions = ImagePredictions(
                instances.pred_masks.numpy().astype(bool),
                instances.scores.numpy().astype(np.float64),
                instances.pred_classes.numpy().astype(np.int64),
            )
            write_prediction_files(self._folder, record["image_id"], predictions, self._label_ids)
            self.num_images += 1
            self.num_instances += len(instances)

    def evaluate(self):
        return {}


def check_output(output, overwrite=False):
    """Refuse an `output` that is no .zip name, is a folder, or exists (unless overwrite)."""
    if not output.endswith(".zip"):
        raise SubmissionError(f"--output {output}: name a .zip file")
    if os.path.isdir(output):
        raise SubmissionError(f"--output {output} is a folder: name a .zip file")
    if os.path.exists(output) and not overwrite:
        raise SubmissionError(f"--output {output} exists: pass --overwrite to replace it, or choose another name")


def _pack(folder, output):
    """Zip the result files of `folder` into `output` atomically (a temporary file renamed when complete)."""
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=".submission-", suffix=".zip", dir=directory)
    os.close(handle)
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for root, _, files in os.walk(folder):
                for name in sorted(files):
                    path = os.path.join(root, name)
                    # PNGs are compressed already; deflating them again costs time for nothing.
                    compression = zipfile.ZIP_STORED if name.endswith(".png") else zipfile.ZIP_DEFLATED
                    archive.write(path, os.path.relpath(path, folder), compress_type=compression)
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def write_submission(cfg, model, dataset_name, output):
    """Predict every image of `dataset_name` with `model` and pack the result files into the zip `output`.

    Returns (number of images, number of instances)."""
    read_split(dataset_name, hint=": nothing to submit")
    label_ids = MetadataCatalog.get(dataset_name).thing_label_ids
    with tempfile.TemporaryDirectory(prefix="cityseg_submission_") as folder:
        writer = ResultFileWriter(folder, label_ids)
        inference_on_dataset(model, build_detection_test_loader(cfg, dataset_name), writer)
        _pack(folder, output)
    logger.info(f"wrote {output}: {writer.num_images} images, {writer.num_instances} instances")
    return writer.num_images, writer.num_instances


def _find_prediction(gt_file, folder):
    """The text file cityscapesscripts' getPrediction picks for a ground-truth file (it exits when there is none)."""
    search = script.CArgs()
    search.predictionPath, search.predictionWalk = folder, None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its printError line; ours says the same
            return script.getPrediction(gt_file, search)
    except SystemExit as e:
        raise SubmissionError(f"cityscapesscripts finds no single result file for {os.path.basename(gt_file)}") from e


def ground_truth_files(dataset_name):
    """The instanceIds PNG of every image of the split; a one-line error when one is missing (the test split)."""
    metadata = MetadataCatalog.get(dataset_name)
    gt_files = [gt_instance_ids_path(record, metadata) for record in read_split(dataset_name)]
    missing = [path for path in gt_files if not os.path.isfile(path)]
    if missing:
        raise SubmissionError(f"--dataset {dataset_name} has no ground truth to evaluate with, e.g. {missing[0]}")
    return gt_files


def evaluate_submission(zip_path, dataset_name, print_table=False):
    """cityscapesscripts' evaluation (its result dict) of a submission zip against `dataset_name`'s ground truth.

    The zip is extracted into a temporary folder; each image's result file is found as the script finds it. With
    print_table, the script prints its table of results."""
    gt_files = ground_truth_files(dataset_name)
    with tempfile.TemporaryDirectory(prefix="cityseg_submission_eval_") as folder:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(folder)
        prediction_files = [_find_prediction(gt_file, folder) for gt_file in gt_files]
        classes = EvaluatedClasses.of_dataset(dataset_name)
        return run_official_evaluation(gt_files, prediction_files, folder, classes, print_table=print_table)
