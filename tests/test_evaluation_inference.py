"""The evaluators under detectron2's inference_on_dataset: on a real (tiny, random) Mask R-CNN, and in two
processes (gloo on the CPU, started by our launch) whose results must equal one process's."""

import atexit
import json
import math
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils import comm

from cityseg_d2.config import get_cityseg_cfg
from cityseg_d2.data import gt_instance_ids_path, register_cityscapes_instances
from cityseg_d2.engine import launch
from cityseg_d2.evaluation import build_evaluator
from cityseg_d2.evaluation.protocol import EvaluatedClasses, read_gt_instance_ids
from cityseg_d2.evaluation.perturbations import perturbed_predictions

QUICKSTART_CONFIG = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"


def _assert_same(a, b, tolerance=1e-6):
    assert list(a) == list(b)
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or abs(a[key] - b[key]) <= tolerance, (key, a, b)


@pytest.mark.slow
def test_evaluators_run_under_inference_on_dataset_on_a_mask_rcnn(register_synthetic, tmp_path):
    name = register_synthetic("eval_model_val", "val", max_images=2)
    cfg = get_cityseg_cfg()
    cfg.merge_from_file(QUICKSTART_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # a random model's scores are low; keep its detections
    cfg.TEST.DETECTIONS_PER_IMAGE = 30
    cfg.TEST.EVALUATORS = ["cityscapes_fast", "cityscapes", "coco"]
    torch.manual_seed(0)
    model = build_model(cfg)
    evaluator = build_evaluator(cfg, name, str(tmp_path))
    results = inference_on_dataset(model, build_detection_test_loader(cfg, name), evaluator)
    assert list(results) == ["segm", "cityscapes/segm", "coco/bbox", "coco/segm"]
    classes = MetadataCatalog.get(name).thing_classes
    expected = ["AP", "AP50"] + [f"AP{t}-{c}" for c in classes for t in ("", "50")] + ["matterport_AP50"]
    assert list(results["segm"]) == expected
    _assert_same(results["cityscapes/segm"], results["segm"])
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(results["coco/segm"])
    assert 0 <= results["segm"]["AP"] < 100 and 0 <= results["segm"]["matterport_AP50"] < 100


class _PerturbedGroundTruthModel:
    """A stand-in model: predictions made from each image's ground truth, the same in any process."""

    def __init__(self, dataset_name):
        self._metadata = MetadataCatalog.get(dataset_name)
        self._classes = EvaluatedClasses.of_dataset(dataset_name)

    def __call__(self, inputs):
        outputs = []
        for image in inputs:
            gt = read_gt_instance_ids(gt_instance_ids_path(image, self._metadata))
            rng = np.random.default_rng(zlib.crc32(image["image_id"].encode()))
            index = int(image["image_id"].split("_")[1])
            outputs.append({"instances": perturbed_predictions(gt, self._classes, "mixed", rng, index)})
        return outputs


def _write_at_exit_whether_a_process_group_is_left(path):
    """At exit a live group's threads may abort the process: none may be left, in torch's registry or detectron2's."""

    def write():
        left = dist.is_initialized() or comm._LOCAL_PROCESS_GROUP is not None
        path.write_text(str(left or comm._get_global_gloo_group.cache_info().currsize > 0))

    atexit.register(write)


def _evaluate_in_processes(root, out_file):
    """Run in each process (by our launch): inference_on_dataset, results written by the main one."""
    if comm.get_world_size() > 1:
        _write_at_exit_whether_a_process_group_is_left(out_file.with_suffix(f".rank{comm.get_rank()}.left_group"))
    name = "eval_distributed_val"
    register_cityscapes_instances(name, root, "val", mask_source="instance_ids")
    cfg = get_cityseg_cfg()
    cfg.TEST.EVALUATORS = ["cityscapes_fast", "cityscapes"]
    loader = build_detection_test_loader(DatasetCatalog.get(name), mapper=lambda d: d)
    results = inference_on_dataset(_PerturbedGroundTruthModel(name), loader, build_evaluator(cfg, name))
    if comm.is_main_process():
        with open(out_file, "w") as f:
            json.dump({"world_size": comm.get_world_size(), "results": results}, f)


@pytest.mark.slow
def test_two_processes_give_the_results_of_one_and_exit_without_a_process_group(synthetic_root, tmp_path):
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    _evaluate_in_processes(synthetic_root, single)
    launch(_evaluate_in_processes, 2, dist_url="auto", args=(synthetic_root, double))
    # a gloo group alive at the interpreter's exit can abort the process (SIGABRT) after its work is done
    assert [(tmp_path / f"double.rank{rank}.left_group").read_text() for rank in (0, 1)] == ["False", "False"]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert list(two["results"]) == ["segm", "cityscapes/segm"]
    for task in two["results"]:
        _assert_same(one["results"][task], two["results"][task], tolerance=1e-9)
    _assert_same(two["results"]["segm"], two["results"]["cityscapes/segm"])
    assert 0 < one["results"]["segm"]["AP"] < 100
