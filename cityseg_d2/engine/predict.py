"""Run a trained model on image files: Cityscapes-format result files, a JSON per image, and overlays.

Result files and JSON keep every detection the model returns (what the official evaluation scores); the
confidence threshold is for the overlays only. Files are written by a background thread while the next image
is predicted, and overlays are drawn with OpenCV (the look of detectron2's Visualizer in its segmentation mode,
without its matplotlib cost), so pictures never hold back the files a user asked for.
"""
import glob
import json
import logging
import os
import queue
import threading
from dataclasses import dataclass, field

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data.detection_utils import read_image
from tqdm import tqdm

from ..errors import ConfigError, first_line
from ..evaluation.official_cityscapes import write_prediction_files
from ..evaluation.protocol import ImagePredictions
from ..modeling import build_batched_predictor, build_fast_model
from .checkpoint import SafeCheckpointer, eval_only_fit_error, weights_fit

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OUTPUT_FOLDERS = ("cityscapes", "json", "overlays")
_OVERLAY_ALPHA = 0.5


def find_images(spec):
    """The images named by `spec`: a file, a folder (searched recursively) or a glob pattern; sorted."""
    if os.path.isdir(spec):
        paths = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files]
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        paths = glob.glob(spec, recursive=True)
    paths = sorted(p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ConfigError(f"--input {spec}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found there")
    return paths


def resolve_weights(cfg):
    """MODEL.WEIGHTS, or the config's OUTPUT_DIR/model_final.pth when it is empty (a random model predicts noise),
    checked to be readable, no refused pickle, and a checkpoint of this model whole (like --eval-only's)."""
    weights = cfg.MODEL.WEIGHTS or os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if not cfg.MODEL.WEIGHTS and not os.path.isfile(weights):
        raise ConfigError(
            f"MODEL.WEIGHTS is empty and {weights} does not exist: pass --opts MODEL.WEIGHTS path/to/model.pth"
        )
    if "://" not in weights:
        refusal = eval_only_fit_error(weights, weights_fit(cfg, weights))
        if refusal:
            raise ConfigError(str(refusal).replace("--eval-only: ", "MODEL.WEIGHTS ", 1))
    return weights


def output_folders(output_dir, overlays=True):
    """The output folders (not created yet); a ConfigError when output_dir or one of them is a file."""
    folders = {name: os.path.join(output_dir, name) for name in OUTPUT_FOLDERS if overlays or name != "overlays"}
    for path in (output_dir, *folders.values()):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"--output {output_dir}: {path} is a file; give a folder (it is created if missing)")
    return folders


def read_image_file(path):
    """(BGR uint8 image, None), or (None, why) when it cannot be decoded (not an image, truncated, unreadable)."""
    try:
        return read_image(path, format="BGR"), None
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises on a file that is no (whole) image
        return None, first_line(e)


def draw_overlay(image, instances, metadata):
    """BGR image with each instance's mask filled in its class colour (half transparent), outlined, boxed and labelled
    with class and score, higher scores on top."""
    canvas = image.copy()
    colours = metadata.get("thing_colors") or [(255, 0, 0)] * len(metadata.thing_classes)
    order = np.argsort(instances.scores.numpy(), kind="stable")
    masks = instances.pred_masks.numpy()
    for i in order:
        colour = tuple(int(c) for c in colours[int(instances.pred_classes[i])][::-1])  # RGB -> BGR
        mask = masks[i]
        canvas[mask] = (canvas[mask] * (1 - _OVERLAY_ALPHA) + np.array(colour) * _OVERLAY_ALPHA).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, colour, 1, cv2.LINE_AA)
    for i in order:
        colour = tuple(int(c) for c in colours[int(instances.pred_classes[i])][::-1])
        x0, y0, x1, y1 = (int(round(v)) for v in instances.pred_boxes.tensor[i].tolist())
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, 1, cv2.LINE_AA)
        label = f"{metadata.thing_classes[int(instances.pred_classes[i])]} {100 * float(instances.scores[i]):.0f}%"
        (width, height), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        top = max(y0 - height - baseline, 0)
        cv2.rectangle(canvas, (x0, top), (x0 + width, top + height + baseline), (0, 0, 0), -1)
        cv2.putText(canvas, label, (x0, top + height), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def _json_record(path, instances, metadata):
    label_ids = metadata.thing_label_ids
    masks = instances.pred_masks.numpy()
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))) if len(masks) else []
    return {
        "file_name": path,
        "instances": [
            {
                "label": metadata.thing_classes[c],
                "label_id": int(label_ids[c]),
                "score": round(float(s), 5),
                "bbox_xyxy": [round(float(v), 2) for v in box],
                "area": int(m.sum()),
                "mask_rle": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            }
            for c, s, box, m, rle in zip(
                instances.pred_classes.tolist(),
                instances.scores.tolist(),
                instances.pred_boxes.tensor.tolist(),
                masks,
                rles,
            )
        ],
    }


