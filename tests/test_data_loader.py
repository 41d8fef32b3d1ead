"""The Cityscapes loader and its registration, checked against the official instanceIds.png files."""
import json
import os
from collections import Counter

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from cityscapesscripts.helpers.labels import name2label
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image, ImageDraw

import cityseg_d2  # noqa: F401  registers the builtin datasets
from cityseg_d2.config import get_cityseg_cfg
from cityseg_d2.data import (
    CityscapesDataError,
    default_cityscapes_root,
    default_synthetic_root,
    gt_instance_ids_path,
    register_cityscapes_instances,
    register_from_config,
)
from cityseg_d2.data.cityscapes import list_split_files, parse_images
from cityseg_d2.data.classes import resolve_label
from cityseg_d2.data.synthetic import make_synthetic_cityscapes

CITYSCAPES10 = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "caravan", "trailer"]


def _mask(segmentation, height, width):
    if isinstance(segmentation, dict):
        return mask_util.decode(segmentation).astype(bool)
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(segmentation, height, width))).astype(bool)


def _instance_ids(dataset_dict, name):
    return cv2.imread(gt_instance_ids_path(dataset_dict, MetadataCatalog.get(name)), cv2.IMREAD_UNCHANGED)


def test_builtin_datasets_are_registered_with_their_metadata():
    for split in ["train", "val", "test"]:
        for name in [f"cityscapes_instance_{split}", f"cityscapes_synthetic_instance_{split}"]:
            assert name in DatasetCatalog.list()
            meta = MetadataCatalog.get(name)
            assert meta.thing_classes == CITYSCAPES10[:8]
            assert meta.thing_label_ids == [24, 25, 26, 27, 28, 31, 32, 33]
            assert meta.thing_colors[2] == name2label["car"].color
            assert meta.image_dir.endswith(f"leftImg8bit/{split}") and meta.gt_dir.endswith(f"gtFine/{split}")


def test_default_roots_follow_the_environment(monkeypatch):
    monkeypatch.delenv("CITYSCAPES_DATASET", raising=False)
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert default_cityscapes_root() == os.path.join("datasets", "cityscapes")
    assert default_synthetic_root() == os.path.join("datasets", "cityscapes_synthetic")
    monkeypatch.setenv("DETECTRON2_DATASETS", "/d2")
    assert (default_cityscapes_root(), default_synthetic_root()) == ("/d2/cityscapes", "/d2/cityscapes_synthetic")
    monkeypatch.setenv("CITYSCAPES_DATASET", "/cs")
    assert (default_cityscapes_root(), default_synthetic_root()) == ("/cs", "/d2/cityscapes_synthetic")


def test_registration_is_lazy_and_a_missing_root_names_layout_and_variables(tmp_path):
    root = tmp_path / "nowhere"
    register_cityscapes_instances("cs_test_missing", str(root), "val")  # no file access yet
    with pytest.raises(CityscapesDataError) as error:
        DatasetCatalog.get("cs_test_missing")
    message = str(error.value)
    assert "\n" not in message and str(root) in message
    assert "leftImg8bit/val/<city>" in message and "$CITYSCAPES_DATASET" in message and "$DETECTRON2_DATASETS" in message


