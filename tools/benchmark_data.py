#!/usr/bin/env python
"""Time the Cityscapes loader: cold (parse and write the cache) and warm (from the cache), against detectron2.

The reference is detectron2's own load_cityscapes_instances (polygons from the JSON, as ours by default) on
the same files; it is imported here only, as a yardstick (the package never uses it). The last line printed
is the ratio of detectron2's time to our warm start.

Example:
  python tools/make_synthetic_cityscapes.py --out /tmp/cs_bench --train 500 --val 0 --width 2048 --height 1024 --instances 20
  python tools/benchmark_data.py --root /tmp/cs_bench --split train
"""
import argparse
import logging
import os
import statistics
import tempfile
import time

from cityseg_d2.data import load_cityscapes_instances


def _timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="Cityscapes root (leftImg8bit/ and gtFine/)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--repeat", type=int, default=9, help="warm loads to time")
    parser.add_argument("--skip-detectron2", action="store_true", help="time our loader only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="cityseg_d2_cache_") as cache:
        os.environ["CITYSEG_D2_CACHE_DIR"] = cache  # a cold start for sure, and no litter in ~/.cache
        load = lambda: load_cityscapes_instances(args.root, args.split)  # noqa: E731
        cold, dicts = _timed(load)
        warm_times = [_timed(load)[0] for _ in range(args.repeat)]
    warm = statistics.median(warm_times)
    instances = sum(len(d["annotations"]) for d in dicts)
    print(f"{len(dicts)} images, {instances} instances ({instances / len(dicts):.1f} per image) in {args.root} {args.split}")
    print(f"cold load (parse + write cache): {cold:.2f} s")
    print(f"warm load (from cache): median {warm * 1000:.1f} ms, min {min(warm_times) * 1000:.1f} ms of {args.repeat}")
    if args.skip_detectron2:
        return
    from detectron2.data.datasets.cityscapes import load_cityscapes_instances as detectron2_load

    reference, reference_dicts = _timed(
        lambda: detectron2_load(os.path.join(args.root, "leftImg8bit", args.split), os.path.join(args.root, "gtFine", args.split))
    )
    reference_instances = sum(len(d["annotations"]) for d in reference_dicts)
    print(f"detectron2 load_cityscapes_instances: {reference:.2f} s ({reference_instances} instances)")
    print(f"cold load: {reference / cold:.1f}x detectron2's speed")
    print(f"warm load (median) is {reference / warm:.0f}x faster than detectron2's load_cityscapes_instances")


if __name__ == "__main__":
    main()
