"""The fast training and inference path: detectron2 components registered under their own names (each a
config switch, interchangeable with detectron2's in checkpoints), the model builder and the batched predictor.

MODEL.PROPOSAL_GENERATOR.NAME "BatchedRPN", MODEL.ROI_HEADS.NAME "BatchedROIHeads" and
MODEL.ROI_MASK_HEAD.NAME "TensorTargetsMaskHead" select them; configs/README.md lists every switch.
"""

from .mask_head import TensorTargetsMaskHead
from .metrics import deferred_scalars, put_scalars
from .model import autocast_dtype, build_fast_model
from .predictor import BatchedPredictor, build_batched_predictor, inference_autocast
from .roi_heads import BatchedROIHeads
from .nms import NMS_METHODS
from .rpn import BatchedRPN

__all__ = [
    "BatchedPredictor",
    "BatchedROIHeads",
    "BatchedRPN",
    "NMS_METHODS",
    "TensorTargetsMaskHead",
    "autocast_dtype",
    "build_batched_predictor",
    "build_fast_model",
    "deferred_scalars",
    "inference_autocast",
    "put_scalars",
]
