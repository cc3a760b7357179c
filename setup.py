#!/usr/bin/env python
"""Install maskattn_d2. detectron2 and panopticapi are installed by scripts/setup.sh."""
from setuptools import find_packages, setup

setup(
    name="maskattn_d2",
    version="0.1.0",
    description="MaskAttn-UNet and hybrid-attention UNet for low-resolution panoptic "
    "segmentation, as a Detectron2 project",
    python_requires=">=3.9",
    packages=find_packages(include=["maskattn_d2", "maskattn_d2.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "pycocotools",
        "opencv-python-headless",
        "scipy",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest"],
        # tools/export_model.py --format onnx and the onnxruntime backend (maskattn_d2.export);
        # ml_dtypes (onnx's dependency) from 0.6 on needs numpy 2, which detectron2 does not run
        "onnx": ["onnx>=1.16", "onnxruntime>=1.17", "ml_dtypes<0.6"],
    },
)
