"""Guards the install: the package imports, and a detectron2 Mask R-CNN trains and predicts on the CPU."""
import re
import subprocess
import sys
from pathlib import Path

import torch
from detectron2 import model_zoo
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import cityseg_d2
from cityseg_d2.config import get_cityseg_cfg


def test_package_imports_and_adds_its_config_keys():
    cfg = get_cityseg_cfg()
    assert cityseg_d2.__version__
    assert cfg.DATASETS.CITYSCAPES.CLASS_SET == "cityscapes8"
    assert cfg.TEST.EVALUATORS == ["cityscapes_fast"]


def test_collect_env_reports_every_dependency_without_warnings():
    run = subprocess.run([sys.executable, "tools/collect_env.py"], check=True, capture_output=True, text=True)
    out = run.stdout
    assert "Warning" not in run.stderr, run.stderr
    for name in ["torch", "detectron2", "detectron2._C", "cityscapesscripts", "pycocotools", "cv2", "ray", "wandb"]:
        line = next(line for line in out.splitlines() if line.split()[0] == name)
        assert "not importable" not in line and "not installed" not in line, line


def _gn_mask_rcnn():
    cfg = get_cityseg_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    # Random init needs GN (FrozenBN with random statistics diverges at once).
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 8
    cfg.INPUT.MIN_SIZE_TEST = 256
    return build_model(cfg)


def _random_batch(height=256, width=512):
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 10, 100, 100], [200, 50, 300, 200]]))
    instances.gt_classes = torch.tensor([0, 3])
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 10:100, 10:100] = True
    masks[1, 50:200, 200:300] = True
    instances.gt_masks = BitMasks(masks)
    return [{"image": image, "instances": instances, "height": height, "width": width}]


def test_mask_rcnn_r50_fpn_gn_trains_one_step_and_predicts_on_cpu():
    torch.manual_seed(0)
    model = _gn_mask_rcnn()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    with EventStorage(0):
        losses = model(_random_batch())
    assert set(losses) >= {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

    model.eval()
    with torch.no_grad():
        (output,) = model(_random_batch())
    instances = output["instances"]
    assert instances.image_size == (256, 512)
    assert {"pred_boxes", "scores", "pred_classes", "pred_masks"} <= set(instances.get_fields())


def test_tools_start_without_third_party_warnings():
    """detectron2's import warns of torch.jit.script, its model zoo of pkg_resources; cityseg_d2 silences just those."""
    run = subprocess.run([sys.executable, "tools/train_net.py", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "usage:" in run.stdout
    assert run.stderr == "", run.stderr
    run = subprocess.run(
        [sys.executable, "-c", "import cityseg_d2, detectron2.model_zoo, warnings; warnings.warn('ours')"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.stderr.count("Warning") == 1 and "UserWarning: ours" in run.stderr, run.stderr  # others still show


def test_every_tool_imports_cityseg_d2_before_what_warns_on_import():
    """What test_tools_start_without_third_party_warnings checks on train_net, read from every tool's imports."""
    third_party = re.compile(r"^(import|from) (detectron2|ray|wandb)\b")
    ours = re.compile(r"^(import|from) cityseg_d2\b")
    for tool in sorted(Path(__file__).resolve().parents[1].glob("tools/*.py")):
        imports = [line for line in tool.read_text().splitlines() if third_party.match(line) or ours.match(line)]
        assert not imports or ours.match(imports[0]), f"{tool.name}: {imports[0]} comes before cityseg_d2"
