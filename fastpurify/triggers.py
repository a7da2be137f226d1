"""Backdoor triggers and poisoned-set builders.

A trigger is a callable ``trigger(x) -> x_triggered`` on a batch N×C×H×W in [0, 1]; it never mutates ``x``
and moves its own tensors to ``x``'s device and dtype. ``parse_trigger`` reads the CLI syntax::

    patch:size=4,row=27,col=27,value=1      (every key optional)
    randpatch:size=3,value=1,seed=0         a size×size patch at a random position per image (every key optional)
    add:FILE.png                            clip(x + image, 0, 1)
    blend:FILE.png,alpha=0.2                (1 - alpha) * x + alpha * image
    masked:pattern=FILE.png,mask=FILE.npy   x * (1 - mask) + pattern * mask

Example:
    >>> import torch
    >>> t = parse_trigger("patch:size=3,row=29,col=29")
    >>> t(torch.zeros(1, 3, 32, 32))[0, :, 29:, 29:].min().item()
    1.0
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

__all__ = [
    "AddTrigger",
    "BlendTrigger",
    "MaskedTrigger",
    "PatchTrigger",
    "RandomPatchTrigger",
    "Trigger",
    "load_image",
    "load_mask",
    "parse_trigger",
    "poison_all_to_all",
    "poison_all_to_one",
    "triggered_test_set",
]

PathLike = Union[str, "os.PathLike[str]"]
TRIGGER_SYNTAX = (
    "patch[:size=4,row=27,col=27,value=1] | randpatch[:size=3,value=1,seed=0] | "
    "add:FILE.png | blend:FILE.png[,alpha=0.2] | "
    "masked:pattern=FILE.png,mask=FILE.npy"
)


# --------------------------------------------------------------------------------------------------------------
# Image files


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(raw: bytes, height: int, stride: int, bpp: int, path: Path) -> np.ndarray:
    """Undo the per-row PNG filters (None, Sub, Up, Average, Paeth) -> height×stride uint8."""
    if len(raw) < height * (stride + 1):
        raise ValueError(f"{path}: truncated PNG image data ({len(raw)} bytes for {height} rows of {stride})")
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for r in range(height):
        ftype = raw[r * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=r * (stride + 1) + 1).astype(np.int64)
        if ftype == 0:
            cur = line
        elif ftype == 1:  # Sub: each byte adds the byte bpp to its left -> a running sum per byte lane
            cur = np.zeros(stride, dtype=np.int64)
            for lane in range(bpp):
                cur[lane::bpp] = np.cumsum(line[lane::bpp]) % 256
        elif ftype == 2:  # Up
            cur = (line + prev) % 256
        elif ftype in (3, 4):  # Average / Paeth depend on the just-decoded left byte: sequential
            c = line.tolist()
            up = prev.tolist()
            for i in range(stride):
                left = c[i - bpp] if i >= bpp else 0
                if ftype == 3:
                    c[i] = (c[i] + (left + up[i]) // 2) & 0xFF
                else:
                    c[i] = (c[i] + _paeth(left, up[i], up[i - bpp] if i >= bpp else 0)) & 0xFF
            cur = np.asarray(c, dtype=np.int64)
        else:
            raise ValueError(f"{path}: invalid PNG filter type {ftype} in row {r} (valid: 0-4)")
        out[r] = cur
        prev = cur
    return out


def _read_png(path: Path) -> np.ndarray:
    """Minimal PNG decoder (8-bit, non-interlaced; grey, RGB, palette, grey+alpha, RGBA) -> H×W×3 uint8.

    Written here because PIL is not a dependency; alpha is dropped (as PIL's ``convert("RGB")`` does).
    """
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{path} is not a PNG file (bad signature {data[:8]!r})")
    pos, idat, palette, header = 8, [], None, None
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif ctype == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
    if header is None or not idat:
        raise ValueError(f"{path}: malformed PNG (missing IHDR or IDAT chunk)")
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
    if channels is None or depth != 8 or interlace != 0:
        raise ValueError(
            f"{path}: unsupported PNG (bit depth {depth}, color type {color}, interlace {interlace}); "
            "supported: 8-bit non-interlaced grey, RGB, palette, grey+alpha or RGBA — re-save it as 8-bit RGB"
        )
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"{path}: corrupt PNG image data ({e})") from None
    img = _unfilter(raw, height, width * channels, channels, path).reshape(height, width, channels)
    if color == 3:
        if palette is None:
            raise ValueError(f"{path}: palette PNG without a PLTE chunk")
        return palette[img[..., 0]]
    if channels in (1, 2):  # grey (+alpha) -> replicate grey into R, G, B
        return np.repeat(img[..., :1], 3, axis=2)
    return img[..., :3].copy()


def load_image(path: PathLike) -> torch.Tensor:
    """Read a trigger image: PNG (grey / palette / RGBA converted to RGB) or ``.npy`` (H×W×C or C×H×W).

    Shapes: returns float32 3×H×W in [0, 1]; an 8-bit image gives exactly ``uint8 / 255``.

    Example:
        >>> from fastpurify.data import default_data_dir
        >>> load_image(default_data_dir() / "ibau" / "trojan_wm.png").shape  # doctest: +SKIP
        torch.Size([3, 32, 32])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trigger image not found: {path}")
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3):
            arr = arr.transpose(2, 0, 1)
        if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4):
            raise ValueError(f"{path}: expected an image array H×W, H×W×C or C×H×W (C in 1, 3, 4), got {arr.shape}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
        t = t.to(torch.float32) / 255.0 if arr.dtype == np.uint8 else t.to(torch.float32)
        t = t[:3] if t.shape[0] >= 3 else t.expand(3, -1, -1)
    else:
        t = torch.from_numpy(_read_png(path)).permute(2, 0, 1).to(torch.float32) / 255.0
    if t.min() < 0 or t.max() > 1:
        raise ValueError(f"{path}: image values must lie in [0, 1] (or be uint8), found [{t.min()}, {t.max()}]")
    return t.contiguous()


def load_mask(path: PathLike) -> torch.Tensor:
    """Read a trigger mask from ``.npy`` (H×W or 3×H×W, values in [0, 1]) or an image file (its first channel).

    Shapes: returns float32 H×W or 3×H×W.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trigger mask not found: {path}")
    if path.suffix.lower() != ".npy":
        return load_image(path)[0]
    arr = np.load(path, allow_pickle=False)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] not in (1, 3):
        arr = arr.transpose(2, 0, 1)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[0] == 3)):
        raise ValueError(f"{path}: a mask must be H×W or 3×H×W, got shape {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32)
    if arr.dtype == np.uint8 and t.max() > 1:
        t = t / 255.0
    if t.min() < 0 or t.max() > 1:
        raise ValueError(f"{path}: mask values must lie in [0, 1], found [{t.min()}, {t.max()}]")
    return t


# --------------------------------------------------------------------------------------------------------------
# Triggers


class Trigger:
    """Base class: ``__call__(x)`` returns a new triggered batch; ``spec`` is the ``parse_trigger`` string."""

    spec: str = "?"

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.spec}: expected a float batch N×C×H×W, got a {desc}")
        return self.apply(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def _image_arg(image: Union[torch.Tensor, PathLike], what: str) -> tuple[torch.Tensor, str]:
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3:
            raise ValueError(f"{what} must be C×H×W or H×W, got shape {tuple(image.shape)}")
        return t, f"<tensor {'x'.join(map(str, t.shape))}>"
    return load_image(image), str(image)


def _check_fits(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.shape[-2:] != x.shape[-2:] or t.shape[0] not in (1, x.shape[1]):
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not fit images of shape {tuple(x.shape[1:])} (C×H×W)")


class PatchTrigger(Trigger):
    """BadNets: set rows ``row..row+size-1`` and columns ``col..col+size-1`` of every channel to ``value``.

    The I-BAU badnets checkpoint uses ``PatchTrigger(4, 27, 27, 1.0)`` (pixels [27:31, 27:31]).

    Shapes: N×C×H×W -> N×C×H×W (same dtype and device).
    """

    def __init__(self, size: int = 4, row: int = 27, col: int = 27, value: float = 1.0) -> None:
        for name, v, lo in (("size", size, 1), ("row", row, 0), ("col", col, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"patch {name} must be an integer >= {lo}, got {v!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"patch value must lie in [0, 1], got {value!r}")
        self.size, self.row, self.col, self.value = int(size), int(row), int(col), float(value)
        self.spec = f"patch:size={self.size},row={self.row},col={self.col},value={self.value:g}"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.row + self.size > h or self.col + self.size > w:
            raise ValueError(
                f"{self.spec}: the patch covers rows {self.row}..{self.row + self.size - 1} and columns "
                f"{self.col}..{self.col + self.size - 1}, outside the {h}×{w} image"
            )
        out = x.clone()
        out[:, :, self.row : self.row + self.size, self.col : self.col + self.size] = self.value
        return out


class RandomPatchTrigger(Trigger):
    """A ``size``×``size`` patch of ``value`` at a random position per image (a random-location BadNets: no
    universal perturbation of a fixed pixel set represents it). The positions come from a generator seeded with
    ``seed`` at every call, so the same batch gets the same positions each time (evaluations repeat).

    Shapes: N×C×H×W -> N×C×H×W (same dtype and device).

    Example:
        >>> t = RandomPatchTrigger(3, seed=0)
        >>> out = t(torch.zeros(4, 3, 32, 32))
        >>> [int((out[i] == 1).sum()) for i in range(4)], bool(torch.equal(out, t(torch.zeros(4, 3, 32, 32))))
        ([27, 27, 27, 27], True)
    """

    def __init__(self, size: int = 3, value: float = 1.0, seed: int = 0) -> None:
        for name, v, lo in (("size", size, 1), ("seed", seed, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"randpatch {name} must be an integer >= {lo}, got {v!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"randpatch value must lie in [0, 1], got {value!r}")
        self.size, self.value, self.seed = int(size), float(value), int(seed)
        self.spec = f"randpatch:size={self.size},value={self.value:g},seed={self.seed}"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        k = self.size
        if k > h or k > w:
            raise ValueError(f"{self.spec}: a {k}×{k} patch does not fit {h}×{w} images")
        g = torch.Generator().manual_seed(self.seed)
        rows = torch.randint(0, h - k + 1, (n, 1, 1), generator=g).to(x.device)
        cols = torch.randint(0, w - k + 1, (n, 1, 1), generator=g).to(x.device)
        r = torch.arange(h, device=x.device).view(1, h, 1)
        c = torch.arange(w, device=x.device).view(1, 1, w)
        inside = (r >= rows) & (r < rows + k) & (c >= cols) & (c < cols + k)  # N×H×W
        return torch.where(inside[:, None], torch.full((), self.value, dtype=x.dtype, device=x.device), x)


class BlendTrigger(Trigger):
    """Blended attack: ``(1 - alpha) * x + alpha * image``.

    Shapes: ``image`` C×H×W (or a PNG path); N×C×H×W -> N×C×H×W.
    """

    def __init__(self, image: Union[torch.Tensor, PathLike], alpha: float = 0.2) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"blend alpha must lie in [0, 1], got {alpha!r}")
        self.image, src = _image_arg(image, "blend image")
        self.alpha = float(alpha)
        self.spec = f"blend:{src},alpha={self.alpha:g}"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_fits("blend image", self.image, x)
        img = self.image.to(device=x.device, dtype=x.dtype)
        return torch.lerp(x, img.expand_as(x), self.alpha)


class AddTrigger(Trigger):
    """Additive trigger (the I-BAU trojan watermark): ``clip(x + image, 0, 1)``.

    Shapes: ``image`` C×H×W (or a PNG path, read as uint8 / 255); N×C×H×W -> N×C×H×W.
    """

    def __init__(self, image: Union[torch.Tensor, PathLike]) -> None:
        self.image, src = _image_arg(image, "additive image")
        self.spec = f"add:{src}"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_fits("additive image", self.image, x)
        return (x + self.image.to(device=x.device, dtype=x.dtype)).clamp_(0.0, 1.0)


class MaskedTrigger(Trigger):
    """Masked pattern (Neural-Cleanse style): ``x * (1 - mask) + pattern * mask``.

    Shapes: ``pattern`` C×H×W, ``mask`` H×W or C×H×W in [0, 1]; N×C×H×W -> N×C×H×W.
    """

    def __init__(self, pattern: Union[torch.Tensor, PathLike], mask: Union[torch.Tensor, PathLike]) -> None:
        self.pattern, psrc = _image_arg(pattern, "pattern")
        if isinstance(mask, torch.Tensor):
            self.mask, msrc = mask.detach(), f"<tensor {'x'.join(map(str, mask.shape))}>"
        else:
            self.mask, msrc = load_mask(mask), str(mask)
        if self.mask.dim() == 2:
            self.mask = self.mask[None]
        if self.mask.dim() != 3 or self.mask.shape[-2:] != self.pattern.shape[-2:]:
            raise ValueError(
                f"mask of shape {tuple(self.mask.shape)} does not match pattern of shape {tuple(self.pattern.shape)}"
                " (expected H×W or C×H×W with the same H×W)"
            )
        if self.mask.min() < 0 or self.mask.max() > 1:
            raise ValueError("mask values must lie in [0, 1]")
        self.spec = f"masked:pattern={psrc},mask={msrc}"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_fits("pattern", self.pattern, x)
        _check_fits("mask", self.mask, x)
        m = self.mask.to(device=x.device, dtype=x.dtype)
        return x * (1 - m) + self.pattern.to(device=x.device, dtype=x.dtype) * m


# --------------------------------------------------------------------------------------------------------------
# CLI syntax


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"invalid trigger {spec!r}: {why}; valid syntax: {TRIGGER_SYNTAX}")


def _number(spec: str, key: str, value: str, cast: Callable[[str], float]) -> float:
    try:
        return cast(value)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise _bad(spec, f"{key}={value!r} is not {kind}") from None


def _file(spec: str, key: str, value: str) -> str:
    if not value:
        raise _bad(spec, f"{key} needs a file path")
    if not Path(value).is_file():
        raise FileNotFoundError(f"trigger {spec!r}: {key} file not found: {value}")
    return value


def parse_trigger(spec: str) -> Trigger:
    """Build a trigger from its CLI string (see the module docstring for the syntax).

    File paths may not contain ``,`` or ``=``. Malformed specs raise ``ValueError`` quoting the spec and the
    valid syntax; missing files raise ``FileNotFoundError`` naming the path.

    Example:
        >>> parse_trigger("patch")
        PatchTrigger('patch:size=4,row=27,col=27,value=1')
        >>> parse_trigger("add:../shared/data/ibau/trojan_wm.png")  # doctest: +SKIP
        AddTrigger('add:../shared/data/ibau/trojan_wm.png')
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), "empty trigger specification")
    kind, _, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    items = [s.strip() for s in rest.split(",")] if rest.strip() else []
    if any(not s for s in items):
        raise _bad(spec, "empty item between commas")
    positional = [s for s in items if "=" not in s]
    keyed: dict[str, str] = {}
    for s in items:
        if "=" in s:
            k, _, v = s.partition("=")
            k = k.strip().lower()
            if k in keyed:
                raise _bad(spec, f"key {k!r} given twice")
            keyed[k] = v.strip()

    valid = {
        "patch": ("size", "row", "col", "value"),
        "randpatch": ("size", "value", "seed"),
        "add": ("image",),
        "blend": ("image", "alpha"),
        "masked": ("pattern", "mask"),
    }
    if kind not in valid:
        raise _bad(spec, f"unknown trigger kind {kind!r} (valid kinds: {', '.join(valid)})")
    unknown = sorted(set(keyed) - set(valid[kind]))
    if unknown:
        raise _bad(spec, f"unknown key(s) {', '.join(unknown)} for {kind!r} (valid keys: {', '.join(valid[kind])})")

    if kind in ("patch", "randpatch"):
        if positional:
            raise _bad(spec, f"{kind} takes only key=value items, got {positional[0]!r}")
        args = {k: _number(spec, k, v, float if k == "value" else int) for k, v in keyed.items()}
        try:
            return (PatchTrigger if kind == "patch" else RandomPatchTrigger)(**args)
        except ValueError as e:
            raise _bad(spec, str(e)) from None
    if kind == "masked":
        if positional:
            raise _bad(spec, f"masked takes pattern=FILE,mask=FILE, got {positional[0]!r}")
        missing = [k for k in ("pattern", "mask") if k not in keyed]
        if missing:
            raise _bad(spec, f"missing {' and '.join(missing)}")
        return MaskedTrigger(_file(spec, "pattern", keyed["pattern"]), _file(spec, "mask", keyed["mask"]))
    # add / blend: one image, given positionally or as image=FILE
    if len(positional) + ("image" in keyed) != 1:
        raise _bad(spec, f"{kind} needs exactly one image file")
    image = _file(spec, "image", keyed.get("image", positional[0] if positional else ""))
    if kind == "add":
        return AddTrigger(image)
    alpha = _number(spec, "alpha", keyed["alpha"], float) if "alpha" in keyed else 0.2
    if not 0.0 <= alpha <= 1.0:
        raise _bad(spec, f"alpha={alpha:g} is outside [0, 1]")
    return BlendTrigger(image, alpha)


