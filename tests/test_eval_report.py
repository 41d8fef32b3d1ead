"""tools/eval_report.py and cityseg_d2.evaluation.report: the report's AP is the evaluator's, every plot and
picture is written, occlusion is measured as cityscapesscripts draws the polygons, bad input is one line."""

import glob
import json
import math
import os
import re

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances

from cityseg_d2.data import gt_instance_ids_path
from cityseg_d2.evaluation import FastCityscapesInstanceEvaluator
from cityseg_d2.evaluation.perturbations import perturbed_predictions
from cityseg_d2.evaluation.predictions_file import PREDICTIONS_FILE, PredictionsFile
from cityseg_d2.evaluation.protocol import EvaluatedClasses, read_gt_instance_ids
from cityseg_d2.evaluation.report import full_instance_areas
from cityseg_d2.evaluation.report_pages import PLOTS, report_tables, write_report

from conftest import QUICKSTART, run_tool_in_process


@pytest.fixture(scope="module")
def evaluated(register_synthetic, tmp_path_factory):
    """The fast evaluator's results on perturbed predictions of the synthetic val split, and the predictions file
    it saved."""
    name = register_synthetic("report_val", "val")
    classes, metadata, dicts = EvaluatedClasses.of_dataset(name), MetadataCatalog.get(name), DatasetCatalog.get(name)
    outputs = [
        {
            "instances": perturbed_predictions(
                read_gt_instance_ids(gt_instance_ids_path(image, metadata)), classes, "mixed", np.random.default_rng(i),
                2 * i + 1, num_predictions=25,
            )  # fmt: skip
        }
        for i, image in enumerate(dicts)
    ]
    output_dir = tmp_path_factory.mktemp("report_eval")
    evaluator = FastCityscapesInstanceEvaluator(name, str(output_dir), save_predictions=True)
    evaluator.reset()
    evaluator.process(dicts, outputs)
    return evaluator.evaluate()["segm"], str(output_dir / PREDICTIONS_FILE), classes


