"""The evaluators against the real cityscapesscripts, pycocotools and detectron2: the fast evaluator gives the
official script's numbers on many kinds of predictions, the Matterport metric its hand-computed values, bad input a
clear error."""

import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as script
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluators
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.structures import Instances

from cityseg_d2.config import get_cityseg_cfg
from cityseg_d2.errors import UserError
from cityseg_d2.data import gt_instance_ids_path, register_cityscapes_instances
from cityseg_d2.data.synthetic import make_synthetic_cityscapes
from cityseg_d2.evaluation import (
    CityscapesInstanceEvaluator,
    FastCityscapesInstanceEvaluator,
    build_evaluator,
)
from cityseg_d2.evaluation import protocol
from cityseg_d2.evaluation.build import EVALUATORS, reported_metrics
from cityseg_d2.evaluation.ground_truth import CACHE_DIR, GroundTruthCache, GroundTruthRegions
from cityseg_d2.evaluation.predictions_file import PREDICTIONS_FILE, PredictionsFile
from cityseg_d2.evaluation.protocol import (
    IOU_THRESHOLDS,
    MIN_REGION_SIZE,
    EvaluatedClasses,
    intersections_by_runs,
    intersections_in_boxes,
    read_gt_instance_ids,
)
from cityseg_d2.evaluation.official_cityscapes import RESULTS_FILE
from cityseg_d2.evaluation.matterport_metric import matterport_ap50
from cityseg_d2.evaluation.perturbations import PERTURBATIONS, ground_truth_predictions, perturbed_predictions

CITYSCAPES_EVALUATORS = {"cityscapes": CityscapesInstanceEvaluator, "cityscapes_fast": FastCityscapesInstanceEvaluator}


def _evaluate(evaluator, dicts, outputs, batch_size=2):
    evaluator.reset()
    for start in range(0, len(dicts), batch_size):
        evaluator.process(dicts[start : start + batch_size], outputs[start : start + batch_size])
    return evaluator.evaluate()


def _assert_same(official, fast, tolerance=1e-6):
    assert list(official) == list(fast)
    for key in official:
        a, b = official[key], fast[key]
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tolerance, (key, a, b)


def _ground_truths(name):
    metadata = MetadataCatalog.get(name)
    return [read_gt_instance_ids(gt_instance_ids_path(d, metadata)) for d in DatasetCatalog.get(name)]


def _outputs(name, perturbation, seed):
    classes, rng = EvaluatedClasses.of_dataset(name), np.random.default_rng(seed)
    return [
        {"instances": perturbed_predictions(gt, classes, perturbation, rng, i)}
        for i, gt in enumerate(_ground_truths(name))
    ]


def _both(name, outputs):
    dicts = DatasetCatalog.get(name)
    official = _evaluate(CityscapesInstanceEvaluator(name), dicts, outputs)["segm"]
    fast = _evaluate(FastCityscapesInstanceEvaluator(name), dicts, outputs)["segm"]
    return official, fast


def _write_dataset(root, ground_truths):
    """A val split of hand-made instanceIds images (city "hand"); returns its root."""
    for i, gt in enumerate(ground_truths):
        for kind, suffix, pixels in [
            ("leftImg8bit", "leftImg8bit", np.zeros((*gt.shape, 3), np.uint8)),
            ("gtFine", "gtFine_instanceIds", gt.astype(np.uint16)),
        ]:
            os.makedirs(root / kind / "val" / "hand", exist_ok=True)
            cv2.imwrite(str(root / kind / "val" / "hand" / f"hand_{i:06d}_000019_{suffix}.png"), pixels)
    return str(root)


def _instances(shape, masks, classes, scores):
    instances = Instances(shape)
    instances.pred_masks = torch.as_tensor(np.array(masks, dtype=bool).reshape(len(masks), *shape))
    instances.pred_classes = torch.as_tensor(classes, dtype=torch.int64)
    instances.scores = torch.as_tensor(scores, dtype=torch.float32)
    return instances


