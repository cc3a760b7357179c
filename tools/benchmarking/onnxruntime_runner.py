"""MaskAttn-UNet's network exported to ONNX and run by onnxruntime, in the benchmark."""
import multiprocessing
import os
import tempfile

import torch

from .maskattn import MaskAttnRunner
from .scenes import synthetic_scenes

# INT8 calibration images: synthetic scenes other than the timed ones (another seed).
CALIBRATION_SCENES = 16
CALIBRATION_SEED = 12345

__all__ = ["ONNXRuntimeRunner"]


class ONNXRuntimeRunner(MaskAttnRunner):
    """A MaskAttn-UNet config whose network is exported to ONNX and run by onnxruntime.

    Network: the exported file on the resized pixels (normalisation inside), ``threads``
    intra-op threads; with ``int8``, its copy with INT8 convolutions
    (:func:`maskattn_d2.export.quantize.quantize_int8`, calibrated on synthetic scenes).
    Post-processing: the same as :class:`MaskAttnRunner`.
    """

    trains = False  # onnxruntime runs inference only

    def __init__(self, cfg, *, name: str, threads: int, int8: bool = False):
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
        if int8:
            from maskattn_d2.export.quantize import INT8_FILE, quantize_int8

            scenes = synthetic_scenes(
                CALIBRATION_SCENES, self.runtime.network_size, seed=CALIBRATION_SEED
            )
            calibration = [self.prepare(scenes).numpy()]
            int8_path = os.path.join(self._tmp.name, INT8_FILE)
            # The float session goes first, and calibration runs in a child process: the
            # benchmark reports this process's peak RSS as the INT8 network's.
            self.runtime = None
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                pool.apply(quantize_int8, (path, int8_path, calibration))
            self.runtime = ONNXRuntimeModel(cfg, int8_path, num_threads=threads)

    def prepare(self, scenes) -> torch.Tensor:
        return self.runtime.preprocess_image(self._image_inputs(scenes))

    def network(self, inputs: torch.Tensor):
        return self.runtime.run_network(inputs)

    def flops_module(self):
        return self.exportable  # the exported network, on prepare's output
