"""Code defaults agree with the config defaults (one source of truth): a default argument of a
config-built class or function equals what ``add_maskattn_config``'s default config passes."""
import functools
import inspect

import pytest
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec

from maskattn_d2 import add_maskattn_config
from maskattn_d2.data import MaskAttnPanopticMapper
from maskattn_d2.modeling.backbone.unet import UNet, unet_kwargs_from_config
from maskattn_d2.modeling.heads import MaskAttnEmbedHead, MaskAttnSemSegHead
from maskattn_d2.modeling.meta_arch import MaskAttnUNet
from maskattn_d2.modeling.postprocessing import MaskAttnPostProcessor

DATASET = "maskattn_test_defaults_panoptic"
MetadataCatalog.get(DATASET).set(
    thing_dataset_id_to_contiguous_id={1: 0},
    stuff_dataset_id_to_contiguous_id={2: 1},
    stuff_classes=["thing", "stuff"],
)


def _default_cfg():
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 2
    cfg.DATASETS.TRAIN = (DATASET,)
    return cfg


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _disagreements(function, kwargs):
    """(code default, config value) of every argument whose code default differs; a None
    default means "absent" (e.g. no class count to check), not a value, and is skipped."""
    parameters = inspect.signature(function).parameters
    return {
        name: (parameters[name].default, value)
        for name, value in kwargs.items()
        if name in parameters
        and parameters[name].default not in (inspect.Parameter.empty, None)
        and _plain(parameters[name].default) != _plain(value)
    }


@functools.lru_cache(maxsize=None)
def _from_config_kwargs():
    cfg = _default_cfg()
    shapes = {"dec1": ShapeSpec(channels=32, stride=1)}
    return {
        "UNet": (UNet.__init__, unet_kwargs_from_config(cfg)),
        "MaskAttnSemSegHead": (
            MaskAttnSemSegHead.__init__, MaskAttnSemSegHead.from_config(cfg, shapes)
        ),
        "MaskAttnEmbedHead": (
            MaskAttnEmbedHead.__init__, MaskAttnEmbedHead.from_config(cfg, shapes)
        ),
        "MaskAttnPostProcessor": (
            MaskAttnPostProcessor.__init__,
            MaskAttnPostProcessor.from_config(cfg, thing_ids=[0]),
        ),
        "MaskAttnUNet": (MaskAttnUNet.__init__, MaskAttnUNet.from_config(cfg)),
        "MaskAttnPanopticMapper": (
            MaskAttnPanopticMapper.__init__, MaskAttnPanopticMapper.from_config(cfg, True)
        ),
    }


@pytest.mark.parametrize("name", sorted(_from_config_kwargs()))
def test_code_defaults_agree_with_the_config(name):
    function, kwargs = _from_config_kwargs()[name]
    assert _disagreements(function, kwargs) == {}
