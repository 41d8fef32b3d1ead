"""An ONNX symbolic for GroupNorm that also runs on an empty batch.

torch's own symbolic reshapes (N, C, H, W) to (0, G, -1) (0 meaning "keep N"). onnxruntime refuses to infer
the -1 when N is 0, which is what the GroupNorm mask head of the quickstart model gets for an image without
detections. This one computes the grouped shape, (N, G, C/G * H * W), from the input's shape instead.
"""

import contextlib

import torch
from torch.onnx import symbolic_helper

_SYMBOLIC_NAME = "aten::group_norm"


def _constant(g, values, dtype=torch.int64):
    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


@symbolic_helper.parse_args("v", "i", "v", "v", "f", "i")
def _group_norm(g, input, num_groups, weight, bias, eps, cudnn_enabled):
    rank = symbolic_helper._get_tensor_rank(input)
    if rank is None:
        return symbolic_helper._unimplemented("group_norm", "unknown input rank", input)
    shape = g.op("Shape", input)
    batch = g.op("Slice", shape, _constant(g, [0]), _constant(g, [1]))
    per_sample = g.op("ReduceProd", g.op("Slice", shape, _constant(g, [1]), _constant(g, [rank])), keepdims_i=1)
    per_group = g.op("Div", per_sample, _constant(g, [num_groups]))
    grouped = g.op("Reshape", input, g.op("Concat", batch, _constant(g, [num_groups]), per_group, axis_i=0))
    dtype = input.type().dtype()
    ones, zeros = _constant(g, [1.0] * num_groups, dtype), _constant(g, [0.0] * num_groups, dtype)
    normalized = g.op("Reshape", g.op("InstanceNormalization", grouped, ones, zeros, epsilon_f=eps), shape)
    channel_axes = _constant(g, list(range(1, rank - 1)))
    if not symbolic_helper._is_none(weight):
        normalized = g.op("Mul", normalized, g.op("Unsqueeze", weight, channel_axes))
    if not symbolic_helper._is_none(bias):
        normalized = g.op("Add", normalized, g.op("Unsqueeze", bias, channel_axes))
    return normalized


@contextlib.contextmanager
def empty_batch_group_norm(opset_version):
    """Export aten::group_norm with the symbolic above while inside (opset >= 13: Unsqueeze takes its axes as input)."""
    torch.onnx.register_custom_op_symbolic(_SYMBOLIC_NAME, _group_norm, opset_version)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(_SYMBOLIC_NAME, opset_version)
