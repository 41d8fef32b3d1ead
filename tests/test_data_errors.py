"""Bad input gets a one-line CityscapesDataError naming the file; skippable objects get one counted warning."""

import glob
import json
import os
import shutil

import pytest

from cityseg_d2.data import CityscapesDataError, load_cityscapes_instances


@pytest.fixture
def root(synthetic_root, tmp_path):
    """A private copy of the synthetic set's val split, to break."""
    copy = tmp_path / "cityscapes"
    for folder in ["leftImg8bit", "gtFine"]:
        shutil.copytree(os.path.join(synthetic_root, folder, "val"), copy / folder / "val")
    return str(copy)


def _first(root, pattern):
    return sorted(glob.glob(os.path.join(root, "*", "val", "*", pattern)))[0]


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _error(root, **options):
    with pytest.raises(CityscapesDataError) as error:
        load_cityscapes_instances(root, "val", cache=False, **options)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_root_names_the_layout_and_the_variables(tmp_path):
    message = _error(str(tmp_path / "absent"))
    assert message.startswith(f"Cityscapes root {tmp_path / 'absent'} not found")
    assert "leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png" in message and "gtFine/val/<city>" in message
    assert "$CITYSCAPES_DATASET" in message and "$DETECTRON2_DATASETS" in message


def test_missing_split_folder(root):
    shutil.rmtree(os.path.join(root, "leftImg8bit", "val"))
    assert _error(root).startswith(os.path.join(root, "leftImg8bit", "val") + " not found")


def test_empty_split(root):
    for image in glob.glob(os.path.join(root, "leftImg8bit", "val", "*", "*.png")):
        os.remove(image)
    assert (
        _error(root)
        == f"{os.path.join(root, 'leftImg8bit', 'val')}: empty split, no *_leftImg8bit.png images in its city folders"
    )


def test_unknown_city(root):
    assert "no city atlantis (cities: frankfurt, lindau, munster)" in _error(root, cities=["atlantis"])


@pytest.mark.parametrize("mask_source, suffix", [("polygons", "polygons.json"), ("instance_ids", "instanceIds.png")])
def test_image_without_its_gtfine_file(root, mask_source, suffix):
    gt_file = _first(root, f"*_gtFine_{suffix}")
    os.remove(gt_file)
    assert (
        _error(root, mask_source=mask_source)
        == f"{gt_file} not found: image {os.path.basename(gt_file).split('_gtFine')[0]} has no gtFine files"
    )


def test_test_split_images_load_without_annotations(synthetic_root, tmp_path):
    shutil.copytree(os.path.join(synthetic_root, "leftImg8bit", "val"), tmp_path / "leftImg8bit" / "test")
    dicts = load_cityscapes_instances(str(tmp_path), "test", cache=False)
    assert len(dicts) == 4 and all(d["annotations"] == [] and d["width"] == 512 for d in dicts)


def test_corrupt_image_png(root):
    image = _first(root, "*_leftImg8bit.png")
    with open(image, "wb") as f:
        f.write(b"GIF89a not a png at all")
    assert _error(root) == f"{image}: corrupt PNG (no PNG signature or IHDR header)"


def test_truncated_image_with_a_valid_header_is_named(root):
    image = _first(root, "*_leftImg8bit.png")
    size = os.path.getsize(image)
    with open(image, "r+b") as f:
        f.truncate(size // 2)  # header and size intact: only reading the whole file finds it
    assert _error(root) == f"{image}: corrupt or truncated image (Truncated File Read): copy or extract it again"


def test_corrupt_instance_ids_png(root):
    png = _first(root, "*_gtFine_instanceIds.png")
    with open(png, "r+b") as f:
        f.truncate(60)
    assert _error(root, mask_source="instance_ids") == f"{png}: corrupt PNG (cannot decode a single-channel image)"


def test_corrupt_json(root):
    json_file = _first(root, "*_gtFine_polygons.json")
    with open(json_file, "a") as f:
        f.write("{")
    message = _error(root)
    assert message.startswith(f"{json_file}: corrupt JSON (")


def test_json_without_the_cityscapes_keys(root):
    json_file = _first(root, "*_gtFine_polygons.json")
    _edit_json(json_file, lambda data: data.pop("imgHeight"))
    assert _error(root) == f"{json_file}: not a Cityscapes polygons file (needs imgWidth, imgHeight, objects)"


def test_image_size_that_disagrees_with_the_json(root):
    json_file = _first(root, "*_gtFine_polygons.json")
    _edit_json(json_file, lambda data: data.update(imgWidth=1024))
    image = _first(root, "*_leftImg8bit.png")
    assert _error(root) == f"{image}: image is 512x256 but {json_file} says 1024x256"


def test_unknown_labels_and_short_polygons_are_skipped_with_one_counted_warning(root, caplog):
    json_files = sorted(glob.glob(os.path.join(root, "gtFine", "val", "*", "*_gtFine_polygons.json")))
    before = sum(len(d["annotations"]) for d in load_cityscapes_instances(root, "val", cache=False))

    def add_bad_objects(data):
        data["objects"] += [
            {"label": "spaceship", "polygon": [[1, 1], [50, 1], [50, 50]]},
            {"label": "car", "polygon": [[300, 200], [310, 210]]},
        ]

    for json_file in json_files[:3]:
        _edit_json(json_file, add_bad_objects)
    after = sum(len(d["annotations"]) for d in load_cityscapes_instances(root, "val", cache=False))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert after == before
    assert f"Skipped 3 object(s) with unknown label 'spaceship' in 4 images (the first in {json_files[0]})" in warnings
    assert f"Skipped 3 object(s) with polygon with < 3 points in 4 images (the first in {json_files[0]})" in warnings
    assert len(warnings) == 2


def test_image_list_with_an_unknown_id(root, tmp_path):
    image_list = tmp_path / "ids.txt"
    image_list.write_text("frankfurt_000000_000019\nnowhere_000000_000019\n")
    assert (
        _error(root, image_list=str(image_list))
        == f"{image_list}: 1 image id(s) not in the split, e.g. 'nowhere_000000_000019'"
    )


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="unknown class set 'coco'"):
        load_cityscapes_instances("unused", "val", class_set="coco")
    with pytest.raises(ValueError, match="unknown mask_source 'pixels'"):
        load_cityscapes_instances("unused", "val", mask_source="pixels")