@pytest.fixture(scope="module")
def sweep_dataset(tmp_path_factory):
    """A synthetic val split bigger than the shared one: 10 images, more instances, all kinds of regions."""
    root = make_synthetic_cityscapes(
        tmp_path_factory.mktemp("sweep"), splits={"val": 10}, width=384, height=192, seed=3, mean_instances=10
    )

    def register(class_set):
        name = f"eval_sweep_{class_set}"
        register_cityscapes_instances(name, root, "val", class_set=class_set, mask_source="instance_ids")
        return name

    return register


def test_protocol_constants_and_class_set_are_the_scripts():
    assert np.array_equal(IOU_THRESHOLDS, script.args.overlaps)
    assert MIN_REGION_SIZE == script.args.minRegionSizes[0]
    official_args = script.CArgs()
    script.setInstanceLabels(official_args)
    register_cityscapes_instances("eval_classes8", "unused_root", "val")
    classes = EvaluatedClasses.of_dataset("eval_classes8")
    assert list(classes.names) == official_args.instLabels
    official_void = [label.id for label in cityscapes_labels if label.ignoreInEval and label.id >= 0]
    assert classes.void_label_ids == tuple(official_void)
    register_cityscapes_instances("eval_classes10", "unused_root", "val", class_set="cityscapes10")
    assert 29 not in EvaluatedClasses.of_dataset("eval_classes10").void_label_ids


