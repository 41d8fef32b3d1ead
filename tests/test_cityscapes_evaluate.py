"""tools/cityscapes_evaluate.py: a folder of result files evaluated as cityscapesscripts' command line does (its
environment variables, table and JSON), with the numbers of our fast evaluator."""

import json
import math
import os
import re

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from cityseg_d2.data import gt_instance_ids_path
from cityseg_d2.evaluation import FastCityscapesInstanceEvaluator
from cityseg_d2.evaluation.official_cityscapes import write_prediction_files
from cityseg_d2.evaluation.perturbations import perturbed_predictions
from cityseg_d2.evaluation.protocol import EvaluatedClasses, ImagePredictions, read_gt_instance_ids

ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def results_folder(register_synthetic, synthetic_root, tmp_path, monkeypatch):
    """A Cityscapes root (the synthetic val ground truth), result files of perturbed predictions in results/ and
    the fast evaluator's results on the same predictions."""
    name = register_synthetic("cityscapes_evaluate_val", "val", mask_source="instance_ids")
    classes, metadata, dicts = EvaluatedClasses.of_dataset(name), MetadataCatalog.get(name), DatasetCatalog.get(name)
    dataset_root, results = tmp_path / "cityscapes", tmp_path / "results"
    dataset_root.mkdir()
    os.symlink(os.path.join(synthetic_root, "gtFine"), dataset_root / "gtFine")
    (results / "masks").mkdir(parents=True)
    outputs = []
    for index, image in enumerate(dicts):
        gt_path = gt_instance_ids_path(image, metadata)
        gt = read_gt_instance_ids(gt_path)
        instances = perturbed_predictions(gt, classes, "mixed", np.random.default_rng(index), 2 * index + 1)
        outputs.append({"instances": instances})
        predictions = ImagePredictions.from_output(outputs[-1], image["image_id"], gt.shape, gt_path, 8)
        write_prediction_files(str(results), image["image_id"], predictions, classes.label_ids)
    evaluator = FastCityscapesInstanceEvaluator(name)
    evaluator.reset()
    evaluator.process(dicts, outputs)
    monkeypatch.setenv("CITYSCAPES_DATASET", str(dataset_root))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(results))
    return dataset_root, results, classes, evaluator.evaluate()["segm"]


def _same(a, b, tolerance):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tolerance


def test_prints_the_scripts_table_and_writes_its_json_with_our_numbers(results_folder, run_tool):
    dataset_root, _, classes, fast = results_folder
    result = run_tool("cityscapes_evaluate.py")
    assert result.code == 0, result.err
    with open(dataset_root / "evaluationResults" / "resultInstanceLevelSemanticLabeling.json") as f:
        saved = json.load(f)
    assert saved["instLabels"] == list(classes.names)
    # The script's table: "<label> : <AP> <AP50>" with 3 decimals, coloured.
    printed = {
        label: (float(ap), float(ap50))
        for label, ap, ap50 in re.findall(
            r"^(\w+)\s*:\s*([\d.]+|nan)\s+([\d.]+|nan)\s*$", ANSI_COLOUR.sub("", result.out), re.M
        )
    }
    assert list(printed) == [*classes.names, "average"]
    for name in classes.names:
        ap, ap50 = fast[f"AP-{name}"] / 100, fast[f"AP50-{name}"] / 100
        assert _same(saved["averages"]["classes"][name]["ap"], ap, 1e-8)
        assert _same(saved["averages"]["classes"][name]["ap50%"], ap50, 1e-8)
        assert _same(printed[name][0], ap, 5e-4) and _same(printed[name][1], ap50, 5e-4)
    assert _same(saved["averages"]["allAp"], fast["AP"] / 100, 1e-8)
    assert _same(saved["averages"]["allAp50%"], fast["AP50"] / 100, 1e-8)
    assert _same(printed["average"][0], fast["AP"] / 100, 5e-4)
    assert 0 < fast["AP"] < 100


def test_a_missing_results_folder_or_result_file_is_one_clear_line(results_folder, run_tool, monkeypatch):
    _, results, _, _ = results_folder
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(results / "nowhere"))
    result = run_tool("cityscapes_evaluate.py")
    assert result.code == 2
    assert result.error_lines() == [
        f"error: results folder {results / 'nowhere'} not found: set CITYSCAPES_RESULTS "
        "(or put the results in $CITYSCAPES_DATASET/results)"
    ]
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(results))
    first = sorted(results.glob("*.txt"))[0]
    first.unlink()
    result = run_tool("cityscapes_evaluate.py")
    assert result.code == 2 and len(result.error_lines()) == 1
    assert f"found no prediction in {results} for the ground truth" in result.err


def _table(output):
    """The script's results table: from its first line of '#' to the average line."""
    lines = output.splitlines()
    first = lines.index("#" * 50)
    last = next(i for i, line in enumerate(lines) if line.startswith("average"))
    return lines[first : last + 1]


def test_the_scripts_own_command_prints_the_same_table_and_json(
    results_folder, run_tool, capsys, monkeypatch, tmp_path
):
    """The real csEvalInstanceLevelSemanticLabeling main(), its JSON writer made to accept numpy integers (the
    crash this command exists for), on the same folder."""
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as script

    dataset_root, results, _, _ = results_folder
    ours = run_tool("cityscapes_evaluate.py")
    json_file = dataset_root / "evaluationResults" / "resultInstanceLevelSemanticLabeling.json"
    our_json = json.loads(json_file.read_text())
    json_file.unlink()

    def write_json(data, file_name):
        with open(file_name, "w") as f:
            json.dump(data, f, default=lambda o: int(o) if isinstance(o, np.integer) else o.__dict__, sort_keys=True)

    monkeypatch.chdir(tmp_path)  # the script writes matches.json into the working folder
    monkeypatch.setattr(script, "writeDict2JSON", write_json)
    for key, value in {
        "groundTruthSearch": str(dataset_root / "gtFine" / "val" / "*" / "*_gtFine_instanceIds.png"),
        "exportFile": str(json_file),
        "gtInstancesFile": str(tmp_path / "gtInstances.json"),
        "predictionPath": None,
        "predictionWalk": None,
        "instLabels": [],
    }.items():
        monkeypatch.setattr(script.args, key, value)  # module state the script reads at import, restored after
    monkeypatch.setattr("sys.argv", ["csEvalInstanceLevelSemanticLabeling"])
    script.main()
    assert _table(capsys.readouterr().out) == _table(ours.out)
    same = json.dumps(json.loads(json_file.read_text()), sort_keys=True) == json.dumps(our_json, sort_keys=True)
    assert same  # as text: NaN (a class without ground truth) is not equal to itself
