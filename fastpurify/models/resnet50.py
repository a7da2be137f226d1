"""ResNet-50 in torchvision's layout (ImageNet stem: 7×7/2 conv + 3×3/2 max-pool; bottleneck blocks [3, 4, 6, 3];
global average pool; Linear head), with a ``width`` argument for small test versions.

At the default ``width=64`` the module names, parameter shapes and state-dict keys are torchvision's
``resnet50()`` (``conv1``, ``bn1``, ``layer1.0.conv1`` .. ``layer4.2.bn3``, ``layerK.0.downsample.0/1``, ``fc``;
25,557,032 parameters with 1,000 classes), so a torchvision checkpoint loads with ``load_state_dict(strict=True)``.
Inputs are images in [0, 1]; pass ImageNet's mean/std as the defenses' ``normalization`` for torchvision weights.

Example:
    >>> net = ResNet50(num_classes=10, width=8).eval()
    >>> net(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["Bottleneck", "ResNet50"]


class Bottleneck(nn.Module):
    """1×1 conv (reduce) -> BN -> ReLU -> 3×3 conv (stride) -> BN -> ReLU -> 1×1 conv (expand ×4) -> BN, plus the
    shortcut (``downsample`` = 1×1 conv + BN when the shape changes), ReLU. torchvision's ResNet v1.5 block (the
    stride sits on the 3×3 conv).

    Shapes: N×in_planes×H×W -> N×(4·planes)×(H/stride)×(W/stride).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 (torchvision layout). ``width``: the base channel count (64 = ResNet-50; 8 is a tiny test
    version with the same structure); ``layers``: blocks per stage ([3, 4, 6, 3] = ResNet-50).

    Shapes: N×3×H×W (224×224 for ImageNet; any H, W ≥ 32 work: the pool is adaptive) -> N×num_classes.
    """

    def __init__(self, num_classes: int = 1000, width: int = 64, layers: Sequence[int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"ResNet50: width must be a positive integer (64 = torchvision's), got {width!r}")
        if len(layers) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"ResNet50: layers must be four positive integers, e.g. (3, 4, 6, 3), got {layers!r}")
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(width * 2, layers[1], 2)
        self.layer3 = self._make_layer(width * 4, layers[2], 2)
        self.layer4 = self._make_layer(width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = []
        for s in [stride] + [1] * (blocks - 1):
            out.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
