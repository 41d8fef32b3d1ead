#!/usr/bin/env python
"""The README's main job on the built-in synthetic data set. For now: an environment check."""
from cityseg_d2.collect_env import main as collect_env


def main():
    collect_env([])
    print("environment OK: torch, detectron2 and cityseg_d2 import.")


if __name__ == "__main__":
    main()