# --------------------------------------------------------------------------------------------------------------
# Poisoned-set builders


def _check_labels(y: torch.Tensor, num_classes: Optional[int], what: str = "y") -> int:
    """Validate integer labels; returns num_classes (inferred as max label + 1 when None)."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        desc = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{what} must be a 1-D integer label tensor, got a {desc}")
    if y.numel() == 0:
        raise ValueError(f"{what} is empty")
    lo, hi = int(y.min()), int(y.max())
    if num_classes is None:
        num_classes = hi + 1
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"label {bad} in {what} is outside [0, {num_classes})")
    return num_classes


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a batch N×C×H×W, got shape {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x holds {x.shape[0]} images but y holds {y.shape[0]} labels")


def _check_target(target: int, num_classes: int, inferred: bool = False) -> int:
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < num_classes:
        hint = " (num_classes inferred as the largest label + 1; pass num_classes= to set it)" if inferred else ""
        raise ValueError(f"target {target!r} is outside [0, {num_classes}){hint}")
    return int(target)


def _check_rate(rate: float) -> float:
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"poisoning rate {rate!r} is outside [0, 1]")
    return float(rate)


def _choose(candidates: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    # A CPU generator makes the choice identical on every device.
    g = torch.Generator().manual_seed(int(seed))
    picked = candidates.cpu()[torch.randperm(candidates.numel(), generator=g)[:k]]
    return picked.sort().values


def _apply(x, y, trigger, idx, new_labels):
    x_p, y_p = x.clone(), y.clone()
    idx_d = idx.to(x.device)
    if idx.numel():
        x_p[idx_d] = trigger(x[idx_d]).to(x.dtype)
        y_p[idx.to(y.device)] = new_labels.to(device=y.device, dtype=y.dtype)
    return x_p, y_p


def poison_all_to_one(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    target: int,
    rate: float,
    seed: int = 0,
    num_classes: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-to-one poisoning: ``round(rate * N)`` samples whose label != ``target`` (chosen by a generator seeded
    with ``seed``) get the trigger and label ``target``. ``x`` and ``y`` are not modified. ``num_classes``
    (for validating ``target`` and the labels) defaults to the largest label + 1.

    Shapes: ``x`` N×C×H×W, ``y`` N int -> ``(x_p, y_p, poisoned_index)``, the last int64 K sorted, on CPU.

    Example:
        >>> import torch
        >>> x, y = torch.zeros(10, 3, 32, 32), torch.arange(10)
        >>> _, y_p, idx = poison_all_to_one(x, y, PatchTrigger(), target=0, rate=0.3)
        >>> len(idx), bool((y_p[idx] == 0).all())
        (3, True)
    """
    inferred = num_classes is None
    num_classes = _check_labels(y, num_classes)
    _check_pair(x, y)
    target, rate = _check_target(target, num_classes, inferred), _check_rate(rate)
    candidates = torch.nonzero(y != target).flatten()
    k = int(round(rate * y.numel()))
    if k > candidates.numel():
        raise ValueError(
            f"rate {rate:g} asks for {k} poisoned samples but only {candidates.numel()} have a label != target {target}"
        )
    idx = _choose(candidates, k, seed)
    return (*_apply(x, y, trigger, idx, torch.full((k,), target, dtype=torch.int64)), idx)


