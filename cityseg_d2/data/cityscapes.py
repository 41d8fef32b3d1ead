"""Cityscapes instance annotations as detectron2 dataset dicts, read straight from the official files.

Does not use detectron2.data.datasets.cityscapes (broken on upstream main). Compared with it, this loader
follows cityscapesscripts' own drawing rules exactly (the `deleted` flag's value, labels with id < 0 not drawn),
keeps occlusion holes (detectron2 drops them), checks the files and says which one is bad, and caches the result.
"""

import functools
import json
import logging
import multiprocessing
import os
import random
import struct
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
import shapely
from detectron2.structures import BoxMode
from PIL import Image
from tqdm import tqdm

from ..errors import CityscapesDataError, first_line
from .cache import load_or_build
from .classes import class_set_labels, resolve_label

logger = logging.getLogger(__name__)

MASK_SOURCES = ("polygons", "instance_ids")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
GT_SUFFIXES = {"polygons": "_gtFine_polygons.json", "instance_ids": "_gtFine_instanceIds.png"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Parts of a visible region smaller than this (in pixels) are slivers left by the polygon arithmetic.
_MIN_PART_AREA = 1.0
_PARALLEL_MIN_IMAGES = 64
# How far (in pixels) a polygon is grown so that pycocotools rasterizes it like PIL draws it; measured on the
# synthetic set: 0.35 gives the best IoU with instanceIds.png (0.5 over-covers diagonal edges, 0.25 under-covers).
_POLYGON_GROWTH = 0.35


class ImageFiles(NamedTuple):
    image_id: str  # e.g. "aachen_000000_000019"
    image_file: str
    gt_file: str | None  # the file the masks come from; None for a test image without annotations
    stat: tuple  # (size, mtime_ns) of both files: what the cache key is made of


def expected_layout(root, split="<split>"):
    return (
        f"{root}/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX} and "
        f"{root}/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_{{polygons.json,instanceIds.png,labelIds.png}}"
    )


def _list_dir(path):
    """{name: DirEntry} of a folder: one scandir; DirEntry.stat() then costs a syscall only for the files used."""
    with os.scandir(path) as entries:
        return {e.name: e for e in entries}


def _stat(entry):
    stat = entry.stat()
    return stat.st_size, stat.st_mtime_ns


def list_split_files(root, split, cities=None, mask_source="polygons"):
    """The images of a split (sorted by id) with the ground-truth file each needs, checked to exist."""
    image_dir = os.path.join(root, "leftImg8bit", split)
    gt_dir = os.path.join(root, "gtFine", split)
    if not os.path.isdir(root):
        raise CityscapesDataError(
            f"Cityscapes root {root} not found: expected {expected_layout(root, split)}; set $CITYSCAPES_DATASET, "
            "$DETECTRON2_DATASETS (its cityscapes/ folder) or DATASETS.CITYSCAPES.ROOT"
        )
    if not os.path.isdir(image_dir):
        raise CityscapesDataError(f"{image_dir} not found: expected {expected_layout(root, split)}")
    available = sorted(e.name for e in os.scandir(image_dir) if e.is_dir())
    if cities:
        unknown = sorted(set(cities) - set(available))
        if unknown:
            raise CityscapesDataError(f"{image_dir}: no city {', '.join(unknown)} (cities: {', '.join(available)})")
    gt_suffix = GT_SUFFIXES[mask_source]
    found = []
    for city in sorted(cities) if cities else available:
        images = _list_dir(os.path.join(image_dir, city))
        city_gt_dir = os.path.join(gt_dir, city)
        gt_files = _list_dir(city_gt_dir) if os.path.isdir(city_gt_dir) else {}
        for name, image_entry in images.items():
            if not name.endswith(IMAGE_SUFFIX):
                continue
            image_id = name[: -len(IMAGE_SUFFIX)]
            gt_name = image_id + gt_suffix
            gt_file = os.path.join(city_gt_dir, gt_name)
            stat = _stat(image_entry)
            if gt_name in gt_files:
                stat += _stat(gt_files[gt_name])
            elif split == "test":  # the test split's annotations are not public: its images load without any
                gt_file = None
            else:
                raise CityscapesDataError(f"{gt_file} not found: image {image_id} has no gtFine files")
            found.append(ImageFiles(image_id, os.path.join(image_dir, city, name), gt_file, stat))
    if not found:
        raise CityscapesDataError(f"{image_dir}: empty split, no *{IMAGE_SUFFIX} images in its city folders")
    return sorted(found)


def read_image_list(image_list):
    """Image ids from a list, or from a text file with one id a line ('#' comments allowed)."""
    if not isinstance(image_list, (str, os.PathLike)):
        return list(image_list)
    try:
        with open(image_list) as f:
            lines = [line.split("#")[0].strip() for line in f]
    except OSError as e:
        raise CityscapesDataError(f"{image_list}: cannot read the image list ({e.strerror})") from e
    return [line for line in lines if line]


def select_images(images, max_images=None, image_list=None, seed=0):
    """A deterministic subset: the ids of image_list, then a seeded sample of max_images, in id order."""
    if image_list is not None:
        by_id = {image.image_id: image for image in images}
        wanted = read_image_list(image_list)
        missing = [image_id for image_id in wanted if image_id not in by_id]
        if missing:
            source = image_list if isinstance(image_list, (str, os.PathLike)) else "image_list"
            raise CityscapesDataError(f"{source}: {len(missing)} image id(s) not in the split, e.g. {missing[0]!r}")
        images = sorted(by_id[image_id] for image_id in set(wanted))
    if max_images and max_images < len(images):
        images = sorted(random.Random(seed).sample(images, max_images))
    return images


def png_size(path):
    """(width, height) from a PNG's header, without decoding it."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise CityscapesDataError(f"{path}: cannot read ({e.strerror})") from e
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise CityscapesDataError(f"{path}: corrupt PNG (no PNG signature or IHDR header)")
    return struct.unpack(">II", head[16:24])


def check_image(path):
    """Read the whole image file and check it (PIL, as detectron2 reads images): a truncated or corrupt image is
    named here, before training, instead of failing a data-loader worker hours into it."""
    try:
        with Image.open(path) as image:
            image.verify()  # every chunk read and its checksum checked, without decoding the pixels
    except OSError as e:
        reason = e.strerror or first_line(e)
        raise CityscapesDataError(f"{path}: corrupt or truncated image ({reason}): copy or extract it again") from e
    except (SyntaxError, ValueError) as e:  # what PIL raises on a bad chunk
        raise CityscapesDataError(f"{path}: corrupt image ({first_line(e)}): copy or extract it again") from e


def _check_size(image_file, width, height, source):
    image_size = png_size(image_file)
    if image_size != (width, height):
        raise CityscapesDataError(
            f"{image_file}: image is {image_size[0]}x{image_size[1]} but {source} says {width}x{height}"
        )


def _pixel_region(coords):
    """The region cityscapesscripts' PIL drawing fills for a polygon, in detectron2's pixel coordinates.

    PIL fills the pixels whose centre lies inside or on the polygon, with centres at integer coordinates;
    detectron2 puts them at +0.5. So shift by 0.5, and grow a little to take in the pixels whose centres lie on
    the edges (mitre joins keep the vertex count).
    """
    polygon = shapely.Polygon(coords + 0.5)
    if not polygon.is_valid:
        polygon = shapely.make_valid(polygon)
    return polygon.buffer(_POLYGON_GROWTH, join_style="mitre", mitre_limit=2.0, cap_style="square")


def _split_holes(polygon):
    """Hole-free polygons whose union is `polygon`: COCO polygons cannot have holes, so cut through each."""
    if not polygon.interiors:
        return [polygon]
    hole_min_x, _, hole_max_x, _ = polygon.interiors[0].bounds
    cut = (hole_min_x + hole_max_x) / 2
    min_x, min_y, max_x, max_y = polygon.bounds
    pieces = []
    for half in (shapely.box(min_x - 1, min_y - 1, cut, max_y + 1), shapely.box(cut, min_y - 1, max_x + 1, max_y + 1)):
        for part in shapely.get_parts(polygon.intersection(half)):
            if isinstance(part, shapely.Polygon) and part.area > 0:
                pieces.extend(_split_holes(part))
    return pieces


def _visible_polygons(region):
    """COCO polygons (flat coordinate lists) of a visible region; its slivers dropped."""
    polygons = []
    for part in shapely.get_parts(region):
        if isinstance(part, shapely.Polygon) and part.area >= _MIN_PART_AREA:
            for piece in _split_holes(part):
                polygons.append(np.asarray(piece.exterior.coords[:-1]).ravel().round(2).tolist())
    return polygons


def _read_objects(json_file, issues):
    """(width, height, drawn objects) of a polygons file; objects are (Label, is_crowd, coords) in drawing order."""
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
        width, height, objects = int(data["imgWidth"]), int(data["imgHeight"]), data["objects"]
    except OSError as e:
        raise CityscapesDataError(f"{json_file}: cannot read ({e.strerror})") from e
    except ValueError as e:
        raise CityscapesDataError(f"{json_file}: corrupt JSON ({e})") from e
    except (KeyError, TypeError) as e:
        raise CityscapesDataError(
            f"{json_file}: not a Cityscapes polygons file (needs imgWidth, imgHeight, objects)"
        ) from e
    drawn = []
    for obj in objects:
        if obj.get("deleted"):
            continue
        resolved = resolve_label(obj.get("label"))
        if resolved is None:
            issues["unknown label " + repr(obj.get("label"))] += 1
            continue
        label, is_crowd = resolved
        if label.id < 0:  # cityscapesscripts does not draw these (license plates)
            continue
        try:
            coords = np.asarray(obj["polygon"], dtype=np.float64).reshape(-1, 2)
        except (KeyError, TypeError, ValueError) as e:
            raise CityscapesDataError(f"{json_file}: object {obj.get('label')!r} has no valid polygon") from e
        if len(coords) < 3:
            issues["polygon with < 3 points"] += 1
            continue
        drawn.append((label, is_crowd, coords))
    return width, height, drawn


def _annotations_from_polygons(json_file, image_file, category_ids, issues):
    """Annotations with the visible part of each instance: later objects of any label occlude earlier ones."""
    width, height, objects = _read_objects(json_file, issues)
    _check_size(image_file, width, height, json_file)
    boxes = np.array([[*c.min(0) - 1, *c.max(0) + 1] for _, _, c in objects]).reshape(-1, 4)
    regions = {}

    def region(index):
        if index not in regions:
            regions[index] = _pixel_region(objects[index][2])
        return regions[index]

    image_box = shapely.box(0, 0, width, height)
    annotations = []
    for index, (label, is_crowd, _) in enumerate(objects):
        if label.id not in category_ids:
            continue
        box = boxes[index]
        later = boxes[index + 1 :]
        overlapping = np.nonzero(
            (later[:, 0] < box[2]) & (later[:, 2] > box[0]) & (later[:, 1] < box[3]) & (later[:, 3] > box[1])
        )[0]
        visible = region(index)
        if len(overlapping):
            visible = visible.difference(shapely.union_all([region(index + 1 + j) for j in overlapping]))
        if not image_box.contains(visible):
            visible = visible.intersection(image_box)
        polygons = _visible_polygons(visible)
        if not polygons:
            continue  # fully occluded
        annotations.append(
            {
                "bbox": list(visible.bounds),
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": category_ids[label.id],
                "segmentation": polygons,
                "iscrowd": int(is_crowd),
            }
        )
    return width, height, annotations


def _annotations_from_instance_ids(png_file, image_file, category_ids):
    """Annotations with the exact pixels of instanceIds.png, as compressed RLE."""
    ids = cv2.imread(png_file, cv2.IMREAD_UNCHANGED)
    if ids is None or ids.ndim != 2:
        raise CityscapesDataError(f"{png_file}: corrupt PNG (cannot decode a single-channel image)")
    height, width = ids.shape
    _check_size(image_file, width, height, png_file)
    annotations = []
    # Instance pixels hold label_id * 1000 + index; a crowd region holds the bare label id.
    for value in np.flatnonzero(np.bincount(ids.ravel())):
        label_id, is_crowd = (value // 1000, False) if value >= 1000 else (value, True)
        if label_id not in category_ids:
            continue
        mask = ids == value
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "bbox": [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)],
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": category_ids[int(label_id)],
                "segmentation": rle,
                "iscrowd": int(is_crowd),
            }
        )
    return width, height, annotations


def image_dict(image, class_set="cityscapes8", mask_source="polygons"):
    """(detectron2 dict, Counter of skipped objects by reason) of one image, whose file is checked whole."""
    category_ids = {label.id: i for i, label in enumerate(class_set_labels(class_set))}
    issues = Counter()
    if image.gt_file is None:
        (width, height), annotations = png_size(image.image_file), []
    elif mask_source == "polygons":
        width, height, annotations = _annotations_from_polygons(image.gt_file, image.image_file, category_ids, issues)
    else:
        width, height, annotations = _annotations_from_instance_ids(image.gt_file, image.image_file, category_ids)
    check_image(image.image_file)
    record = {
        "file_name": image.image_file,
        "image_id": image.image_id,
        "height": height,
        "width": width,
        "annotations": annotations,
    }
    return record, issues


def _image_dict_star(args):
    return image_dict(*args)


def parse_images(images, class_set="cityscapes8", mask_source="polygons", workers=None):
    """Dicts of the images, each image file checked whole, in parallel processes for large sets, with a progress bar
    on a terminal; logs one warning per kind of skipped object."""
    if workers is None:  # daemonic processes (e.g. DataLoader workers) cannot start a pool
        workers = 1 if multiprocessing.current_process().daemon else min(os.cpu_count() or 1, 8)
    jobs = [(image, class_set, mask_source) for image in images]
    progress = functools.partial(
        tqdm, total=len(jobs), desc="checking images, reading annotations", unit="img", disable=None
    )
    if workers > 1 and len(jobs) >= _PARALLEL_MIN_IMAGES:
        with ProcessPoolExecutor(workers) as pool:
            results = list(progress(pool.map(_image_dict_star, jobs, chunksize=16)))
    else:
        results = [_image_dict_star(job) for job in progress(jobs)]
    issues, first_file = Counter(), {}
    for image, (_, image_issues) in zip(images, results):
        issues.update(image_issues)
        for reason in image_issues:
            first_file.setdefault(reason, image.gt_file)
    for reason, count in sorted(issues.items()):
        logger.warning(
            f"Skipped {count} object(s) with {reason} in {len(images)} images (the first in {first_file[reason]})"
        )
    return [record for record, _ in results]


def load_cityscapes_instances(
    root,
    split,
    class_set="cityscapes8",
    cities=None,
    max_images=None,
    image_list=None,
    cache=True,
    mask_source="polygons",
    subset_seed=0,
):
    """detectron2 dicts of a Cityscapes split (or of a deterministic subset of it); see
    register_cityscapes_instances for the arguments."""
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"unknown mask_source {mask_source!r}; choose one of {MASK_SOURCES}")
    class_set_labels(class_set)  # fails early on an unknown class set
    images = select_images(list_split_files(root, split, cities, mask_source), max_images, image_list, subset_seed)
    if not cache:
        return parse_images(images, class_set, mask_source)
    options = {"root": os.path.abspath(root), "split": split, "class_set": class_set, "mask_source": mask_source}
    fingerprint = [(image.image_id, image.stat) for image in images]
    return load_or_build(options, fingerprint, lambda: parse_images(images, class_set, mask_source))
