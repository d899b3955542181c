"""Models taking [0, 1] images: a registry of CIFAR architectures, timm models, dual BN."""

from . import resnet, wrn  # noqa: F401  (fill the registry)
from .dual_bn import (
    DualBatchNorm,
    bn_branch,
    convert_dual_bn,
    export_main_branch,
    fused_split,
    has_dual_bn,
    set_bn_branch,
)
from .folding import FoldError, fold_batchnorm
from .normalize import Normalize
from .registry import create, list_models, register
from .timm_models import TimmClassifier

__all__ = [
    "DualBatchNorm",
    "FoldError",
    "Normalize",
    "TimmClassifier",
    "bn_branch",
    "convert_dual_bn",
    "create",
    "export_main_branch",
    "fold_batchnorm",
    "fused_split",
    "has_dual_bn",
    "list_models",
    "register",
    "set_bn_branch",
]
