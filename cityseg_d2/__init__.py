"""Cityscapes instance segmentation for Detectron2: datasets, evaluators, trainer and integrations."""
import warnings

__version__ = "0.1.0"

# Importing detectron2 calls torch.jit.script (deprecated since torch 2.14) and its model zoo imports pkg_resources
# (deprecated by setuptools): users read these warnings as something broken. Exactly these two are silenced, before
# anything imports detectron2; tools import cityseg_d2 first for that reason.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated as an API", category=UserWarning)

from . import data  # noqa: E402,F401  registers the builtin Cityscapes datasets
