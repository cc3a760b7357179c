"""Write the network of a MaskAttnUNet (:class:`ExportableNetwork`) as ONNX or TorchScript.

ONNX uses torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it
needs only the ``onnx`` package, traces the eval-mode graph with a dynamic batch axis, and
folds every BatchNorm into the preceding convolution (the file has no BatchNormalization
node). The default ``dynamo=True`` exporter needs ``onnxscript`` on top and ``torch.export``,
which rejects the backbone's data-dependent input check (``torch.isfinite(x).all()``).
"""
import contextlib
import logging
import os
import warnings
from typing import Dict, List, Optional

import torch

from .network import INPUT_NAME, ExportableNetwork

__all__ = [
    "METADATA_PREFIX",
    "ONNX_OPSET",
    "export_onnx",
    "export_torchscript",
    "network_metadata",
    "read_onnx_metadata",
]

logger = logging.getLogger(__name__)

# LayerNormalization is an ONNX op from opset 17 on (older opsets spell it out op by op).
ONNX_OPSET = 17
# Keys of the ONNX file's metadata_props written here (read back by the onnxruntime model).
METADATA_PREFIX = "maskattn_d2."


def network_metadata(cfg, network: ExportableNetwork) -> Dict[str, str]:
    """What a runtime needs to feed the exported network and to check it against a config."""
    return {
        "input": f"{INPUT_NAME}: float32 (batch, {network.num_channels}, "
        f"{network.network_size[0]}, {network.network_size[1]}) pixels 0-255, channel order "
        f"{cfg.INPUT.FORMAT}, resized (bilinear) to the network size; normalised inside",
        "input_format": cfg.INPUT.FORMAT,
        "network_size": ",".join(str(s) for s in network.network_size),
        "num_classes": str(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),
        "outputs": ",".join(network.output_names),
        "pixel_mean": ",".join(f"{v:g}" for v in cfg.MODEL.PIXEL_MEAN),
        "pixel_std": ",".join(f"{v:g}" for v in cfg.MODEL.PIXEL_STD),
        "per_image_normalization": str(bool(cfg.MODEL.PER_IMAGE_NORMALIZATION)),
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
    }


@contextlib.contextmanager
def _tracing_warnings_ignored():
    """Tracing warns at every Python-level shape check (fixed in the trace, as intended for
    a fixed network size) and that the exporter is the legacy one (chosen on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # torch marks TorchScript deprecated (FutureWarning) but still traces and runs it.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        yield


def export_onnx(
    network: ExportableNetwork,
    path: str,
    *,
    metadata: Optional[Dict[str, str]] = None,
    opset: int = ONNX_OPSET,
) -> List[str]:
    """Export ``network`` to the ONNX file ``path`` (dynamic batch, fixed network size).

    Args:
        metadata: written into the file's ``metadata_props`` under :data:`METADATA_PREFIX`.
        opset: ONNX opset, at least 17.

    Returns:
        The output names, in order.
    """
    import onnx  # optional dependency: maskattn_d2[onnx]

    if opset < ONNX_OPSET:
        raise ValueError(f"opset must be >= {ONNX_OPSET} (LayerNormalization), got {opset}")
    names = [INPUT_NAME, *network.output_names]
    network.eval()
    with _tracing_warnings_ignored(), torch.no_grad():
        torch.onnx.export(
            network,
            (network.example_input(2),),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=network.output_names,
            dynamic_axes={name: {0: "batch"} for name in names},
            do_constant_folding=True,
        )
    model = onnx.load(path)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=METADATA_PREFIX + key, value=str(value))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    logger.info("Wrote %s (%.1f MB, opset %d, outputs %s)", path,
                os.path.getsize(path) / 2**20, opset, network.output_names)
    return list(network.output_names)


def read_onnx_metadata(path: str) -> Dict[str, str]:
    """The :data:`METADATA_PREFIX` entries of an ONNX file's metadata_props, prefix removed."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return {
        p.key[len(METADATA_PREFIX):]: p.value
        for p in model.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


def export_torchscript(network: ExportableNetwork, path: str) -> List[str]:
    """Trace ``network`` (eval mode), freeze it and save it as TorchScript to ``path``.

    The module takes the same input as the ONNX file and returns the outputs as a tuple in
    the order of the returned names; it runs with any batch size. Freezing inlines the
    parameters and folds every BatchNorm into the preceding convolution.
    """
    network.eval()
    with _tracing_warnings_ignored(), torch.no_grad():
        traced = torch.jit.trace(network, (network.example_input(2),), check_trace=False)
        frozen = torch.jit.freeze(traced)
    frozen.save(path)
    logger.info("Wrote %s (outputs %s)", path, network.output_names)
    return list(network.output_names)
