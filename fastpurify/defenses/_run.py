"""The driver every defense (reference and fast) is called through: check everything the user gave before any
work, run the algorithm on a working copy inside the loop helper, and hand back a model only when it is a
purification.

Policies (the README's reliability section lists them with the tests that hold them):

- **Everything is checked first**: options (types too: ``inplace="False"`` is an error, not a truthy string),
  hyper-parameters, the model (parameters, float32, finite, on one device, something trainable), the device,
  the backend of every op the defense calls, the clean data and ``eval_data``, the checkpoint paths.
- **The user's model is never damaged.** With ``inplace=False`` (default) the defense works on a copy. With
  ``inplace=True`` the model is modified only by a run that succeeds: a run that fails (an error, a divergence)
  or is interrupted puts the weights and buffers you gave back in place. Your ``.grad`` tensors,
  ``requires_grad`` flags and per-module train/eval modes come back as they were.
- **Frozen parameters** (``requires_grad=False``) are never changed by a defense.
- **Hooks**: forward/backward hooks you registered are suspended while the defense runs (they would fire on
  every attack step, on perturbed inputs) and are on the returned model as before. Hooks that implement part of
  the model itself (``torch.nn.utils`` weight_norm, spectral_norm, prune) stay active.
- **No false success**: a run that made no model update, or whose weights are no longer finite, raises
  :class:`PurificationError` / :class:`DivergenceError` instead of returning ``status="completed"``.
- **Ctrl-C** raises :class:`Interrupted` carrying the result of the last completed round.
- **Randomness is the run's own**: the defenses draw from the loop's generator, and the model's dropout layers
  (``nn.Dropout``, ``Dropout1d/2d/3d``) from generators of the run, so two runs in two threads give the results
  of two sequential runs. Randomness a model draws itself (``F.dropout`` in its ``forward``) still comes from
  torch's global RNG, which ``run_defense`` seeds (process-wide, so not per thread).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import backend as _backend
from ..recipes import apply_recipe
from . import _dist, _state
from ._guard import GuardedData
from ._inputs import CleanData, Normalize, check_eval, check_normalization, prepare
from ._loop import EvalSet, Interrupted, Loop, PurifyResult, check_choice, check_positive
from ._state import DivergenceError, PurificationError

#: The options every defense takes besides its hyper-parameters.
COMMON_OPTIONS = ("normalization", "num_classes", "epochs", "backend", "device", "seed", "time_budget", "eval_data",
                  "eval_every", "progress", "inplace", "check_range", "max_images", "checkpoint", "checkpoint_every",
                  "resume", "recipe", "distributed")

#: ``FASTPURIFY_RULE9_GUARD=1``: every run reads its data and changes its weights only through the loop helper,
#: or fails with RuleNineError (the tests' check of DESIGN.md rule 9).
GUARD_ENV = "FASTPURIFY_RULE9_GUARD"


def _config(config_cls, epochs: Optional[int], hyperparameters: Dict[str, Any], name: str):
    """The hyper-parameter dataclass built and validated: unknown names, and a value of the wrong type for a
    boolean or integer field (``"False"``, ``1.5``), are errors before the defense's own checks run."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(hyperparameters) - set(fields))
    if unknown:
        raise TypeError(f"{name}: unknown hyper-parameter(s) {unknown}; valid: {', '.join(fields)} "
                        f"(and the common options {', '.join(COMMON_OPTIONS)})")
    if epochs is not None:
        hyperparameters = dict(hyperparameters, epochs=epochs)
    for k, v in hyperparameters.items():
        default = fields[k].default
        if v is None and "Optional" in str(fields[k].type):
            continue
        if isinstance(default, bool):
            check_bool(k, v)
        elif isinstance(default, int) and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise TypeError(f"{name}: {k} must be an integer, got {v!r} ({type(v).__name__})")
        elif isinstance(default, float) and (isinstance(v, bool) or not isinstance(v, (int, float, np.number))):
            raise TypeError(f"{name}: {k} must be a number, got {v!r} ({type(v).__name__})")
    cfg = config_cls(**hyperparameters)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def _eval_set(eval_data: Any) -> Optional[EvalSet]:
    """``eval_data`` in any accepted form, as an EvalSet (checked later against the model)."""
    if eval_data is None:
        return None
    if isinstance(eval_data, EvalSet):
        return eval_data
    if isinstance(eval_data, dict):
        keys = {"x", "y", "trigger", "target"}
        if not {"x", "y"} <= set(eval_data) or set(eval_data) - keys:
            raise TypeError(f"eval_data as a dict needs the keys 'x' and 'y' (optionally 'trigger', 'target'), got "
                            f"{sorted(eval_data)}")
        return EvalSet(**eval_data)
    if isinstance(eval_data, (tuple, list)) and len(eval_data) in (2, 4):
        return EvalSet(*eval_data)
    length = f" of length {len(eval_data)}" if isinstance(eval_data, (tuple, list)) else ""
    raise TypeError("eval_data must be an EvalSet, a dict, or a tuple (x, y) / (x, y, trigger, target), got "
                    f"{type(eval_data).__name__}{length}")


