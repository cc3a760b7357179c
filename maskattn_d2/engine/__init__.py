from .optimizer import build_optimizer
from .trainer import AtomicCheckpointer, MaskAttnTrainer, adapt_config_to_device

__all__ = ["AtomicCheckpointer", "MaskAttnTrainer", "adapt_config_to_device", "build_optimizer"]
