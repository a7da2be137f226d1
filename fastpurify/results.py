"""Save a :class:`~fastpurify.PurifyResult` to files people (and ``fastpurify plot``) can read, and load it back.

Layout: two files side by side.

- ``PATH`` — the purified weights, written by ``fastpurify.models.save_checkpoint``: ``PATH.safetensors`` as a
  safetensors file (needs ``pip install fastpurify[safetensors]``), any other suffix (``.pt``, ``.pth``) as
  ``torch.save({"model": state_dict, "defense": ..., "status": ..., "result": "<json name>"})``. Either loads
  with ``fastpurify.models.load_checkpoint`` / ``fastpurify evaluate --checkpoint PATH`` like any checkpoint.
- ``PATH`` with the suffix ``.json`` (``purified.pt`` -> ``purified.json``) — everything else as JSON: defense,
  status, config, history, timings, schedule, info, the weights' file name (``"weights"``), the model's class, and
  ``"conversions"``: one note per value that is not plain JSON and how it was written (see :func:`to_json`).

Nothing is pickled: values JSON cannot hold are converted explicitly — tuples to lists, tensors and numpy arrays
of up to ``TENSOR_LIST_MAX`` elements to (nested) lists, larger ones left out, callables and other objects left
out (a trigger with a ``spec`` is written as its spec string), non-finite floats as ``null`` — and each
conversion is noted under ``"conversions"`` by where it happened (``"info.delta"``). Loading gives the JSON
values back as they are (lists stay lists).

Example:
    >>> from fastpurify.models import SmallVGG
    >>> r = fastpurify.bcu(SmallVGG(), x, epochs=1, progress=False)          # doctest: +SKIP
    >>> r.save("purified.safetensors")                                        # doctest: +SKIP
    >>> back = PurifyResult.load("purified.json", model=SmallVGG())           # doctest: +SKIP
    >>> back.history == r.history                                             # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from .defenses._loop import PurifyResult

__all__ = ["FORMAT", "SavedResult", "TENSOR_LIST_MAX", "load_result", "result_json_path", "save_result", "to_json"]

#: The ``"format"`` entry of a saved result's JSON file.
FORMAT = "fastpurify.result/1"
#: Tensors (and numpy arrays) with at most this many elements are written as lists; larger ones are left out.
#: I-BAU's δ (1×3×32×32 = 3,072 values) fits; AWM's masks (one per conv weight, 10^5..10^7 values) do not.
TENSOR_LIST_MAX = 4096
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


@dataclass
class SavedResult(PurifyResult):
    """A :class:`PurifyResult` read back by :func:`load_result`: ``model`` is ``None`` unless a model was given to
    load the weights into; ``state_dict`` holds the weights (CPU tensors) either way; ``conversions`` are the notes
    the save wrote for the values it converted; ``path`` is the JSON file read."""

    state_dict: Dict[str, Tensor] = field(default_factory=dict)
    conversions: Dict[str, str] = field(default_factory=dict)
    path: Optional[str] = None


# --------------------------------------------------------------------------------------------------------
# JSON conversion
# --------------------------------------------------------------------------------------------------------


def _describe_array(x: Any) -> str:
    dtype = str(x.dtype).replace("torch.", "")
    return f"{type(x).__name__} {dtype} {list(x.shape)}"


def to_json(value: Any, where: str, notes: Dict[str, str]) -> Any:
    """``value`` as plain JSON (dicts with string keys, lists, strings, finite numbers, booleans, ``None``).
    Every other value is converted explicitly and a note saying how is added to ``notes[where]``; a value that
    cannot be converted is returned as :data:`OMIT` (and left out of its container).

    Example:
        >>> notes = {}
        >>> to_json({"size": (3, 3), "w": torch.ones(2), "f": len}, "config", notes)
        {'size': [3, 3], 'w': [1.0, 1.0]}
        >>> sorted(notes)
        ['config.f', 'config.size', 'config.w']
    """
    import numpy as np

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value):
            return float(value)
        notes[where] = f"non-finite float {value} written as null"
        return None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (Tensor, np.ndarray)):
        if value.ndim == 0:
            notes[where] = f"0-d {_describe_array(value)} written as a number"
            return to_json(value.item(), where, notes)
        if (value.size if isinstance(value, np.ndarray) else value.numel()) > TENSOR_LIST_MAX:
            notes[where] = (f"{_describe_array(value)} left out (more than {TENSOR_LIST_MAX} elements; it is in "
                            "the PurifyResult, not in this file)")
            return OMIT
        data = value.detach().cpu().tolist() if isinstance(value, Tensor) else value.tolist()
        if _has_nonfinite(data):
            notes[where] = f"{_describe_array(value)} written as a nested list (non-finite values as null)"
            return _finite(data)
        notes[where] = f"{_describe_array(value)} written as a nested list"
        return data
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = k if isinstance(k, str) else str(k)
            if not isinstance(k, str):
                notes[f"{where}.{key}"] = f"key {k!r} ({type(k).__name__}) written as the string {key!r}"
            v = to_json(v, f"{where}.{key}", notes)
            if v is not OMIT:
                out[key] = v
        return out
    if isinstance(value, (list, tuple)):
        if isinstance(value, tuple):
            notes[where] = "tuple written as a list"
        items = [to_json(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
        return [None if v is OMIT else v for v in items]
    if isinstance(value, (torch.device, torch.dtype, os.PathLike)):
        notes[where] = f"{type(value).__name__} written as the string {str(value)!r}"
        return str(value)
    spec = getattr(value, "spec", None)
    if isinstance(spec, str):
        notes[where] = f"{type(value).__name__} written as its spec string"
        return spec
    what = "callable" if callable(value) else "object"
    notes[where] = f"{what} {type(value).__name__} left out (not JSON; nothing is pickled)"
    return OMIT


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


#: What :func:`to_json` returns for a value it leaves out.
OMIT = _Omit()


def _has_nonfinite(data: Any) -> bool:
    if isinstance(data, list):
        return any(_has_nonfinite(v) for v in data)
    return isinstance(data, float) and not math.isfinite(data)


def _finite(data: Any) -> Any:
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return None if isinstance(data, float) and not math.isfinite(data) else data


# --------------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------------


def result_json_path(path: Union[str, os.PathLike]) -> Path:
    """The JSON file that goes with the weights file ``path`` (``purified.pt`` -> ``purified.json``)."""
    return Path(path).with_suffix(".json")


def _check_weights_path(path: Path) -> None:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"save: {str(path)!r} should name the weights file, ending in "
                         f"{', '.join(WEIGHT_SUFFIXES)} (.safetensors needs pip install fastpurify[safetensors]); "
                         "the result's JSON is written beside it with the suffix .json")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"save: the folder {str(parent)!r} of {str(path)!r} does not exist; create it first")
    if path.is_dir():
        raise ValueError(f"save: {str(path)!r} is a directory; give a file name such as {str(path / 'purified.pt')!r}")


def result_record(result: PurifyResult, notes: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The JSON-able content of ``result`` without its weights (what :func:`save_result` writes, and what
    ``fastpurify plot`` reads): defense, status, config, history, timings, schedule, info, and ``conversions``."""
    import fastpurify

    notes = {} if notes is None else notes
    rec: Dict[str, Any] = {"format": FORMAT, "fastpurify": fastpurify.__version__, "torch": torch.__version__}
    rec["defense"] = result.defense
    rec["status"] = result.status
    for name in ("config", "history", "timings", "schedule", "info"):
        v = to_json(getattr(result, name), name, notes)
        rec[name] = {} if v is OMIT else v
    model = result.model
    rec["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}" if model is not None else None
    rec["conversions"] = notes
    return rec


def save_result(result: PurifyResult, path: Union[str, os.PathLike]) -> Path:
    """Write ``result``'s weights to ``path`` (``.pt`` / ``.pth``: torch.save; ``.safetensors``: safetensors) and
    everything else to the JSON file beside it (:func:`result_json_path`). Returns the JSON file's path. The
    result and its model are not changed; the weights are written from CPU copies."""
    from .models.checkpoint import save_checkpoint

    if not isinstance(result, PurifyResult):
        raise TypeError(f"save_result: expected a PurifyResult, got {type(result).__name__}")
    path = Path(path)
    _check_weights_path(path)
    if result.model is not None:
        if not isinstance(result.model, nn.Module):
            raise TypeError(f"save: result.model is a {type(result.model).__name__}, not a torch.nn.Module")
        state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    else:
        state = dict(getattr(result, "state_dict", None) or {})
        if not state:
            raise ValueError("save: the result has no model and no state dict: there are no weights to save")
    rec = result_record(result)
    json_path = result_json_path(path)
    rec["weights"] = path.name
    rec["weights_format"] = "safetensors" if path.suffix == ".safetensors" else "torch"
    text = json.dumps(rec, indent=1, allow_nan=False)  # checked before anything is written
    save_checkpoint(path, state, {"defense": result.defense, "status": result.status, "result": json_path.name})
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, json_path)
    return json_path


