"""Optimizer: AdamW (both papers) or SGD, with detectron2's param groups and gradient clipping."""
import torch

from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

_OPTIMIZERS = ("ADAMW", "SGD")


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build ``cfg.SOLVER.OPTIMIZER`` over ``model``'s parameters.

    Norm layers get ``SOLVER.WEIGHT_DECAY_NORM`` and biases ``SOLVER.BIAS_LR_FACTOR`` (detectron2's
    defaults); ``SOLVER.CLIP_GRADIENTS`` wraps the optimizer as detectron2 does.
    """
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in _OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {_OPTIMIZERS}, got '{cfg.SOLVER.OPTIMIZER}'")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    if name == "ADAMW":
        optimizer_cls = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return optimizer_cls(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    optimizer_cls = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    return optimizer_cls(
        params,
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
