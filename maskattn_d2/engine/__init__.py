from .launch import launch, run_and_shut_down, shut_down_process_group
from .optimizer import build_optimizer
from .trainer import AtomicCheckpointer, MaskAttnTrainer, TrainingError, adapt_config_to_device

__all__ = [
    "AtomicCheckpointer",
    "MaskAttnTrainer",
    "TrainingError",
    "adapt_config_to_device",
    "build_optimizer",
    "launch",
    "run_and_shut_down",
    "shut_down_process_group",
]