# --------------------------------------------------------------------------------------------------------
# The model and the device
# --------------------------------------------------------------------------------------------------------


def _check_model(model: nn.Module, name: str) -> torch.device:
    """The model's device, after checking that there is something to purify and that it is intact."""
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{name}: the model has no parameters: there is nothing to purify")
    devices = sorted({str(p.device) for p in params})
    if len(devices) > 1:
        raise ValueError(f"{name}: the model's parameters are on several devices ({', '.join(devices)}); "
                         "fastpurify purifies a model on one device: move it with model.to(device)")
    if not any(p.requires_grad for p in params):
        raise ValueError(f"{name}: every parameter of the model is frozen (requires_grad=False), and defenses never "
                         "change frozen parameters: there is nothing to purify. Unfreeze the layers to purify with "
                         "model.requires_grad_(True)")
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params if p.is_floating_point()})
    if dtypes != ["float32"]:
        raise TypeError(f"{name}: the model's parameters are {', '.join(dtypes)}; the defenses run in float32: pass "
                        "model.float() (the fast paths' precision='bf16' option runs the heavy passes in bfloat16)")
    bad = _state.nonfinite_tensors(model)
    if bad:
        raise ValueError(f"{name}: the model holds NaN or inf in {', '.join(bad)} before any purification: it is "
                         "broken; load its weights again")
    return params[0].device


def _device(device: Any, user_device: torch.device) -> torch.device:
    if device is None:
        dev = user_device
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={device!r} is not a device; use 'cpu' or 'cuda' (or 'cuda:N')") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(dev)!r} is not supported: fastpurify runs on 'cpu' and 'cuda' devices")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(dev)!r} but CUDA is not available to torch {torch.__version__}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(dev)!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


# Hooks that are part of the model itself (a reparametrised or pruned weight is recomputed by them).
def _structural_hook(hook: Any) -> bool:
    import importlib

    # torch.nn.utils re-exports the functions weight_norm/spectral_norm under their modules' names
    kinds = tuple(getattr(importlib.import_module(f"torch.nn.utils.{mod}"), cls) for mod, cls in (
        ("weight_norm", "WeightNorm"), ("spectral_norm", "SpectralNorm"), ("prune", "BasePruningMethod")))
    return isinstance(hook, kinds)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class _SeededDropout:
    """Mixin of the run's dropout layers: the same dropout, its masks drawn from a generator of the run (seeded
    from ``seed``) instead of torch's process-global RNG, so that two runs in two threads, or a run and its
    resumed continuation, draw the same masks. Installed on the working model for the run only."""

    _fp_generator: torch.Generator
    _fp_channelwise: int  # 0: element-wise (nn.Dropout); d: a whole channel of a d-dimensional map (DropoutNd)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        d = self._fp_channelwise
        shape = x.shape if d == 0 else (*x.shape[:x.dim() - d], *([1] * d))
        keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - self.p,
                                                                               generator=self._fp_generator)
        return x * keep / (1.0 - self.p) if self.p < 1.0 else x * keep


