"""MaskAttn-UNet's network exported to ONNX and run by onnxruntime, in the benchmark."""
import os
import tempfile

import torch

from .maskattn import MaskAttnRunner

__all__ = ["ONNXRuntimeRunner"]


class ONNXRuntimeRunner(MaskAttnRunner):
    """A MaskAttn-UNet config whose network is exported to ONNX and run by onnxruntime.

    Network: the exported file on the resized pixels (normalisation inside), ``threads``
    intra-op threads. Post-processing: the same as :class:`MaskAttnRunner`.
    """

    trains = False  # onnxruntime runs inference only

    def __init__(self, cfg, *, name: str, threads: int):
        from maskattn_d2.export import (
            ExportableNetwork,
            ONNXRuntimeModel,
            export_onnx,
            network_metadata,
        )

        super().__init__(cfg, name=name)
        self.exportable = ExportableNetwork(self.model)
        self._tmp = tempfile.TemporaryDirectory()
        path = os.path.join(self._tmp.name, "model.onnx")
        export_onnx(self.exportable, path, metadata=network_metadata(cfg, self.exportable))
        self.runtime = ONNXRuntimeModel(cfg, path, num_threads=threads)

    def prepare(self, scenes) -> torch.Tensor:
        return self.runtime.preprocess_image(self._image_inputs(scenes))

    def network(self, inputs: torch.Tensor):
        return self.runtime.run_network(inputs)

    def flops_module(self):
        return self.exportable  # the exported network, on prepare's output
