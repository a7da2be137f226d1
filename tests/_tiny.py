"""Small models and triggers shared by the defense tests (reference and fast paths)."""

from typing import Optional

import torch
from torch import nn


def tiny_cnn(last: int = 32, num_classes: int = 10, seed: Optional[int] = None) -> nn.Module:
    """Three conv-BN-ReLU-pool blocks (16, 32, ``last`` channels) and a linear head, for 32×32 inputs; seeded
    when ``seed`` is given."""
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, last, 3, padding=1), nn.BatchNorm2d(last), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(last * 4 * 4, num_classes),
    )


class RandomPatch:
    """White k×k patch at a random position per image (seeded): a trigger a universal δ cannot represent."""

    def __init__(self, k: int = 3, seed: int = 0) -> None:
        self.k, self.g = k, torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        n, _, h, w = x.shape
        rows = torch.randint(0, h - self.k + 1, (n,), generator=self.g).tolist()
        cols = torch.randint(0, w - self.k + 1, (n,), generator=self.g).tolist()
        for i, (r, c) in enumerate(zip(rows, cols)):
            out[i, :, r:r + self.k, c:c + self.k] = 1.0
        return out
