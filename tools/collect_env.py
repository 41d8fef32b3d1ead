#!/usr/bin/env python
"""Print the versions of Python, torch, detectron2 (and its _C), cityscapesscripts, Ray, W&B and the GPUs."""
from cityseg_d2.collect_env import main

if __name__ == "__main__":
    main()
