"""Shared fixtures: a private dataset cache, a small synthetic Cityscapes, and a helper to register it."""
import contextlib
import logging
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


@contextlib.contextmanager
def _restored_loggers():
    """A tool's run logs as in a fresh process, and the test still sees its records.

    detectron2's setup_logger stops the package loggers' propagation and adds handlers bound to the captured stdout
    and the run's log.txt. pytest's log capture reaches a non-propagating logger only if it was one when the test
    started, so for the run the package loggers get the root logger's handlers (pytest's, a test's own) in place of
    propagation; afterwards their handlers, level and propagation are as before and setup_logger's cache is
    forgotten, so the next run sets them up again."""
    from detectron2.utils.logger import setup_logger

    root = logging.getLogger()
    loggers = [logging.getLogger(name) for name in ("detectron2", "fvcore", "cityseg_d2", "d2")]
    before = {logger: (list(logger.handlers), logger.level, logger.propagate) for logger in [*loggers, root]}
    for logger in loggers:
        if logger.propagate:
            logger.propagate = False
            for handler in root.handlers:
                logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, (handlers, level, propagate) in before.items():
            for handler in logger.handlers[:]:
                if handler not in handlers:
                    logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        setup_logger.cache_clear()


@contextlib.contextmanager
def _builtin_datasets_under(datasets_dir):
    """The builtin dataset names registered under $DETECTRON2_DATASETS=datasets_dir, as a fresh process would."""
    from cityseg_d2.data import register_builtin_datasets

    previous = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(datasets_dir)
    register_builtin_datasets()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DETECTRON2_DATASETS", None)
        else:
            os.environ["DETECTRON2_DATASETS"] = previous
        register_builtin_datasets()


class ToolResult:
    """What a tool run in-process left: its exit code and what it printed."""

    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def error_lines(self):
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def run_tool_in_process(tool, *args, datasets_dir=None):
    """Run tools/<tool> as `python tools/<tool> args` would, in this process (no interpreter, torch and detectron2
    start-up per run), with stdout and stderr captured and, with datasets_dir, the builtin dataset names under it.
    For what only a real process shows (signals, kill -9, start-up warnings) use a subprocess."""
    import io
    import runpy
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / tool
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [str(path), *map(str, args)]
    code = 0
    datasets = _builtin_datasets_under(datasets_dir) if datasets_dir else contextlib.nullcontext()
    try:
        with datasets, _restored_loggers(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return ToolResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def synthetic_datasets_dir(synthetic_root, tmp_path_factory):
    """A $DETECTRON2_DATASETS folder whose cityscapes_synthetic is the test data set."""
    datasets = tmp_path_factory.mktemp("d2_datasets")
    os.symlink(synthetic_root, datasets / "cityscapes_synthetic")
    return datasets


@pytest.fixture
def run_tool(synthetic_datasets_dir):
    """run_tool("train_net.py", *args) -> ToolResult: run_tool_in_process with the builtin cityscapes_synthetic_instance_*
    names pointing at the test data set."""

    def run(tool, *args):
        return run_tool_in_process(tool, *args, datasets_dir=synthetic_datasets_dir)

    return run


QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
FAST_QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic_fast.yaml"
# The quickstart model trained on the 6 synthetic training images until it has learned them: what every test that
# needs a model that really predicts something uses (evaluated on the training images, where AP50 must be high).
# At 192 px with 64-channel FPN and mask head: 0.42 s an iteration here, against 0.92 at the quickstart's 256 px and
# 128 channels, and it still learns (AP50 of 5 seeds in tests/test_fast_path.py).
LEARNING = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "20", "SOLVER.STEPS", "(120,)", "INPUT.MIN_SIZE_TRAIN",
    "(192,)", "INPUT.MIN_SIZE_TEST", "192", "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "128",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "('cityscapes_synthetic_instance_train',)", "SEED", "1",
]  # fmt: skip
LEARNING_ITERATIONS = 150


def train_learning(config_file, output_dir, datasets_dir):
    """train_net on config_file with LEARNING into output_dir (model_final.pth, metrics.json with the final evaluation,
    config.yaml)."""
    result = run_tool_in_process(
        "train_net.py", "--config-file", config_file, *LEARNING, "SOLVER.MAX_ITER", str(LEARNING_ITERATIONS),
        "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", output_dir, datasets_dir=datasets_dir,
    )  # fmt: skip
    assert result.code == 0, result.err[-5000:]
    return output_dir, LEARNING


@pytest.fixture(scope="session")
def trained_quickstart(synthetic_datasets_dir, tmp_path_factory):
    """(output dir, the overrides it was trained with): the quickstart config (stock detectron2) trained with LEARNING,
    once per session."""
    return train_learning(QUICKSTART, tmp_path_factory.mktemp("trained_quickstart"), synthetic_datasets_dir)


@pytest.fixture(scope="session")
def fast_trained_quickstart(synthetic_datasets_dir, tmp_path_factory):
    """The same for the fast quickstart config (bfloat16 autocast on the CPU, every fast-path switch)."""
    return train_learning(FAST_QUICKSTART, tmp_path_factory.mktemp("fast_trained_quickstart"), synthetic_datasets_dir)
