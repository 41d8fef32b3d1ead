"""Shared fixtures: a private dataset cache, a small synthetic Cityscapes, and a helper to register it."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_dataset_cache(tmp_path_factory):
    """Point the dataset cache at a temporary folder, so tests never read or write ~/.cache."""
    previous = os.environ.get("CITYSEG_D2_CACHE_DIR")
    os.environ["CITYSEG_D2_CACHE_DIR"] = str(tmp_path_factory.mktemp("dataset_cache"))
    yield
    if previous is None:
        os.environ.pop("CITYSEG_D2_CACHE_DIR", None)
    else:
        os.environ["CITYSEG_D2_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A synthetic Cityscapes with 6 train and 4 val images of 512x256 (str path of its root)."""
    from cityseg_d2.data.synthetic import make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("cityscapes_synthetic")
    return make_synthetic_cityscapes(root, splits={"train": 6, "val": 4}, width=512, height=256, seed=0)


@pytest.fixture(scope="session")
def register_synthetic(synthetic_root):
    """register_synthetic(name, split, **options) registers a split of `synthetic_root` and returns name."""
    from cityseg_d2.data import register_cityscapes_instances

    def register(name, split="train", **options):
        register_cityscapes_instances(name, synthetic_root, split, **options)
        return name

    return register