_DROPOUTS = {nn.Dropout: 0, nn.Dropout1d: 1, nn.Dropout2d: 2, nn.Dropout3d: 3}
_SEEDED = {cls: type(f"Seeded{cls.__name__}", (_SeededDropout, cls), {}) for cls in _DROPOUTS}


class _Suspended:
    """What the run must not see or change of the user's model, set aside and put back at the end: hooks (except
    structural ones), ``.grad`` tensors, ``requires_grad`` flags and per-module train/eval modes."""

    def __init__(self, model: nn.Module, seed: int, device: torch.device) -> None:
        self.model = model
        self.dropouts: List[Tuple[nn.Module, type]] = []
        self.generators: Dict[str, torch.Generator] = {}
        for i, m in enumerate(model.modules()):
            if type(m) in _DROPOUTS:
                self.dropouts.append((m, type(m)))
                m._fp_channelwise = _DROPOUTS[type(m)]
                m._fp_generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
                self.generators[f"dropout_{len(self.dropouts)}"] = m._fp_generator
                m.__class__ = _SEEDED[type(m)]
        self.hooks: List[Tuple[nn.Module, str, OrderedDict]] = []
        for m in model.modules():
            for attr in _HOOK_DICTS:
                d = getattr(m, attr, None)
                if d:
                    self.hooks.append((m, attr, d))
                    setattr(m, attr, OrderedDict((k, h) for k, h in d.items() if _structural_hook(h)))
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]
        for p in model.parameters():
            p.grad = None

    def restore(self, keep_grads: bool) -> None:
        for m, cls in self.dropouts:
            m.__class__ = cls
            del m._fp_generator, m._fp_channelwise
        self.dropouts = []
        for m, attr, d in self.hooks:
            setattr(m, attr, d)
        for p, g in self.grads:
            p.grad = g if keep_grads else None
        for p, f in self.flags:
            p.requires_grad_(f)
        for m, mode in self.modes:
            m.training = mode


# --------------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------------