@dataclass
class PredictionSummary:
    """What predict_images did: the images it wrote files for and the ones it skipped, with the reason."""

    written: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # path -> reason


class _BackgroundWriter:
    """Writes each image's files in one background thread (PNG encoding and OpenCV drawing release the GIL), a few
    images behind the predictor; close() waits for the last one and re-raises the first error."""

    def __init__(self, write, depth=4):
        self._write = write
        self._queue = queue.Queue(maxsize=depth)
        self._error = None
        self._thread = threading.Thread(target=self._run, name="prediction-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*job)
                except BaseException as e:  # handed to the main thread by close()
                    self._error = e

    def put(self, *job):
        if self._error is not None:
            raise self._error
        self._queue.put(job)

    def close(self):
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def build_predictor(cfg):
    """The batched predictor (cityseg_d2.modeling.BatchedPredictor: CITYSEG.FAST.TEST_BATCH_SIZE images a pass, the
    config's fast components and precision) with MODEL.WEIGHTS, or OUTPUT_DIR/model_final.pth, loaded safely."""
    weights = resolve_weights(cfg)
    model = build_fast_model(cfg)
    SafeCheckpointer(model, trust_pickle=cfg.CITYSEG.TRUST_PICKLE_WEIGHTS).load(weights)
    return build_batched_predictor(cfg, model)


def _batches(paths, size):
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def predict_images(predictor, metadata, image_paths, output_dir, confidence_threshold=0.5, overlays=True):
    """Predict every image and write cityscapes/ (result files), json/ and, with `overlays`, overlays/ (detections
    scoring at least confidence_threshold) under output_dir. `predictor` maps a list of BGR images to their outputs
    (build_predictor's, or an exported model's cityseg_d2.export.ExportedPredictor); `metadata` names the classes
    (thing_classes, thing_label_ids, thing_colors: the test set's MetadataCatalog entry, or the exported model's).
    An image that cannot be read is skipped with a warning naming it. Returns a PredictionSummary."""
    folders = output_folders(output_dir, overlays)
    summary = PredictionSummary()

    def write(path, image, instances):
        for folder in (*folders.values(), os.path.join(folders["cityscapes"], "masks")):  # made with the first file
            os.makedirs(folder, exist_ok=True)
        stem = os.path.splitext(os.path.basename(path))[0]
        predictions = ImagePredictions(
            instances.pred_masks.numpy(), instances.scores.numpy().astype(np.float64), instances.pred_classes.numpy()
        )
        write_prediction_files(folders["cityscapes"], stem, predictions, metadata.thing_label_ids)
        with open(os.path.join(folders["json"], stem + ".json"), "w") as f:
            json.dump(_json_record(path, instances, metadata), f)
        if overlays:
            shown = instances[instances.scores >= confidence_threshold]
            cv2.imwrite(os.path.join(folders["overlays"], stem + ".png"), draw_overlay(image, shown, metadata))

    writer = _BackgroundWriter(write)
    progress = tqdm(total=len(image_paths), desc="predict", unit="img")
    try:
        for batch in _batches(image_paths, getattr(predictor, "batch_size", 1)):
            images = {}
            for path in batch:
                image, problem = read_image_file(path)
                if image is None:
                    summary.skipped[path] = problem
                    logger.warning("skipped %s: not a readable image (%s)", path, problem)
                else:
                    images[path] = image
            outputs = predictor(list(images.values())) if images else []
            for (path, image), output in zip(images.items(), outputs):
                summary.written.append(path)
                writer.put(path, image, output["instances"].to("cpu"))
            progress.update(len(batch))
    finally:
        progress.close()
        writer.close()
    logger.info("wrote predictions of %d images to %s", len(summary.written), output_dir)
    return summary
