"""Deployment of MaskAttn-UNet: the network as ONNX / TorchScript (``tools/export_model.py``)
and an onnxruntime model that runs the ONNX file with the PyTorch model's post-processing.

onnx and onnxruntime are the optional extra ``maskattn_d2[onnx]`` (installed by
``make setup``); they are imported only when an ONNX function is called.
"""
from .export import (
    METADATA_PREFIX,
    ONNX_OPSET,
    export_onnx,
    export_torchscript,
    network_metadata,
    read_onnx_metadata,
)
from .network import INPUT_NAME, SEM_LOGITS_NAME, ExportableNetwork
from .onnxruntime_model import ONNXRuntimeModel, ONNXRuntimePredictor, import_onnxruntime

__all__ = [
    "INPUT_NAME",
    "METADATA_PREFIX",
    "ONNX_OPSET",
    "SEM_LOGITS_NAME",
    "ExportableNetwork",
    "ONNXRuntimeModel",
    "ONNXRuntimePredictor",
    "export_onnx",
    "export_torchscript",
    "import_onnxruntime",
    "network_metadata",
    "read_onnx_metadata",
]
