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


class ToolResult:
    """What a tool run in-process left: its exit code and what it printed."""

    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def error_lines(self):
        return [line for line in self.err.splitlines() if line.startswith("error:")]


@pytest.fixture
def run_tool(capsys, monkeypatch, synthetic_root, tmp_path):
    """run_tool("train_net.py", *args) runs tools/<tool> as `python tools/<tool> args` would, in this process (no
    interpreter start-up, no re-import of torch and detectron2), with the builtin cityscapes_synthetic_instance_* names
    pointing at the test data set. Returns a ToolResult; for what only a real process shows (signals, kill -9,
    start-up warnings) use subprocess."""
    import runpy
    import sys
    from pathlib import Path

    from cityseg_d2.data import register_builtin_datasets

    datasets = tmp_path / "d2_datasets"
    datasets.mkdir()
    os.symlink(synthetic_root, datasets / "cityscapes_synthetic")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    register_builtin_datasets()
    tools = Path(__file__).resolve().parents[1] / "tools"

    def run(tool, *args):
        monkeypatch.setattr(sys, "argv", [str(tools / tool), *map(str, args)])
        code = 0
        try:
            runpy.run_path(str(tools / tool), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return ToolResult(code, captured.out, captured.err)

    yield run
    monkeypatch.undo()
    register_builtin_datasets()
