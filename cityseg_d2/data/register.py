"""Registration of Cityscapes datasets in detectron2's DatasetCatalog and MetadataCatalog."""
import functools
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .cityscapes import MASK_SOURCES, SPLITS, load_cityscapes_instances
from .classes import class_set_labels

# Options each dataset was registered with, so register_from_config can re-register it with others.
_REGISTERED = {}


def default_cityscapes_root():
    """$CITYSCAPES_DATASET, else $DETECTRON2_DATASETS/cityscapes, else ./datasets/cityscapes."""
    return os.environ.get("CITYSCAPES_DATASET") or os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "cityscapes")


def default_synthetic_root():
    """$DETECTRON2_DATASETS/cityscapes_synthetic, else ./datasets/cityscapes_synthetic."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "cityscapes_synthetic")


def register_cityscapes_instances(
    name,
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
    """Register a Cityscapes split (or a subset of it) as an instance segmentation dataset; replaces an
    existing registration of `name`. Nothing is read until DatasetCatalog.get(name).

    Args:
        root: folder holding leftImg8bit/ and gtFine/.
        split: "train", "val" or "test" (test images have no public annotations and load without any).
        class_set: "cityscapes8" (the 8 officially evaluated classes) or "cityscapes10" (also caravan and trailer).
        cities: city names to keep (None = all).
        max_images: keep a seeded random sample of this many images (None or 0 = all).
        image_list: image ids to keep (e.g. "aachen_000000_000019"), or a text file of them, one a line.
        cache: store the parsed dicts on disk (see cityseg_d2.data.cache).
        mask_source: "polygons" (gtFine_polygons.json, masks as COCO polygons, fast to train with) or
            "instance_ids" (gtFine_instanceIds.png, exact pixels as RLE; needs INPUT.MASK_FORMAT "bitmask").
        subset_seed: seed of the max_images sample.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"unknown mask_source {mask_source!r}; choose one of {MASK_SOURCES}")
    labels = class_set_labels(class_set)
    options = dict(
        root=root,
        split=split,
        class_set=class_set,
        cities=list(cities) if cities else None,
        max_images=max_images or None,
        image_list=image_list or None,
        cache=cache,
        mask_source=mask_source,
        subset_seed=subset_seed,
    )
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, functools.partial(load_cityscapes_instances, **options))
    MetadataCatalog.get(name).set(
        thing_classes=[label.name for label in labels],
        thing_colors=[label.color for label in labels],
        thing_label_ids=[label.id for label in labels],
        thing_dataset_id_to_contiguous_id={label.id: i for i, label in enumerate(labels)},
        image_dir=os.path.join(root, "leftImg8bit", split),
        gt_dir=os.path.join(root, "gtFine", split),
        root=root,
        split=split,
        class_set=class_set,
        mask_source=mask_source,
    )
    _REGISTERED[name] = options


def gt_instance_ids_path(dataset_dict, metadata):
    """The gtFine_instanceIds.png of a dataset dict: what the official evaluation compares predictions with."""
    city = os.path.basename(os.path.dirname(dataset_dict["file_name"]))
    return os.path.join(metadata.gt_dir, city, dataset_dict["image_id"] + "_gtFine_instanceIds.png")


_REAL_NAMES = {f"cityscapes_instance_{split}": split for split in SPLITS}
_SYNTHETIC_NAMES = {f"cityscapes_synthetic_instance_{split}": split for split in SPLITS}


def register_builtin_datasets():
    """Register cityscapes_instance_{train,val,test} and cityscapes_synthetic_instance_{train,val,test}."""
    for name, split in _REAL_NAMES.items():
        register_cityscapes_instances(name, default_cityscapes_root(), split)
    for name, split in _SYNTHETIC_NAMES.items():
        register_cityscapes_instances(name, default_synthetic_root(), split)


def register_from_config(cfg):
    """Re-register the Cityscapes datasets of cfg.DATASETS.TRAIN and TEST with cfg.DATASETS.CITYSCAPES's options.

    Applies to every dataset registered through register_cityscapes_instances (the builtin ones included);
    other names are left alone. CLASS_SET, MASK_SOURCE, CITIES, CACHE and SUBSET_SEED apply to all of them,
    TRAIN_MAX_IMAGES / TRAIN_IMAGE_LIST to the names in DATASETS.TRAIN and TEST_* to those in DATASETS.TEST.
    ROOT (when set) replaces the root of cityscapes_instance_* only: it says where the real Cityscapes is, so
    the synthetic set and datasets registered with an explicit root keep theirs. The model's NUM_CLASSES must
    match the class set (8 or 10); that is the caller's business.
    """
    c = cfg.DATASETS.CITYSCAPES
    roles = [(name, "TRAIN") for name in cfg.DATASETS.TRAIN] + [(name, "TEST") for name in cfg.DATASETS.TEST]
    chosen = {}
    for name, role in roles:
        if name not in _REGISTERED:
            continue
        options = dict(
            _REGISTERED[name],
            class_set=c.CLASS_SET,
            mask_source=c.MASK_SOURCE,
            cities=list(c.CITIES) or None,
            cache=c.CACHE,
            subset_seed=c.SUBSET_SEED,
            max_images=c.get(f"{role}_MAX_IMAGES") or None,
            image_list=c.get(f"{role}_IMAGE_LIST") or None,
        )
        if c.ROOT and name in _REAL_NAMES:
            options["root"] = c.ROOT
        if name in chosen and chosen[name] != options:
            raise ValueError(
                f"{name} is in DATASETS.TRAIN and DATASETS.TEST with different DATASETS.CITYSCAPES.*_MAX_IMAGES "
                "or *_IMAGE_LIST: register the subset under its own name"
            )
        chosen[name] = options
    for name, options in chosen.items():
        register_cityscapes_instances(name, **options)
