"""The model of a config with the fast path's whole-model switches: channels_last and a compiled backbone."""

import logging

import torch
from detectron2.modeling import build_model

from ..errors import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS = {"": None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(name, key):
    """The torch dtype of a precision name ("" or float32: no autocast)."""
    if name not in PRECISIONS:
        raise ConfigError(f"{key} is {name!r}: use one of {', '.join(repr(p) for p in PRECISIONS)}")
    return PRECISIONS[name]


def build_fast_model(cfg):
    """detectron2's build_model(cfg), then CITYSEG.FAST.CHANNELS_LAST and CITYSEG.FAST.COMPILE applied in place
    (parameter names, and so checkpoints, stay those of the plain model); with CITYSEG.FAST.TEST_PRECISION, its
    inference outputs are turned back into float32."""
    model = build_model(cfg)
    fast = cfg.CITYSEG.FAST
    if fast.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
        model.backbone.register_forward_pre_hook(_channels_last_input)
    if autocast_dtype(fast.TEST_PRECISION, "CITYSEG.FAST.TEST_PRECISION") is not None:
        model.register_forward_hook(_float32_outputs)
    if fast.COMPILE:
        # One graph per input size: the multi-scale training sizes and the test size (padded to the backbone's
        # size divisibility); raise dynamo's recompile limit so that none of them falls back to eager.
        sizes = len(cfg.INPUT.MIN_SIZE_TRAIN) + 1
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * sizes)
        model.backbone.compile(dynamic=False, backend=fast.COMPILE_BACKEND)
        logger.info("backbone compiled with torch.compile (backend %s)", fast.COMPILE_BACKEND)
    return model


def _float32_outputs(module, args, outputs):
    """Inference outputs with float32 fields, as evaluators and writers expect, also after autocast."""
    if module.training:
        return outputs
    for output in outputs:
        instances = output.get("instances")
        for name, value in instances.get_fields().items() if instances is not None else ():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
                instances.set(name, value.float())
    return outputs


def _channels_last_input(module, args):
    return (args[0].contiguous(memory_format=torch.channels_last),) + args[1:]