def poison_all_to_all(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    rate: float,
    num_classes: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-to-all poisoning: ``round(rate * N)`` samples (seeded choice) get the trigger and label ``(y+1) % C``.

    Shapes: ``x`` N×C×H×W, ``y`` N int -> ``(x_p, y_p, poisoned_index)``, the last int64 K sorted, on CPU.

    Example:
        >>> import torch
        >>> _, y_p, idx = poison_all_to_all(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 9]),
        ...                                 PatchTrigger(2, 0, 0), rate=1.0, num_classes=10)
        >>> y_p.tolist()
        [1, 2, 3, 0]
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    _check_labels(y, num_classes)
    _check_pair(x, y)
    rate = _check_rate(rate)
    k = int(round(rate * y.numel()))
    idx = _choose(torch.arange(y.numel()), k, seed)
    new = (y.cpu()[idx].to(torch.int64) + 1) % num_classes
    return (*_apply(x, y, trigger, idx, new), idx)


def triggered_test_set(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    target: int,
    num_classes: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The triggered images whose true label != ``target``, with their true labels (for ASR and RA).

    Shapes: ``x`` N×C×H×W, ``y`` N -> ``(x_t, y_true)`` with M = #{y != target} rows.

    Example:
        >>> import torch
        >>> x_t, y_t = triggered_test_set(torch.zeros(3, 3, 32, 32), torch.tensor([0, 1, 0]), PatchTrigger(), 0)
        >>> y_t.tolist(), x_t[0, 0, 30, 30].item()
        ([1], 1.0)
    """
    inferred = num_classes is None
    num_classes = _check_labels(y, num_classes)
    _check_pair(x, y)
    target = _check_target(target, num_classes, inferred)
    keep = torch.nonzero(y != target).flatten()
    return trigger(x[keep.to(x.device)]), y[keep]
