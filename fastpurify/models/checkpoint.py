"""Load a classifier checkpoint into one of the architectures of ``fastpurify.models.ARCHS``.

Every failure says what was found and what was expected (never a raw torch traceback), because the
usual cause is a user pointing the CLI at the wrong file or the wrong ``--arch``.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

__all__ = ["CheckpointError", "extract_state_dict", "load_checkpoint"]

# Top-level keys under which common training scripts store the state dict (I-BAU uses 'net').
_LAYOUT_KEYS = ("net", "model", "state_dict")
# Wrapper prefixes added by nn.DataParallel / DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # how many offending keys an error message lists


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be loaded into the requested architecture."""


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


def load_checkpoint(
    path: Union[str, os.PathLike],
    arch: str = "small_vgg",
    num_classes: int | None = None,
    map_location: Any = "cpu",
) -> nn.Module:
    """Build ``arch`` and load the checkpoint at ``path`` into it strictly; returns the model in eval mode.

    The file is read with ``torch.load(..., weights_only=True)`` (no arbitrary code runs). ``num_classes``
    defaults to the row count of the checkpoint's classifier weight. When ``map_location`` is a device
    (string or ``torch.device``) the model is moved there.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for an unknown ``arch`` and
    ``CheckpointError`` (a ``ValueError``) for a file that is not a torch checkpoint, an unknown layout,
    keys that do not fit ``arch`` (naming an architecture of ``ARCHS`` that fits, if one does) or shape
    mismatches.

    Example:
        >>> from fastpurify.data import default_data_dir
        >>> model = load_checkpoint(default_data_dir() / "ibau" / "badnets_8_02_ckpt.pth")  # doctest: +SKIP
        >>> model(torch.rand(1, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([1, 10])
    """
    from . import ARCHS, build_model

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid names: {', '.join(sorted(ARCHS))}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a checkpoint file written by torch.save")
    sd = extract_state_dict(_torch_load(path, map_location), source=str(path))

    inferred = _num_classes_for(arch, sd)
    model = build_model(arch, num_classes if num_classes is not None else (inferred or 10))
    expected = model.state_dict()

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        fitting = [a for a in ARCHS if a != arch and _fits(a, sd)]
        hint = f"; the checkpoint fits arch={fitting[0]!r}" if fitting else f"; none of {', '.join(sorted(ARCHS))} fits"
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_show(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_show(unexpected)})")
        raise CheckpointError(
            f"{path} does not fit arch={arch!r}: " + " and ".join(parts) + f" out of {len(sd)} checkpoint keys" + hint
        )

    bad = [(k, tuple(sd[k].shape), tuple(expected[k].shape)) for k in expected if sd[k].shape != expected[k].shape]
    if bad:
        details = "; ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in bad[:_SHOW])
        more = f" ... ({len(bad) - _SHOW} more)" if len(bad) > _SHOW else ""
        note = ""
        if num_classes is not None and inferred is not None and inferred != num_classes:
            note = f" (the checkpoint has {inferred} classes but num_classes={num_classes} was given)"
        raise CheckpointError(
            f"{path}: {len(bad)} tensors have the wrong shape for arch={arch!r}{note}: {details}{more}"
        )

    model.load_state_dict(sd, strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()
