"""tools/make_submission.py: the zip holds every detection of every image in the layout cityscapesscripts reads, and
its own evaluation of the zip's contents gives our evaluator's numbers; mistakes give one line."""

import glob
import io
import math
import os
import zipfile

import numpy as np
import pytest
from conftest import QUICKSTART, _builtin_datasets_under, run_tool_in_process
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultPredictor
from detectron2.evaluation import inference_on_dataset
from PIL import Image

from cityseg_d2.engine import prepare_config
from cityseg_d2.evaluation import build_evaluator
from cityseg_d2.export.exporter import load_trained_model
from cityseg_d2.export.submission import evaluate_submission

VAL = "cityscapes_synthetic_instance_val"


@pytest.fixture(scope="module")
def submission(trained_quickstart, synthetic_datasets_dir, tmp_path_factory):
    """(zip path, tool result, weights, overrides): make_submission --evaluate of the trained model on the val split."""
    output_dir, learning = trained_quickstart
    weights = os.path.join(output_dir, "model_final.pth")
    zip_path = tmp_path_factory.mktemp("submission") / "submission.zip"
    result = run_tool_in_process(
        "make_submission.py", "--config-file", QUICKSTART, "--weights", weights, "--output", zip_path,
        "--dataset", VAL, "--evaluate", "--opts", *learning, datasets_dir=synthetic_datasets_dir,
    )  # fmt: skip
    assert result.code == 0, result.err[-3000:]
    return zip_path, result, weights, learning


def _config(weights, learning):
    return prepare_config(QUICKSTART, [*learning, "MODEL.WEIGHTS", weights, "DATASETS.TEST", f"('{VAL}',)"])


def test_zip_holds_every_detection_of_every_image_in_the_benchmark_layout(
    submission, synthetic_root, synthetic_datasets_dir
):
    zip_path, result, weights, learning = submission
    images = sorted(glob.glob(os.path.join(synthetic_root, "leftImg8bit", "val", "*", "*_leftImg8bit.png")))
    image_ids = [os.path.basename(p)[: -len("_leftImg8bit.png")] for p in images]
    with _builtin_datasets_under(synthetic_datasets_dir):
        predictor = DefaultPredictor(_config(weights, learning))
        label_ids = MetadataCatalog.get(VAL).thing_label_ids
    with zipfile.ZipFile(zip_path) as archive:
        names = set(archive.namelist())
        assert {n for n in names if not n.startswith("masks/")} == {f"{i}.txt" for i in image_ids}
        assert all(n.endswith(".png") for n in names if n.startswith("masks/"))
        referenced = set()
        for path, image_id in zip(images, image_ids):
            instances = predictor(np.asarray(Image.open(path))[:, :, ::-1])["instances"]
            lines = archive.read(f"{image_id}.txt").decode().splitlines()
            assert len(lines) == len(instances)  # every detection, no threshold
            for line, score, label, mask in zip(
                lines, instances.scores.tolist(), instances.pred_classes.tolist(), instances.pred_masks.numpy()
            ):
                mask_file, label_id, confidence = line.split(" ")
                assert int(label_id) == label_ids[label] and float(confidence) == score
                png = np.asarray(Image.open(io.BytesIO(archive.read(mask_file))))
                assert png.shape == (256, 512) and np.array_equal(png != 0, mask)
                referenced.add(mask_file)
        assert referenced == names - {f"{i}.txt" for i in image_ids}
    assert f"result files of 4 images of {VAL}" in result.out


def test_cityscapesscripts_on_the_zip_equals_our_evaluator(submission, synthetic_datasets_dir, tmp_path):
    zip_path, result, weights, learning = submission
    with _builtin_datasets_under(synthetic_datasets_dir):
        cfg = _config(weights, learning)
        model = load_trained_model(cfg, weights)
        ours = inference_on_dataset(
            model, build_detection_test_loader(cfg, VAL), build_evaluator(cfg, VAL, str(tmp_path))
        )
        official = evaluate_submission(str(zip_path), VAL)["averages"]
    ours = ours["segm"]
    assert ours["AP50"] > 1  # a model that finds objects, so that the numbers say something
    assert math.isclose(100 * official["allAp"], ours["AP"], abs_tol=1e-9)
    assert math.isclose(100 * official["allAp50%"], ours["AP50"], abs_tol=1e-9)
    for name in MetadataCatalog.get(VAL).thing_classes:
        for theirs, key in ((official["classes"][name]["ap"], "AP"), (official["classes"][name]["ap50%"], "AP50")):
            assert (math.isnan(theirs) and math.isnan(ours[f"{key}-{name}"])) or math.isclose(
                100 * theirs, ours[f"{key}-{name}"], abs_tol=1e-9
            ), (name, key)
    assert f"cityscapesscripts on {zip_path}: AP {ours['AP']:.3f}, AP50 {ours['AP50']:.3f}" in result.out


@pytest.fixture
def empty_split(tmp_path):
    """A $DETECTRON2_DATASETS whose synthetic test split has a city folder without images."""
    for folder in ("leftImg8bit", "gtFine"):
        os.makedirs(tmp_path / "datasets" / "cityscapes_synthetic" / folder / "test" / "berlin")
    return tmp_path / "datasets"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weights", "no/such/weights.pth"], "error: MODEL.WEIGHTS file not found: no/such/weights.pth"),
        ([], "error: MODEL.WEIGHTS is empty and no/such/dir/model_final.pth does not exist"),
        (["--weights", "WEIGHTS"], "error: cityscapes_synthetic_instance_test: OUT/datasets/cityscapes_synthetic/leftImg8bit/test: empty split"),
        (["--weights", "WEIGHTS", "--output", "submission.txt"], "error: --output OUT/submission.txt: name a .zip file"),
        (["--weights", "WEIGHTS", "--output", "existing.zip"], "error: --output OUT/existing.zip exists: pass --overwrite"),
    ],
)  # fmt: skip
def test_submission_mistakes_give_one_line(args, message, trained_quickstart, empty_split, tmp_path):
    output_dir, learning = trained_quickstart
    (tmp_path / "existing.zip").write_bytes(b"an earlier submission")
    args = [str(tmp_path / a) if a.endswith((".zip", ".txt")) else a for a in args]
    args = [os.path.join(output_dir, "model_final.pth") if a == "WEIGHTS" else a for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "submission.zip")]
    result = run_tool_in_process(
        "make_submission.py", "--config-file", QUICKSTART, "--dataset", "cityscapes_synthetic_instance_test", *args,
        "--opts", *learning, "OUTPUT_DIR", "no/such/dir", datasets_dir=empty_split,
    )  # fmt: skip
    message = message.replace("OUT", str(tmp_path))
    assert result.code == 2 and len(result.error_lines()) == 1, result.err[-3000:]
    assert result.error_lines()[0].startswith(message) and "Traceback" not in result.err
    assert sorted(os.listdir(tmp_path)) == ["datasets", "existing.zip"]
    assert (tmp_path / "existing.zip").read_bytes() == b"an earlier submission"
