"""Load a classifier checkpoint into one of the architectures of ``fastpurify.models.ARCHS`` or into any model
(``load_checkpoint(path, model=net)``), and save one (``save_checkpoint``).

Files: torch checkpoints (read with ``torch.load(..., weights_only=True)``) holding a state dict or a dict with one
under ``'net'`` / ``'model'`` / ``'state_dict'``, and safetensors files (``.safetensors``; the optional package
``safetensors``: ``pip install fastpurify[safetensors]``). Every failure says what was found and what was expected
(never a raw torch traceback), because the usual cause is a user pointing the CLI at the wrong file or the wrong
``--arch``.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = ["CheckpointError", "extract_state_dict", "load_checkpoint", "read_state_dict", "save_checkpoint"]

# Top-level keys under which common training scripts store the state dict (I-BAU uses 'net').
_LAYOUT_KEYS = ("net", "model", "state_dict")
# Wrapper prefixes added by nn.DataParallel / DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # how many offending keys an error message lists


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be loaded into the requested architecture."""


class MissingExtraError(ModuleNotFoundError, ValueError):
    """An optional package is not installed; the message names the pip extra (a ValueError too, so that the
    command line prints it as one line)."""


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)
        shown = ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "")
        return f"a dict with top-level keys [{shown}]"
    return f"a {type(obj).__name__}"


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object, with any ``module.`` / ``_orig_mod.`` prefix removed.

    Accepted layouts: a plain state dict, or a dict holding one under ``'net'`` (I-BAU), ``'model'`` or
    ``'state_dict'``. Raises ``CheckpointError`` listing the top-level keys found otherwise.

    Example:
        >>> import torch
        >>> sorted(extract_state_dict({"net": {"module.w": torch.zeros(1)}, "acc": 1.0}))
        ['w']
    """
    if _is_state_dict(obj):
        sd = dict(obj)
    else:
        sd = None
        if isinstance(obj, Mapping):
            for key in _LAYOUT_KEYS:
                if key in obj:
                    if not _is_state_dict(obj[key]):
                        raise CheckpointError(
                            f"{source}: the entry {key!r} holds {_describe(obj[key])}, not a state dict "
                            "(a non-empty mapping from parameter names to tensors)"
                        )
                    sd = dict(obj[key])
                    break
        if sd is None:
            raise CheckpointError(
                f"{source} holds {_describe(obj)}; expected a state dict (parameter name -> tensor) or a dict "
                f"holding one under one of the keys {', '.join(repr(k) for k in _LAYOUT_KEYS)}"
            )
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


def _torch_load(path: Path, map_location: Any) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..), or a raw pickle (0x80 protocol byte) with the legacy format.
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(
            f"{path} is not a torch checkpoint: it starts with the bytes {head!r}, while a file written by "
            "torch.save is a zip archive (starting with b'PK') or a legacy pickle (starting with b'\\x80')"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"{path} holds a pickled Python object ({found.group(1)}) besides tensors and plain containers, "
                "which torch.load(weights_only=True) refuses to run for safety; re-save only the weights, e.g. "
                "torch.save(model.state_dict(), path) or torch.save({'net': model.state_dict()}, path)"
            ) from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint (torch.load: {_first_line(e)})") from None
    except (RuntimeError, OSError, zipfile.BadZipFile, EOFError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (torch.load: {_first_line(e)})") from None


def _is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or the format's header (8-byte little-endian length, then a JSON object)."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def _safetensors_torch(what: str):
    try:
        import safetensors.torch
    except ImportError:
        raise MissingExtraError(f"{what} needs the optional package safetensors: pip install "
                                  "fastpurify[safetensors]") from None
    return safetensors.torch


def read_state_dict(path: Union[str, os.PathLike], map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The state dict in the file at ``path``: a safetensors file, or a torch checkpoint of any layout that
    ``extract_state_dict`` accepts (with ``module.`` / ``_orig_mod.`` prefixes removed). Nothing else is built.

    Example:
        >>> sd = read_state_dict("purified.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a checkpoint file (torch.save or .safetensors)")
    if _is_safetensors(path):
        st = _safetensors_torch(f"reading {path}")
        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        try:
            obj = st.load_file(str(path), device=device)
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
            raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
        return extract_state_dict(obj, source=str(path))
    return extract_state_dict(_torch_load(path, map_location), source=str(path))


def _fit_error(path: Path, what: str, sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
               hint: str = "", note: str = "") -> Optional[CheckpointError]:
    """The error for a state dict that does not fit a model's (keys first, then shapes), or None when it fits."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_show(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_show(unexpected)})")
        return CheckpointError(f"{path} does not fit {what}: " + " and ".join(parts)
                               + f" out of {len(sd)} checkpoint keys" + hint)
    bad = [(k, tuple(sd[k].shape), tuple(expected[k].shape)) for k in expected if sd[k].shape != expected[k].shape]
    if bad:
        details = "; ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in bad[:_SHOW])
        more = f" ... ({len(bad) - _SHOW} more)" if len(bad) > _SHOW else ""
        return CheckpointError(f"{path}: {len(bad)} tensors have the wrong shape for {what}{note}: {details}{more}")
    return None


