"""PreActResNet18 as defined by BackdoorBench (the architecture of its CIFAR-10 results).

Differences from the paper's pre-activation ResNet that matter for checkpoint compatibility: the 1x1
projection shortcut is a Sequential holding only a conv (no BN) and exists only when the shape changes,
there is no final BN/ReLU before pooling, pooling is ``avgpool`` (adaptive) and the classifier is ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PreActBlock", "PreActResNet18"]


class PreActBlock(nn.Module):
    """BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, plus the (projected) input.

    Shapes: N×in_planes×H×W -> N×planes×(H/stride)×(W/stride).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        # Only created when needed, so identity blocks have no `shortcut` keys (as in BackdoorBench files).
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, the identity the raw input (pre-activation design).
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 for 32×32 inputs in [0, 1] (no normalisation inside).

    Shapes: ``x`` N×3×H×W float (H, W >= 8; 32 for CIFAR) -> logits N×num_classes.

    Example:
        >>> import torch
        >>> PreActResNet18(num_classes=43)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 43])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            blocks = [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))