def test_dicts_have_detectron2_fields_and_the_mapper_accepts_them(register_synthetic):
    name = register_synthetic("cs_test_fields", "train", class_set="cityscapes10")
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == sorted(d["image_id"] for d in dicts)
    assert dicts[0]["image_id"] == "aachen_000000_000019"
    assert sum(len(d["annotations"]) for d in dicts) > 0
    for d in dicts:
        assert (d["height"], d["width"]) == (256, 512)
        assert d["file_name"].endswith(d["image_id"] + "_leftImg8bit.png")
        for a in d["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            assert a["bbox_mode"] == BoxMode.XYXY_ABS and 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 256
            assert 0 <= a["category_id"] < 10 and a["iscrowd"] in (0, 1)
            assert all(len(polygon) >= 6 and len(polygon) % 2 == 0 for polygon in a["segmentation"])
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (256,)
    mapped = DatasetMapper(cfg, is_train=True)(dicts[0])
    assert len(mapped["instances"]) == sum(1 - a["iscrowd"] for a in dicts[0]["annotations"])


@pytest.mark.parametrize("mask_source", ["polygons", "instance_ids"])
def test_instance_counts_per_class_equal_those_in_instance_ids_png(register_synthetic, mask_source):
    name = register_synthetic(f"cs_test_counts_{mask_source}", "train", class_set="cityscapes10", mask_source=mask_source)
    label_ids = MetadataCatalog.get(name).thing_label_ids
    total = 0
    for d in DatasetCatalog.get(name):
        ids = np.unique(_instance_ids(d, name))
        expected = Counter(label_ids.index(i // 1000) for i in ids if i >= 1000 and i // 1000 in label_ids)
        loaded = Counter(a["category_id"] for a in d["annotations"] if not a["iscrowd"])
        assert loaded == expected, d["image_id"]
        # All crowds of a class share one value in instanceIds.png.
        crowd_classes = {label_ids.index(i) for i in ids if i in label_ids}
        assert {a["category_id"] for a in d["annotations"] if a["iscrowd"]} == crowd_classes, d["image_id"]
        total += sum(expected.values())
    assert total >= 20


def test_polygon_masks_agree_with_instance_ids_for_every_unoccluded_instance(register_synthetic):
    name = register_synthetic("cs_test_iou", "train", class_set="cityscapes10")
    label_ids = MetadataCatalog.get(name).thing_label_ids
    checked = 0
    for d in DatasetCatalog.get(name):
        gt = _instance_ids(d, name)
        json_file = gt_instance_ids_path(d, MetadataCatalog.get(name)).replace("instanceIds.png", "polygons.json")
        seen = Counter()
        for obj in json.load(open(json_file))["objects"]:
            label, is_crowd = resolve_label(obj["label"])
            if not label.hasInstances or is_crowd:
                continue
            instance_id = label.id * 1000 + seen[label.id]  # json2instanceImg's numbering
            seen[label.id] += 1
            alone = Image.new("L", (d["width"], d["height"]))
            ImageDraw.Draw(alone).polygon([tuple(p) for p in obj["polygon"]], fill=1)
            visible = gt == instance_id
            if visible.sum() != np.count_nonzero(alone):
                continue  # occluded
            candidates = [a for a in d["annotations"] if a["category_id"] == label_ids.index(label.id)]
            masks = [_mask(a["segmentation"], d["height"], d["width"]) for a in candidates]
            best = max((m & visible).sum() / (m | visible).sum() for m in masks)
            assert best >= 0.9, (d["image_id"], instance_id, best)
            checked += 1
    assert checked >= 10


def test_occluded_instances_keep_only_their_visible_part(register_synthetic):
    polygons = DatasetCatalog.get(register_synthetic("cs_test_occl_poly", "train"))
    exact = DatasetCatalog.get(register_synthetic("cs_test_occl_ids", "train", mask_source="instance_ids"))
    for p, e in zip(polygons, exact):
        masks = [_mask(a["segmentation"], p["height"], p["width"]) for a in p["annotations"] if not a["iscrowd"]]
        # Visible parts do not overlap (up to the border pixels the polygon approximation shares).
        if len(masks) > 1:
            assert np.sum(masks, axis=0).max() <= 2
            assert (np.sum(masks, axis=0) > 1).sum() < 0.02 * np.any(masks, axis=0).sum()
        exact_area = sum(mask_util.area(a["segmentation"]) for a in e["annotations"] if not a["iscrowd"])
        polygon_area = sum(m.sum() for m in masks)
        assert abs(int(polygon_area) - int(exact_area)) <= 0.06 * exact_area + 20, p["image_id"]


def test_subsets_are_deterministic(register_synthetic, tmp_path):
    def ids(name):
        return [d["image_id"] for d in DatasetCatalog.get(name)]

    first = ids(register_synthetic("cs_test_sub_a", "train", max_images=3, subset_seed=1))
    assert len(first) == 3 and first == sorted(first)
    assert ids(register_synthetic("cs_test_sub_b", "train", max_images=3, subset_seed=1)) == first
    other_seeds = {tuple(ids(register_synthetic("cs_test_sub_c", "train", max_images=3, subset_seed=s))) for s in range(5)}
    assert len(other_seeds) > 1
    assert ids(register_synthetic("cs_test_sub_d", "train", cities=["bochum"])) == ["bochum_000000_000019", "bochum_000001_000019"]
    image_list = tmp_path / "ids.txt"
    image_list.write_text("bremen_000000_000019\n# a comment\naachen_000001_000019\n")
    assert ids(register_synthetic("cs_test_sub_e", "train", image_list=str(image_list))) == [
        "aachen_000001_000019",
        "bremen_000000_000019",
    ]


def test_gt_instance_ids_path_points_at_the_instance_image(register_synthetic):
    name = register_synthetic("cs_test_gt_path", "val")
    d = DatasetCatalog.get(name)[0]
    path = gt_instance_ids_path(d, MetadataCatalog.get(name))
    assert path.endswith(f"gtFine/val/frankfurt/{d['image_id']}_gtFine_instanceIds.png")
    assert _instance_ids(d, name).shape == (256, 512)


def test_register_from_config_applies_the_subset_options(register_synthetic, synthetic_root):
    register_synthetic("cs_test_cfg_train", "train")
    register_synthetic("cs_test_cfg_val", "val")
    cfg = get_cityseg_cfg()
    cfg.DATASETS.TRAIN = ("cs_test_cfg_train", "cityscapes_instance_train")
    cfg.DATASETS.TEST = ("cs_test_cfg_val", "coco_2017_val")
    cfg.DATASETS.CITYSCAPES.CLASS_SET = "cityscapes10"
    cfg.DATASETS.CITYSCAPES.TRAIN_MAX_IMAGES = 2
    cfg.DATASETS.CITYSCAPES.TEST_MAX_IMAGES = 3
    cfg.DATASETS.CITYSCAPES.ROOT = "/data/cityscapes"
    try:
        register_from_config(cfg)
        assert len(DatasetCatalog.get("cs_test_cfg_train")) == 2
        assert len(DatasetCatalog.get("cs_test_cfg_val")) == 3
        assert MetadataCatalog.get("cs_test_cfg_val").thing_classes == CITYSCAPES10
        # ROOT moves the real Cityscapes names only; other names keep their root.
        assert MetadataCatalog.get("cityscapes_instance_train").root == "/data/cityscapes"
        assert MetadataCatalog.get("cs_test_cfg_train").root == synthetic_root
        assert MetadataCatalog.get("coco_2017_val").evaluator_type == "coco"
    finally:
        register_cityscapes_instances("cityscapes_instance_train", default_cityscapes_root(), "train")


def test_register_from_config_refuses_one_name_with_two_subsets(register_synthetic):
    cfg = get_cityseg_cfg()
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = (register_synthetic("cs_test_cfg_both", "val"),)
    cfg.DATASETS.CITYSCAPES.TRAIN_MAX_IMAGES = 2
    with pytest.raises(ValueError, match="cs_test_cfg_both is in DATASETS.TRAIN and DATASETS.TEST"):
        register_from_config(cfg)
    cfg.DATASETS.CITYSCAPES.TEST_MAX_IMAGES = 2
    register_from_config(cfg)
    assert len(DatasetCatalog.get("cs_test_cfg_both")) == 2


def test_parallel_parse_equals_serial_parse(tmp_path):
    root = make_synthetic_cityscapes(tmp_path, {"val": 64}, width=128, height=64, seed=2)
    images = list_split_files(root, "val")
    assert parse_images(images, workers=2) == parse_images(images, workers=1)
