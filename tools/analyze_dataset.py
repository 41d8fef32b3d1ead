#!/usr/bin/env python
"""Explore a Cityscapes-format dataset: counts per class, city and image, instance areas, image sizes.

Prints the tables and writes stats.json, tables.txt and PNG plots to --out. Examples:
  python tools/analyze_dataset.py --dataset cityscapes_instance_train --out output/dataset_stats
  python tools/analyze_dataset.py --root datasets/cityscapes_synthetic --split val --out output/synthetic_stats
"""
import argparse
import sys

import cityseg_d2  # noqa: F401  registers the builtin datasets
from cityseg_d2.data import CityscapesDataError, load_cityscapes_instances
from cityseg_d2.data.analysis import dataset_stats, format_tables, registered_dataset_stats, write_report
from cityseg_d2.data.classes import class_set_labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a registered dataset name, e.g. cityscapes_instance_val")
    source.add_argument("--root", help="a Cityscapes root folder (leftImg8bit/ and gtFine/)")
    parser.add_argument("--split", default="train", help="split of --root (default: %(default)s)")
    parser.add_argument("--class-set", default="cityscapes8", choices=["cityscapes8", "cityscapes10"], help="for --root")
    parser.add_argument("--mask-source", default="polygons", choices=["polygons", "instance_ids"], help="for --root")
    parser.add_argument("--out", required=True, help="folder for stats.json, tables.txt and the plots")
    args = parser.parse_args(argv)
    try:
        if args.dataset:
            stats = registered_dataset_stats(args.dataset)
        else:
            dicts = load_cityscapes_instances(args.root, args.split, args.class_set, mask_source=args.mask_source)
            classes = [label.name for label in class_set_labels(args.class_set)]
            stats = dataset_stats(dicts, classes, f"{args.root} {args.split}")
    except CityscapesDataError as e:
        sys.exit(f"error: {e}")
    print(format_tables(stats))
    paths = write_report(stats, args.out)
    print(f"\nWrote {', '.join(sorted(paths))} to {args.out}")


if __name__ == "__main__":
    main()