@pytest.mark.parametrize("evaluator_name", ["cityscapes", "cityscapes_fast", "coco"])
def test_ground_truth_as_predictions_scores_100(evaluator_name, register_synthetic, tmp_path):
    # Exact RLE masks in the dataset dicts, so that COCO's ground truth is the instanceIds pixels too.
    name = register_synthetic("eval_gt_val", "val", mask_source="instance_ids")
    classes = EvaluatedClasses.of_dataset(name)
    ground_truths = _ground_truths(name)
    outputs = [{"instances": ground_truth_predictions(gt, classes)} for gt in ground_truths]
    cfg = get_cityseg_cfg()
    cfg.TEST.EVALUATORS = [evaluator_name]
    results = _evaluate(build_evaluator(cfg, name, str(tmp_path)), DatasetCatalog.get(name), outputs)
    if evaluator_name == "coco":
        for task in ("bbox", "segm"):
            assert results[task]["AP"] == results[task]["AP50"] == results[task]["AP75"] == pytest.approx(100)
        return
    segm = results["segm"]
    assert segm["AP"] == segm["AP50"] == segm["matterport_AP50"] == pytest.approx(100)
    present = set()
    for gt in ground_truths:
        ids, counts = np.unique(gt, return_counts=True)
        matchable = (ids >= 1000) & (counts >= MIN_REGION_SIZE)
        present |= {classes.names[c] for c in classes.class_of_labels(ids[matchable] // 1000) if c >= 0}
    for class_name in classes.names:
        for key in (f"AP-{class_name}", f"AP50-{class_name}"):
            if class_name in present:
                assert segm[key] == pytest.approx(100)
            else:  # no ground truth: NaN, left out of the means
                assert math.isnan(segm[key])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_fast_equals_official(perturbation, seed, sweep_dataset):
    name = sweep_dataset("cityscapes8")
    official, fast = _both(name, _outputs(name, perturbation, seed))
    _assert_same(official, fast)
    if perturbation not in ("exact", "shuffle_scores", "tied_scores"):
        assert official["AP"] < 100  # the perturbation did something


@pytest.mark.parametrize("perturbation", ["swap_classes", "absent_classes", "group_void", "mixed"])
def test_fast_equals_official_with_caravan_and_trailer(perturbation, sweep_dataset):
    name = sweep_dataset("cityscapes10")
    official, fast = _both(name, _outputs(name, perturbation, seed=5))
    _assert_same(official, fast)
    assert not math.isnan(official["AP-caravan"]) and not math.isnan(official["AP-trailer"])


def _hand_ground_truth():
    """A car (26001, 400 px), a car group region (26), a small car (26002, 36 px) and void (0) on road (7)."""
    gt = np.full((60, 80), 7, np.uint16)
    gt[5:25, 5:25] = 26001
    gt[30:50, 5:35] = 26
    gt[5:11, 40:46] = 26002
    gt[30:55, 50:75] = 0
    return gt


def test_predictions_on_void_group_and_small_regions_are_not_false_positives(tmp_path):
    gt = _hand_ground_truth()
    name = "eval_hand"
    register_cityscapes_instances(name, _write_dataset(tmp_path, [gt]), "val", mask_source="instance_ids")
    car = gt == 26001
    masks = [car, gt == 26, gt == 26002, gt == 0, (gt == 0) | car]
    official, fast = _both(name, [{"instances": _instances(gt.shape, masks, [2] * 5, [0.1, 0.9, 0.8, 0.7, 0.6])}])
    _assert_same(official, fast)
    # Only the exact car is a match; the group, small and void masks are ignored. The last mask is mostly void
    # (ignored fraction 625/1025 = 0.61): ignored at IoU thresholds 0.5, 0.55 and 0.6 (AP 1), a false positive
    # scoring above the match at the 7 others, where the script's curve has the points (score 0.1: precision
    # 1/2, recall 1), (score 0.6: 0, 0) and (1, 0), and its area 1/2 * (1 - 0) / 2 = 0.25.
    assert official["AP50-car"] == pytest.approx(100)
    assert official["AP-car"] == pytest.approx(100 * (3 * 1 + 7 * 0.25) / 10)


def test_every_prediction_ignored_scores_0_where_the_script_would_crash(tmp_path):
    gt = _hand_ground_truth()
    name = "eval_hand_ignored"
    register_cityscapes_instances(name, _write_dataset(tmp_path, [gt]), "val", mask_source="instance_ids")
    official, fast = _both(name, [{"instances": _instances(gt.shape, [gt == 0], [2], [0.5])}])
    _assert_same(official, fast)
    assert official["AP-car"] == 0 and math.isnan(official["AP-person"])


@pytest.mark.parametrize(
    "gt_classes, pred_classes, scores, ious, expected",
    [
        # TP, FP, TP by score: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 1/2 * 1 + 1/2 * 2/3.
        ([0, 0], [0, 0, 0], [0.9, 0.8, 0.7], [[0.9, 0], [0.1, 0.2], [0, 0.6]], 0.5 + 1 / 3),
        # Right mask, wrong class: no match.
        ([0], [1], [0.9], [[1.0]], 0.0),
        # IoU exactly 0.5 matches (>=).
        ([0], [0], [0.9], [[0.5]], 1.0),
        # Two predictions of one instance: the higher score matches, the other is a false positive.
        ([0], [0, 0], [0.3, 0.8], [[0.95], [0.6]], 1.0),
        # Greedy by score: the first prediction takes the better instance of the two it overlaps.
        ([0, 0], [0, 0], [0.9, 0.8], [[0.7, 0.6], [0.65, 0.0]], 0.5),
        # An image without predictions scores 0.
        ([0, 1], [], [], np.zeros((0, 2)), 0.0),
    ],
)
def test_matterport_metric_on_hand_computed_cases(gt_classes, pred_classes, scores, ious, expected):
    value = matterport_ap50(np.array(gt_classes), np.array(pred_classes), np.array(scores), np.array(ious))
    assert value == pytest.approx(expected)


def test_matterport_metric_skips_images_without_instances_and_ignores_crowds(tmp_path):
    with_car, without_instances = _hand_ground_truth(), np.full((60, 80), 7, np.uint16)
    with_car[with_car == 26002] = 7  # one instance: the car
    name = "eval_hand_seed"
    root = _write_dataset(tmp_path, [with_car, without_instances])
    register_cityscapes_instances(name, root, "val", mask_source="instance_ids")
    outputs = [
        # The group-region mask ranks first and is a false positive for the Matterport metric (Matterport has no
        # crowds): precision 0 then 1/2 at recall 0 then 1 -> AP 0.5. The official AP ignores it.
        {"instances": _instances(with_car.shape, [with_car == 26, with_car == 26001], [2, 2], [0.9, 0.8])},
        {"instances": _instances(with_car.shape, [without_instances == 7], [0], [0.9])},
    ]
    official, fast = _both(name, outputs)
    _assert_same(official, fast)
    assert official["matterport_AP50"] == pytest.approx(50)
    assert official["AP-car"] == pytest.approx(100)


def test_no_predictions_scores_0(sweep_dataset, caplog):
    name = sweep_dataset("cityscapes8")
    empty = [{"instances": _instances(gt.shape, [], [], [])} for gt in _ground_truths(name)]
    official, fast = _both(name, empty)
    _assert_same(official, fast)
    assert official["AP"] == official["AP50"] == official["matterport_AP50"] == 0
    assert "no predicted instances" in caplog.text


@pytest.mark.parametrize("evaluator", CITYSCAPES_EVALUATORS.values())
def test_no_images_gives_no_results(evaluator, sweep_dataset, caplog):
    assert _evaluate(evaluator(sweep_dataset("cityscapes8")), [], []) == {}
    assert "no images were processed" in caplog.text


@pytest.mark.parametrize("evaluator", CITYSCAPES_EVALUATORS.values())
def test_masks_of_the_wrong_size_are_refused(evaluator, sweep_dataset):
    name = sweep_dataset("cityscapes8")
    dicts = DatasetCatalog.get(name)[:1]
    outputs = [{"instances": _instances((10, 20), [np.ones((10, 20))], [0], [0.5])}]
    with pytest.raises(ValueError, match=rf"are 10x20 .* ground truth .*{dicts[0]['image_id']}.* is 192x384"):
        _evaluate(evaluator(name), dicts, outputs)


@pytest.mark.parametrize("evaluator", CITYSCAPES_EVALUATORS.values())
def test_a_dataset_without_gt_dir_is_refused(evaluator):
    DatasetCatalog.register("eval_no_gt_dir", lambda: [])
    MetadataCatalog.get("eval_no_gt_dir").set(thing_classes=["car"], thing_label_ids=[26])
    try:
        with pytest.raises(ValueError, match="'eval_no_gt_dir' has no 'gt_dir' metadata"):
            evaluator("eval_no_gt_dir")
    finally:
        DatasetCatalog.remove("eval_no_gt_dir")
        MetadataCatalog.remove("eval_no_gt_dir")


def test_official_evaluator_restores_the_script_and_saves_its_json(sweep_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the script's evaluateImgLists would write matches.json here
    name = sweep_dataset("cityscapes8")
    args_before, labels_before = dict(vars(script.args)), script.labels
    output_dir = tmp_path / "inference"
    results = _evaluate(
        CityscapesInstanceEvaluator(name, str(output_dir)), DatasetCatalog.get(name), _outputs(name, "drop", 0)
    )
    assert vars(script.args).keys() == args_before.keys()
    assert all(vars(script.args)[key] is value for key, value in args_before.items())
    assert script.labels is labels_before
    assert not (tmp_path / "matches.json").exists()
    with open(output_dir / RESULTS_FILE) as f:
        saved = json.load(f)
    assert saved["averages"]["allAp"] * 100 == pytest.approx(results["segm"]["AP"])
    assert len(os.listdir(output_dir / "cityscapes_instance_predictions" / "masks")) > 0


def test_official_evaluator_removes_its_temporary_folder(sweep_dataset):
    name = sweep_dataset("cityscapes8")
    evaluator = CityscapesInstanceEvaluator(name)
    evaluator.reset()
    prediction_dir = evaluator._prediction_dir
    evaluator.process(DatasetCatalog.get(name)[:2], _outputs(name, "exact", 0)[:2])
    assert os.listdir(prediction_dir)
    evaluator.evaluate()
    assert not os.path.exists(prediction_dir)


def test_build_evaluator_chooses_from_the_config(sweep_dataset, tmp_path):
    name = sweep_dataset("cityscapes8")
    cfg = get_cityseg_cfg()
    assert isinstance(build_evaluator(cfg, name, str(tmp_path)), FastCityscapesInstanceEvaluator)
    cfg.TEST.EVALUATORS = ["cityscapes_fast", "cityscapes", "coco"]
    combined = build_evaluator(cfg, name, str(tmp_path))
    assert isinstance(combined, DatasetEvaluators)
    results = _evaluate(combined, DatasetCatalog.get(name), _outputs(name, "erode", 0))
    assert list(results) == ["segm", "cityscapes/segm", "coco/bbox", "coco/segm"]
    _assert_same(results["cityscapes/segm"], results["segm"])
    # What the registry declares is exactly what the evaluators report (the keys a metric name is checked against).
    cfg.DATASETS.TEST = (name,)
    assert set(flatten_results_dict(results)) == set(reported_metrics(cfg))
    cfg.TEST.EVALUATORS = ["cityscapes_fast", "official"]
    with pytest.raises(ValueError) as error:
        build_evaluator(cfg, name, str(tmp_path))
    assert "TEST.EVALUATORS" in str(error.value) and all(valid in str(error.value) for valid in EVALUATORS)


def test_a_missing_ground_truth_file_is_named(tmp_path):
    gt = _hand_ground_truth()
    name = "eval_hand_missing"
    register_cityscapes_instances(name, _write_dataset(tmp_path, [gt]), "val", mask_source="instance_ids")
    dicts = DatasetCatalog.get(name)
    missing = gt_instance_ids_path(dicts[0], MetadataCatalog.get(name))
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=f"{missing} not found"):
        _evaluate(FastCityscapesInstanceEvaluator(name), dicts, [{"instances": _instances(gt.shape, [], [], [])}])


def _region_index(gt):
    return np.unique(gt, return_inverse=True)[1].reshape(gt.shape)


@pytest.mark.parametrize("chunk_elements", [2**26, 3 * 384 * 192 + 1])
def test_overlap_counts_in_boxes_and_by_runs_equal_a_plain_count(chunk_elements, sweep_dataset, monkeypatch):
    name = sweep_dataset("cityscapes8")
    classes = EvaluatedClasses.of_dataset(name)
    gt = _ground_truths(name)[1]
    instances = perturbed_predictions(gt, classes, "mixed", np.random.default_rng(0), 1, num_predictions=12)
    masks = instances.pred_masks.numpy()
    masks[0] = False  # an empty mask
    regions = GroundTruthRegions.from_instance_ids(gt)
    index = _region_index(gt)
    expected = np.stack([np.bincount(index[m], minlength=len(regions.region_ids)) for m in masks])
    assert np.array_equal(regions.region_map(), index)
    assert np.array_equal(intersections_in_boxes(masks, regions.region_map(), len(regions.region_ids)), expected)
    # The model's boxes only hint: a right one, one too small, one elsewhere, one not finite.
    boxes = instances.pred_boxes.tensor.numpy().copy()
    boxes[2] = boxes[2] + [4, 4, -4, -4]
    boxes[3] = [0, 0, 1, 1]
    boxes[4] = [np.nan, 0, np.inf, 5]
    hinted = intersections_in_boxes(masks, regions.region_map(), len(regions.region_ids), boxes)
    assert np.array_equal(hinted, expected)
    monkeypatch.setattr(protocol, "_RUNS_CHUNK_ELEMENTS", chunk_elements)  # several chunks of 3 masks, or one
    assert np.array_equal(intersections_by_runs(torch.from_numpy(masks), regions), expected)
    if torch.cuda.is_available():  # the device it is for
        assert np.array_equal(intersections_by_runs(torch.from_numpy(masks).cuda(), regions), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_evaluator_on_masks_left_on_the_gpu_equals_official(sweep_dataset):
    name = sweep_dataset("cityscapes8")
    outputs = _outputs(name, "mixed", 0)
    official = _evaluate(CityscapesInstanceEvaluator(name), DatasetCatalog.get(name), outputs)["segm"]
    on_gpu = [{"instances": output["instances"].to("cuda")} for output in outputs]
    _assert_same(official, _evaluate(FastCityscapesInstanceEvaluator(name), DatasetCatalog.get(name), on_gpu)["segm"])


def test_ground_truth_cache_decodes_each_png_once_and_notices_a_change(sweep_dataset, tmp_path, caplog):
    name = sweep_dataset("cityscapes8")
    source = gt_instance_ids_path(DatasetCatalog.get(name)[0], MetadataCatalog.get(name))
    gt_path = tmp_path / os.path.basename(source)
    gt = read_gt_instance_ids(source)
    cv2.imwrite(str(gt_path), gt)
    cache = GroundTruthCache(str(tmp_path / "cache"))
    cold = cache.load(str(gt_path))
    (cache_file,) = (tmp_path / "cache").iterdir()
    written = cache_file.stat().st_mtime_ns
    warm = cache.load(str(gt_path))
    assert cache_file.stat().st_mtime_ns == written  # read, not rebuilt
    for regions in (cold, warm):
        assert np.array_equal(regions.region_ids, np.unique(gt))
        assert np.array_equal(regions.region_map(), _region_index(gt))
        assert regions.region_areas.sum() == gt.size
    changed = gt.copy()
    changed[:10, :10] = 26099
    cv2.imwrite(str(gt_path), changed)
    os.utime(gt_path, ns=(written + 10**9, written + 10**9))
    assert 26099 in cache.load(str(gt_path)).region_ids
    cache_file.write_bytes(b"not a zip file")
    assert np.array_equal(cache.load(str(gt_path)).region_map(), _region_index(changed))
    assert "rebuilding the unreadable ground-truth cache file" in caplog.text
    with pytest.raises(FileNotFoundError, match="missing.png not found"):
        cache.load(str(tmp_path / "missing.png"))


def test_fast_evaluator_with_a_ground_truth_cache_and_saved_predictions(sweep_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CITYSEG_D2_CACHE_DIR", str(tmp_path / "dataset_cache"))
    name = sweep_dataset("cityscapes8")
    dicts, outputs = DatasetCatalog.get(name), _outputs(name, "mixed", 2)
    official = _evaluate(CityscapesInstanceEvaluator(name), dicts, outputs)["segm"]
    cold = FastCityscapesInstanceEvaluator(name, str(tmp_path), save_predictions=True)
    _assert_same(official, _evaluate(cold, dicts, outputs)["segm"])
    assert len(os.listdir(tmp_path / "dataset_cache" / CACHE_DIR)) == len(dicts)  # kept in the dataset cache
    _assert_same(official, _evaluate(FastCityscapesInstanceEvaluator(name, str(tmp_path)), dicts, outputs)["segm"])
    saved = PredictionsFile.load(str(tmp_path / PREDICTIONS_FILE))
    assert (saved.dataset, saved.class_names) == (name, EvaluatedClasses.of_dataset(name).names)
    assert [image.image_id for image in saved.images] == [d["image_id"] for d in dicts]
    for image, output in zip(saved.images, outputs):
        decoded, instances = image.decode(), output["instances"]
        assert np.array_equal(decoded.masks, instances.pred_masks.numpy())
        assert np.array_equal(decoded.scores, instances.scores.numpy().astype(np.float64))
        assert np.array_equal(decoded.classes, instances.pred_classes.numpy())


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), (b"garbage", "not a readable .npz"), ({"scores": np.zeros(2)}, "no 'format' array")],
)
def test_a_bad_predictions_file_is_one_clear_error(content, message, tmp_path):
    path = tmp_path / "predictions.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.savez(path, **content)
    with pytest.raises(UserError, match=f"predictions file {path} .*{message}"):
        PredictionsFile.load(str(path))
