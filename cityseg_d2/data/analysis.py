"""Dataset explorer: what is in a Cityscapes-format dataset (real or synthetic), as numbers, tables and plots.

dataset_stats() returns a JSON-ready dict (W&B logs class_table() of it); write_report() adds printed tables,
stats.json and PNG plots.
"""
import json
import os
from collections import Counter, defaultdict

import numpy as np
import pycocotools.mask as mask_util
from matplotlib.figure import Figure
from tabulate import tabulate

# COCO's size classes: small < 32², medium < 96² pixels.
_SMALL, _MEDIUM = 32**2, 96**2
_AREA_BINS = np.logspace(0, 7, 29)  # 1 pixel to 10 megapixels, 4 bins per decade


def instance_area(annotation, height, width):
    """Pixels of an annotation's mask (polygon pieces of one instance do not overlap)."""
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, dict):
        return float(mask_util.area(segmentation))
    area = 0.0
    for polygon in segmentation:
        x, y = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
        area += 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    return float(area)


def _summary(values, prefix=""):
    functions = {"mean": np.mean, "median": np.median, "min": np.min, "max": np.max}
    return {prefix + name: float(function(values)) if len(values) else 0.0 for name, function in functions.items()}


def dataset_stats(dicts, thing_classes, name=""):
    """Counts per class, city and image, instance areas per class (with log-scale histograms), image sizes.

    Records are flat (scalars only) so that each mapping of records reads as a table.
    """
    areas = defaultdict(list)
    crowds, images_with = Counter(), Counter()
    cities = defaultdict(Counter)
    per_image, sizes = [], Counter()
    for d in dicts:
        city = os.path.basename(os.path.dirname(d["file_name"]))
        cities[city]["images"] += 1
        sizes[f"{d['width']}x{d['height']}"] += 1
        present = set()
        for a in d["annotations"]:
            class_name = thing_classes[a["category_id"]]
            present.add(class_name)
            if a["iscrowd"]:
                crowds[class_name] += 1
                continue
            areas[class_name].append(instance_area(a, d["height"], d["width"]))
            cities[city][class_name] += 1
            cities[city]["instances"] += 1
        images_with.update(present)
        per_image.append(sum(1 for a in d["annotations"] if not a["iscrowd"]))
    per_class = {}
    for class_name in thing_classes:
        class_areas = areas[class_name]
        per_class[class_name] = {
            "instances": len(class_areas),
            "crowd_regions": crowds[class_name],
            "images": images_with[class_name],
            "small": sum(a < _SMALL for a in class_areas),
            "medium": sum(_SMALL <= a < _MEDIUM for a in class_areas),
            "large": sum(a >= _MEDIUM for a in class_areas),
            **_summary(class_areas, "area_"),
        }
    return {
        "name": name,
        "num_images": len(dicts),
        "num_instances": int(sum(per_image)),
        "num_crowd_regions": int(sum(crowds.values())),
        "classes": list(thing_classes),
        "per_class": per_class,
        "per_city": {
            city: {column: counts[column] for column in ["images", "instances", *thing_classes]}
            for city, counts in sorted(cities.items())
        },
        "per_image": {**_summary(per_image), "without_instances": per_image.count(0)},
        "instances_per_image": {str(k): v for k, v in sorted(Counter(per_image).items())},
        "image_sizes": dict(sizes),
        "area_histograms": {name: np.histogram(areas[name], _AREA_BINS)[0].tolist() for name in thing_classes},
        "area_bin_edges": _AREA_BINS.tolist(),
    }


def registered_dataset_stats(dataset_name):
    """dataset_stats of a dataset registered in DatasetCatalog / MetadataCatalog."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    return dataset_stats(DatasetCatalog.get(dataset_name), MetadataCatalog.get(dataset_name).thing_classes, dataset_name)


def class_table(stats):
    """(columns, rows) of the per-class counts and areas, e.g. for a wandb.Table."""
    columns = ["class", "instances", "crowd_regions", "images", "small", "medium", "large", "mean_area", "median_area"]
    rows = [
        [name, c["instances"], c["crowd_regions"], c["images"], c["small"], c["medium"], c["large"],
         round(c["area_mean"], 1), round(c["area_median"], 1)]
        for name, c in stats["per_class"].items()
    ]
    return columns, rows


def format_tables(stats):
    """The stats as printable tables: per class, per city, per image and image sizes."""
    p = stats["per_image"]
    class_columns, class_rows = class_table(stats)
    city_columns = ["city", "images", "instances"] + stats["classes"]
    city_rows = [[city, *counts.values()] for city, counts in stats["per_city"].items()]
    return "\n\n".join(
        [
            f"{stats['name'] or 'dataset'}: {stats['num_images']} images, {stats['num_instances']} instances, "
            f"{stats['num_crowd_regions']} crowd regions",
            tabulate(class_rows, headers=class_columns),
            tabulate(city_rows, headers=city_columns),
            f"instances per image: mean {p['mean']:.1f}, median {p['median']:.0f}, max {p['max']:.0f}, "
            f"{p['without_instances']} images without any",
            "image sizes: " + ", ".join(f"{size} ({n})" for size, n in stats["image_sizes"].items()),
        ]
    )


def _save_bar(path, labels, values, title, ylabel):
    figure = Figure(figsize=(max(6, 0.6 * len(labels)), 4), tight_layout=True)
    axes = figure.add_subplot()
    axes.bar(range(len(labels)), values, color="#4477aa")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set(title=title, ylabel=ylabel)
    figure.savefig(path, dpi=100)


def write_report(stats, out_dir):
    """Write stats.json, tables.txt and the PNG plots into out_dir; return the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in
             ["stats.json", "tables.txt", "class_counts.png", "city_counts.png", "instances_per_image.png", "instance_areas.png"]}
    with open(paths["stats.json"], "w") as f:
        json.dump(stats, f, indent=2)
    with open(paths["tables.txt"], "w") as f:
        f.write(format_tables(stats) + "\n")
    classes = stats["classes"]
    _save_bar(paths["class_counts.png"], classes, [stats["per_class"][c]["instances"] for c in classes], "Instances per class", "instances")
    cities = list(stats["per_city"])
    _save_bar(paths["city_counts.png"], cities, [stats["per_city"][c]["images"] for c in cities], "Images per city", "images")
    histogram = stats["instances_per_image"]
    _save_bar(paths["instances_per_image.png"], list(histogram), list(histogram.values()), "Instances per image", "images")

    columns = 4
    rows = -(-len(classes) // columns)
    figure = Figure(figsize=(4 * columns, 3 * rows), tight_layout=True)
    edges = stats["area_bin_edges"]
    for i, name in enumerate(classes):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.stairs(stats["area_histograms"][name], edges, fill=True, color="#4477aa")
        axes.set(xscale="log", title=name, xlabel="instance area (pixels)", ylabel="instances")
    figure.savefig(paths["instance_areas.png"], dpi=100)
    return paths
