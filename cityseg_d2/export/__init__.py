"""Deployment: a trained model exported to TorchScript or ONNX, the runtime that runs the exported file like
DefaultPredictor, and a Cityscapes benchmark submission."""

from .exporter import DEFAULT_ONNX_OPSET, EXPORT_METHODS, FORMATS, ExportError, export_model
from .runtime import ExportedPredictor

__all__ = ["DEFAULT_ONNX_OPSET", "EXPORT_METHODS", "FORMATS", "ExportError", "ExportedPredictor", "export_model"]
