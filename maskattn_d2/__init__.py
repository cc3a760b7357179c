"""maskattn_d2: MaskAttn-UNet and the hybrid-attention UNet as a Detectron2 project.

Importing the package registers its components with detectron2's registries: the backbone,
heads and meta-architecture (``maskattn_d2.modeling``), the dataset mapper
(``maskattn_d2.data``) and the project's datasets (synthetic default, the COCO sample,
ADE20K panoptic). Dataset files are only read or generated when a dataset is first used.
"""
from . import data, modeling  # noqa: F401  (registration)
from .config import add_maskattn_config
from .data.datasets import register_all_maskattn_datasets

register_all_maskattn_datasets()

__version__ = "0.1.0"
__all__ = ["add_maskattn_config", "register_all_maskattn_datasets", "__version__"]
