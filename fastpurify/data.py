"""Image data for fastpurify: the CIFAR-10 python-batch files, and a synthetic 10-class dataset.

All loaders return plain tensors: ``x`` float32 N×3×32×32 in [0, 1] and ``y`` int64 N.

Example:
    >>> x, y = synthetic_dataset(n=100)
    >>> x.shape, y.dtype
    (torch.Size([100, 3, 32, 32]), torch.int64)
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["cifar10_classes", "default_data_dir", "find_cifar10", "load_cifar10", "synthetic_dataset"]

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
_SPLITS = ("train", "test")
PathLike = Union[str, "os.PathLike[str]"]


def default_data_dir() -> Path:
    """The data folder used when none is given: ``$FASTPURIFY_DATA`` if set, else ``../shared/data`` beside the
    repository (``Path(fastpurify.__file__).parents[2] / "shared" / "data"``). It may not exist.

    Example:
        >>> default_data_dir().name  # doctest: +SKIP
        'data'
    """
    env = os.environ.get("FASTPURIFY_DATA")
    if env:
        return Path(env).expanduser()
    # data.py sits beside fastpurify/__init__.py, so parents[2] is the folder holding the repository.
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _has_cifar_files(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE))


def find_cifar10(root: Optional[PathLike] = None) -> Path:
    """Locate the ``cifar-10-batches-py`` folder.

    ``root`` may be that folder, its parent, or a data folder holding ``cifar10/cifar-10-batches-py`` (such as
    ``../shared/data``); ``None`` means ``default_data_dir()``. A folder counts when it holds at least one of
    ``data_batch_1`` .. ``data_batch_5``, ``test_batch``. Raises ``FileNotFoundError`` naming the paths tried.

    Example:
        >>> find_cifar10(default_data_dir()).name  # doctest: +SKIP
        'cifar-10-batches-py'
    """
    base = default_data_dir() if root is None else Path(root).expanduser()
    tried = [base, base / "cifar-10-batches-py", base / "cifar10" / "cifar-10-batches-py"]
    for folder in tried:
        if _has_cifar_files(folder):
            return folder
    source = "" if root is not None else " (from $FASTPURIFY_DATA or the default ../shared/data)"
    raise FileNotFoundError(
        f"CIFAR-10 python batches not found under {base}{source}; tried: {', '.join(str(p) for p in tried)}. "
        f"Expected a folder holding some of {', '.join(CIFAR10_TRAIN_FILES)}, {CIFAR10_TEST_FILE} (and "
        f"{CIFAR10_META_FILE}), the 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html"
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            d = pickle.load(f, encoding="latin1")
        except Exception as e:  # a truncated or foreign file: say which one, not just the pickle error
            raise ValueError(f"{path} is not a CIFAR-10 python batch (pickle.load failed: {e})") from None
    if not isinstance(d, dict) or "data" not in d or "labels" not in d:
        keys = list(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected keys 'data' and 'labels', found {keys}")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected 'data' uint8 N×3072 and N labels, found {data.dtype} {data.shape} and "
            f"{labels.shape[0]} labels"
        )
    return data, labels


def load_cifar10(
    root: Optional[PathLike] = None,
    split: str = "train",
    batches: Optional[Iterable[int]] = None,
    count: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10 from the python-batch pickles.

    ``split="train"`` concatenates ``batches`` (any subset of 1..5, default: every one present, in order);
    ``split="test"`` reads ``test_batch``. ``count`` keeps the first ``count`` images.

    Shapes: returns ``x`` float32 N×3×32×32 with values exactly ``uint8 / 255`` and ``y`` int64 N in 0..9.

    Example:
        >>> x, y = load_cifar10(split="train", batches=[1], count=2500)  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        torch.Size([2500, 3, 32, 32])
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; valid values: {', '.join(repr(s) for s in _SPLITS)}")
    folder = find_cifar10(root)
    if split == "test":
        if batches is not None:
            raise ValueError(f"batches={batches!r} applies to split='train' only; the test split is one file")
        if not (folder / CIFAR10_TEST_FILE).is_file():
            raise FileNotFoundError(f"{folder / CIFAR10_TEST_FILE} not found (the CIFAR-10 test split)")
        files = [folder / CIFAR10_TEST_FILE]
    else:
        present = [i for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()]
        if batches is None:
            wanted = present
        else:
            wanted = list(batches)
            bad = [b for b in wanted if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 5]
            if bad or not wanted:
                raise ValueError(f"batches must be a non-empty subset of 1..5, got {batches!r}")
            missing = [b for b in wanted if b not in present]
            if missing:
                raise FileNotFoundError(
                    f"CIFAR-10 training batch(es) {missing} not found in {folder}; present: "
                    f"{present or 'none'} (data_batch_N files)"
                )
        if not wanted:
            raise FileNotFoundError(f"no CIFAR-10 training batches (data_batch_1..5) in {folder}")
        files = [folder / f"data_batch_{b}" for b in wanted]

    if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0):
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    datas, labels, total = [], [], 0
    for f in files:
        if count is not None and total >= count and datas:
            break  # no need to unpickle batches past the requested count
        d, lab = _read_batch(f)
        datas.append(d)
        labels.append(lab)
        total += len(lab)
    if count is not None and count > total:
        names = ", ".join(p.name for p in files)
        raise ValueError(f"count={count} but the {split} split ({names}) holds only {total} images")
    data = np.concatenate(datas)[:count]
    y = torch.from_numpy(np.concatenate(labels)[:count])
    # Row layout is 1024 R, 1024 G, 1024 B values, each row-major 32x32: a plain reshape gives N×3×32×32.
    x = torch.from_numpy(data).view(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    return x, y


def cifar10_classes(root: Optional[PathLike] = None) -> list[str]:
    """The ten class names from ``batches.meta`` (``['airplane', 'automobile', ...]``).

    Example:
        >>> cifar10_classes()[8]  # doctest: +SKIP
        'ship'
    """
    path = find_cifar10(root) / CIFAR10_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (CIFAR-10 class names)")
    with open(path, "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    return list(meta["label_names"])


# --------------------------------------------------------------------------------------------------------------
# Synthetic data


def _generator(*key: int) -> torch.Generator:
    # SeedSequence turns (seed, stream) into well-separated states, so train/test draws never coincide.
    state = np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _smooth_field(n: int, channels: int, grid: int, size: int, g: torch.Generator) -> torch.Tensor:
    """n×channels×size×size, unit-variance Gaussian noise on a grid×grid lattice, bicubically upsampled."""
    coarse = torch.randn(n, channels, grid, grid, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


_SPLIT_STREAM = {"train": 1, "test": 2}
_ORIENTATIONS = 4  # |angle| in {0, 30, 60, 90} degrees
_MAX_CLASSES = 16  # 4 frequencies x 4 orientations; a 5th frequency (10.5 cycles) would near the 16-cycle limit


def synthetic_dataset(
    n: int = 5000,
    num_classes: int = 10,
    seed: int = 0,
    split: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic synthetic dataset of 32×32 RGB images in [0, 1]: oriented stripe patches on clutter.

    Generative process (every random draw comes from a generator keyed by ``seed`` and ``split``, so the
    train and test splits are disjoint draws of the same distribution):

    1. Labels are balanced (``arange(n) % num_classes``) and shuffled.
    2. Class ``c`` is a sinusoidal grating with orientation ``±30° * (c % 4)`` (the sign drawn per sample,
       so horizontal flips keep the class) plus N(0, 0.1 rad) jitter, and frequency ``2.5 + 2 * (c // 4)``
       cycles per 32 px times U(0.9, 1.1). Its phase is uniform, so the class mean image is flat and a
       linear classifier on pixels stays near chance (about 13 % for 10 classes).
    3. The grating is seen through a Gaussian window of radius U(6, 10) px centred at a random position
       within ±6 px of the image centre, tinted with a random RGB colour (channels U(0.3, 1)), with
       amplitude 0.4 times a contrast U(0.5, 1).
    4. It is added to a mid-grey background with a random colour cast (std 0.1), a smooth colored clutter
       field (4×4 lattice, bicubic, amplitude 0.1) that carries no class information, and pixel noise
       (std 0.06).
    5. Values are clipped to [0, 1] and squeezed into [0.02, 0.9], so no clean image holds a white (1.0)
       pixel anywhere: a BadNets white patch never occurs naturally and attack success measures the backdoor.

    Learning it takes oriented, translation-invariant filters: a linear classifier on pixels stays near
    chance, while SmallVGG (SGD lr 0.01, batch 128, n=5000, per-step cosine, no augmentation) is near 30 % after
    1 epoch, about 90 % after 2 and 96-99 % after 8 (measured for seeds 0, 2-7; with 6 epochs one seed in 4 was
    at 92 %). Horizontal flips keep the class, so ``augment=True`` is valid, but it slows the backdoor: with it,
    one seed in 3 had 88.5 % attack success after 8 epochs. (A weaker signal, amplitude 0.3 with contrast
    U(0.4, 1), made one seed in 4 stall near 70 % accuracy in 8 epochs.)

    Shapes: returns ``x`` float32 n×3×32×32 and ``y`` int64 n.

    Example:
        >>> x, y = synthetic_dataset(n=20, split="test")
        >>> bool(x.max() <= 0.9), sorted(set(y.tolist()))[:3]
        (True, [0, 1, 2])
    """
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; valid values: {', '.join(repr(s) for s in _SPLIT_STREAM)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= _MAX_CLASSES:
        raise ValueError(f"num_classes must be an integer in [2, {_MAX_CLASSES}], got {num_classes!r}")

    g = _generator(seed, _SPLIT_STREAM[split])
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]

    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    theta = sign * (math.pi / 6) * (y % _ORIENTATIONS).float() + 0.1 * torch.randn(n, generator=g)
    freq = (2.5 + 2.0 * (y // _ORIENTATIONS).float()) * torch.empty(n).uniform_(0.9, 1.1, generator=g)
    phase = torch.empty(n).uniform_(0, 2 * math.pi, generator=g)
    coord = torch.arange(32, dtype=torch.float32) - 15.5
    rows, cols = coord.view(1, 32, 1), coord.view(1, 1, 32)
    along = cols * torch.cos(theta).view(n, 1, 1) + rows * torch.sin(theta).view(n, 1, 1)  # n×32×32
    grating = torch.sin(2 * math.pi * freq.view(n, 1, 1) * along / 32 + phase.view(n, 1, 1))

    cy = torch.empty(n, 1, 1).uniform_(-6, 6, generator=g)
    cx = torch.empty(n, 1, 1).uniform_(-6, 6, generator=g)
    radius = torch.empty(n, 1, 1).uniform_(6, 10, generator=g)
    window = torch.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * radius**2))
    tint = torch.rand(n, 3, 1, 1, generator=g) * 0.7 + 0.3
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.0, generator=g)

    clutter = _smooth_field(n, 3, 4, 32, g)
    background = 0.5 + 0.1 * torch.randn(n, 3, 1, 1, generator=g)
    noise = 0.06 * torch.randn(n, 3, 32, 32, generator=g)
    x = background + 0.4 * contrast * tint * (grating * window).unsqueeze(1) + 0.1 * clutter + noise
    x = 0.02 + 0.88 * x.clamp_(0.0, 1.0)
    return x.contiguous(), y.to(torch.int64)
