"""What a defense receives, checked before any heavy work: the clean data, the model, the options.

Every check raises a ``ValueError``/``TypeError`` naming the offending value and what is expected. The clean
data becomes one pair of tensors on the defense's device (the defender's clean set is small: 2,500 CIFAR
images are 31 MB), so that batches are index gathers and no DataLoader runs inside a defense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

RANGE_HINT = (
    "fastpurify works on pixel images in [0, 1]. If your model expects normalised inputs, pass pixel images and "
    "normalization=(mean, std); if your data is already normalised, undo it first (x * std + mean). To skip this "
    "check, pass check_range=False."
)


@dataclass
class CleanData:
    """The defender's clean set on the defense's device.

    Shapes: ``x`` N×C×H×W float in [0, 1] (pixel units); ``y`` N int64 in [0, num_classes), or None for
    defenses that use no labels (BCU).
    """

    x: Tensor
    y: Optional[Tensor]
    num_classes: int

    def __len__(self) -> int:
        return self.x.shape[0]


class Normalize(nn.Module):
    """``(x - mean) / std`` channel-wise: put in front of a model that expects normalised inputs, so that the
    defenses work (and perturb) in pixel units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _tensor(v: Any, what: str) -> Tensor:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    if isinstance(v, (list, tuple)) and v and all(isinstance(t, Tensor) for t in v):
        return torch.stack(list(v))
    raise TypeError(f"{what} must be a torch.Tensor (or numpy array), got {type(v).__name__}")


#: Without ``max_images``, reading an iterable data source (a DataLoader, an IterableDataset) stops with an error
#: after this many images: the defender's clean set is small (the published settings use 2,500-5,000 CIFAR
#: images), and an endless stream would otherwise be drained into memory until the machine runs out.
MAX_IMAGES_DEFAULT = 1_000_000


def _bounded(source: Any, what: str, max_images: Optional[int], labels: bool):
    """Read batches (``per_batch``) or samples from an iterable data source into lists, stopping at
    ``max_images`` images, or with an error past :data:`MAX_IMAGES_DEFAULT` when no ``max_images`` was given."""
    from torch.utils.data import DataLoader

    per_batch = isinstance(source, DataLoader) and source.batch_size is not None
    cap = max_images if max_images is not None else MAX_IMAGES_DEFAULT
    xs, ys, count = [], [], 0
    for i, item in enumerate(source):
        bx, by = _split(item, labels, f"{'batch' if per_batch else 'item'} {i} of the {what}")
        bx = _tensor(bx, f"images of {'batch' if per_batch else 'item'} {i}")
        if not per_batch:
            bx = bx.unsqueeze(0)
            by = None if by is None else torch.as_tensor(by).reshape(1)
        elif by is not None:
            by = _tensor(by, f"labels of batch {i}")
        xs.append(bx)
        if labels:
            ys.append(by)
        count += bx.shape[0]
        if count >= cap:
            if max_images is None:
                raise ValueError(
                    f"clean_data ({what}) yielded {count:,} images and has not ended (an endless IterableDataset?); "
                    f"fastpurify reads the clean set into memory: pass max_images=N to take the first N images")
            break
    if not xs:
        raise ValueError(f"clean_data is an empty {what}")
    x = torch.cat(xs)[:cap]
    y = torch.cat(ys)[:cap] if labels else None
    return x, y


