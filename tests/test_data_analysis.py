"""The dataset explorer: its numbers agree with the instance images, and it writes its tables and plots."""
import json
import os
import runpy

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from cityseg_d2.data import gt_instance_ids_path
from cityseg_d2.data.analysis import class_table, registered_dataset_stats, write_report


def test_stats_count_what_the_instance_images_hold(register_synthetic):
    name = register_synthetic("cs_test_stats", "train", class_set="cityscapes10", mask_source="instance_ids")
    stats = registered_dataset_stats(name)
    meta = MetadataCatalog.get(name)
    areas = {}
    for d in DatasetCatalog.get(name):
        ids, counts = np.unique(cv2.imread(gt_instance_ids_path(d, meta), cv2.IMREAD_UNCHANGED), return_counts=True)
        for instance_id, count in zip(ids, counts):
            if instance_id >= 1000:
                areas.setdefault(meta.thing_classes[meta.thing_label_ids.index(instance_id // 1000)], []).append(count)
    assert stats["num_images"] == 6 and stats["image_sizes"] == {"512x256": 6}
    assert stats["num_instances"] == sum(len(v) for v in areas.values())
    for class_name, c in stats["per_class"].items():
        histogram = stats["area_histograms"][class_name]
        assert c["instances"] == len(areas.get(class_name, [])) == sum(histogram) == c["small"] + c["medium"] + c["large"]
        if class_name in areas:
            assert c["area_max"] == max(areas[class_name])
    assert sum(city["images"] for city in stats["per_city"].values()) == 6
    assert sum(city["instances"] for city in stats["per_city"].values()) == stats["num_instances"]
    assert all(list(city) == ["images", "instances", *meta.thing_classes] for city in stats["per_city"].values())
    assert sum(stats["instances_per_image"].values()) == 6
    columns, rows = class_table(stats)
    assert [row[0] for row in rows] == meta.thing_classes and len(columns) == len(rows[0])


def test_report_writes_json_tables_and_plots(register_synthetic, tmp_path):
    stats = registered_dataset_stats(register_synthetic("cs_test_report", "val"))
    paths = write_report(stats, str(tmp_path))
    with open(paths["stats.json"]) as f:
        assert json.load(f) == stats
    with open(paths["tables.txt"]) as f:
        tables = f.read()
    assert all(name in tables for name in ["person", "bicycle", "frankfurt", "instances per image", "512x256"])
    for path in paths.values():
        if path.endswith(".png"):
            image = cv2.imread(path)
            assert image is not None and image.shape[0] > 100 and image.std() > 0, path


def test_cli_explores_a_root_or_a_registered_dataset(synthetic_root, register_synthetic, tmp_path, capsys):
    main = runpy.run_path("tools/analyze_dataset.py")["main"]
    main(["--root", synthetic_root, "--split", "val", "--out", str(tmp_path / "root")])
    assert "4 images" in capsys.readouterr().out and os.path.isfile(tmp_path / "root" / "instance_areas.png")
    main(["--dataset", register_synthetic("cs_test_cli", "train"), "--out", str(tmp_path / "named")])
    assert "cs_test_cli: 6 images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        main(["--root", str(tmp_path / "missing"), "--out", str(tmp_path / "none")])
    assert str(error.value).startswith(f"error: Cityscapes root {tmp_path / 'missing'} not found")
