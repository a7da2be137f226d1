"""Image classifiers for 32×32 inputs in [0, 1]: the I-BAU checkpoints' SmallVGG, and the two ResNet-18s
that backdoor benchmarks train (BackdoorBench's PreActResNet18, the classic CIFAR ResNet18).

Example:
    >>> from fastpurify.models import build_model
    >>> build_model("preact_resnet18", num_classes=10).linear.out_features
    10
"""

from __future__ import annotations

from torch import nn

from .checkpoint import (
    CheckpointError,
    MissingExtraError,
    extract_state_dict,
    load_checkpoint,
    load_into,
    read_state_dict,
    save_checkpoint,
)
from .factory import ModelSpecError, resolve_model
from .preact_resnet import PreActResNet18
from .resnet import ResNet18
from .resnet50 import ResNet50
from .small_vgg import SmallVGG
from .vit import ViT

__all__ = [
    "ARCHS",
    "CheckpointError",
    "MissingExtraError",
    "ModelSpecError",
    "PreActResNet18",
    "ResNet18",
    "ResNet50",
    "SmallVGG",
    "ViT",
    "build_model",
    "extract_state_dict",
    "load_checkpoint",
    "load_into",
    "read_state_dict",
    "resolve_model",
    "save_checkpoint",
]

#: Architecture name (as used by the CLI and ``load_checkpoint``) -> model class taking ``num_classes``.
ARCHS: dict[str, type[nn.Module]] = {
    "small_vgg": SmallVGG,
    "preact_resnet18": PreActResNet18,
    "resnet18": ResNet18,
    # ImageNet-layout large models (224×224; torchvision's resnet50 / vit_b_16 state-dict keys); their classes take
    # width / depth arguments for small versions
    "resnet50": ResNet50,
    "vit": ViT,
}


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (a key of ``ARCHS``), in training mode.

    Example:
        >>> build_model("small_vgg", 10).classifier.weight.shape
        torch.Size([10, 2048])
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid names: {', '.join(sorted(ARCHS))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return ARCHS[arch](num_classes=num_classes)
