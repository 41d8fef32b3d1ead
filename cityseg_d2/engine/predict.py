"""Run a trained model on image files: overlays, Cityscapes-format result files and a JSON per image."""
import glob
import json
import logging
import os

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import ColorMode, Visualizer
from tqdm import tqdm

from ..evaluation.protocol import ImagePredictions
from ..evaluation.official_cityscapes import write_prediction_files
from ..errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


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
    """MODEL.WEIGHTS, or the config's OUTPUT_DIR/model_final.pth when it is empty (a random model predicts noise)."""
    if cfg.MODEL.WEIGHTS:
        return cfg.MODEL.WEIGHTS
    trained = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if os.path.isfile(trained):
        return trained
    raise ConfigError(f"MODEL.WEIGHTS is empty and {trained} does not exist: pass --opts MODEL.WEIGHTS path/to/model.pth")


def _image_record(instances, metadata):
    label_ids = metadata.thing_label_ids
    masks = instances.pred_masks.numpy()
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))) if len(masks) else []
    return [
        {
            "label": metadata.thing_classes[c],
            "label_id": int(label_ids[c]),
            "score": round(float(s), 5),
            "bbox_xyxy": [round(float(v), 2) for v in box],
            "area": int(m.sum()),
            "mask_rle": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        }
        for c, s, box, m, rle in zip(
            instances.pred_classes.tolist(), instances.scores.tolist(), instances.pred_boxes.tensor.tolist(), masks, rles
        )
    ]


def predict_images(cfg, image_paths, output_dir, confidence_threshold=0.5):
    """Predict every image; write overlays/, cityscapes/ and json/ under output_dir. Returns the JSON records."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = resolve_weights(cfg)
    cfg.freeze()
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    predictor = DefaultPredictor(cfg)
    folders = {k: os.path.join(output_dir, k) for k in ("overlays", "cityscapes", "json")}
    for folder in (*folders.values(), os.path.join(folders["cityscapes"], "masks")):
        os.makedirs(folder, exist_ok=True)
    records = {}
    for path in tqdm(image_paths, desc="predict", unit="img"):
        image = read_image(path, format="BGR")
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= confidence_threshold]
        stem = os.path.splitext(os.path.basename(path))[0]
        visualizer = Visualizer(image[:, :, ::-1], metadata, instance_mode=ColorMode.SEGMENTATION)
        visualizer.draw_instance_predictions(instances).save(os.path.join(folders["overlays"], stem + ".png"))
        predictions = ImagePredictions(
            instances.pred_masks.numpy(), instances.scores.numpy().astype(np.float64), instances.pred_classes.numpy()
        )
        write_prediction_files(folders["cityscapes"], stem, predictions, metadata.thing_label_ids)
        records[path] = _image_record(instances, metadata)
        with open(os.path.join(folders["json"], stem + ".json"), "w") as f:
            json.dump({"file_name": path, "instances": records[path]}, f)
    logger.info("wrote predictions of %d images to %s", len(image_paths), output_dir)
    return records
