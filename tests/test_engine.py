"""tools/train_net.py, the Trainer and tools/predict.py on the synthetic data set, with a real detectron2 model.

The tools run in this process (conftest.run_tool_in_process), as `python tools/<tool> ...` runs them.
"""
import glob
import json
import os
from pathlib import Path

import cv2
import pytest
import torch
from conftest import run_tool_in_process
from detectron2.modeling import build_model

from cityseg_d2.engine.setup import load_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
# The quickstart model at a size that trains a few iterations in seconds.
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "256", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "SOLVER.WARMUP_ITERS", "2",
]  # fmt: skip


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def succeeded(result):
    assert result.code == 0, f"exit code {result.code}:\n{result.out[-3000:]}\n{result.err[-5000:]}"
    return result


@pytest.mark.parametrize(
    "config_file", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if "sweeps" not in p.parts)
)
def test_every_config_loads_and_builds_its_model_on_cpu(config_file):
    cfg = load_config(str(REPO / config_file), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)  # builds only: weights are loaded by the checkpointer, not here
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == {"cityscapes8": 8, "cityscapes10": 10}[cfg.DATASETS.CITYSCAPES.CLASS_SET]


@pytest.fixture(scope="module")
def short_run(synthetic_datasets_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("train_net")
    result = run_tool_in_process(
        "train_net.py", "--config-file", QUICKSTART, *TINY, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
        "TEST.EVAL_PERIOD", "2", "OUTPUT_DIR", output_dir, datasets_dir=synthetic_datasets_dir,
    )  # fmt: skip
    return output_dir, succeeded(result)


def test_train_net_writes_checkpoints_metrics_and_evaluation(short_run):
    output_dir, _ = short_run
    files = set(os.listdir(output_dir))
    assert {"model_0000001.pth", "model_final.pth", "last_checkpoint", "config.yaml", "metrics.json"} <= files
    assert "model_best.pth" in files  # BestCheckpointer on segm/AP of the periodic evaluation
    metrics = read_metrics(output_dir)
    evaluations = [m for m in metrics if "segm/AP" in m]
    # The evaluation after iteration 2 (EVAL_PERIOD) is replaced in the event storage by the last one before the
    # writers write (every 20 iterations, and at the last), which is logged at the last iteration, like model_final.
    assert [m["iteration"] for m in evaluations] == [3]
    assert all("segm/matterport_AP50" in m and "segm/AP50-car" in m for m in evaluations)
    assert any("total_loss" in m for m in metrics)


def test_resume_continues_from_the_last_checkpoint(short_run, run_tool):
    output_dir, _ = short_run
    result = succeeded(
        run_tool(
            "train_net.py", "--config-file", QUICKSTART, "--resume", *TINY, "SOLVER.MAX_ITER", "6",
            "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", output_dir,
        )  # fmt: skip
    )
    assert "Starting training from iteration 4" in result.out + result.err
    iterations = [m["iteration"] for m in read_metrics(output_dir) if "total_loss" in m]
    assert max(iterations) == 5
    checkpoint = torch.load(os.path.join(output_dir, "model_final.pth"), map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == 5


def test_predict_writes_overlays_cityscapes_files_and_json(short_run, run_tool, synthetic_root, tmp_path):
    output_dir, _ = short_run
    images = sorted(glob.glob(os.path.join(synthetic_root, "leftImg8bit", "val", "*", "*.png")))[:2]
    out = tmp_path / "predictions"
    succeeded(
        run_tool(
            "predict.py", "--config-file", QUICKSTART, "--input", os.path.dirname(images[0]), "--output", out,
            "--confidence-threshold", "0.0", "--opts", *TINY, "MODEL.WEIGHTS", os.path.join(output_dir, "model_final.pth"),
        )  # fmt: skip
    )
    stems = sorted(Path(p).stem for p in glob.glob(os.path.join(os.path.dirname(images[0]), "*.png")))
    assert sorted(p.stem for p in (out / "overlays").glob("*.png")) == stems
    assert sorted(p.stem for p in (out / "json").glob("*.json")) == stems
    assert sorted(p.stem for p in (out / "cityscapes").glob("*.txt")) == stems
    record = json.loads((out / "json" / f"{stems[0]}.json").read_text())
    assert record["file_name"].endswith(f"{stems[0]}.png")
    lines = (out / "cityscapes" / f"{stems[0]}.txt").read_text().splitlines()
    assert len(lines) == len(record["instances"])
    for line, instance in zip(lines, record["instances"]):
        mask_file, label_id, score = line.split()
        assert (out / "cityscapes" / mask_file).is_file()
        assert int(label_id) == instance["label_id"] and abs(float(score) - instance["score"]) < 1e-4


def test_predict_files_keep_every_detection_and_overlays_only_confident_ones(short_run, run_tool, synthetic_root, tmp_path):
    output_dir, _ = short_run
    image = sorted(glob.glob(os.path.join(synthetic_root, "leftImg8bit", "val", "*", "*.png")))[0]
    stem = Path(image).stem
    # An untrained model's detections score low: keep them all (the model's own threshold at 0).
    weights = ["MODEL.WEIGHTS", os.path.join(output_dir, "model_final.pth"), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    outputs = {}
    for threshold in ("0.0", "0.999"):
        out = tmp_path / threshold
        succeeded(run_tool("predict.py", "--config-file", QUICKSTART, "--input", image, "--output", out,
                           "--confidence-threshold", threshold, "--opts", *TINY, *weights))  # fmt: skip
        outputs[threshold] = out
    lines = {t: (out / "cityscapes" / f"{stem}.txt").read_text().splitlines() for t, out in outputs.items()}
    assert len(lines["0.0"]) > 0 and lines["0.0"] == lines["0.999"]  # the threshold never touches result files
    original = cv2.imread(image)
    assert (cv2.imread(str(outputs["0.999"] / "overlays" / f"{stem}.png")) == original).all()
    assert (cv2.imread(str(outputs["0.0"] / "overlays" / f"{stem}.png")) != original).any()
    out = tmp_path / "no_overlays"
    succeeded(run_tool("predict.py", "--config-file", QUICKSTART, "--input", image, "--output", out, "--no-overlays",
                       "--opts", *TINY, *weights))  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["cityscapes", "json"]


def test_predict_skips_unreadable_images_and_carries_on(short_run, run_tool, synthetic_root, tmp_path, caplog):
    output_dir, _ = short_run
    images = tmp_path / "images"
    images.mkdir()
    good = sorted(glob.glob(os.path.join(synthetic_root, "leftImg8bit", "val", "*", "*.png")))[0]
    data = Path(good).read_bytes()
    (images / "a_good.png").write_bytes(data)
    (images / "b_truncated.png").write_bytes(data[: len(data) // 2])
    (images / "c_text.png").write_text("not an image")
    out = tmp_path / "predictions"
    result = succeeded(
        run_tool("predict.py", "--config-file", QUICKSTART, "--input", images, "--output", out,
                 "--opts", *TINY, "MODEL.WEIGHTS", os.path.join(output_dir, "model_final.pth"))
    )  # fmt: skip
    assert sorted(p.stem for p in (out / "json").glob("*.json")) == ["a_good"]
    assert "skipped 2 unreadable" in result.out
    assert {r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("skipped ")} == {
        f"skipped {images / 'b_truncated.png'}", f"skipped {images / 'c_text.png'}"
    }


def test_predict_bad_input_gives_one_clear_line(short_run, run_tool, synthetic_root, tmp_path):
    output_dir, _ = short_run
    image = sorted(glob.glob(os.path.join(synthetic_root, "leftImg8bit", "val", "*", "*.png")))[0]
    weights = os.path.join(output_dir, "model_final.pth")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    text_weights = tmp_path / "weights.pth"
    text_weights.write_text("not a checkpoint")
    text_image = tmp_path / "text.png"
    text_image.write_text("not an image")
    cases = [
        (["--input", image, "--output", a_file, "--opts", "MODEL.WEIGHTS", weights], f"--output {a_file}: {a_file} is a file"),
        (["--input", tmp_path / "nothing", "--output", tmp_path / "o1", "--opts", "MODEL.WEIGHTS", weights], "no image files"),
        (["--input", text_image, "--output", tmp_path / "o2", "--opts", "MODEL.WEIGHTS", weights], "none of the 1 files could be read"),
        (["--input", image, "--output", tmp_path / "o3", "--opts", "MODEL.WEIGHTS", tmp_path / "missing.pth"], "MODEL.WEIGHTS file not found"),
        (["--input", image, "--output", tmp_path / "o4", "--opts", "MODEL.WEIGHTS", text_weights], "could not be loaded"),
        (["--input", image, "--output", tmp_path / "o5", "--confidence-threshold", "50", "--opts", "MODEL.WEIGHTS", weights], "--confidence-threshold 50.0: must be between 0 and 1"),
    ]  # fmt: skip
    for args, message in cases:
        result = run_tool("predict.py", "--config-file", QUICKSTART, *args)
        assert result.code == 2, (args, result.err[-2000:])
        assert len(result.error_lines()) == 1 and message in result.error_lines()[0], (args, result.err[-2000:])
        assert "Traceback" not in result.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config-file", "configs/missing.yaml"], "error: config file not found: configs/missing.yaml"),
        (["--config-file", QUICKSTART, "SOLVER.NO_SUCH_KEY", "1"], "error: command-line override: Non-existent key: SOLVER.NO_SUCH_KEY"),
        (["--config-file", QUICKSTART, "MODEL.WEIGHTS", "no/such/weights.pth"], "error: MODEL.WEIGHTS file not found: no/such/weights.pth"),
        (["--config-file", QUICKSTART, "DATASETS.TRAIN", "('no_such_set',)"], "error: DATASETS.TRAIN: dataset 'no_such_set' is not registered; registered Cityscapes instance sets:"),
        (["--config-file", QUICKSTART, "TEST.EVALUATORS", "['cityscape']"], "error: TEST.EVALUATORS ['cityscape']: unknown ['cityscape']"),
        (["--config-file", QUICKSTART, "MODEL.ROI_HEADS.NUM_CLASSES", "10"], "error: MODEL.ROI_HEADS.NUM_CLASSES is 10 but cityscapes_synthetic_instance_train has 8 classes"),
        (["--config-file", QUICKSTART, "DATASETS.CITYSCAPES.CLASS_SET", "cityscapes10"], "error: MODEL.ROI_HEADS.NUM_CLASSES is 8 but cityscapes_synthetic_instance_train has 10 classes (cityscapes10): set MODEL.ROI_HEADS.NUM_CLASSES 10"),
        (["--config-file", QUICKSTART, "CITYSEG.BEST_CHECKPOINT_METRIC", "segm/APP"], "error: CITYSEG.BEST_CHECKPOINT_METRIC 'segm/APP' is not reported"),
        (["--config-file", QUICKSTART, "SOLVER.BASE_LR", "-0.1"], "error: SOLVER.BASE_LR is -0.1: it must be > 0.0"),
        (["--config-file", QUICKSTART, "SOLVER.MAX_ITER", "0"], "error: SOLVER.MAX_ITER is 0: it must be > 0"),
        (["--config-file", QUICKSTART, "DATASETS.CITYSCAPES.CLASS_SET", "cityscapes9"], "error: DATASETS.CITYSCAPES.CLASS_SET is 'cityscapes9': use one of"),
        (["--config-file", QUICKSTART, "WANDB.MODE", "sometimes"], "error: WANDB.MODE is 'sometimes': use one of"),
        (["--config-file", QUICKSTART, "CITYSEG.FAST.NMS", "fastest"], "error: CITYSEG.FAST.NMS is 'fastest': use one of"),
        (["--config-file", QUICKSTART, "MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "True"], "error: SOLVER.AMP.PRECISION float16 needs a GPU"),
    ],  # fmt: skip
)
def test_bad_input_gives_one_clear_line_before_anything_is_written(args, message, run_tool, tmp_path):
    result = run_tool("train_net.py", *args, "OUTPUT_DIR", tmp_path / "out")
    assert result.code == 2
    assert len(result.error_lines()) == 1 and result.error_lines()[0].startswith(message), result.err[-2000:]
    assert "Traceback" not in result.err
    assert not (tmp_path / "out").exists()


def test_incompatible_weights_and_empty_training_set_give_one_clear_line(run_tool, tmp_path):
    not_a_checkpoint = tmp_path / "weights.pth"
    not_a_checkpoint.write_text("not a checkpoint")
    result = run_tool(
        "train_net.py", "--config-file", QUICKSTART, *TINY, "MODEL.WEIGHTS", not_a_checkpoint, "OUTPUT_DIR", tmp_path / "out"
    )
    assert result.code == 2 and f"error: MODEL.WEIGHTS '{not_a_checkpoint}' could not be loaded" in result.err
    result = run_tool(
        "train_net.py", "--config-file", QUICKSTART, *TINY, "DATASETS.CITYSCAPES.CITIES", "['atlantis']",
        "OUTPUT_DIR", tmp_path / "out2",
    )  # fmt: skip
    assert result.code == 2, result.err[-3000:]
    assert len(result.error_lines()) == 1 and "Traceback" not in result.err, result.err[-3000:]


def copypaste_results(log, task="segm"):
    """The numbers detectron2 prints after an evaluation ("copypaste: AP,AP50,..."), last evaluation wins."""
    lines = [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]
    starts = [i for i, line in enumerate(lines) if line == f"Task: {task}"]
    names, values = lines[starts[-1] + 1].split(","), lines[starts[-1] + 2].split(",")
    return dict(zip(names, map(float, values)))


def test_quickstart_model_learns_and_eval_only_reproduces_its_numbers(trained_quickstart, run_tool, tmp_path):
    """The shared trained model (conftest.trained_quickstart) learned: its loss fell and its training-set AP50 is far
    above an untrained model's (~0); --eval-only with its weights gives the same numbers again."""
    output_dir, learning = trained_quickstart
    metrics = read_metrics(output_dir)
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses[-1] < 0.75 * losses[0], losses
    trained = [m for m in metrics if "segm/AP50" in m][-1]
    assert trained["segm/AP50"] > 30, trained

    untrained = succeeded(
        run_tool(
            "train_net.py", "--config-file", QUICKSTART, "--eval-only", *learning, "MODEL.WEIGHTS", "",
            "OUTPUT_DIR", tmp_path / "untrained",
        )  # fmt: skip
    )
    assert copypaste_results(untrained.out + untrained.err)["AP50"] < trained["segm/AP50"] - 25

    again = succeeded(
        run_tool(
            "train_net.py", "--config-file", QUICKSTART, "--eval-only", *learning,
            "MODEL.WEIGHTS", output_dir / "model_final.pth", "OUTPUT_DIR", tmp_path / "eval",
        )  # fmt: skip
    )
    reproduced = copypaste_results(again.out + again.err)
    for key in ("AP", "AP50", "matterport_AP50"):
        assert reproduced[key] == pytest.approx(trained[f"segm/{key}"], abs=1e-4), key


def test_diverging_training_stops_with_a_clear_message(run_tool, tmp_path):
    result = run_tool(
        "train_net.py", "--config-file", QUICKSTART, *TINY, "SOLVER.BASE_LR", "1e8", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.MAX_ITER", "10", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", tmp_path,
    )  # fmt: skip
    assert result.code == 2
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at iteration ") and "Lower SOLVER.BASE_LR" in last, last


def test_benchmark_predict_runs_at_toy_size(short_run, run_tool, synthetic_root):
    output_dir, _ = short_run
    images = os.path.join(synthetic_root, "leftImg8bit", "val")
    result = succeeded(
        run_tool("benchmark_predict.py", "--config-file", QUICKSTART, "--images", images, "--limit", "2",
                 "--rounds", "2", "--opts", *TINY, "MODEL.WEIGHTS", os.path.join(output_dir, "model_final.pth"))
    )  # fmt: skip
    assert result.out.count("round ") == 2 and "median ratio predict_images / DefaultPredictor" in result.out
