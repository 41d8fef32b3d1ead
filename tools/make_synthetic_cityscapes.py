#!/usr/bin/env python
"""Write a synthetic Cityscapes (official layout and files) for the demo, the tests and the benchmarks.

Example: python tools/make_synthetic_cityscapes.py --out datasets/cityscapes_synthetic --train 300 --val 50
"""
import argparse
import time

from cityseg_d2.data import default_synthetic_root
from cityseg_d2.data.synthetic import make_synthetic_cityscapes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_synthetic_root(), help="root folder (default: %(default)s)")
    parser.add_argument("--train", type=int, default=300, help="train images")
    parser.add_argument("--val", type=int, default=50, help="val images")
    parser.add_argument("--test", type=int, default=0, help="test images")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instances", type=float, default=8, help="mean instances per image (Cityscapes: ~20)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = parser.parse_args(argv)
    splits = {split: count for split, count in [("train", args.train), ("val", args.val), ("test", args.test)] if count}
    start = time.perf_counter()
    make_synthetic_cityscapes(
        args.out, splits, args.width, args.height, args.seed, mean_instances=args.instances, workers=args.workers
    )
    seconds = time.perf_counter() - start
    total = sum(splits.values())
    print(f"Wrote {total} images ({splits}) of {args.width}x{args.height} to {args.out} "
          f"in {seconds:.1f} s ({total / seconds:.1f} images/s)")


if __name__ == "__main__":
    main()
