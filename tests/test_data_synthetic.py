"""The synthetic Cityscapes generator: official layout, files cityscapesscripts agrees with, varied scenes."""
import glob
import json
import os
import runpy
from collections import Counter

import cv2
import numpy as np
import pytest
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage, json2labelImg
from PIL import Image, ImageDraw

from cityseg_d2.data.classes import resolve_label
from cityseg_d2.data.synthetic import make_synthetic_cityscapes

GT_FILES = ["polygons.json", "labelIds.png", "instanceIds.png", "color.png"]


@pytest.fixture(scope="module")
def varied_root(tmp_path_factory):
    """40 small images: enough for every kind of object the generator makes to appear."""
    root = tmp_path_factory.mktemp("synthetic_varied")
    return make_synthetic_cityscapes(root, splits={"train": 40}, width=384, height=192, seed=3)


def _objects(root, split="train"):
    for json_file in sorted(glob.glob(os.path.join(root, "gtFine", split, "*", "*_gtFine_polygons.json"))):
        with open(json_file) as f:
            yield json_file, json.load(f)


def test_writes_the_official_layout(synthetic_root):
    for split, count, cities in [("train", 6, {"aachen", "bochum", "bremen", "cologne"}), ("val", 4, {"frankfurt", "lindau", "munster"})]:
        images = sorted(glob.glob(os.path.join(synthetic_root, "leftImg8bit", split, "*", "*_leftImg8bit.png")))
        assert len(images) == count
        assert {os.path.basename(os.path.dirname(p)) for p in images} == cities
        for image in images:
            city = os.path.basename(os.path.dirname(image))
            image_id = os.path.basename(image)[: -len("_leftImg8bit.png")]
            name_city, seq, frame = image_id.split("_")
            assert name_city == city and len(seq) == 6 and frame == "000019"
            for suffix in GT_FILES:
                assert os.path.isfile(os.path.join(synthetic_root, "gtFine", split, city, f"{image_id}_gtFine_{suffix}"))
            rgb = cv2.imread(image, cv2.IMREAD_UNCHANGED)
            assert rgb.shape == (256, 512, 3) and rgb.dtype == np.uint8


def test_label_images_are_what_cityscapesscripts_makes_from_the_json(synthetic_root, tmp_path):
    for json_file, _ in _objects(synthetic_root):
        prefix = json_file[: -len("polygons.json")]
        annotation = Annotation()
        annotation.fromJsonFile(json_file)
        label_ids = cv2.imread(prefix + "labelIds.png", cv2.IMREAD_UNCHANGED)
        instance_ids = cv2.imread(prefix + "instanceIds.png", cv2.IMREAD_UNCHANGED)
        color = cv2.cvtColor(cv2.imread(prefix + "color.png", cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
        assert instance_ids.dtype == np.uint16
        # json2labelImg itself writes the label image; createInstanceImage's pixels stand for json2instanceImg,
        # which cannot save its mode "I" image with this Pillow.
        json2labelImg(json_file, str(tmp_path / "labelIds.png"), "ids")
        np.testing.assert_array_equal(label_ids, cv2.imread(str(tmp_path / "labelIds.png"), cv2.IMREAD_UNCHANGED))
        np.testing.assert_array_equal(instance_ids, np.asarray(createInstanceImage(annotation, "ids")))
        np.testing.assert_array_equal(color, np.asarray(createLabelImage(annotation, "color")))


def test_is_deterministic_per_seed(tmp_path):
    a = make_synthetic_cityscapes(tmp_path / "a", {"val": 2}, width=256, height=128, seed=5)
    b = make_synthetic_cityscapes(tmp_path / "b", {"val": 3}, width=256, height=128, seed=5)
    c = make_synthetic_cityscapes(tmp_path / "c", {"val": 2}, width=256, height=128, seed=6)
    relative = sorted(os.path.relpath(p, a) for p in glob.glob(os.path.join(a, "*", "val", "*", "*")))
    assert len(relative) == 2 * 5

    def read(root, path):
        with open(os.path.join(root, path), "rb") as f:
            return f.read()

    assert all(read(a, p) == read(b, p) for p in relative)  # a larger set starts with the smaller one
    assert any(read(a, p) != read(c, p) for p in relative)


def test_scenes_have_every_class_occlusion_truncation_crowds_and_tiny_instances(varied_root):
    labels, crowds = Counter(), Counter()
    without_instances = truncated = tiny = occluded = 0
    for json_file, data in _objects(varied_root):
        width, height = data["imgWidth"], data["imgHeight"]
        things = [o for o in data["objects"] if resolve_label(o["label"])[0].hasInstances]
        labels.update(o["label"] for o in things if not resolve_label(o["label"])[1])
        crowds.update(o["label"] for o in things if resolve_label(o["label"])[1])
        without_instances += not things
        truncated += sum(min(x for x, _ in o["polygon"]) == 0 or max(x for x, _ in o["polygon"]) == width - 1 for o in things)
        instance_ids = cv2.imread(json_file.replace("polygons.json", "instanceIds.png"), cv2.IMREAD_UNCHANGED)
        seen = Counter()
        for o in things:
            label, is_crowd = resolve_label(o["label"])
            if is_crowd:
                continue
            visible = np.count_nonzero(instance_ids == label.id * 1000 + seen[label.id])  # json2instanceImg's ids
            seen[label.id] += 1
            alone = Image.new("L", (width, height))
            ImageDraw.Draw(alone).polygon([tuple(p) for p in o["polygon"]], fill=1)
            occluded += visible < np.count_nonzero(alone)
            tiny += 0 < visible < 100
    assert set(labels) == {"person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "caravan", "trailer"}
    assert labels["car"] > labels["train"] and labels["person"] > labels["caravan"]
    assert set(crowds) <= {"cargroup", "persongroup", "bicyclegroup"} and sum(crowds.values()) >= 2
    assert without_instances >= 1 and truncated >= 5 and tiny >= 5 and occluded >= 10


def test_each_class_has_its_own_colour(varied_root):
    """The appearance the learning tests rely on: mean image colour inside each class's pixels differs."""
    means = {}
    for json_file, _ in _objects(varied_root):
        image_file = json_file.replace("gtFine", "leftImg8bit", 1).replace("_gtFine_polygons.json", "_leftImg8bit.png")
        rgb = cv2.imread(image_file)[:, :, ::-1].astype(float)
        instance_ids = cv2.imread(json_file.replace("polygons.json", "instanceIds.png"), cv2.IMREAD_UNCHANGED)
        for label_id in np.unique(instance_ids[instance_ids >= 1000] // 1000):
            means.setdefault(int(label_id), []).append(rgb[instance_ids // 1000 == label_id].mean(0))
    centres = {label_id: np.mean(v, axis=0) for label_id, v in means.items()}
    distances = [np.linalg.norm(centres[a] - centres[b]) for a in centres for b in centres if a < b]
    assert len(centres) == 10 and min(distances) > 25


def test_cli_writes_the_requested_splits(tmp_path, capsys):
    out = tmp_path / "cli"
    runpy.run_path("tools/make_synthetic_cityscapes.py")["main"](
        ["--out", str(out), "--train", "2", "--val", "1", "--test", "1", "--width", "128", "--height", "64", "--seed", "1"]
    )
    assert "Wrote 4 images" in capsys.readouterr().out
    for split, count in [("train", 2), ("val", 1), ("test", 1)]:
        assert len(glob.glob(str(out / "leftImg8bit" / split / "*" / "*_leftImg8bit.png"))) == count
        assert len(glob.glob(str(out / "gtFine" / split / "*" / "*_gtFine_instanceIds.png"))) == count