def run_defense(name: str, algorithm: Callable[..., Optional[Dict[str, Any]]], config_cls, model: nn.Module,
                clean_data: Any, *, ops: Any = (), labels: bool = True, normalization=None,
                num_classes: Optional[int] = None, epochs: Optional[int] = None, backend: Optional[str] = "auto",
                device=None, seed: int = 0, time_budget: Optional[float] = None, eval_data: Any = None,
                eval_every: int = 1, progress: bool = True, inplace: bool = False, check_range: bool = True,
                max_images: Optional[int] = None, checkpoint=None, checkpoint_every: int = 1, resume=None,
                recipe: str = "published", distributed: Optional[bool] = None, allow_small: bool = False,
                sync_checks: bool = True,
                fast_path: bool = False, clock: Optional[Callable[[], float]] = None,
                **hyperparameters) -> PurifyResult:
    """Check everything, then run ``algorithm(net, data, cfg, loop)`` on a copy of ``model`` (``net`` is the
    copy behind the normalisation, if any) and return a :class:`PurifyResult`. ``algorithm`` may return a
    dict of extras for ``result.info``. ``ops``: the fastpurify ops the algorithm calls (a tuple, or a function
    of the configuration), resolved against ``backend`` before any work. ``recipe``: a named set of settings
    (:mod:`fastpurify.recipes`) placed under the ``hyperparameters`` given; recipes other than ``"published"``
    exist on the fast paths only (``fast_path=True``). ``clock``: the clock of timings and of the time budget
    (tests inject a deterministic one). ``distributed``: ``None`` runs data-parallel exactly when a
    ``torch.distributed`` process group of more than one process exists (``_dist.py``), ``False`` never,
    ``True`` requires it."""
    clock = clock if clock is not None else time.perf_counter
    clock_start = clock()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: model must be a torch.nn.Module, got {type(model).__name__}")
    for opt, v in (("inplace", inplace), ("progress", progress), ("check_range", check_range)):
        check_bool(opt, v)
    hyperparameters, epochs = apply_recipe(name, recipe, hyperparameters, epochs, fast_path)
    cfg = _config(config_cls, epochs, hyperparameters, name)
    check_choice("backend", backend if backend is not None else "auto", ("auto",) + _backend.BACKENDS)
    check_positive("eval_every", eval_every, integer=True)
    check_positive("checkpoint_every", checkpoint_every, integer=True)
    if time_budget is not None:
        check_positive("time_budget", time_budget)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                                    or num_classes < 2):
        raise TypeError(f"num_classes must be an integer >= 2 (or None: read from the model), got {num_classes!r}")
    if max_images is not None:
        check_positive("max_images", max_images, integer=True)
    ckpt = _state.path_arg(checkpoint, "checkpoint")
    if ckpt is not None:
        _state.check_writable(ckpt, "checkpoint")
    resume_path = _state.path_arg(resume, "resume")
    resume_state = _state.load(resume_path, name) if resume_path is not None else None
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None (auto), got {distributed!r}")
    group = _dist.active(distributed)
    if group is not None and not fast_path:
        raise ValueError(f"{name}: the reference implementation runs in one process, and this one is rank "
                         f"{group.rank} of {group.world}: use the fast path (fastpurify.{name}) to run data-parallel, "
                         "or pass distributed=False to run the reference alone in every process")
    user_device = _check_model(model, name)
    dev = _device(device, user_device)
    _backend.plan(name, tuple(ops(cfg) if callable(ops) else ops), backend, device_type=dev.type)
    evalset = _eval_set(eval_data)

    work = model if inplace else copy.deepcopy(model)
    suspended = _Suspended(work, seed, dev)
    given = _state.snapshot(model) if inplace else None  # what a failed in-place run puts back
    loop = None
    try:
        work.to(dev)
        norm = check_normalization(normalization, _channels(clean_data))
        net = nn.Sequential(Normalize(*norm), work).to(dev) if norm else work
        # the clean data is read under the seed: a shuffling DataLoader then yields the same order every run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            data: CleanData = prepare(net, clean_data, labels=labels, num_classes=num_classes, device=dev,
                                      batch_size=getattr(cfg, "batch_size", None), check_range=check_range,
                                      allow_small=allow_small, max_images=max_images)
        eval_fn = _eval_fn(evalset, net, data, dev, check_range)
        guard = os.environ.get(GUARD_ENV, "") not in ("", "0")
        meta = {"defense": name, "recipe": recipe, "config": dataclasses.asdict(cfg), "seed": seed,
                "model_fingerprint": _state.fingerprint(net),
                "data_fingerprint": _state.data_fingerprint(data.x, data.y)}
        if resume_state is not None:
            _state.check_matches(resume_state, name=name, config=meta["config"], seed=seed,
                                 model_print=meta["model_fingerprint"], data_print=meta["data_fingerprint"],
                                 path=resume_path)
        loop = Loop(name, cfg.epochs, device=dev, seed=seed, progress=progress, time_budget=time_budget,
                    eval_fn=eval_fn, eval_every=eval_every, sync_checks=sync_checks, clock_start=clock_start,
                    clock=clock, model=net, checkpoint=ckpt, checkpoint_every=checkpoint_every,
                    resume_state=resume_state, meta=meta, group=group, guard=guard)
        loop.track(**suspended.generators)  # the dropout masks' streams: a resumed run draws the same masks
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _backend.use(backend, f"{name}(backend=...)"):
            torch.manual_seed(seed)
            # data-parallel: train-mode BatchNorm normalises with the global batch's statistics (_dist.py)
            with _dist.sync_batchnorm(net, group):
                info = algorithm(net, GuardedData(data, loop) if guard else data, cfg, loop) or {}
            loop.end_guard()
        info = {"recipe": recipe, **info}
        _final_checks(name, net, loop, cfg, len(data))
    except KeyboardInterrupt:
        suspended.restore(keep_grads=inplace)
        work.to(user_device)
        raise Interrupted(_interrupted(name, model, work, loop, cfg, given)) from None
    except BaseException:
        if inplace:
            work.to(user_device)
            _state.restore(model, given)
        suspended.restore(keep_grads=inplace)
        work.to(user_device)
        raise
    suspended.restore(keep_grads=inplace)
    work.to(user_device)
    timings = dict(loop.timings)
    n_images = len(data) * max(1, len(loop.history))
    timings["images_per_s"] = n_images / timings["defense"] if timings.get("defense") else 0.0
    return PurifyResult(model=work, history=loop.history, timings=timings, status=loop.status, defense=name,
                        config=dataclasses.asdict(cfg), info=info, schedule=dict(loop.schedule))


