from .launch import import_user_modules, launch, run_and_shut_down, shut_down_process_group
from .optimizer import build_optimizer
from .trainer import (
    NORM_KEYS,
    AtomicCheckpointer,
    MaskAttnTrainer,
    TrainingError,
    WeightsError,
    adapt_config_to_device,
    load_inference_weights,
)

__all__ = [
    "NORM_KEYS",
    "AtomicCheckpointer",
    "MaskAttnTrainer",
    "TrainingError",
    "WeightsError",
    "adapt_config_to_device",
    "build_optimizer",
    "import_user_modules",
    "launch",
    "load_inference_weights",
    "run_and_shut_down",
    "shut_down_process_group",
]