@pytest.fixture(scope="module")
def report_dir(evaluated, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = run_tool_in_process("eval_report.py", "--predictions", evaluated[1], "--out", out, "--gallery", 3)
    assert result.code == 0, result.err[-3000:]
    assert f"report: {out / 'report.html'}" in result.out
    return out


def _same(a, b, tolerance=1e-6):
    """Equal within tolerance, or both not a number (NaN, or None as JSON files hold it)."""
    a_nan, b_nan = a is None or math.isnan(a), b is None or math.isnan(b)
    return (a_nan and b_nan) or (not a_nan and not b_nan and abs(a - b) <= tolerance)


def test_report_ap_is_the_evaluators(evaluated, report_dir):
    results, _, classes = evaluated
    report = json.loads((report_dir / "report.json").read_text())
    assert _same(report["AP"], results["AP"]) and _same(report["AP50"], results["AP50"])
    for name in classes.names:
        assert _same(report["per_class"][name]["AP"], results[f"AP-{name}"])
        assert _same(report["per_class"][name]["AP50"], results[f"AP50-{name}"])
    assert _same(report["ap_by_iou"]["mean"][0], results["AP50"])
    assert 0 < results["AP"] < 100
    sizes = report["ap_by_size"]
    assert sum(v["instances"] for v in sizes.values()) == report["ground_truth_instances"]
    # What each detection is, and the misses, add up: every matched instance has exactly one true positive.
    detections = report["detections"]
    negatives = report["false_negatives"]
    for name in classes.names:
        found = negatives["per_class"][name]["instances"] - negatives["per_class"][name]["missed"]
        assert detections[name]["true positive"] == found
    assert sum(v["instances"] for v in negatives["by_visibility"].values()) == report["ground_truth_instances"]
    assert negatives["visibility_unknown"] == 0
    confusion = np.array(report["confusion"]["counts"])
    assert confusion.sum() == sum(sum(v.values()) for v in detections.values())


def test_every_plot_and_gallery_picture_is_written_and_embedded(report_dir):
    page = (report_dir / "report.html").read_text()
    for file, _ in PLOTS.values():
        picture = cv2.imread(str(report_dir / file))
        assert picture is not None and picture.size > 0, file
    gallery = sorted((report_dir / "gallery").iterdir())
    assert 1 <= len(gallery) <= 3 and all(cv2.imread(str(p)) is not None for p in gallery)
    assert page.count("src='data:image/png;base64,") == len(PLOTS)
    assert page.count("src='data:image/jpeg;base64,") == len(gallery)
    assert not re.search(r"src='(?!data:)", page)  # self-contained


def test_occlusion_is_visible_pixels_over_the_polygons_own_pixels(tmp_path):
    # A car, a person drawn over its right half (later objects occlude earlier ones), a car group.
    polygons = {
        "imgHeight": 60,
        "imgWidth": 80,
        "objects": [
            {"label": "road", "polygon": [[0, 30], [79, 30], [79, 59], [0, 59]]},
            {"label": "car", "polygon": [[10, 10], [40, 10], [40, 30], [10, 30]]},
            {"label": "person", "polygon": [[25, 5], [60, 5], [60, 35], [25, 35]]},
            {"label": "cargroup", "polygon": [[60, 40], [70, 40], [70, 50], [60, 50]]},
            {"label": "car", "polygon": [[65, 10], [75, 10], [75, 20], [65, 20]]},
        ],
    }
    path = tmp_path / "hand_000000_000019_gtFine_polygons.json"
    path.write_text(json.dumps(polygons))
    annotation = Annotation()
    annotation.fromJsonFile(str(path))
    visible_ids = np.array(createInstanceImage(annotation, "ids"))  # cityscapesscripts' own drawing
    full = full_instance_areas(str(path), (60, 80))
    assert sorted(full) == [24000, 26000, 26001]  # the group has no instance id
    for instance_id in (24000, 26001):  # nothing covers them
        assert full[instance_id] == np.sum(visible_ids == instance_id)
    assert np.sum(visible_ids == 26000) < 0.6 * full[26000]


def test_every_instance_of_the_synthetic_set_has_its_polygon(synthetic_root):
    """The instance ids full_instance_areas gives are those of the instanceIds PNGs: no instance is missing, none
    shows more pixels than its polygon covers, and most are not occluded at all."""
    ratios = []
    for polygons in sorted(glob.glob(os.path.join(synthetic_root, "gtFine", "val", "*", "*_polygons.json"))):
        ids = read_gt_instance_ids(polygons.replace("_polygons.json", "_instanceIds.png"))
        full = full_instance_areas(polygons, ids.shape)
        values, counts = np.unique(ids[ids >= 1000], return_counts=True)
        assert set(values) <= set(full)
        ratios += [count / full[value] for value, count in zip(values, counts)]
    assert len(ratios) > 10 and max(ratios) <= 1 and np.mean(np.array(ratios) == 1) > 0.3


def test_report_of_a_trained_model_equals_its_evaluation(trained_quickstart, run_tool, tmp_path):
    output_dir, learning = trained_quickstart
    evaluations = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    final = [e for e in evaluations if "segm/AP" in e][-1]
    result = run_tool(
        "eval_report.py", "--config-file", QUICKSTART, "--weights", output_dir / "model_final.pth",
        "--out", tmp_path, "--opts", *learning,
    )  # fmt: skip
    assert result.code == 0, result.err[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dataset"] == "cityscapes_synthetic_instance_train"
    for name, values in report["per_class"].items():
        assert _same(values["AP"], final[f"segm/AP-{name}"], 1e-4), name
    assert (tmp_path / "inference" / "cityscapes_synthetic_instance_train" / PREDICTIONS_FILE).is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config-file", QUICKSTART], "error: no weights: pass --weights W (with --config-file), or --predictions"),
        (["--config-file", QUICKSTART, "--weights", "missing.pth"], "error: MODEL.WEIGHTS file not found: missing.pth"),
        (["--predictions", "missing.npz"], "error: predictions file missing.npz not found"),
        (["--predictions", "p.npz", "--weights", "w.pth"], "error: give --weights (run the model) or --predictions"),
        (["--config-file", QUICKSTART, "--weights", "{weights}", "--dataset", "report_empty"], "error: data set "
         "report_empty has no images"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(args, message, run_tool, tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save({"model": {}}, weights)  # readable; never loaded when the data set is empty
    DatasetCatalog.register("report_empty", lambda: [])
    MetadataCatalog.get("report_empty").set(thing_classes=list(EvaluatedClasses.official().names))
    try:
        result = run_tool("eval_report.py", *[a.format(weights=weights) for a in args], "--out", tmp_path / "out")
    finally:
        DatasetCatalog.remove("report_empty")
        MetadataCatalog.remove("report_empty")
    assert result.code == 2
    assert len(result.error_lines()) == 1 and result.error_lines()[0].startswith(message), result.err[-2000:]
    assert not os.path.exists(tmp_path / "out" / "report.html")


def test_the_report_reaches_wandb_when_it_is_on(evaluated, run_tool, tmp_path, monkeypatch):
    """Offline W&B, isolated from this machine (as tests/test_wandb.py does): the report's tables and plots are the
    run's media files."""
    import wandb

    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    for var, folder in [("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")]:
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / folder))
    monkeypatch.setenv("NETRC", str(tmp_path / "wandb_home" / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb.teardown()
    try:
        result = run_tool(
            "eval_report.py", "--predictions", evaluated[1], "--config-file", QUICKSTART, "--out", tmp_path / "out",
            "--gallery", 1, "--opts", "WANDB.ENABLED", "True", "WANDB.MODE", "offline",
        )  # fmt: skip
    finally:
        wandb.teardown()
    assert result.code == 0, result.err[-3000:]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    media = {p.relative_to(run_dir / "files" / "media").as_posix() for p in (run_dir / "files" / "media").rglob("*")}
    for title in report_tables(json.loads((tmp_path / "out" / "report.json").read_text())):
        assert any(m.startswith(f"table/report/tables/{title}_") for m in media), (title, sorted(media))
    for prefix in [*(f"plots/{title}" for title in PLOTS), "worst images"]:
        assert any(m.startswith(f"images/report/{prefix}_") for m in media), (prefix, sorted(media))


def test_a_report_without_predictions_says_every_instance_is_missed(register_synthetic, tmp_path):
    name = register_synthetic("report_empty_predictions", "val")
    dicts = DatasetCatalog.get(name)[:2]
    evaluator = FastCityscapesInstanceEvaluator(name, str(tmp_path), save_predictions=True)
    evaluator.reset()
    nothing = Instances((256, 512), pred_masks=torch.zeros((0, 256, 512), dtype=torch.bool))
    nothing.set("scores", torch.zeros(0))
    nothing.set("pred_classes", torch.zeros(0, dtype=torch.int64))
    evaluator.process(dicts, [{"instances": nothing} for _ in dicts])
    assert evaluator.evaluate()["segm"]["AP"] == 0
    report, figures, gallery, _ = write_report(PredictionsFile.load(str(tmp_path / PREDICTIONS_FILE)), tmp_path)
    negatives = report["false_negatives"]["by_size"]
    assert report["AP"] == 0 and sum(b["missed"] for b in negatives.values()) == report["ground_truth_instances"] > 0
    assert all(os.path.getsize(path) > 0 for path in [*figures.values(), *gallery])