def as_tensors(clean_data: Any, *, labels: bool, max_images: Optional[int] = None,
               what: str = "clean_data") -> Tuple[Tensor, Optional[Tensor]]:
    """``clean_data`` — a DataLoader, a Dataset, an IterableDataset, an ``(x, y)`` pair, a list of ``(x_i, y_i)``
    samples, a dict ``{"x": ..., "y": ...}``, or (``labels=False``) ``x`` alone or ``(x, None)`` — as a pair of
    tensors. Batches and samples may carry extra fields after ``(x, y)``; they are ignored. ``max_images`` takes
    the first images only (required for an endless iterable). Returns ``(x, y)`` with ``y`` None when ``labels``
    is False."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(clean_data, (Tensor, np.ndarray)):
        if labels:
            raise TypeError(f"{what} is a single tensor, but this defense needs labels: pass (x, y)")
        return _cap(_tensor(clean_data, what), max_images), None
    if isinstance(clean_data, dict):
        x, y = _split(clean_data, labels, what)
        return _cap(_tensor(x, f"{what} images"), max_images), (
            _cap(_tensor(y, f"{what} labels"), max_images) if labels else None)
    if isinstance(clean_data, (tuple, list)):
        if len(clean_data) == 0:
            raise ValueError(f"{what} is empty")
        if len(clean_data) != 2 or _is_sample(clean_data[0]):
            # a list of samples [(x_0, y_0), (x_1, y_1), ...] (each an image C×H×W, not a batch)
            if all(_is_sample(item) for item in clean_data):
                return _bounded(clean_data, "list of samples", max_images, labels)
        if not labels and isinstance(clean_data[0], (Tensor, np.ndarray)) and (
            len(clean_data) == 1 or clean_data[1] is None or isinstance(clean_data[1], (Tensor, np.ndarray))
        ):
            return _cap(_tensor(clean_data[0], f"{what}[0] (images)"), max_images), None
        if len(clean_data) < 2:
            raise TypeError(f"{what} must be (x, y): a pair of tensors (images N×C×H×W, labels N)")
        if labels and clean_data[1] is None:
            raise TypeError(f"{what} is (x, None), but this defense needs labels: pass (x, y)")
        return (_cap(_tensor(clean_data[0], f"{what}[0] (images)"), max_images),
                _cap(_tensor(clean_data[1], f"{what}[1] (labels)"), max_images))
    if isinstance(clean_data, DataLoader):
        return _bounded(clean_data, "DataLoader", max_images, labels)
    if isinstance(clean_data, IterableDataset):
        return _bounded(clean_data, "IterableDataset", max_images, labels)
    if isinstance(clean_data, (str, bytes)):
        pass  # a file name is not a data set (it has __getitem__ and __len__ too)
    elif isinstance(clean_data, Dataset) or (hasattr(clean_data, "__getitem__") and hasattr(clean_data, "__len__")):
        n = len(clean_data)
        if n == 0:
            raise ValueError(f"{what} is an empty Dataset")
        if max_images is not None:
            n = min(n, max_images)
        items = [_split(clean_data[i], labels, f"item {i} of the Dataset") for i in range(n)]
        x = torch.stack([_tensor(a, f"image {i}") for i, (a, _) in enumerate(items)])
        y = torch.as_tensor([int(b) for _, b in items]) if labels else None
        return x, y
    raise TypeError(
        f"{what} must be a DataLoader, a Dataset, an IterableDataset, an (x, y) pair of tensors, a list of (x_i, y_i) "
        f"samples or a dict {{'x': ..., 'y': ...}}, got {type(clean_data).__name__}"
    )


def _is_sample(item: Any) -> bool:
    """A single ``(image C×H×W, label, ...)`` sample (not a batch)."""
    return (isinstance(item, (tuple, list)) and len(item) >= 1 and isinstance(item[0], (Tensor, np.ndarray))
            and item[0].ndim == 3)


def _cap(t: Tensor, max_images: Optional[int]) -> Tensor:
    return t if max_images is None else t[:max_images]


def _split(item: Any, labels: bool, where: str):
    if isinstance(item, (tuple, list)):
        if labels and len(item) < 2:
            raise TypeError(f"{where} has {len(item)} field(s); expected (x, y, ...)")
        return item[0], (item[1] if labels else None)
    if isinstance(item, dict):
        keys = ("x", "image", "images", "input")
        xk = next((k for k in keys if k in item), None)
        yk = next((k for k in ("y", "label", "labels", "target") if k in item), None)
        if xk is None or (labels and yk is None):
            raise TypeError(f"{where} is a dict with keys {sorted(item)}; expected image and label keys such as "
                            "'x'/'image' and 'y'/'label'")
        return item[xk], (item[yk] if labels else None)
    if not labels and isinstance(item, (Tensor, np.ndarray)):
        return item, None
    raise TypeError(f"{where} is a {type(item).__name__}; expected a tuple (x, y, ...)")


def check_images(x: Tensor, *, check_range: bool, what: str = "clean_data") -> None:
    if not x.is_floating_point():
        raise TypeError(f"{what} images must be floating point in [0, 1], got dtype {x.dtype} "
                        "(for uint8 images divide by 255)")
    if x.dim() != 4:
        raise ValueError(f"{what} images must be a batch N×C×H×W, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty (0 images)")
    lo, hi, finite = torch.aminmax(x) + (torch.isfinite(x).all(),)
    lo, hi, finite = float(lo), float(hi), bool(finite)
    if not finite:
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} holds {bad} non-finite pixel value(s) (NaN or inf)")
    if check_range and (lo < 0.0 or hi > 1.0):
        raise ValueError(f"{what} pixel values span [{lo:.4g}, {hi:.4g}], outside [0, 1]. {RANGE_HINT}")


def check_labels(y: Tensor, n: int, num_classes: Optional[int], what: str = "clean_data") -> Tensor:
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{what} labels must be integers, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{what} labels must be 1-D (N,), got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"{what} holds {n} images but {y.shape[0]} labels")
    y = y.long()
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} label {bad} is outside [0, {num_classes}) (num_classes={num_classes})")
    return y


def first_conv_channels(model: nn.Module) -> Optional[int]:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def probe_model(model: nn.Module, x: Tensor, num_classes: Optional[int], device: torch.device) -> int:
    """Run the model once on two images (eval mode, no grad) and return its number of classes; errors name
    what does not fit."""
    expected = first_conv_channels(model)
    if expected is not None and x.shape[1] != expected:
        raise ValueError(f"clean_data images have {x.shape[1]} channels but the model's first convolution expects "
                         f"{expected} (images must be N×C×H×W)")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2].to(device))
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the model cannot run on clean_data images of shape {tuple(x.shape[1:])}: {first}") from e
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != min(2, x.shape[0]):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits of shape (N, num_classes); on {min(2, x.shape[0])} images "
                         f"it returned {shape}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"num_classes={num_classes} but the model returns {out.shape[1]} logits per image")
    if out.shape[1] < 2:
        raise ValueError(f"the model returns {out.shape[1]} logit per image: a classifier needs at least 2 classes "
                         "(for a binary classifier with one logit, wrap it to return (N, 2) logits)")
    if not torch.isfinite(out).all():
        raise ValueError("the model returns non-finite logits (NaN or inf) on clean images: it is broken before any "
                         "purification; check its weights")
    return int(out.shape[1])


def check_normalization(normalization: Any, channels: int) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    if normalization is None:
        return None
    try:
        mean, std = normalization
        mean = tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else torch.as_tensor(mean).flatten()))
        std = tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else torch.as_tensor(std).flatten()))
    except (TypeError, ValueError):
        msg = f"normalization must be (mean, std) with one value per channel, got {normalization!r}"
        raise ValueError(msg) from None
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalization has {len(mean)} means and {len(std)} stds; the images have {channels} "
                         "channels")
    if any(s <= 0 or not math.isfinite(s) for s in std) or not all(math.isfinite(m) for m in mean):
        raise ValueError(f"normalization std must be positive and finite, got mean={mean} std={std}")
    return mean, std


def prepare(model: nn.Module, clean_data: Any, *, labels: bool, num_classes: Optional[int], device: torch.device,
            batch_size: Optional[int], check_range: bool, allow_small: bool = False,
            max_images: Optional[int] = None) -> CleanData:
    """All checks of the clean data against the model, then the data on ``device``."""
    x, y = as_tensors(clean_data, labels=labels, max_images=max_images)
    check_images(x, check_range=check_range)
    x = x.float()  # float64/float16 images: the defenses work in float32 (the model's dtype, checked before)
    if y is not None:
        y = check_labels(y, x.shape[0], num_classes)
    if batch_size is not None and x.shape[0] < batch_size and not allow_small:
        raise ValueError(f"clean_data holds {x.shape[0]} images, fewer than one batch (batch_size={batch_size}); "
                         "pass a smaller batch_size or more data")
    classes = probe_model(model, x, num_classes, device)
    if y is not None:
        check_labels(y, x.shape[0], classes)
    x = x.to(device=device, dtype=torch.float32)
    return CleanData(x=x, y=None if y is None else y.to(device), num_classes=classes)


def check_eval(x: Tensor, y: Tensor, trigger: Any, target: Any, *, num_classes: int, image_shape: Tuple[int, ...],
               check_range: bool):
    """Check ``eval_data`` as the clean data is checked, before any work: images (dtype, shape, channels and
    size of the clean images, finite, in [0, 1]), labels in range, the trigger (a callable, or a trigger spec
    string such as ``"patch:size=4,row=27,col=27,value=1"``, which is parsed) run once on two images, and the
    target class. Returns ``(x float32, y int64, trigger callable or None, target int or None)``."""
    what = "eval_data"
    x = _tensor(x, f"{what} images")
    y = _tensor(y, f"{what} labels")
    check_images(x, check_range=check_range, what=what)
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{what} images have shape {tuple(x.shape[1:])} per image but the clean images have "
                         f"{tuple(image_shape)}: evaluate on images of the size the model is purified on")
    y = check_labels(y, x.shape[0], num_classes, what=what)
    x = x.float()
    if isinstance(trigger, str):
        from ..triggers import parse_trigger

        trigger = parse_trigger(trigger)
    if trigger is not None:
        if not callable(trigger):
            raise TypeError(f"{what} trigger must be a callable images -> triggered images (e.g. "
                            f"fastpurify.triggers.PatchTrigger) or a trigger spec string, got {type(trigger).__name__}")
        try:
            out = trigger(x[:2].clone())
        except Exception as e:  # noqa: BLE001 - any failure of the user's trigger is reported the same way
            raise ValueError(f"{what} trigger {trigger!r} fails on images of shape {tuple(x[:2].shape)}: "
                             f"{type(e).__name__}: {e}") from e
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(x[:2].shape):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{what} trigger must return images of the shape it is given ({tuple(x[:2].shape)}), "
                             f"returned {shape}")
    if (trigger is None) != (target is None):
        raise ValueError(f"{what}: trigger and target go together: give both (for ASR/RA) or neither (ACC only); "
                         f"got trigger={trigger!r}, target={target!r}")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise TypeError(f"{what} target must be an integer class index, got {target!r}")
        if not 0 <= int(target) < num_classes:
            raise ValueError(f"{what} target {target} is outside [0, {num_classes}) (the model's classes)")
        target = int(target)
    return x, y, trigger, target
