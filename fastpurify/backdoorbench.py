"""BackdoorBench attack records in, defense results out.

A BackdoorBench (https://github.com/SCLBD/BackdoorBench) attack leaves ``record/<attack>/attack_result.pt``: a
``torch.save`` dict with ``model_name``, ``num_classes``, ``model`` (the backdoored state dict), ``data_path`` and
``clean_data`` (the clean dataset, by path and name: only the poisoned images are stored), ``img_size``, and
``bd_train`` / ``bd_test``, the states of its poisoned datasets: ``poison_indicator`` (one 0/1 per image of the
clean split), ``original_index_array`` (the images the dataset shows) and ``bd_data_container.data_dict``
(poisoned image index -> ``(PIL image, backdoor label, original label)``, or ``{"path", "other_info"}`` for
images kept on disk). Its models expect inputs normalised with the dataset's mean and std.

:func:`read_record` rebuilds what a defense and its evaluation need from that (the model, the clean train and test
images from the original CIFAR-10 files, the triggered test images with their original and backdoor labels), and
:func:`write_result` writes a purified model back as BackdoorBench's defenses do: ``record/<attack>/defense/
<name>/defense_result.pt`` (``{'model_name', 'num_classes', 'model'}``, what its analysis scripts load) with
``<name>_df.csv`` / ``<name>_df_summary.csv`` (test_acc / test_asr / test_ra as fractions). The format was learned
from BackdoorBench's public code; nothing of it is copied here.

Records load with ``torch.load(..., weights_only=True)``: the numpy arrays and the pickled PIL images in them are
allowed by name (the images become plain pixel buffers: no Pillow needed, no pickled code runs).

Example:
    >>> rec = read_record("record/badnet_0_1", data_dir="data/cifar10")  # doctest: +SKIP
    >>> result = fastpurify.sau(rec.model, rec.clean_train, normalization=rec.normalization)  # doctest: +SKIP
    >>> write_result(result, rec, rec.evaluate(result.model))  # doctest: +SKIP
    PosixPath('record/badnet_0_1/defense/sau')
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ATTACK_FILE", "DEFENSE_FILE", "BackdoorBenchRecord", "RecordError", "read_record", "read_result",
           "result_folder", "write_result"]

ATTACK_FILE = "attack_result.pt"
DEFENSE_FILE = "defense_result.pt"
#: Written beside every defense result fastpurify writes: what ran, before/after metrics. A folder holding a
#: defense_result.pt without it was written by someone else and is never overwritten.
MARKER_FILE = "fastpurify.json"
_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
#: BackdoorBench's normalisation of each dataset fastpurify reads (utils/aggregate_block/dataset_and_transform_
#: generate.py there); its models see (x - mean) / std.
NORMALIZATION = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))}
_SHAPES = {"cifar10": (32, 32, 3)}
#: BackdoorBench model_name -> fastpurify architecture with the same state-dict keys. (Its "resnet18" is
#: torchvision's ImageNet ResNet-18, not fastpurify's CIFAR one: give it with model=.)
MODEL_NAMES = {"preactresnet18": "preact_resnet18"}
#: fastpurify defense -> the folder / csv name BackdoorBench gives it (record/<attack>/defense/<name>/).
DEFENSE_NAMES = {"sau": "sau", "ibau": "i-bau", "awm": "awm", "baerase": "baerase", "bcu": "bcu"}
_METRICS = ("test_acc", "test_asr", "test_ra")


class RecordError(ValueError):
    """A BackdoorBench record (or a folder to write a result to) that cannot be used as it is."""


# --------------------------------------------------------------------------------------------------------
# Loading a record safely
# --------------------------------------------------------------------------------------------------------


class _PickledImage:
    """Stands in for ``PIL.Image.Image`` while a record is unpickled: Pillow pickles an image as
    ``[info, mode, size, palette, pixel bytes]``; this keeps the mode, size and bytes and runs nothing."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, (list, tuple)) or len(state) < 4 or not isinstance(state[-1], (bytes, bytearray)):
            raise pickle.UnpicklingError(f"a pickled PIL image with an unexpected state {type(state).__name__}")
        self.mode, self.size, self.data = state[1], tuple(state[2]), bytes(state[-1])

    def to_tensor(self) -> Tensor:
        channels = {"RGB": 3, "L": 1}.get(self.mode)
        w, h = self.size
        if channels is None or len(self.data) != w * h * channels:
            raise RecordError(f"a poisoned image of mode {self.mode!r} and size {self.size} ({len(self.data)} bytes): "
                              "expected RGB or L pixels")
        pixels = torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(h, w, channels)
        return pixels.permute(2, 0, 1).float().div_(255)


