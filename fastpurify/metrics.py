"""Clean accuracy (ACC), attack success rate (ASR), robust accuracy (RA) and defense effectiveness (DER).

Definitions follow BackdoorBench (``specs/evaluation.md``): ASR and RA are measured over the test images
whose TRUE label is not the target, after applying the trigger; all three are percentages.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    >>> r = evaluate(model, torch.rand(20, 3, 32, 32), torch.randint(0, 10, (20,)))
    >>> r.n_clean, r.asr is None
    (20, True)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

__all__ = ["BAR", "EvalResult", "der", "evaluate", "verdict"]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Result of ``evaluate``: percentages and the raw counts they come from (asr/ra are None without trigger)."""

    acc: float
    asr: Optional[float]
    ra: Optional[float]
    n_clean: int
    n_correct: int
    n_triggered: int
    n_attack_success: int
    n_robust: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        s = f"ACC {self.acc:.2f}"
        if self.asr is not None:
            s += f" | ASR {self.asr:.2f} | RA {self.ra:.2f}"
        return s


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.device, b.dtype
    return torch.device("cpu"), torch.float32


def _norm_tensor(v: Any, channels: int, device: torch.device, dtype: torch.dtype, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=dtype).to(device).flatten()
    if t.numel() not in (1, channels):
        raise ValueError(f"normalization {name} must have 1 or {channels} values, got {t.numel()}")
    return t.view(1, -1, 1, 1)


