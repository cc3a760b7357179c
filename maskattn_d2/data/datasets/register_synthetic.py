"""Registration of the synthetic panoptic dataset (the default, generated on first use).

``register_synthetic_panoptic()`` registers "maskattn_synthetic_panoptic_{train,val}";
``register_synthetic_panoptic(TOUCHING_PREFIX, touching=True, num_train=256, num_val=32)``
registers "maskattn_synthetic_touching_panoptic_{train,val}", the touching layout (chains of
same-class instances in contact, see ``synthetic.py``). Their files live in
``$MASKATTN_D2_CACHE`` (default ``~/.cache/maskattn_d2``), in a folder named after the
generation parameters. The environment variable is read when the paths are resolved
(at registration, because detectron2's evaluators read ``panoptic_json``/``panoptic_root``/
``json_file`` from the metadata, and again each time the dataset is loaded), never at import.
The data are generated the first time the dataset is loaded (``DatasetCatalog.get``) or its
instances json is asked for (``ensure_instances_json``).
"""
import os
from typing import Dict, List, Optional

from .panoptic_json import (
    coco_layout_paths,
    default_cache_dir,
    panoptic_metadata,
    register_panoptic_dataset,
)
from .synthetic import SYNTHETIC_CATEGORIES, SYNTHETIC_VERSION, generate_synthetic_panoptic

__all__ = [
    "SYNTHETIC_PREFIX",
    "TOUCHING_PREFIX",
    "register_synthetic_panoptic",
    "synthetic_paths",
    "synthetic_root",
]

SYNTHETIC_PREFIX = "maskattn_synthetic_panoptic"
# Sized so that a CPU run of train_net.py learns the task in minutes.
DEFAULT_NUM_TRAIN = 512
DEFAULT_NUM_VAL = 64
# The touching layout, at the size of tools/compare_pq.py's default comparison.
TOUCHING_PREFIX = "maskattn_synthetic_touching_panoptic"
TOUCHING_NUM_TRAIN = 256
TOUCHING_NUM_VAL = 32


def synthetic_root(
    cache_dir: Optional[str] = None,
    *,
    num_train: int,
    num_val: int,
    seed: int,
    touching: bool = False,
) -> str:
    """Folder of one synthetic dataset version inside ``cache_dir`` (default: the cache);
    the touching layout gets "_touching" in the folder name."""
    base = cache_dir if cache_dir is not None else default_cache_dir()
    layout = "_touching" if touching else ""
    name = f"synthetic_panoptic{layout}_v{SYNTHETIC_VERSION}_seed{seed}_{num_train}-{num_val}"
    return os.path.join(base, name)


def synthetic_paths(root: str, split: str) -> Dict[str, str]:
    """Metadata paths of split "train" or "val" of a synthetic dataset under ``root``."""
    return coco_layout_paths(root, split)


def register_synthetic_panoptic(
    name_prefix: str = SYNTHETIC_PREFIX,
    root: Optional[str] = None,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = 0,
    touching: bool = False,
) -> List[str]:
    """Register "<name_prefix>_train" and "<name_prefix>_val" (skipping existing names).

    Args:
        name_prefix: prefix of the two dataset names.
        root: folder of the data; None uses ``synthetic_root()`` in the cache, resolved each
            time the paths are needed (so ``$MASKATTN_D2_CACHE`` may be set after import).
        num_train, num_val, seed: generation parameters (small values make tiny versions,
            e.g. for tests).
        touching: the touching layout (chains of same-class instances in contact).

    Returns:
        The two dataset names.
    """
    metadata = panoptic_metadata(SYNTHETIC_CATEGORIES)

    def current_root() -> str:
        if root is not None:
            return root
        return synthetic_root(num_train=num_train, num_val=num_val, seed=seed, touching=touching)

    def prepare(paths) -> None:
        # image_root is <root>/<split>: generate the whole dataset (both splits) once.
        generate_synthetic_panoptic(
            os.path.dirname(paths["image_root"]),
            num_train=num_train,
            num_val=num_val,
            seed=seed,
            touching=touching,
        )

    names = []
    for split in ("train", "val"):
        name = f"{name_prefix}_{split}"
        register_panoptic_dataset(
            name,
            metadata,
            lambda split=split: synthetic_paths(current_root(), split),
            prepare=prepare,
        )
        names.append(name)
    return names