@functools.cache
def _classifier_key(arch: str) -> str:
    # The last Linear layer is the classifier in every architecture of ARCHS; found once per arch.
    from . import build_model

    name = [n for n, m in build_model(arch, 2).named_modules() if isinstance(m, nn.Linear)][-1]
    return f"{name}.weight"


def _num_classes_for(arch: str, sd: Mapping[str, torch.Tensor]) -> int | None:
    w = sd.get(_classifier_key(arch))
    return int(w.shape[0]) if w is not None and w.dim() == 2 else None


def _fits(arch: str, sd: Mapping[str, torch.Tensor]) -> bool:
    from . import build_model

    n = _num_classes_for(arch, sd)
    if n is None:
        return False
    model = build_model(arch, n)
    expected = model.state_dict()
    if set(expected) != set(sd):
        return False
    return all(tuple(expected[k].shape) == tuple(sd[k].shape) for k in expected)


def _show(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOW]) + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint",
              what: Optional[str] = None) -> nn.Module:
    """Load ``sd`` into ``model`` strictly, after checking every key and shape (``model`` is untouched when they do
    not fit: the ``CheckpointError`` lists the missing / unexpected keys or the wrong shapes)."""
    err = _fit_error(Path(source), what or f"the model ({type(model).__name__})", sd, model.state_dict())
    if err is not None:
        raise err
    model.load_state_dict(sd, strict=True)
    return model


def load_checkpoint(
    path: Union[str, os.PathLike],
    arch: str = "small_vgg",
    num_classes: int | None = None,
    map_location: Any = "cpu",
    *,
    model: Optional[nn.Module] = None,
) -> nn.Module:
    """Build ``arch`` (or take ``model``, any ``nn.Module``) and load the checkpoint at ``path`` into it strictly;
    returns the model in eval mode.

    The file is a safetensors file or a torch checkpoint, read with ``torch.load(..., weights_only=True)`` (no
    arbitrary code runs). With ``arch``, ``num_classes`` defaults to the row count of the checkpoint's classifier
    weight. ``model`` receives the weights only after every key and shape was checked (a checkpoint that does not
    fit leaves it as it was). When ``map_location`` is a device (string or ``torch.device``) the model is moved there.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for an unknown ``arch`` and
    ``CheckpointError`` (a ``ValueError``) for a file that is not a checkpoint, an unknown layout,
    keys that do not fit (naming an architecture of ``ARCHS`` that fits, if one does) or shape mismatches.

    Example:
        >>> from fastpurify.data import default_data_dir
        >>> model = load_checkpoint(default_data_dir() / "ibau" / "badnets_8_02_ckpt.pth")  # doctest: +SKIP
        >>> model(torch.rand(1, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([1, 10])
    """
    from . import ARCHS, build_model

    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    elif arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid names: {', '.join(sorted(ARCHS))}")
    path = Path(path)
    sd = read_state_dict(path, map_location)

    if model is not None:
        load_into(model, sd, str(path))
    else:
        inferred = _num_classes_for(arch, sd)
        model = build_model(arch, num_classes if num_classes is not None else (inferred or 10))
        if set(model.state_dict()) != set(sd):
            fitting = [a for a in ARCHS if a != arch and _fits(a, sd)]
            hint = (f"; the checkpoint fits arch={fitting[0]!r}" if fitting
                    else f"; none of {', '.join(sorted(ARCHS))} fits (a model of your own: --model MODULE:FACTORY)")
        else:
            hint = ""
        note = ""
        if num_classes is not None and inferred is not None and inferred != num_classes:
            note = f" (the checkpoint has {inferred} classes but num_classes={num_classes} was given)"
        err = _fit_error(path, f"arch={arch!r}", sd, model.state_dict(), hint=hint, note=note)
        if err is not None:
            raise err
        model.load_state_dict(sd, strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def save_checkpoint(path: Union[str, os.PathLike], state_dict: Mapping[str, torch.Tensor],
                    extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``state_dict`` to ``path``: a ``.safetensors`` file (``extra`` goes into its metadata, each value as
    JSON text) or, for any other suffix, ``torch.save({'model': state_dict, **extra})``. Both load back with
    ``load_checkpoint`` / ``read_state_dict``.

    Example:
        >>> save_checkpoint("net.safetensors", model.state_dict(), {"defense": "sau"})  # doctest: +SKIP
    """
    path = Path(path)
    extra = dict(extra or {})
    if path.suffix == ".safetensors":
        st = _safetensors_torch(f"saving {path}")
        seen: set = set()
        tensors = {}
        for k, v in state_dict.items():
            t = v.detach().cpu().contiguous()
            ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
            if ptr is not None and ptr in seen:
                t = t.clone()  # safetensors refuses tensors sharing memory (tied weights): each gets its own copy
            seen.add(ptr)
            tensors[k] = t
        meta = {"format": "pt", **{k: json.dumps(v, default=str) for k, v in extra.items()}}
        st.save_file(tensors, str(path), metadata=meta)
    else:
        torch.save({"model": dict(state_dict), **extra}, path)
    return path
