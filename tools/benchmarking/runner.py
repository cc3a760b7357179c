"""The interface the benchmark measures every model through (MaskAttn-UNet and the peers)."""
import abc
from typing import Any, List, Sequence, Tuple

import torch
from torch import nn

from .scenes import SyntheticScene

__all__ = ["Runner", "TupleOutputs"]


class Runner(abc.ABC):
    """What the benchmark measures of one model.

    ``prepare`` turns the scenes' images into the network input (normalisation, not timed);
    ``network`` is the timed forward; ``postprocess`` turns its outputs into panoptic results
    at ``image_size``; ``training_loss`` is one forward in training mode with the model's own
    targets built from the scenes (the caller sets train mode); ``flops_module`` is a module
    whose ``forward(x)`` runs the network on ``prepare``'s output and returns tensors only (for
    fvcore's tracer; the default suits a ``network`` that returns a tuple of tensors).
    """

    name: str = ""
    model: nn.Module

    @abc.abstractmethod
    def prepare(self, scenes: Sequence[SyntheticScene]) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def network(self, inputs: torch.Tensor) -> Any:
        ...

    @abc.abstractmethod
    def postprocess(self, outputs: Any, image_size: Tuple[int, int]) -> List[Any]:
        ...

    @abc.abstractmethod
    def training_loss(self, scenes: Sequence[SyntheticScene]) -> torch.Tensor:
        ...

    def flops_module(self) -> nn.Module:
        return TupleOutputs(self.model, lambda model, x: tuple(self.network(x)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class TupleOutputs(nn.Module):
    """Wraps ``fn(model, x)`` so that tracing sees a module returning a tuple of tensors."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor):
        return tuple(self.fn(self.model, x))
