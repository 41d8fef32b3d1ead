#!/usr/bin/env python
"""Time the Cityscapes loader against detectron2's, alternating them in rounds: detectron2's parse, ours cold
(parse and write the cache) and ours warm (from the cache).

The reference is detectron2's own load_cityscapes_instances (polygons from the JSON, as ours by default) on
the same files; it is imported here only, as a yardstick (the package never uses it). Each round uses a new,
empty cache folder, prints its times and ratios; the end prints the median ratios and the load average
(os.getloadavg) before and after.

Example:
  python tools/make_synthetic_cityscapes.py --out /tmp/cs_bench --train 500 --val 0 --width 2048 --height 1024 --instances 20
  python tools/benchmark_data.py --root /tmp/cs_bench --split train --rounds 3
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


def load_average():
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="Cityscapes root (leftImg8bit/ and gtFine/)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--rounds", type=int, default=3, help="detectron2, ours cold, ours warm: this many times")
    parser.add_argument("--warm-loads", type=int, default=3, help="warm loads per round (their median counts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from detectron2.data.datasets.cityscapes import load_cityscapes_instances as detectron2_load

    image_dir = os.path.join(args.root, "leftImg8bit", args.split)
    gt_dir = os.path.join(args.root, "gtFine", args.split)
    print(f"load average before (1/5/15 min): {load_average()}")
    cold_ratios, warm_ratios = [], []
    previous_cache = os.environ.get("CITYSEG_D2_CACHE_DIR")
    try:
        for round_index in range(args.rounds):
            reference, reference_dicts = _timed(lambda: detectron2_load(image_dir, gt_dir))
            with tempfile.TemporaryDirectory(prefix="cityseg_d2_cache_") as cache:
                os.environ["CITYSEG_D2_CACHE_DIR"] = cache  # a cold start for sure, and no litter in ~/.cache
                load = lambda: load_cityscapes_instances(args.root, args.split)  # noqa: E731
                cold, dicts = _timed(load)
                warm = statistics.median(_timed(load)[0] for _ in range(args.warm_loads))
            cold_ratios.append(reference / cold)
            warm_ratios.append(reference / warm)
            print(
                f"round {round_index + 1}: detectron2 {reference:7.2f} s, ours cold {cold:7.2f} s "
                f"({cold_ratios[-1]:5.1f}x), ours warm {1000 * warm:8.1f} ms ({warm_ratios[-1]:6.1f}x)"
            )
    finally:
        if previous_cache is None:
            os.environ.pop("CITYSEG_D2_CACHE_DIR", None)
        else:
            os.environ["CITYSEG_D2_CACHE_DIR"] = previous_cache
    instances = sum(len(d["annotations"]) for d in dicts)
    reference_instances = sum(len(d["annotations"]) for d in reference_dicts)
    print(
        f"{len(dicts)} images, {instances} instances ({instances / max(len(dicts), 1):.1f} per image; detectron2: "
        f"{reference_instances}) in {args.root} {args.split}"
    )
    print(f"load average after (1/5/15 min): {load_average()}")
    print(
        f"median speed ratio (detectron2 / ours) over {args.rounds} rounds: cold {statistics.median(cold_ratios):.1f}x, "
        f"warm {statistics.median(warm_ratios):.0f}x"
    )


if __name__ == "__main__":
    main()
