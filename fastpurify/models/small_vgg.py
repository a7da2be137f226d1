"""SmallVGG: the 6-conv VGG-style CIFAR network of the I-BAU authors' backdoored checkpoints.

Module indices are part of the checkpoint format (``features.{0,3,8,11,16,19}`` are the convs,
``features.{1,4,9,12,17,20}`` the BatchNorms), so the layer order below must not change.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallVGG"]


def _block(in_ch: int, out_ch: int, dropout: float) -> list[nn.Module]:
    # [Conv3x3 -> BN -> ELU] x 2 -> MaxPool2 -> Dropout: 7 modules, which fixes the checkpoint indices.
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ELU(inplace=True),
        nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ELU(inplace=True),
        nn.MaxPool2d(2),
        nn.Dropout(dropout),
    ]


class SmallVGG(nn.Module):
    """Three conv blocks (widths 32, 64, 128; dropout 0.3, 0.4, 0.4) and one linear layer.

    Inputs are RGB in [0, 1] with no mean/std normalisation, as in the I-BAU checkpoints.

    Shapes: ``x`` N×3×32×32 float -> logits N×num_classes.

    Example:
        >>> import torch
        >>> SmallVGG()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for in_ch, out_ch, p in ((3, 32, 0.3), (32, 64, 0.4), (64, 128, 0.4)):
            layers += _block(in_ch, out_ch, p)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
