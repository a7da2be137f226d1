"""A small CIFAR-shaped classifier that fastpurify does not know: what a user passes as ``--model userpkg.net:build``.

Also a few broken "factories", one per error the command line has to explain.
"""

from torch import nn


class UserNet(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a linear head, for 32×32 RGB inputs in [0, 1]."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(4),
        )
        self.head = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def build(num_classes: int = 10, width: int = 8) -> nn.Module:
    return UserNet(num_classes=num_classes, width=width)


NOT_CALLABLE = 3


def returns_a_dict(num_classes: int = 10):
    return {"num_classes": num_classes}


def raises(num_classes: int = 10):
    raise RuntimeError("no weights for this size")