@torch.inference_mode()
def _count(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    index: Optional[torch.Tensor],
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
    target: Optional[int],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    norm: Optional[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side counts (predicted == y, predicted == target) over x[index] (all of x when index is None)."""
    n = x.shape[0] if index is None else index.numel()
    hit_label = torch.zeros((), dtype=torch.int64, device=device)
    hit_target = torch.zeros((), dtype=torch.int64, device=device)
    # channels_last inputs run the oneDNN convolutions about 1.7x faster on CPU (SmallVGG, 2 cores).
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    for start in range(0, n, batch_size):
        if index is None:
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        else:
            sel = index[start : start + batch_size]
            xb, yb = x[sel.to(x.device)], y[sel.to(y.device)]
        xb = xb.to(device=device, non_blocking=True)
        yb = yb.to(device=device, non_blocking=True)
        if transform is not None:
            xb = transform(xb)
        xb = xb.to(dtype=dtype)
        if norm is not None:
            xb = (xb - norm[0]) / norm[1]
        pred = model(xb.contiguous(memory_format=fmt)).argmax(dim=1)
        hit_label += (pred == yb).sum()
        if target is not None:
            hit_target += (pred == target).sum()
    return hit_label, hit_target


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    trigger: Optional[Union[str, Callable[[torch.Tensor], torch.Tensor]]] = None,
    target: Optional[int] = None,
    batch_size: int = 500,
    device: Optional[Union[str, torch.device]] = None,
    normalization: Optional[tuple[Sequence[float], Sequence[float]]] = None,
    num_classes: Optional[int] = None,
) -> EvalResult:
    """ACC of ``model`` on ``(x, y)``; with ``trigger`` and ``target`` also ASR and RA.

    Runs in eval mode under ``torch.inference_mode`` (the caller's train/eval mode is restored), on ``device``
    (default: the model's), moving one batch at a time; counts stay on the device and are read once at the
    end. ``normalization=(mean, std)`` is applied channel-wise after the trigger. ``num_classes`` defaults to
    the width of the model's output. ``trigger`` is a callable on image batches or a spec string such as
    ``"patch:size=4,row=27,col=27,value=1"`` (:func:`fastpurify.triggers.parse_trigger`), as the defenses'
    ``eval_data`` takes.

    Shapes: ``x`` N×C×H×W float in [0, 1], ``y`` N integer labels in [0, num_classes).

    Example:
        >>> from fastpurify.data import default_data_dir, load_cifar10
        >>> from fastpurify.models import load_checkpoint
        >>> from fastpurify.triggers import PatchTrigger
        >>> model = load_checkpoint(default_data_dir() / "ibau" / "badnets_8_02_ckpt.pth")  # doctest: +SKIP
        >>> x, y = load_cifar10(split="test")  # doctest: +SKIP
        >>> str(evaluate(model, x, y, trigger=PatchTrigger(4, 27, 27, 1.0), target=8))  # doctest: +SKIP
        'ACC 84.46 | ASR 97.74 | RA 1.96'
    """
    if isinstance(trigger, str):  # a spec string, as eval_data and the command line take (ValueError if malformed)
        from .triggers import parse_trigger

        trigger = parse_trigger(trigger)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float batch N×C×H×W, got a {desc}")
    if (
        not isinstance(y, torch.Tensor)
        or y.dim() != 1
        or y.dtype.is_floating_point
        or y.dtype
        in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        )
    ):
        desc = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a 1-D integer label tensor, got a {desc}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x holds {x.shape[0]} images but y holds {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty set (x has 0 images)")
    if (trigger is None) != (target is None):
        raise ValueError("trigger and target go together: give both (for ASR/RA) or neither (ACC only)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    model_device, dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    # Per-module flags, so that a caller's mixed state (e.g. BatchNorm frozen in eval inside a training model)
    # comes back exactly.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if num_classes is None:
            with torch.inference_mode():
                num_classes = int(model(x[:1].to(device=device, dtype=dtype)).shape[1])
        lo, hi = torch.aminmax(y)
        lo, hi = int(lo), int(hi)  # one read of the labels, before any batch runs
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"label {lo if lo < 0 else hi} is outside [0, {num_classes})")
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, numbers.Integral) or not 0 <= target < num_classes
        ):
            raise ValueError(f"target {target!r} is outside [0, {num_classes})")
        target = None if target is None else int(target)
        norm = None
        if normalization is not None:
            mean, std = normalization
            channels = x.shape[1]
            norm = (
                _norm_tensor(mean, channels, device, dtype, "mean"),
                _norm_tensor(std, channels, device, dtype, "std"),
            )
            if (norm[1] == 0).any():
                raise ValueError("normalization std must be non-zero")

        n_correct, _ = _count(model, x, y, None, None, None, batch_size, device, dtype, norm)
        counts = [n_correct]
        n_triggered = 0
        if trigger is not None:
            index = torch.nonzero(y != target).flatten()
            n_triggered = index.numel()
            robust, success = _count(model, x, y, index, trigger, target, batch_size, device, dtype, norm)
            counts += [success, robust]
        values = torch.stack(counts).tolist()  # the one device -> host sync of the whole pass
    finally:
        for m, mode in modes:
            m.training = mode

    n = x.shape[0]
    acc = 100.0 * values[0] / n
    if trigger is None:
        return EvalResult(acc, None, None, n, values[0], 0, 0, 0)
    asr = 100.0 * values[1] / n_triggered if n_triggered else float("nan")
    ra = 100.0 * values[2] / n_triggered if n_triggered else float("nan")
    return EvalResult(acc, asr, ra, n, values[0], n_triggered, values[1], values[2])


def _acc_asr(r: Union[EvalResult, Mapping[str, float], Sequence[float]], name: str) -> tuple[float, float]:
    if isinstance(r, EvalResult):
        acc, asr = r.acc, r.asr
    elif isinstance(r, Mapping):
        acc, asr = r.get("acc"), r.get("asr")
    else:
        acc, asr = tuple(r) if len(r) == 2 else (None, None)
    if acc is None or asr is None:
        raise ValueError(
            f"{name} must give both ACC and ASR in percent (an EvalResult with a trigger, a mapping "
            f"with 'acc' and 'asr', or an (acc, asr) pair), got {r!r}"
        )
    for label, v in (("ACC", acc), ("ASR", asr)):
        if not 0.0 <= float(v) <= 100.0:
            raise ValueError(f"{name} {label} {v!r} is not a percentage in [0, 100]")
    return float(acc), float(asr)


def der(
    before: Union[EvalResult, Mapping[str, float], Sequence[float]],
    after: Union[EvalResult, Mapping[str, float], Sequence[float]],
) -> float:
    """Defense effectiveness rating in percent:
    ``100 * [max(0, ASR_b - ASR_a) - max(0, ACC_b - ACC_a) + 1] / 2`` with ACC and ASR as fractions.

    ``before``/``after`` are ``EvalResult``s (with a trigger), mappings with ``acc``/``asr`` or ``(acc, asr)``
    pairs, all in percent. 50 means no change; 100 a full ASR drop at no accuracy cost.

    Example:
        >>> der((84.46, 97.74), (82.30, 3.43))
        96.075
    """
    acc_b, asr_b = _acc_asr(before, "before")
    acc_a, asr_a = _acc_asr(after, "after")
    drop_asr = max(0.0, (asr_b - asr_a) / 100.0)
    drop_acc = max(0.0, (acc_b - acc_a) / 100.0)
    return 100.0 * (drop_asr - drop_acc + 1.0) / 2.0


#: The bar a purification must meet to count as removing the backdoor (issue 15, evaluation.md): attack success
#: at most 5 % and clean accuracy at most 3 points below the model's before purification.
BAR = {"max_asr": 5.0, "max_acc_drop": 3.0}


def verdict(
    before: Union[EvalResult, Mapping[str, float], Sequence[float]],
    after: Union[EvalResult, Mapping[str, float], Sequence[float]],
    *,
    max_asr: float = BAR["max_asr"],
    max_acc_drop: float = BAR["max_acc_drop"],
) -> Dict[str, Any]:
    """Whether a purification met the bar: ``{"met", "asr_ok", "acc_ok", "acc_drop", "text"}``, where ``text`` is
    one plain sentence for people (printed wherever the command line shows ACC/ASR after a defense).

    Example:
        >>> verdict((84.46, 97.74), (82.30, 3.43))["text"]
        'backdoor removed: ASR 3.43 % <= 5 % and ACC drop 2.16 <= 3 points'
        >>> verdict((84.46, 97.74), (83.0, 81.5))["text"]
        'backdoor NOT removed: ASR 81.50 % > 5 % (ACC drop 1.46 <= 3 points)'
    """
    acc_b, _ = _acc_asr(before, "before")
    acc_a, asr_a = _acc_asr(after, "after")
    drop = acc_b - acc_a
    asr_ok, acc_ok = asr_a <= max_asr, drop <= max_acc_drop
    asr_txt = f"ASR {asr_a:.2f} % {'<=' if asr_ok else '>'} {max_asr:g} %"
    acc_txt = f"ACC drop {drop:.2f} {'<=' if acc_ok else '>'} {max_acc_drop:g} points"
    if asr_ok and acc_ok:
        text = f"backdoor removed: {asr_txt} and {acc_txt}"
    elif asr_ok:
        text = f"backdoor removed, but at too high a cost: {acc_txt} ({asr_txt})"
    else:
        text = f"backdoor NOT removed: {asr_txt} ({acc_txt})"
    return {"met": asr_ok and acc_ok, "asr_ok": asr_ok, "acc_ok": acc_ok, "acc_drop": drop, "text": text}
