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


def patch_backdoored() -> nn.Module:
    """``tiny_cnn(64)`` backdoored with a random-position 3×3 white patch (target 0, 20 % poisoned) on 1,500
    synthetic images: the model of the AWM and BAERASE tests (eval mode)."""
    from fastpurify.data import synthetic_dataset
    from fastpurify.train import train_backdoored

    torch.manual_seed(0)
    x, y = synthetic_dataset(n=1500, seed=1)
    model, _ = train_backdoored(tiny_cnn(64), x, y, trigger=RandomPatch(3, seed=0), target=0, poison_rate=0.2,
                                epochs=8, lr=0.01, augment=False)
    return model.eval()


def additive_backdoored(target: int = 0):
    """``tiny_cnn(32, seed=0)`` backdoored with an additive ±0.1 pattern (which a universal δ can represent) on
    1,024 synthetic images: the model of the SAU and I-BAU tests. Returns ``(model in eval mode, trigger)``."""
    from fastpurify.data import synthetic_dataset
    from fastpurify.train import train_backdoored
    from fastpurify.triggers import AddTrigger

    g = torch.Generator().manual_seed(0)
    trigger = AddTrigger(0.1 * (torch.randint(0, 2, (3, 32, 32), generator=g).float() * 2 - 1))
    x, y = synthetic_dataset(n=1024, seed=0)
    model, _ = train_backdoored(tiny_cnn(32, seed=0), x, y, trigger=trigger, target=target, epochs=10, lr=0.05,
                                batch_size=64, augment=False)
    return model.eval(), trigger
