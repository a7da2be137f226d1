"""A defense run's state: snapshots of the model, the checkpoint file that lets a run resume, and the checks that
a model is intact.

The loop helper writes a checkpoint after every ``checkpoint_every`` rounds (atomically: a temporary file, then a
rename, so that an interruption while writing leaves the previous checkpoint whole). It holds everything the next
round depends on: the working model, the state of every object the defense registered with ``loop.track`` (its
optimizers, a recovered trigger, ...), the loop's generator and the global RNG states, the history and the
schedule. ``resume=`` loads it back before the first round runs, after the defense's own setup, so that a resumed
run takes the same steps as an uninterrupted one with the same seed. Files are read with ``weights_only=True``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

FORMAT = "fastpurify-defense-state-1"

# A parameter whose RMS grows past this factor of max(its initial RMS, 1) has diverged. Purification fine-tunes a
# trained model with small steps (Adam at 1e-4 moves each weight by about 1e-4 per step); SAU and I-BAU at lr=1e3
# reached weights of 7.7e6 after one round (issue 13). The floor of 1 keeps tensors that start near zero (biases)
# from tripping it.
DIVERGENCE_FACTOR = 100.0


class PurificationError(RuntimeError):
    """The run ended without a usable purified model: it made no update, or the model it made is broken. The
    message says what happened and what to change; the model you gave is left as it was."""


class DivergenceError(PurificationError, FloatingPointError):
    """The defense diverged: a non-finite or exploding loss, or weights that are no longer finite or grew by
    orders of magnitude. The message names the round (and step, when known)."""


def path_arg(value: Any, name: str) -> Optional[Path]:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got {value!r}")
    return Path(value)


def check_writable(path: Path, name: str) -> None:
    """Fail before any work when ``path`` cannot be written: a directory, a missing or unwritable folder."""
    if path.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a directory; give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{name}={str(path)!r}: the folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{name}={str(path)!r} cannot be written (permission denied)")


# --------------------------------------------------------------------------------------------------------
# Model integrity
# --------------------------------------------------------------------------------------------------------


def snapshot(model: nn.Module, device: Optional[torch.device] = None) -> Dict[str, Tensor]:
    """A detached copy of every parameter and buffer (``device``: where to keep it; default where they are)."""
    return {k: v.detach().to(device=device if device is not None else v.device, copy=True)
            for k, v in model.state_dict().items()}


def tensor_norms(model: nn.Module) -> Dict[str, float]:
    """The L2 norm of every floating parameter and buffer, by state-dict name: a few multi-tensor launches and one
    device read (NaN or inf when a tensor holds one)."""
    items = [(k, v.detach()) for k, v in model.state_dict().items() if v.is_floating_point() and v.numel()]
    if not items:
        return {}
    norms = torch.stack([n.float() for n in torch._foreach_norm([v for _, v in items])]).tolist()
    return dict(zip((k for k, _ in items), norms))


def nonfinite_tensors(model: nn.Module, limit: int = 3, norms: Optional[Dict[str, float]] = None) -> List[str]:
    """Names of parameters and floating buffers holding NaN or inf (at most ``limit``)."""
    norms = tensor_norms(model) if norms is None else norms
    return [k for k, n in norms.items() if not math.isfinite(n)][:limit]


def param_rms(model: nn.Module, norms: Dict[str, float]) -> Dict[str, float]:
    """The root-mean-square of every floating parameter, by name, from :func:`tensor_norms`."""
    return {k: norms[k] / math.sqrt(max(1, p.numel())) for k, p in model.named_parameters()
            if p.is_floating_point() and k in norms}


def describe_nonfinite(name: str, bad: List[str], when: str) -> str:
    return (f"{name}: the model holds non-finite values {when} in {', '.join(bad)}; the run diverged — lower the "
            "learning rate (or check the model and data). The model you gave is unchanged.")


def fingerprint(model: nn.Module) -> List[float]:
    """A cheap identity of a model's weights (float64 sums of every tensor): tells a resumed run whether it was
    given the model the checkpoint started from."""
    ts = [v.detach() for v in model.state_dict().values() if v.is_floating_point()]
    return torch.stack([t.double().sum() for t in ts]).tolist() if ts else []


def data_fingerprint(x: Tensor, y: Optional[Tensor]) -> List[float]:
    out = [float(x.shape[0]), float(x.double().sum())]
    if y is not None:
        out.append(float(y.double().sum()))
    return out


def close(a: List[float], b: List[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-6) for u, v in zip(a, b))


# --------------------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------------------


def _state_of(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0]):  # (get, set)
        return obj[0]()
    sd = obj.state_dict()
    return {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for k, v in sd.items()} \
        if isinstance(obj, nn.Module) else sd


def _load_into(obj: Any, state: Any) -> None:
    if isinstance(obj, Tensor):
        with torch.no_grad():
            obj.copy_(state.to(obj.device))
    elif isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0]):
        obj[1](state)
    else:
        obj.load_state_dict(state)


def rng_states(device: torch.device) -> Dict[str, Any]:
    out: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_states(states: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def save(path: Path, state: Dict[str, Any]) -> None:
    """Write ``state`` atomically: to a temporary file beside ``path``, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, name: str) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save` (``weights_only=True``); errors say what is wrong with it."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: resume={str(path)!r} does not exist (or is not a file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise ValueError(f"{name}: resume={str(path)!r} is not a readable fastpurify checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{name}: resume={str(path)!r} is not a fastpurify defense checkpoint (written with "
                         f"checkpoint=...); it has format {state.get('format') if isinstance(state, dict) else None!r}")
    return state


def check_matches(state: Dict[str, Any], *, name: str, config: Dict[str, Any], seed: int,
                  model_print: List[float], data_print: List[float], path: Path) -> None:
    """A resumed run must be the run that wrote the checkpoint: same defense, options, seed, model and data."""
    where = f"resume={str(path)!r}"
    if state["defense"] != name:
        raise ValueError(f"{name}: {where} was written by {state['defense']!r}, not {name!r}")
    diff = sorted(k for k in set(config) | set(state["config"])
                  if _plain(config.get(k)) != _plain(state["config"].get(k)))
    if diff:
        shown = ", ".join(f"{k}={state['config'].get(k)!r} there vs {config.get(k)!r} now" for k in diff[:4])
        raise ValueError(f"{name}: {where} was written with other hyper-parameters ({shown}); resume with the same "
                         "options as the interrupted run")
    if state["seed"] != seed:
        raise ValueError(f"{name}: {where} was written with seed={state['seed']}, this run has seed={seed}")
    if not close(state["model_fingerprint"], model_print):
        raise ValueError(f"{name}: {where} was started from another model; pass the same (unpurified) model as the "
                         "interrupted run")
    if not close(state["data_fingerprint"], data_print):
        raise ValueError(f"{name}: {where} was started on other clean data; pass the same clean_data as the "
                         "interrupted run")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def tracked_states(objects: Dict[str, Any]) -> Dict[str, Any]:
    return {k: _state_of(o) for k, o in objects.items()}


def load_tracked(objects: Dict[str, Any], states: Dict[str, Any], name: str) -> None:
    missing = sorted(set(objects) - set(states))
    if missing:
        raise ValueError(f"{name}: the checkpoint holds no state for {missing}; it was written by another version")
    for k, o in objects.items():
        _load_into(o, states[k])


def restore(model: nn.Module, snap: Dict[str, Tensor]) -> None:
    """Put a :func:`snapshot` back into ``model`` in place (the parameters stay the same objects)."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(snap[k].to(v.device))

