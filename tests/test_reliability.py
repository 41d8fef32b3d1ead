"""What survives a crash and what is refused (README, "What survives a crash, what is refused").

- Bad input to train_net, predict and tune_net: one `error:` line naming the file or key, exit code 2, no traceback,
  and the files already in OUTPUT_DIR byte-identical afterwards (the tools run in this process).
- Files that would run code (a tagged YAML config or _BASE_, a .pkl, a .pth holding objects) are refused, and a
  marker file that their code would create proves that none of it ran.
- Signals, kill -9, a second writer and a full disk need real processes: those are forked from a forkserver that
  has imported torch and detectron2 once (multiprocessing's own zygote), so each costs a fork, not a start-up.
  The kill -9 loop is marked slow (CI runs it).
"""

import hashlib
import json
import multiprocessing
import os
import pickle
import random
import re
import resource
import runpy
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_tool_in_process
from detectron2.modeling import build_model

from cityseg_d2.engine.checkpoint import checkpoint_iteration, resume_candidates
from cityseg_d2.engine.setup import load_config
from cityseg_d2.file_io import atomic_write, partial_files

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml")
# The quickstart model made tiny: a ResNet-50 FPN 1/8 wide (5 MB checkpoints) on 128 px images, one thread.
SMALL = [
    "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32", "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "256", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005", "SOLVER.WARMUP_ITERS", "2",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
NO_EVALUATION = ["TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]


def train_args(output_dir, *overrides, flags=()):
    return ["--config-file", QUICKSTART, *flags, *SMALL, "OUTPUT_DIR", str(output_dir), *map(str, overrides)]


def snapshot(folder):
    """{relative path: sha256} of every file under `folder` (folders as None): equal snapshots, untouched files."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return found


def strict_json_lines(path):
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


@pytest.fixture(scope="module")
def finished_dir(synthetic_datasets_dir, tmp_path_factory):
    """A finished training: 4 iterations, checkpoints and evaluations after 2 and 4."""
    output_dir = tmp_path_factory.mktemp("finished") / "output"
    result = run_tool_in_process(
        "train_net.py",
        *train_args(
            output_dir,
            "SOLVER.MAX_ITER",
            4,
            "SOLVER.CHECKPOINT_PERIOD",
            2,
            "TEST.EVAL_PERIOD",
            2,
            "CITYSEG.BEST_CHECKPOINT_METRIC",
            "",
        ),
        datasets_dir=synthetic_datasets_dir,
    )
    assert result.code == 0, result.err[-3000:]
    return output_dir


def test_a_finished_training_is_read_back_and_logs_strict_json(finished_dir):
    assert checkpoint_iteration(finished_dir / "model_final.pth") == 3
    metrics = strict_json_lines(finished_dir / "metrics.json")
    evaluations = [m for m in metrics if "segm/AP" in m]
    # After the last iteration, logged at it like model_final.pth (detectron2: one past it). The evaluation after
    # iteration 2 was replaced by this one before the writers' first write (every 20 iterations), as in detectron2.
    assert [m["iteration"] for m in evaluations] == [3]
    assert any(value is None for m in evaluations for value in m.values())  # NaN (a class absent from val): null
    assert not partial_files(str(finished_dir))
    assert "Training finished" in (finished_dir / "log.txt").read_text()


class RunsCode:
    """Unpickling this runs `touch <marker>`: what a malicious file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def small_model_state(*overrides):
    cfg = load_config(QUICKSTART, [*SMALL, "MODEL.DEVICE", "cpu", *overrides])
    return build_model(cfg).state_dict()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synthetic_root):
    """Broken and malicious inputs, and the marker file their code would create."""
    folder = tmp_path_factory.mktemp("inputs")
    marker = folder / "code_ran"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    (folder / "tagged.yaml").write_text(f'_BASE_: "{QUICKSTART}"\nSOLVER:\n  BASE_LR: {tag}\n')
    (folder / "tagged_base.yaml").write_text('_BASE_: "tagged.yaml"\n')
    (folder / "missing_base.yaml").write_text('_BASE_: "no_such_base.yaml"\n')
    (folder / "syntax.yaml").write_text(f'_BASE_: "{QUICKSTART}"\nSOLVER: [unclosed\n')
    (folder / "unknown_key.yaml").write_text(f'_BASE_: "{QUICKSTART}"\nSOLVER:\n  NO_SUCH_KEY: 1\n')
    (folder / "text.pth").write_text("not a checkpoint\n")
    (folder / "empty.pth").write_bytes(b"")
    (folder / "evil.pkl").write_bytes(pickle.dumps({"model": {}, "__author__": RunsCode(marker)}))
    torch.save({"model": {}, "trainer": RunsCode(marker)}, folder / "evil.pth")
    quickstart_model = build_model(load_config(QUICKSTART, ["MODEL.DEVICE", "cpu"]))  # a ResNet-18, 4x as wide
    torch.save({"model": quickstart_model.state_dict()}, folder / "other_architecture.pth")
    torch.save({"model": small_model_state("MODEL.ROI_HEADS.NUM_CLASSES", "10")}, folder / "ten_classes.pth")
    for broken in ("truncated_image", "corrupt_json"):
        for kind in ("leftImg8bit", "gtFine"):
            shutil.copytree(os.path.join(synthetic_root, kind, "train"), folder / broken / kind / "train")
    image = sorted((folder / "truncated_image" / "leftImg8bit" / "train").rglob("*.png"))[-1]
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size // 2)
    annotation = sorted((folder / "corrupt_json" / "gtFine" / "train").rglob("*_polygons.json"))[-1]
    annotation.write_text(annotation.read_text()[:-20])
    (folder / "a_file").write_text("a file, not a folder\n")
    (folder / "not_an_image.png").write_text("not an image\n")
    sweep = (REPO / "configs/sweeps/student_project_space.yaml").read_text()
    (folder / "bad_metric_sweep.yaml").write_text(sweep.replace("metric: segm/AP ", "metric: segm/APP "))
    (folder / "unknown_key_sweep.yaml").write_text(sweep.replace("SOLVER.MOMENTUM:", "SOLVER.MOMENTUMS:"))
    return folder


def real_names(root):
    """Overrides that train on the real-Cityscapes dataset names, rooted at `root`."""
    return ["DATASETS.CITYSCAPES.ROOT", root, "DATASETS.TRAIN", "('cityscapes_instance_train',)", *NO_EVALUATION]


# (id, flags before the overrides, overrides, the error line's start; {inputs} and {out} are filled in)
TRAIN_NET_CASES = [
    ("missing config", [], [], "config file not found: {inputs}/none.yaml"),
    ("tagged config", [], [], "{inputs}/tagged.yaml: refused: could not determine a constructor for the tag"),
    ("tagged _BASE_", [], [], "{inputs}/tagged_base.yaml: refused: could not determine a constructor for the tag"),
    ("missing _BASE_", [], [], "{inputs}/missing_base.yaml: cannot read its _BASE_ {inputs}/no_such_base.yaml"),
    ("YAML syntax", [], [], "{inputs}/syntax.yaml: while parsing a flow sequence"),
    ("unknown key in file", [], [], "{inputs}/unknown_key.yaml: Non-existent config key: SOLVER.NO_SUCH_KEY"),
    ("unknown override", [], ["SOLVER.NO_SUCH_KEY", "1"], "command-line override: Non-existent key: SOLVER.NO_SUCH_KEY"),
    ("odd overrides", [], ["SOLVER.BASE_LR"], "command-line override: Override list has odd length"),
    ("override type", [], ["SOLVER.MAX_ITER", "many"], "command-line override: "),
    ("evaluator name", [], ["TEST.EVALUATORS", "['cityscape']"], "TEST.EVALUATORS ['cityscape']: unknown ['cityscape']"),
    ("class set vs head", [], ["DATASETS.CITYSCAPES.CLASS_SET", "cityscapes10"], "MODEL.ROI_HEADS.NUM_CLASSES is 8 but"),
    ("class set name", [], ["DATASETS.CITYSCAPES.CLASS_SET", "seed10"], "DATASETS.CITYSCAPES.CLASS_SET is 'seed10': use one of"),
    ("mask source", [], ["DATASETS.CITYSCAPES.MASK_SOURCE", "pixels"], "DATASETS.CITYSCAPES.MASK_SOURCE is 'pixels': use one of"),
    ("mask format", [], ["DATASETS.CITYSCAPES.MASK_SOURCE", "instance_ids"], "DATASETS.CITYSCAPES.MASK_SOURCE instance_ids gives"),
    ("W&B mode", [], ["WANDB.MODE", "sometimes"], "WANDB.MODE is 'sometimes': use one of"),
    ("negative LR", [], ["SOLVER.BASE_LR", "-0.01"], "SOLVER.BASE_LR is -0.01: it must be > 0.0"),
    ("MAX_ITER 0", [], ["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER is 0: it must be > 0"),
    ("batch 0", [], ["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH is 0: it must be > 0"),
    ("checkpoint period 0", [], ["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD is 0: it must be > 0"),
    ("eval period -1", [], ["TEST.EVAL_PERIOD", "-1"], "TEST.EVAL_PERIOD is -1: it must be >= 0"),
    ("best metric", [], ["TEST.EVAL_PERIOD", "2", "CITYSEG.BEST_CHECKPOINT_METRIC", "segm/APP"], "CITYSEG.BEST_CHECKPOINT_METRIC 'segm/APP' is not reported"),
    ("best mode", [], ["CITYSEG.BEST_CHECKPOINT_MODE", "best"], "CITYSEG.BEST_CHECKPOINT_MODE is 'best': use max or min"),
    ("unregistered dataset", [], ["DATASETS.TRAIN", "('no_such_set',)"], "DATASETS.TRAIN: dataset 'no_such_set' is not registered"),
    ("missing weights", [], ["MODEL.WEIGHTS", "{inputs}/none.pth"], "MODEL.WEIGHTS file not found: {inputs}/none.pth"),
    ("text weights", [], ["MODEL.WEIGHTS", "{inputs}/text.pth"], "MODEL.WEIGHTS '{inputs}/text.pth' could not be loaded (not a PyTorch checkpoint)"),
    ("empty weights", [], ["MODEL.WEIGHTS", "{inputs}/empty.pth"], "MODEL.WEIGHTS '{inputs}/empty.pth' could not be loaded (the file is empty)"),
    ("pickle weights", [], ["MODEL.WEIGHTS", "{inputs}/evil.pkl"], "MODEL.WEIGHTS {inputs}/evil.pkl is a pickle, which can run code when loaded: refused"),
    ("objects in .pth", [], ["MODEL.WEIGHTS", "{inputs}/evil.pth"], "MODEL.WEIGHTS '{inputs}/evil.pth' could not be loaded (it holds Python objects besides tensors"),
    ("other architecture", [], ["MODEL.WEIGHTS", "{inputs}/other_architecture.pth"], "MODEL.WEIGHTS {inputs}/other_architecture.pth does not fit this model"),
    ("eval-only, other classes", ["--eval-only"], ["MODEL.WEIGHTS", "{inputs}/ten_classes.pth"], "--eval-only: {inputs}/ten_classes.pth does not fit this model"),
    ("finished OUTPUT_DIR", [], [], "OUTPUT_DIR {out} holds a finished training (last_checkpoint, metrics.json, model_0000001.pth, ...): pass --resume"),
    ("resume below MAX_ITER", ["--resume"], ["SOLVER.MAX_ITER", "3"], "--resume: {out}/model_final.pth has trained 4 iterations but SOLVER.MAX_ITER is 3"),
    ("OUTPUT_DIR is a file", [], ["OUTPUT_DIR", "{inputs}/a_file"], "OUTPUT_DIR {inputs}/a_file is a file, not a folder"),
    ("truncated image", [], real_names("{inputs}/truncated_image"), "{inputs}/truncated_image/leftImg8bit/train/"),
    ("corrupt annotation", [], real_names("{inputs}/corrupt_json"), "{inputs}/corrupt_json/gtFine/train/"),
    ("missing data root", [], real_names("{inputs}/nowhere"), "Cityscapes root {inputs}/nowhere not found"),
    ("unknown city", [], ["DATASETS.CITYSCAPES.CITIES", "['atlantis']"], "{datasets}/cityscapes_synthetic/leftImg8bit/train: no city atlantis"),
]  # fmt: skip
# Cases found after OUTPUT_DIR's checks, so run into a new OUTPUT_DIR (which must not be created).
NEW_OUTPUT_DIR = {"truncated image", "corrupt annotation", "missing data root", "unknown city"}
CONFIG_FILES = {"missing config": "none.yaml", "tagged config": "tagged.yaml", "tagged _BASE_": "tagged_base.yaml",
                "missing _BASE_": "missing_base.yaml", "YAML syntax": "syntax.yaml", "unknown key in file": "unknown_key.yaml"}  # fmt: skip


def assert_one_line_error(result, expected, code=2):
    assert result.code == code, f"exit code {result.code}:\n{result.err[-3000:]}"
    assert len(result.error_lines()) == 1 and result.error_lines()[0].startswith(f"error: {expected}"), result.err[
        -3000:
    ]
    assert "Traceback" not in result.err + result.out


@pytest.mark.parametrize("case, flags, overrides, expected", TRAIN_NET_CASES, ids=[c[0] for c in TRAIN_NET_CASES])
def test_train_net_bad_input_is_one_line_and_touches_nothing(
    case, flags, overrides, expected, run_tool, inputs, finished_dir, synthetic_datasets_dir, tmp_path
):
    fill = dict(inputs=inputs, out=finished_dir, datasets=synthetic_datasets_dir)
    output_dir = tmp_path / "new_output" if case in NEW_OUTPUT_DIR else finished_dir
    args = train_args(output_dir, *(o.format(**fill) for o in overrides), flags=flags)
    if case in CONFIG_FILES:
        args[1] = str(inputs / CONFIG_FILES[case])
    before = snapshot(finished_dir), snapshot(inputs)
    result = run_tool("train_net.py", *args)
    assert_one_line_error(result, expected.format(**fill))
    assert (snapshot(finished_dir), snapshot(inputs)) == before  # no marker either: no code ran
    assert not (tmp_path / "new_output").exists()


# predict.py: (id, arguments, the error line's start); the weights are those of finished_dir unless a case overrides them
PREDICT_CASES = [
    ("missing weights", ["--opts", "MODEL.WEIGHTS", "{inputs}/none.pth"], "MODEL.WEIGHTS file not found: {inputs}/none.pth"),
    ("text weights", ["--opts", "MODEL.WEIGHTS", "{inputs}/text.pth"], "MODEL.WEIGHTS '{inputs}/text.pth' could not be loaded (not a PyTorch checkpoint)"),
    ("pickle weights", ["--opts", "MODEL.WEIGHTS", "{inputs}/evil.pkl"], "MODEL.WEIGHTS {inputs}/evil.pkl is a pickle"),
    ("objects in .pth", ["--opts", "MODEL.WEIGHTS", "{inputs}/evil.pth"], "MODEL.WEIGHTS '{inputs}/evil.pth' could not be loaded (it holds Python objects"),
    ("other architecture", ["--opts", "MODEL.WEIGHTS", "{inputs}/other_architecture.pth"], "MODEL.WEIGHTS {inputs}/other_architecture.pth does not fit this model"),
    ("tagged config", ["--config-file", "{inputs}/tagged.yaml"], "{inputs}/tagged.yaml: refused: could not determine a constructor"),
    ("output is a file", ["--output", "{inputs}/a_file"], "--output {inputs}/a_file"),
    ("no image", ["--input", "{inputs}/not_an_image.png"], "--input {inputs}/not_an_image.png: none of the 1 files could be read as an image"),
    ("no input", ["--input", "{inputs}/nowhere/*.png"], "--input {inputs}/nowhere/*.png: no image files"),
    ("threshold", ["--confidence-threshold", "2"], "--confidence-threshold 2.0: must be between 0 and 1"),
]  # fmt: skip


@pytest.mark.parametrize("case, arguments, expected", PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_bad_input_is_one_line_and_touches_nothing(
    case, arguments, expected, run_tool, inputs, finished_dir, synthetic_root, tmp_path
):
    output = tmp_path / "predictions"
    output.mkdir()
    (output / "earlier.json").write_text("{}")  # what an earlier run left
    image = sorted(Path(synthetic_root, "leftImg8bit", "val").rglob("*.png"))[0]
    options = {"--config-file": QUICKSTART, "--input": str(image), "--output": str(output)}
    opts = ["--opts", *SMALL, "MODEL.WEIGHTS", str(finished_dir / "model_final.pth")]
    fill = dict(inputs=inputs)
    arguments = [a.format(**fill) for a in arguments]
    if arguments[0] == "--opts":
        opts += arguments[1:]
    else:
        options[arguments[0]] = arguments[1]
    earlier, before = snapshot(output), (snapshot(inputs), snapshot(finished_dir))
    result = run_tool("predict.py", *[x for option in options.items() for x in option], *opts)
    assert_one_line_error(result, expected.format(**fill))
    assert {name: snapshot(output).get(name) for name in earlier} == earlier
    assert (snapshot(inputs), snapshot(finished_dir)) == before


# tune_net.py: (id, arguments, the error line's start); KEY VALUE overrides come first on purpose (any order works)
TUNE_NET_CASES = [
    ("no sweep file", [], "no sweep file given: pass --sweep"),
    ("missing sweep file", ["--sweep", "{inputs}/none.yaml"], "sweep file not found: {inputs}/none.yaml"),
    ("sweep metric", ["--sweep", "{inputs}/bad_metric_sweep.yaml"], "{inputs}/bad_metric_sweep.yaml: metric 'segm/APP'"),
    ("sweep key", ["--sweep", "{inputs}/unknown_key_sweep.yaml"], "{inputs}/unknown_key_sweep.yaml: "),
    ("tagged config", ["--sweep", "{student}", "--config-file", "{inputs}/tagged.yaml"], "{inputs}/tagged.yaml: refused"),
    ("not a Ray server", ["--sweep", "{student}", "--address", "127.0.0.1:{port}"], "--address 127.0.0.1:{port}: "),
]  # fmt: skip


@pytest.fixture
def not_a_ray_server():
    """A TCP port where a server answers, but not Ray's: it says hello and hangs up."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            with connection:
                connection.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("case, arguments, expected", TUNE_NET_CASES, ids=[c[0] for c in TUNE_NET_CASES])
def test_tune_net_bad_input_is_one_line_and_touches_nothing(
    case, arguments, expected, run_tool, inputs, not_a_ray_server, tmp_path
):
    storage = tmp_path / "sweeps"
    storage.mkdir()
    (storage / "earlier.csv").write_text("trial,segm/AP\n")  # what an earlier sweep left
    fill = dict(inputs=inputs, port=not_a_ray_server, student=REPO / "configs/sweeps/student_project_space.yaml")
    arguments = [a.format(**fill) for a in arguments]
    config = [] if "--config-file" in arguments else ["--config-file", QUICKSTART]
    before = snapshot(storage), snapshot(inputs)
    signal.alarm(120)  # a probe that hangs fails the test instead of the suite
    try:
        result = run_tool("tune_net.py", "SOLVER.MAX_ITER", "6000", *config, *arguments, "--storage", storage)
    finally:
        signal.alarm(0)
    assert_one_line_error(result, expected.format(**fill))
    assert (snapshot(storage), snapshot(inputs)) == before


def test_the_malicious_inputs_do_run_code_when_loaded_unsafely(inputs, tmp_path):
    """The refusals above prove something only because these files are not harmless."""
    import yaml

    for load in (
        lambda: pickle.loads((inputs / "evil.pkl").read_bytes()),
        lambda: torch.load(inputs / "evil.pth", weights_only=False),
        lambda: yaml.unsafe_load((inputs / "tagged.yaml").read_text()),
    ):
        load()
        assert (inputs / "code_ran").exists()
        (inputs / "code_ran").unlink()


def test_pickle_weights_load_with_trust_pickle(run_tool, inputs, tmp_path):
    weights = tmp_path / "weights.pkl"
    state = {key: value.numpy() for key, value in small_model_state().items()}
    weights.write_bytes(pickle.dumps({"model": state, "__author__": "a trusted source"}))
    args = [
        "--eval-only",
        *SMALL,
        "MODEL.WEIGHTS",
        weights,
        "OUTPUT_DIR",
        tmp_path / "out",
        "TEST.EVALUATORS",
        "['cityscapes_fast']",
    ]
    refused = run_tool("train_net.py", "--config-file", QUICKSTART, *args)
    assert_one_line_error(refused, f"MODEL.WEIGHTS {weights} is a pickle")
    trusted = run_tool("train_net.py", "--config-file", QUICKSTART, "--trust-pickle", *args)
    assert trusted.code == 0, trusted.err[-3000:]


def copy_of(finished_dir, tmp_path):
    return Path(shutil.copytree(finished_dir, tmp_path / "output"))


def test_resume_falls_back_to_the_newest_readable_checkpoint(run_tool, finished_dir, tmp_path):
    output_dir = copy_of(finished_dir, tmp_path)
    (output_dir / "model_0000003.pth").unlink()
    final = output_dir / "model_final.pth"
    (output_dir / "last_checkpoint").write_text(final.name)
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    assert resume_candidates(str(output_dir)) == [str(final), str(output_dir / "model_0000001.pth")]
    result = run_tool("train_net.py", *train_args(output_dir, "SOLVER.MAX_ITER", 5, *NO_EVALUATION, flags=["--resume"]))
    assert result.code == 0, result.err[-3000:]
    log = result.out + result.err
    assert f"Cannot resume from {final}" in log and "Starting training from iteration 2" in log
    assert checkpoint_iteration(final) == 4
    iterations = [m["iteration"] for m in strict_json_lines(output_dir / "metrics.json") if "total_loss" in m]
    assert iterations == sorted(iterations) and iterations[-1] == 4  # lines of the lost iterations 2-3 dropped


def test_resume_candidates_skip_an_empty_or_dangling_last_checkpoint(tmp_path):
    for age, name in enumerate(["model_0000009.pth", "model_0000004.pth", "model_final.pth"]):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (1000 - age, 1000 - age))
    for content in ("", "model_0000042.pth"):
        (tmp_path / "last_checkpoint").write_text(content)
        newest_first = ("model_0000009.pth", "model_0000004.pth", "model_final.pth")
        assert resume_candidates(str(tmp_path)) == [str(tmp_path / name) for name in newest_first]
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    assert resume_candidates(str(tmp_path))[0] == str(tmp_path / "model_final.pth")


def test_resume_with_no_readable_checkpoint_is_one_line(run_tool, finished_dir, tmp_path):
    output_dir = copy_of(finished_dir, tmp_path)
    for path in output_dir.glob("*.pth"):
        path.write_bytes(b"")
    before = snapshot(output_dir)
    result = run_tool("train_net.py", *train_args(output_dir, "SOLVER.MAX_ITER", 5, flags=["--resume"]))
    assert_one_line_error(
        result, f"--resume: no checkpoint in {output_dir} can be read (model_final.pth: the file is empty;"
    )
    assert snapshot(output_dir) == before


def test_overwrite_starts_afresh_in_a_finished_output_dir(run_tool, finished_dir, tmp_path):
    output_dir = copy_of(finished_dir, tmp_path)
    result = run_tool(
        "train_net.py", *train_args(output_dir, "SOLVER.MAX_ITER", 1, *NO_EVALUATION, flags=["--overwrite"])
    )
    assert result.code == 0, result.err[-3000:]
    assert sorted(p.name for p in output_dir.glob("*.pth")) == ["model_final.pth"]
    assert [m["iteration"] for m in strict_json_lines(output_dir / "metrics.json")] == [0]


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "last_checkpoint"
    target.write_text("model_0000001.pth")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(str(target), "w") as f:
            f.write("model_00")
            1 / 0
    assert target.read_text() == "model_0000001.pth" and not partial_files(str(tmp_path))


# Real processes, forked from a forkserver that imported torch and detectron2 once.

_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(["torch", "detectron2.engine", "cityseg_d2.engine"])


def _train_net_in_child(argv, environment, log_path, fault):
    """A child process: tools/train_net.py argv, output to log_path, with one test fault (or none):
    ("kill in save", n) kills the process with SIGKILL halfway through writing the n-th checkpoint;
    ("kill before tag", n) kills it just before the n-th last_checkpoint is renamed into place;
    ("file size limit", bytes) makes every file write beyond `bytes` fail, as a full disk does.
    It leads its own process group, which holds its data-loader workers, as a job step's processes in Slurm, and
    forks them as `python tools/train_net.py` does (a forkserver's child would have them forked by another one)."""
    os.setpgrp()
    multiprocessing.set_start_method("fork", force=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(environment)
    torch.set_num_threads(1)
    from cityseg_d2.data import register_builtin_datasets

    register_builtin_datasets()
    kind, value = fault or (None, None)
    calls = {"save": 0, "tag": 0}
    if kind == "kill in save":
        real_save = torch.save

        def save_then_die(obj, f, *args, **kwargs):
            calls["save"] += 1
            if calls["save"] == value:
                import io

                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save_then_die
    elif kind == "kill before tag":
        real_replace = os.replace

        def replace_or_die(source, destination):
            if str(destination).endswith("last_checkpoint"):
                calls["tag"] += 1
                if calls["tag"] == value:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(source, destination)

        os.replace = replace_or_die
    elif kind == "file size limit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (value, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    sys.argv = [str(REPO / "tools" / "train_net.py"), *map(str, argv)]
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Training:
    """tools/train_net.py in a forked child process."""

    def __init__(self, argv, datasets_dir, log_path, fault=None):
        environment = {
            "DETECTRON2_DATASETS": str(datasets_dir),
            "CITYSEG_D2_CACHE_DIR": os.environ["CITYSEG_D2_CACHE_DIR"],
            "OMP_NUM_THREADS": "1",
        }
        self.log_path = Path(log_path)
        self.process = _FORKSERVER.Process(target=_train_net_in_child, args=(argv, environment, str(log_path), fault))
        self.process.start()

    def wait(self, timeout=300):
        self.process.join(timeout)
        assert self.process.exitcode is not None, f"still running after {timeout} s:\n{self.log()[-3000:]}"
        return self.process.exitcode

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for(self, ready, timeout=300):
        """Until ready() (or, for a string, until the log holds it)."""
        if isinstance(ready, str):
            text, ready = ready, lambda: text in self.log()
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.process.is_alive(), f"ended ({self.process.exitcode}) too soon:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{self.log()[-3000:]}"
            time.sleep(0.1)


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_a_second_writer_is_refused(signum, synthetic_datasets_dir, run_tool, tmp_path):
    """The signal goes to the whole process group, data-loader workers included, as Slurm's SIGTERM and Ctrl-C do."""
    output_dir = tmp_path / "output"
    argv = train_args(
        output_dir, "SOLVER.MAX_ITER", 1000, "SOLVER.CHECKPOINT_PERIOD", 2, *NO_EVALUATION, "DATALOADER.NUM_WORKERS", 1
    )
    training = Training(argv, synthetic_datasets_dir, tmp_path / "train.log")
    training.wait_for((output_dir / "model_0000001.pth").exists)  # training is under way
    if signum == signal.SIGTERM:
        second = run_tool("train_net.py", *train_args(output_dir, "SOLVER.MAX_ITER", 1000, flags=["--resume"]))
        assert_one_line_error(
            second, f"OUTPUT_DIR {output_dir} is in use by another run (pid {training.process.pid} on "
        )
    os.killpg(training.process.pid, signum)
    assert training.wait() == 128 + signum
    (line,) = error_lines(training.log())
    name = signal.Signals(signum).name
    assert line.startswith(f"error: {name} stopped training after iteration ") and " --resume " in line, line
    assert "Traceback" not in training.log()
    checkpoint = output_dir / (output_dir / "last_checkpoint").read_text()
    iteration = checkpoint_iteration(checkpoint)
    assert checkpoint.name == f"model_{iteration:07d}.pth" and iteration >= 1
    assert line.startswith(
        f"error: {name} stopped training after iteration {iteration + 1} of 1000, saved in {checkpoint};"
    )
    resumed = run_tool(
        "train_net.py", *train_args(output_dir, "SOLVER.MAX_ITER", iteration + 2, *NO_EVALUATION, flags=["--resume"])
    )
    assert resumed.code == 0, resumed.err[-3000:]
    assert f"Starting training from iteration {iteration + 1}" in resumed.out + resumed.err


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(synthetic_datasets_dir, finished_dir, tmp_path):
    output_dir = copy_of(finished_dir, tmp_path)
    checkpoints = {
        name: digest
        for name, digest in snapshot(output_dir).items()
        if name.endswith(".pth") or name == "last_checkpoint"
    }
    argv = train_args(
        output_dir, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2, *NO_EVALUATION, flags=["--resume"]
    )
    training = Training(argv, synthetic_datasets_dir, tmp_path / "train.log", fault=("file size limit", 2**20))
    assert training.wait() == 2, training.log()[-3000:]
    (line,) = error_lines(training.log())
    assert line.startswith(
        f"error: cannot write checkpoint {output_dir}/model_0000005.pth (File too large); the last complete checkpoint"
    )
    assert "Traceback" not in training.log()
    assert {name: digest for name, digest in snapshot(output_dir).items() if name in checkpoints} == checkpoints
    assert not partial_files(str(output_dir))


@pytest.mark.slow
def test_kill_9_at_random_points_always_resumes_to_a_whole_final_model(synthetic_datasets_dir, tmp_path):
    """12 kill -9 cycles, at random moments and halfway through checkpoint and last_checkpoint writes, each followed
    by --resume; then a last run to the end. Whatever was killed, last_checkpoint names a whole checkpoint, and the
    final model is the last iteration's."""
    output_dir, max_iter = tmp_path / "output", 80
    argv = train_args(
        output_dir, "SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", 2, *NO_EVALUATION, flags=["--resume"]
    )
    rng = random.Random(0)
    faults = [("kill in save", 2), ("kill before tag", 2), None, ("kill in save", 1), None, ("kill before tag", 1)] * 2
    starts = []
    for cycle, fault in enumerate(faults):
        training = Training(argv, synthetic_datasets_dir, tmp_path / f"cycle{cycle}.log", fault)
        if fault is None:
            training.wait_for("Starting training")
            time.sleep(rng.uniform(0.0, 2.0))
            training.process.kill()
        code = training.wait()
        assert code == -signal.SIGKILL, f"cycle {cycle} ({fault}) ended with {code}:\n{training.log()[-3000:]}"
        if fault:
            assert partial_files(str(output_dir))  # killed halfway through a write
        if (output_dir / "last_checkpoint").exists():
            named = output_dir / (output_dir / "last_checkpoint").read_text()
            assert checkpoint_iteration(named) is not None  # whole, readable
        starts += [int(n) for n in re.findall(r"Starting training from iteration (\d+)", training.log())]
        assert cycle == 0 or "ended without releasing it" in training.log()  # the killed run's lock, taken over
    training = Training(argv, synthetic_datasets_dir, tmp_path / "last.log")
    assert training.wait() == 0, training.log()[-3000:]
    assert starts == sorted(starts) and starts[-1] > 0, starts  # a kill never loses a saved iteration
    assert checkpoint_iteration(output_dir / "model_final.pth") == max_iter - 1
    assert not partial_files(str(output_dir))
    iterations = [m["iteration"] for m in strict_json_lines(output_dir / "metrics.json") if "total_loss" in m]
    assert iterations == sorted(iterations) and iterations[-1] == max_iter - 1