def read_result_json(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The JSON object in ``path``: a saved result (``"format": "fastpurify.result/1"``) or the one object that
    ``fastpurify purify --json`` prints (its last line, when the file holds more)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file not found: {str(path)!r}")
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        last = text.splitlines()[-1] if text else ""
        try:
            obj = json.loads(last)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a JSON file ({e.msg} at line {e.lineno}); expected the JSON of "
                             "PurifyResult.save or of fastpurify purify --json") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}; expected one object (PurifyResult.save's JSON "
                         "or fastpurify purify --json's output)")
    return obj


def load_result(path: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> SavedResult:
    """Read a result written by :func:`save_result`; ``path`` is its JSON file or its weights file.

    The weights are read with ``torch.load(..., weights_only=True)`` (or safetensors) onto the CPU. With ``model``
    (an ``nn.Module`` of the architecture that was purified), a copy of it receives the weights after every key and
    shape was checked, and is the result's ``model`` (in eval mode); ``model`` itself is not changed. Without it,
    ``model`` is ``None``. ``state_dict`` holds the weights in both cases."""
    from .models.checkpoint import load_into, read_state_dict

    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"load: model must be a torch.nn.Module of the purified architecture, got "
                        f"{type(model).__name__}")
    path = Path(path)
    json_path = path if path.suffix == ".json" else result_json_path(path)
    if not json_path.is_file():
        hint = "" if path.suffix == ".json" else f" (the JSON file saved beside {path.name})"
        raise FileNotFoundError(f"load: {str(json_path)!r} not found{hint}; give the .json file PurifyResult.save "
                                "wrote, or its weights file")
    rec = read_result_json(json_path)
    if rec.get("format") != FORMAT:
        raise ValueError(f"load: {json_path} is not a saved PurifyResult (its format is {rec.get('format')!r}, "
                         f"expected {FORMAT!r}); a fastpurify purify --json report has no weights: read it with "
                         "fastpurify.results.read_result_json or plot it with fastpurify plot")
    weights = json_path.parent / str(rec.get("weights", ""))
    if path.suffix != ".json" and weights.resolve() != path.resolve():
        raise ValueError(f"load: {json_path} belongs to the weights file {weights.name}, not to {path.name}")
    if not weights.is_file():
        raise FileNotFoundError(f"load: the weights file {str(weights)!r} named in {json_path} is missing")
    state = read_state_dict(weights, map_location="cpu")
    net = None
    if model is not None:
        net = load_into(copy.deepcopy(model), state, str(weights)).eval()
    return SavedResult(model=net, history=list(rec.get("history", [])), timings=dict(rec.get("timings", {})),
                       status=str(rec.get("status")), defense=str(rec.get("defense")),
                       config=dict(rec.get("config", {})), info=dict(rec.get("info", {})),
                       schedule=dict(rec.get("schedule", {})), state_dict=state,
                       conversions=dict(rec.get("conversions", {})), path=str(json_path))