def _safe_globals() -> list:
    """Exactly what BackdoorBench records pickle besides tensors: numpy arrays, scalars and dtypes (under the
    numpy 1 and numpy 2 module names) and PIL images (as :class:`_PickledImage`)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    allowed: list = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        allowed += [(fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    for t in (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
              np.float16, np.float32, np.float64):
        cls = type(np.dtype(t))
        allowed.append((cls, f"{cls.__module__}.{cls.__qualname__}"))
    for name in ("PIL.Image.Image", "PIL.PngImagePlugin.PngImageFile", "PIL.JpegImagePlugin.JpegImageFile"):
        allowed.append((_PickledImage, name))
    return allowed


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


def _load(path: Path) -> Any:
    from torch.serialization import safe_globals

    try:
        with safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found.group(1)}" if found else f"data it refuses ({_first_line(e)})"
        raise RecordError(f"{path} holds {what}: not part of a BackdoorBench record (tensors, numpy arrays, PIL "
                          "images), and torch.load(weights_only=True) runs no other pickled code") from None
    except (RuntimeError, OSError, zipfile.BadZipFile, EOFError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise RecordError(f"{path} is not a readable torch file (torch.load: {_first_line(e)})") from None


def _record_file(path: Union[str, os.PathLike]) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / ATTACK_FILE).is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise FileNotFoundError(f"{path} holds no {ATTACK_FILE} (a BackdoorBench attack record folder, "
                                    f"record/<attack>/); found: {', '.join(found) or 'nothing'}")
        return path / ATTACK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"BackdoorBench record not found: {path} (give record/<attack>/ or its {ATTACK_FILE})")
    return path


def _check_layout(obj: Any, path: Path) -> None:
    if not isinstance(obj, Mapping):
        raise RecordError(f"{path} holds a {type(obj).__name__}, not a BackdoorBench attack record (a dict with "
                          f"{', '.join(_KEYS)})")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        hint = " (this looks like a defense result, not an attack record)" if "model" in obj and len(obj) <= 4 else ""
        raise RecordError(f"{path} is not a BackdoorBench attack record: missing key(s) {missing}; found "
                          f"{sorted(map(str, obj))}{hint}")
    types = {"model_name": str, "num_classes": (int, np.integer), "model": Mapping, "data_path": str,
             "img_size": (list, tuple), "clean_data": str, "bd_test": Mapping}
    for key, kind in types.items():
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise RecordError(f"{path}: {key!r} is a {type(obj[key]).__name__} ({obj[key]!r:.60}); expected "
                              f"{getattr(kind, '__name__', 'an integer' if kind[0] is int else 'a list')}")
    if obj["num_classes"] < 2:
        raise RecordError(f"{path}: num_classes is {obj['num_classes']}; expected 2 or more")
    bd = obj["bd_test"]
    if "x" in bd and "bd_data_container" not in bd:
        raise RecordError(f"{path}: bd_test holds 'x'/'y' tensors, the format of BackdoorBench 1.x, which keeps no "
                          "original labels (no RA); re-run the attack with BackdoorBench 2.x")
    need = ("bd_data_container", "original_index_array", "poison_indicator")
    if any(k not in bd for k in need) or not isinstance(bd["bd_data_container"], Mapping) \
            or not isinstance(bd["bd_data_container"].get("data_dict"), Mapping):
        raise RecordError(f"{path}: bd_test is not a poisoned-dataset state: expected the keys {list(need)} with "
                          f"bd_data_container['data_dict']; found {sorted(map(str, bd))}")


# --------------------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------------------


@dataclass
class BackdoorBenchRecord:
    """A BackdoorBench attack record, rebuilt for fastpurify.

    Shapes: ``clean_train`` / ``clean_test`` are ``(x, y)`` with ``x`` N×C×H×W float in [0, 1] (pixels, not
    normalised) and ``y`` N int64; ``bd_x`` M×C×H×W the triggered test images, ``bd_y`` their original labels,
    ``bd_target`` the labels the backdoor wants (one target for all-to-one attacks), ``bd_index`` their indices
    in the test split. ``model`` (eval mode, CPU) expects ``normalization=(mean, std)`` applied to its inputs:
    pass it to the defenses and to ``fastpurify.evaluate``.
    """

    path: Path
    attack: str
    model_name: str
    num_classes: int
    img_size: Tuple[int, ...]
    dataset: str
    data_dir: Path
    model: nn.Module
    normalization: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]
    clean_train: Optional[Tuple[Tensor, Tensor]]
    clean_test: Tuple[Tensor, Tensor]
    bd_x: Tensor
    bd_y: Tensor
    bd_target: Tensor
    bd_index: Tensor
    poisoned_train_index: Optional[Tensor] = None
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def targets(self) -> List[int]:
        return sorted(set(self.bd_target.tolist()))

    def evaluate(self, model: Optional[nn.Module] = None, *, device=None, batch_size: int = 500):
        """ACC on the clean test images, ASR (prediction == backdoor label) and RA (prediction == original label)
        on the triggered ones, as BackdoorBench measures them; an ``fastpurify.metrics.EvalResult``."""
        from .metrics import EvalResult, evaluate

        model = self.model if model is None else model
        xt, yt = self.clean_test
        clean = evaluate(model, xt, yt, device=device, batch_size=batch_size, normalization=self.normalization)
        success, robust = _bd_counts(model, self.bd_x, self.bd_y, self.bd_target, self.normalization, device,
                                     batch_size)
        n = int(self.bd_y.numel())
        return EvalResult(clean.acc, 100.0 * success / n, 100.0 * robust / n, clean.n_clean, clean.n_correct, n,
                          success, robust)

    def describe(self) -> Dict[str, Any]:
        return {"record": str(self.path), "attack": self.attack, "model_name": self.model_name,
                "num_classes": self.num_classes, "dataset": self.dataset, "data_dir": str(self.data_dir),
                "targets": self.targets, "clean_count": 0 if self.clean_train is None else len(self.clean_train[1]),
                "eval_count": len(self.clean_test[1]), "bd_count": len(self.bd_y)}


@torch.inference_mode()
def _bd_counts(model: nn.Module, x: Tensor, y: Tensor, target: Tensor, normalization, device,
               batch_size: int) -> Tuple[int, int]:
    """(predictions == target, predictions == y) over the triggered images, in one pass, eval mode."""
    from .metrics import _model_device_dtype

    dev, dtype = _model_device_dtype(model)
    dev = torch.device(device) if device is not None else dev
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    mean, std = (torch.as_tensor(v, dtype=dtype, device=dev).view(1, -1, 1, 1) for v in normalization) \
        if normalization is not None else (None, None)
    hits = torch.zeros(2, dtype=torch.int64, device=dev)
    try:
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size].to(device=dev, dtype=dtype)
            if mean is not None:
                xb = (xb - mean) / std
            pred = model(xb).argmax(1)
            hits[0] += (pred == target[s:s + batch_size].to(dev)).sum()
            hits[1] += (pred == y[s:s + batch_size].to(dev)).sum()
    finally:
        for m, mode in modes:
            m.training = mode
    success, robust = hits.tolist()
    return success, robust


def _build_model(path: Path, name: str, num_classes: int, sd: Dict[str, Tensor], model: Any,
                 model_kwargs: Optional[Mapping[str, Any]]) -> nn.Module:
    from .models import build_model, load_into
    from .models.factory import ModelSpecError, is_builtin, resolve_model

    kwargs = dict(model_kwargs) if model_kwargs is not None else {"num_classes": num_classes}
    if model is None:
        if name not in MODEL_NAMES:
            raise RecordError(f"{path}: model_name {name!r} has no fastpurify equivalent (built in: "
                              f"{', '.join(MODEL_NAMES)}); give the model: model= (an nn.Module or a factory) in "
                              f"Python, --model MODULE:FACTORY on the command line, building it for num_classes="
                              f"{num_classes}")
        net = build_model(MODEL_NAMES[name], num_classes)
    elif isinstance(model, nn.Module):
        net = copy.deepcopy(model)  # the caller's model stays as it was
    elif isinstance(model, str):
        net = build_model(model, num_classes) if is_builtin(model) and model_kwargs is None else \
            resolve_model(model, kwargs)
    elif callable(model):
        net = model(**kwargs)
        if not isinstance(net, nn.Module):
            raise ModelSpecError(f"model= returned a {type(net).__name__}, not a torch.nn.Module")
    else:
        raise TypeError(f"model must be None, an nn.Module, a factory or a MODULE:FACTORY string, got "
                        f"{type(model).__name__}")
    expected = net.state_dict()
    if set(sd) != set(expected) and len(sd) == len(expected) and all(
            a.shape == b.shape for a, b in zip(sd.values(), expected.values())):
        # Same tensors in the same order under other names (a renamed attribute): BackdoorBench's own loader
        # maps such keys by position too.
        sd = dict(zip(expected, sd.values()))
    load_into(net, sd, f"{path} ('model')", what=f"the model ({type(net).__name__}, for model_name {name!r})")
    net.eval()
    with torch.inference_mode():
        width = net(torch.zeros(1, 3, 32, 32)).shape[-1]  # CIFAR-shaped: the only dataset read here
    if width != num_classes:
        raise RecordError(f"{path}: the model outputs {width} classes but the record says num_classes={num_classes}")
    return net


def _data_candidates(path: Path, data_path: str) -> List[Path]:
    """Where BackdoorBench's data_path may be: as written (relative to the current folder), and inside the
    BackdoorBench checkout the record lies in (the folder above record/, with the data_path from its 'data' part
    on, as BackdoorBench itself resolves it)."""
    raw = Path(data_path).expanduser()
    out = [raw]
    parts = path.resolve().parts
    if "record" in parts:
        root = Path(*parts[:len(parts) - 1 - parts[::-1].index("record")])
        out.append(root / raw)
        rel = raw.parts
        if "data" in rel:
            out.append(root.joinpath(*rel[rel.index("data"):]))
    return list(dict.fromkeys(out))


def _find_data(path: Path, data_path: str, data_dir) -> Path:
    from .data import find_cifar10

    if data_dir is not None:
        return find_cifar10(data_dir)
    tried = _data_candidates(path, data_path)
    for folder in tried:
        try:
            return find_cifar10(folder)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"{path}: the record's data_path {data_path!r} holds no CIFAR-10 python batches (tried "
                            f"{', '.join(map(str, tried))}); give the folder: data_dir= / --data DIR")


def _image(value: Any, where: str, roots: List[Path]) -> Tensor:
    if isinstance(value, _PickledImage):
        return value.to_tensor()
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
        return torch.from_numpy(value.copy()).permute(2, 0, 1).float().div_(255)
    if isinstance(value, Tensor) and value.dim() == 3:
        return value.float() if value.is_floating_point() else value.float().div_(255)
    if isinstance(value, str):  # images kept on disk (BackdoorBench's save_folder_path): read with Pillow
        file = next((r / value for r in roots if (r / value).is_file()), None)
        if file is None:
            raise FileNotFoundError(f"{where}: the image file {value!r} does not exist (looked in "
                                    f"{', '.join(map(str, roots))})")
        try:
            from PIL import Image
        except ImportError:
            raise RecordError(f"{where}: the record keeps its poisoned images as files, which need Pillow: pip "
                              "install pillow") from None
        with Image.open(file) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float().div_(255)
    raise RecordError(f"{where}: a poisoned image is a {type(value).__name__}; expected a PIL image")


def _poisoned(state: Mapping[str, Any], key: str, path: Path, n_clean: int, roots: List[Path], limit=None):
    """(indices, images, backdoor labels, original labels) of the poisoned images a dataset state shows."""
    where = f"{path}: {key}"
    indicator = np.asarray(state["poison_indicator"]).reshape(-1)
    shown = np.asarray(state["original_index_array"]).reshape(-1).astype(np.int64)
    if len(indicator) != n_clean:
        raise RecordError(f"{where} indexes a split of {len(indicator)} images but the CIFAR-10 files hold {n_clean}; "
                          "is --data the dataset the attack used?")
    if shown.size and (shown.min() < 0 or shown.max() >= n_clean):
        raise RecordError(f"{where}: original_index_array holds {shown.min()}..{shown.max()}, outside [0, {n_clean})")
    chosen = [int(i) for i in shown if indicator[i] == 1 and (limit is None or i < limit)]
    table = state["bd_data_container"]["data_dict"]
    idx, xs, ys, orig = [], [], [], []
    for i in chosen:
        entry = table.get(i)
        if entry is None:
            raise RecordError(f"{where}: image {i} is marked poisoned but bd_data_container holds no image for it")
        if isinstance(entry, Mapping):  # kept on disk: {"path": file, "other_info": [bd label, label]}
            value, labels = entry.get("path"), list(entry.get("other_info") or [])
        else:
            value, labels = entry[0], list(entry[1:])
        if len(labels) < 2:
            raise RecordError(f"{where}: image {i} has labels {labels}; expected (backdoor label, original label)")
        idx.append(i)
        xs.append(_image(value, f"{where} image {i}", roots))
        ys.append(int(labels[0]))
        orig.append(int(labels[1]))
    if not idx:
        return torch.zeros(0, dtype=torch.int64), None, None, None
    return (torch.tensor(idx), torch.stack(xs), torch.tensor(ys, dtype=torch.int64),
            torch.tensor(orig, dtype=torch.int64))


def read_record(path: Union[str, os.PathLike], data_dir: Optional[Union[str, os.PathLike]] = None, *,
                model: Any = None, model_kwargs: Optional[Mapping[str, Any]] = None,
                clean_count: Optional[int] = None, eval_count: Optional[int] = None) -> BackdoorBenchRecord:
    """Read a BackdoorBench attack record (``record/<attack>/`` or its ``attack_result.pt``).

    ``data_dir``: the CIFAR-10 folder (default: the record's ``data_path``, as written or inside the BackdoorBench
    checkout holding the record). ``model``: how to build the network for a ``model_name`` fastpurify does not
    map (``MODEL_NAMES``): an ``nn.Module`` (copied), a factory, or a ``MODULE:FACTORY`` string, called with
    ``model_kwargs`` (default ``{"num_classes": <the record's>}``). ``clean_count``: the defender's clean set, the
    first N training images (None: all; 0: none); ``eval_count``: evaluate on the first N test images (and the
    triggered ones among them).

    Raises ``FileNotFoundError`` (no record, no data) or ``RecordError`` (a ``ValueError``) naming what is wrong.
    """
    from .data import load_cifar10
    from .models import extract_state_dict

    for name, v in (("clean_count", clean_count), ("eval_count", eval_count)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "clean_count" else 1)):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'clean_count' else 'positive'} integer, "
                             f"got {v!r}")
    file = _record_file(path)
    obj = _load(file)
    _check_layout(obj, file)
    dataset = obj["clean_data"].lower()
    if dataset not in NORMALIZATION:
        raise RecordError(f"{file}: clean_data {obj['clean_data']!r}: fastpurify reads records of "
                          f"{', '.join(NORMALIZATION)} only")
    size = tuple(int(v) for v in obj["img_size"])
    if size[:2] != _SHAPES[dataset][:2] or (len(size) > 2 and size[2] != _SHAPES[dataset][2]):
        raise RecordError(f"{file}: img_size {list(size)} does not match {dataset} ({list(_SHAPES[dataset])})")
    num_classes = int(obj["num_classes"])
    sd = extract_state_dict(obj["model"], source=f"{file}: 'model'")
    net = _build_model(file, obj["model_name"], num_classes, sd, model, model_kwargs)

    folder = _find_data(file, obj["data_path"], data_dir)
    x_all, y_all = load_cifar10(folder, split="test")
    if int(y_all.max()) >= num_classes:
        raise RecordError(f"{file}: num_classes={num_classes} but the test labels in {folder} reach {int(y_all.max())}")
    roots = list(dict.fromkeys([Path.cwd(), *(p for p in file.resolve().parents if p.name == "record")]))
    roots = roots + [r.parent for r in roots[1:]]
    idx, bd_x, bd_target, bd_y = _poisoned(obj["bd_test"], "bd_test", file, len(y_all), roots, limit=eval_count)
    if bd_x is None:
        raise RecordError(f"{file}: bd_test holds no poisoned image" + (f" among the first {eval_count} test images"
                                                                        if eval_count else ""))
    if bd_x.shape[1:] != x_all.shape[1:]:
        raise RecordError(f"{file}: the poisoned test images are {tuple(bd_x.shape[1:])}, the clean ones "
                          f"{tuple(x_all.shape[1:])}")
    wrong = int((bd_y != y_all[idx]).sum())
    if wrong:
        raise RecordError(f"{file}: {wrong} of {len(idx)} poisoned test images carry an original label that differs "
                          f"from the test set in {folder}; is it the dataset the attack used?")
    if int(bd_target.min()) < 0 or int(bd_target.max()) >= num_classes:
        raise RecordError(f"{file}: backdoor labels outside [0, {num_classes}): {sorted(set(bd_target.tolist()))[:5]}")
    n_eval = len(y_all) if eval_count is None else min(eval_count, len(y_all))
    clean_train = None if clean_count == 0 else load_cifar10(folder, split="train", count=clean_count)
    poisoned_train = None
    train_state = obj["bd_train"]
    if isinstance(train_state, Mapping) and "poison_indicator" in train_state:
        poisoned_train = torch.from_numpy(np.flatnonzero(np.asarray(train_state["poison_indicator"]) == 1))
    return BackdoorBenchRecord(
        path=file, attack=file.parent.name, model_name=obj["model_name"], num_classes=num_classes, img_size=size,
        dataset=dataset, data_dir=folder, model=net, normalization=NORMALIZATION[dataset], clean_train=clean_train,
        clean_test=(x_all[:n_eval].clone(), y_all[:n_eval].clone()), bd_x=bd_x, bd_y=bd_y, bd_target=bd_target,
        bd_index=idx, poisoned_train_index=poisoned_train,
        info={k: v for k, v in obj.items() if k not in _KEYS and isinstance(v, (str, int, float, bool))})


# --------------------------------------------------------------------------------------------------------
# Writing a defense result
# --------------------------------------------------------------------------------------------------------


def _record_folder(record: Union[BackdoorBenchRecord, str, os.PathLike]) -> Path:
    return record.folder if isinstance(record, BackdoorBenchRecord) else _record_file(record).parent


def result_folder(record: Union[BackdoorBenchRecord, str, os.PathLike], name: str,
                  out_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Where :func:`write_result` writes: ``out_dir``, else ``<record folder>/defense/<name>/`` (BackdoorBench's
    layout). Checked before any work: a file in the way, or a ``defense_result.pt`` that fastpurify did not write
    (BackdoorBench's own run of a defense of that name), is a ``RecordError``; nothing is overwritten but results
    of earlier fastpurify runs."""
    if not isinstance(name, str) or not name or "/" in name or os.sep in name or name in (".", ".."):
        raise RecordError(f"the defense result's name must be a plain folder name, got {name!r}")
    folder = Path(out_dir).expanduser() if out_dir is not None else _record_folder(record) / "defense" / name
    if folder.exists() and not folder.is_dir():
        raise RecordError(f"{folder} is a file; the defense result goes into a folder ({DEFENSE_FILE} and csv files)")
    if (folder / DEFENSE_FILE).exists() and not (folder / MARKER_FILE).exists():
        raise RecordError(f"{folder} holds a {DEFENSE_FILE} that fastpurify did not write (BackdoorBench's own "
                          "run?); not overwriting it: give another folder (out_dir= / --out DIR)")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise RecordError(f"cannot write the defense result to {folder}: {existing} is not writable")
    return folder


def _percent(metrics: Any, what: str) -> Dict[str, float]:
    """``{'acc', 'asr', 'ra'}`` in percent from an EvalResult or a mapping holding them."""
    from .metrics import EvalResult

    d = metrics.as_dict() if isinstance(metrics, EvalResult) else metrics
    if not isinstance(d, Mapping) or any(d.get(k) is None for k in ("acc", "asr", "ra")):
        raise TypeError(f"{what} must be an EvalResult with ASR (a trigger) or a mapping with 'acc', 'asr' and 'ra' "
                        f"in percent, got {metrics!r:.100}")
    out = {k: float(d[k]) for k in ("acc", "asr", "ra")}
    bad = {k: v for k, v in out.items() if not (math.isnan(v) or 0.0 <= v <= 100.0)}
    if bad:
        raise ValueError(f"{what}: {bad} are not percentages in [0, 100]")
    return out


def _csv_value(v: float) -> Any:
    return "nan_value" if isinstance(v, float) and math.isnan(v) else v  # as BackdoorBench's Metric_Aggregator


def _write_csvs(folder: Path, name: str, rows: List[Dict[str, Any]]) -> None:
    """``<name>_df.csv`` (one row per evaluation) and ``<name>_df_summary.csv`` (rows last / valid_max /
    exist_nan_value), laid out as pandas writes BackdoorBench's Metric_Aggregator frames."""
    cols = ["epoch", *_METRICS]
    with open(folder / f"{name}_df.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", *cols])
        for i, r in enumerate(rows):
            w.writerow([i, *(_csv_value(r[c]) for c in cols)])
    valid = {c: [r[c] for r in rows if not (isinstance(r[c], float) and math.isnan(r[c]))] for c in cols}
    with open(folder / f"{name}_df_summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", *cols])
        w.writerow(["last", *(valid[c][-1] if valid[c] else "nan_value" for c in cols)])
        w.writerow(["valid_max", *(max(valid[c]) if valid[c] else "nan_value" for c in cols)])
        w.writerow(["exist_nan_value", *(len(valid[c]) < len(rows) for c in cols)])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_result(result: Any, record: Union[BackdoorBenchRecord, str, os.PathLike], metrics: Any = None, *,
                 before: Any = None, name: Optional[str] = None, out_dir: Optional[Union[str, os.PathLike]] = None,
                 info: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a purified model back into a BackdoorBench record, the way its defenses do; returns the folder.

    ``result``: a ``PurifyResult`` (or the purified ``nn.Module``); ``record``: the :class:`BackdoorBenchRecord`
    (or the record's path); ``metrics``: ACC/ASR/RA of the purified model (an ``EvalResult`` such as
    ``record.evaluate(result.model)``, or a mapping in percent), ``before`` the same for the backdoored model.
    Writes into ``out_dir`` or ``<record>/defense/<name>/`` (``name``: BackdoorBench's name of the defense, e.g.
    ``i-bau`` for ibau): ``defense_result.pt`` = ``{'model_name', 'num_classes', 'model': state dict}``,
    ``<name>_df.csv`` and ``<name>_df_summary.csv`` (test_acc, test_asr, test_ra as fractions, as BackdoorBench
    records them) when metrics are given, and ``fastpurify.json`` (what ran, before and after, in percent).
    """
    model = result if isinstance(result, nn.Module) else getattr(result, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"result must be a PurifyResult or an nn.Module, got {type(result).__name__}")
    defense = getattr(result, "defense", None)
    name = name or DEFENSE_NAMES.get(defense, defense) or "fastpurify"
    if isinstance(record, BackdoorBenchRecord):
        model_name, num_classes, source = record.model_name, record.num_classes, record.path
    else:
        source = _record_file(record)
        obj = _load(source)
        _check_layout(obj, source)
        model_name, num_classes = obj["model_name"], int(obj["num_classes"])
    folder = result_folder(source.parent if not isinstance(record, BackdoorBenchRecord) else record, name, out_dir)
    after = _percent(metrics, "metrics") if metrics is not None else None
    prior = _percent(before, "before") if before is not None else None
    history = list(getattr(result, "history", []) or [])
    rows = [{"epoch": h.get("round", i + 1), "test_acc": h["acc"] / 100, "test_asr": h["asr"] / 100,
             "test_ra": h["ra"] / 100} for i, h in enumerate(history) if all(h.get(k) is not None
                                                                          for k in ("acc", "asr", "ra"))]
    if after is not None:
        final = {"epoch": len(history), **{f"test_{k}": after[k] / 100 for k in ("acc", "asr", "ra")}}
        rows = [r for r in rows if r["epoch"] != final["epoch"]] + [final]

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _atomic_save({"model_name": model_name, "num_classes": num_classes, "model": state}, folder / DEFENSE_FILE)
    if rows:
        _write_csvs(folder, name, rows)
    from . import __version__

    marker = {"written_by": f"fastpurify {__version__}", "record": str(source), "defense": defense, "name": name,
              "model_name": model_name, "num_classes": num_classes, "before": prior, "after": after,
              "status": getattr(result, "status", None), "rounds": len(history),
              "config": getattr(result, "config", None), "timings": getattr(result, "timings", None),
              **dict(info or {})}
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2, default=str) + "\n")
    return folder


def read_result(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """A defense result folder (or its ``defense_result.pt``) as BackdoorBench's analysis reads it:
    ``{'model_name', 'num_classes', 'model' (state dict), 'summary': {csv name: {row: {column: value}}},
    'fastpurify': the marker's JSON or None, 'folder'}``."""
    path = Path(path).expanduser()
    file = path / DEFENSE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {DEFENSE_FILE} at {path}")
    obj = _load(file)
    if not isinstance(obj, Mapping) or any(k not in obj for k in ("model_name", "num_classes", "model")):
        raise RecordError(f"{file} is not a BackdoorBench defense result: expected the keys model_name, num_classes, "
                          f"model; found {sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__}")
    summary = {}
    for csv_file in sorted(file.parent.glob("*_df_summary.csv")):
        with open(csv_file, newline="") as f:
            rows = list(csv.reader(f))
        summary[csv_file.name] = {r[0]: dict(zip(rows[0][1:], r[1:])) for r in rows[1:]}
    marker = file.parent / MARKER_FILE
    return {"model_name": obj["model_name"], "num_classes": obj["num_classes"], "model": obj["model"],
            "summary": summary, "fastpurify": json.loads(marker.read_text()) if marker.is_file() else None,
            "folder": file.parent}