def _eval_fn(evalset: Optional[EvalSet], net: nn.Module, data: CleanData, dev: torch.device, check_range: bool):
    if evalset is None:
        return None
    from ..metrics import evaluate

    x, y, trigger, target = check_eval(evalset.x, evalset.y, evalset.trigger, evalset.target,
                                       num_classes=data.num_classes, image_shape=tuple(data.x.shape[1:]),
                                       check_range=check_range)

    def eval_fn():
        r = evaluate(net, x, y, trigger=trigger, target=target, device=dev)
        return {k: v for k, v in (("acc", r.acc), ("asr", r.asr), ("ra", r.ra)) if v is not None}

    return eval_fn


def _final_checks(name: str, net: nn.Module, loop: Loop, cfg, n: int) -> None:
    """A run returns its model only when it is a purification: updated at least once, and intact."""
    bad = _state.nonfinite_tensors(net)
    if bad:
        raise DivergenceError(_state.describe_nonfinite(name, bad, "at the end of the run"))
    if not loop._updated:
        bs = getattr(cfg, "batch_size", None)
        raise PurificationError(
            f"{name}: the run made no update to the model ({len(loop.history)} round(s) on {n} clean image(s)"
            + (f", batch_size={bs}" if bs is not None else "") + "): nothing was purified. Give more clean images or "
            "a batch size the defense can use (see its docstring)")


def _interrupted(name: str, model: nn.Module, work: nn.Module, loop: Optional[Loop], cfg,
                 given: Optional[Dict[str, Tensor]]) -> PurifyResult:
    """The result an interruption hands back: the model after the last completed round (the model as given when
    none completed). An in-place run's partial result is a copy, and the user's model gets its weights back."""
    if given is not None:
        partial = copy.deepcopy(model)
        for p in partial.parameters():
            p.grad = None
        _state.restore(model, given)
    else:
        partial = work
    done = loop.completed_rounds if loop is not None else 0
    if done:
        snap = loop.last_good  # the state of the network the loop ran: ``work``, or Normalize → ``work``
        if loop.model is not work:
            snap = {k[2:]: v for k, v in snap.items() if k.startswith("1.")}
        _state.restore(partial, snap)
    else:
        _state.restore(partial, given if given is not None else model.state_dict())
    schedule = dict(loop.schedule) if loop is not None else {}
    schedule["rounds"] = done
    return PurifyResult(model=partial, history=list(loop.history) if loop else [],
                        timings=dict(loop.timings) if loop else {}, status="interrupted", defense=name,
                        config=dataclasses.asdict(cfg), info={}, schedule=schedule)


def _channels(clean_data: Any) -> int:
    """Channel count of the clean images, for checking ``normalization`` before the data is converted."""
    x = clean_data[0] if isinstance(clean_data, (tuple, list)) and clean_data else clean_data
    shape = getattr(x, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) == 4 else 3

