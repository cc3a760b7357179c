"""maskattn_d2: MaskAttn-UNet and the hybrid-attention UNet as a Detectron2 project.

Importing the package registers its components with detectron2's registries: the backbone,
heads and meta-architecture (``maskattn_d2.modeling``).
"""
from . import modeling  # noqa: F401  (registration)
from .config import add_maskattn_config

__version__ = "0.1.0"
__all__ = ["add_maskattn_config", "__version__"]
