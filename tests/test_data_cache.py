"""The on-disk cache of parsed dicts: hit, miss, and rebuild when a file, an option or the version changes; a
planted file is data, never code."""

import glob
import json
import os
import pickle
import shutil

import pytest

import cityseg_d2
from cityseg_d2.data import cityscapes, load_cityscapes_instances
from cityseg_d2.data.cache import cache_dir


@pytest.fixture
def root(synthetic_root, tmp_path):
    """A private copy of the synthetic set, to change files in."""
    return shutil.copytree(synthetic_root, tmp_path / "cityscapes")


@pytest.fixture
def parses(monkeypatch, tmp_path):
    """Counts the real parses, in an empty cache folder."""
    monkeypatch.setenv("CITYSEG_D2_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    parse = cityscapes.parse_images

    def counting(images, *args, **kwargs):
        calls.append(len(images))
        return parse(images, *args, **kwargs)

    monkeypatch.setattr(cityscapes, "parse_images", counting)
    return calls


def test_second_load_is_a_hit_with_equal_dicts(root, parses):
    first = load_cityscapes_instances(root, "val")
    assert parses == [4] and len(glob.glob(os.path.join(cache_dir(), "*.json"))) == 1
    assert load_cityscapes_instances(root, "val") == first
    assert parses == [4]


def test_changed_file_rebuilds_the_cache(root, parses):
    before = load_cityscapes_instances(root, "val")
    json_file = glob.glob(os.path.join(root, "gtFine", "val", "*", before[0]["image_id"] + "_gtFine_polygons.json"))[0]
    with open(json_file) as f:
        data = json.load(f)
    data["objects"] = [o for o in data["objects"] if o["label"] in ("sky", "road")]
    with open(json_file, "w") as f:
        json.dump(data, f)
    after = load_cityscapes_instances(root, "val")
    assert parses == [4, 4]
    assert before[0]["annotations"] and after[0]["annotations"] == []
    assert after[1:] == before[1:]


def test_touching_an_image_or_removing_one_rebuilds(root, parses):
    load_cityscapes_instances(root, "val")
    image = sorted(glob.glob(os.path.join(root, "leftImg8bit", "val", "*", "*.png")))[0]
    os.utime(image, ns=(1, 1))
    load_cityscapes_instances(root, "val")
    os.remove(image)
    assert len(load_cityscapes_instances(root, "val")) == 3
    assert parses == [4, 4, 3]


def test_options_and_package_version_are_part_of_the_key(root, parses, monkeypatch):
    load_cityscapes_instances(root, "val")
    load_cityscapes_instances(root, "val", class_set="cityscapes10")
    load_cityscapes_instances(root, "val", mask_source="instance_ids")
    load_cityscapes_instances(root, "val", max_images=2)
    assert parses == [4, 4, 4, 2]
    monkeypatch.setattr(cityseg_d2, "__version__", "99.0")
    load_cityscapes_instances(root, "val")
    assert parses == [4, 4, 4, 2, 4]


def test_corrupt_cache_file_is_rebuilt_and_cache_false_writes_nothing(root, parses, caplog):
    expected = load_cityscapes_instances(root, "val")
    (cache_file,) = glob.glob(os.path.join(cache_dir(), "*.json"))
    with open(cache_file, "wb") as f:
        f.write(b"not JSON")
    assert load_cityscapes_instances(root, "val") == expected
    assert "Ignoring unreadable cache file" in caplog.text and parses == [4, 4]
    os.remove(cache_file)
    assert load_cityscapes_instances(root, "val", cache=False) == expected
    assert not glob.glob(os.path.join(cache_dir(), "*"))


class _RunsCode:
    """Unpickling this runs `touch marker`: what a malicious cache file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_never_unpickled(root, parses, tmp_path, caplog):
    expected = load_cityscapes_instances(root, "val")
    (cache_file,) = glob.glob(os.path.join(cache_dir(), "*.json"))
    marker = tmp_path / "code_ran"
    payload = pickle.dumps(_RunsCode(marker))
    pickle.loads(payload)  # the payload works: it runs its command when unpickled
    assert marker.exists()
    marker.unlink()
    for planted in (cache_file, cache_file[: -len(".json")] + ".pkl"):  # the file itself, and the old format's name
        with open(planted, "wb") as f:
            f.write(payload)
    assert load_cityscapes_instances(root, "val") == expected
    assert not marker.exists()
    assert "Ignoring unreadable cache file" in caplog.text and parses == [4, 4]
