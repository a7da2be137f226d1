"""Test helpers shared by tests/ and benchmarks/: the ONE tolerance table (DESIGN.md rule 7), backend
enumeration, the TF32 switch of GPU references (rule 7) and the host-synchronisation check of the fast paths'
steps (:func:`host_sync_check`).

Tolerances are ``torch.testing.assert_close``'s defaults per dtype; a looser one is passed explicitly at
the call site with a comment giving the measured error.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import backend as _backend

# (rtol, atol): torch.testing.assert_close defaults.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(rtol, atol) for comparing a result of ``dtype`` against the reference."""
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: Optional[float] = None,
                 atol: Optional[float] = None, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``expected.dtype`` unless overridden."""
    rt, at = TOLERANCES.get(expected.dtype, (None, None))
    torch.testing.assert_close(
        actual, expected, rtol=rt if rtol is None else rtol, atol=at if atol is None else atol, equal_nan=True,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def backends_for(op: str, device_type: str, dtype: torch.dtype = torch.float32) -> List[str]:
    """The backends that can run ``op`` here on ``device_type`` tensors."""
    return [b for b in _backend.BACKENDS if _backend.why_not(op, b, device_type, dtype) is None]


# --------------------------------------------------------------------------------------------------------
# TF32 (DESIGN.md rule 7: GPU references run with TF32 off)
# --------------------------------------------------------------------------------------------------------
#
# torch runs fp32 cuDNN convolutions in TF32 by default (10-bit mantissa: ~1e-3 relative error), so a cuDNN
# reference compared with an exact kernel at fp32 tolerances fails on a GPU unless TF32 is off. Since torch 2.9
# the switches exist twice: the legacy booleans (``torch.backends.cudnn.allow_tf32``,
# ``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``) and per-op strings
# (``torch.backends.cudnn.conv.fp32_precision`` ... = "ieee" | "tf32" | "none"). torch 2.13's legacy getters raise
# ("a mix of the legacy and new APIs") when the two disagree, so both are set, legacy first, and restored in the
# same order: legacy values, then the exact per-op strings.

_TF32_OPS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"))
# set_float32_matmul_precision also writes the oneDNN (CPU) matmul switch: saved and restored with the rest
_RESTORED_OPS = _TF32_OPS + (("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))


def _per_op_api() -> bool:
    return hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


def _read(getter):
    try:
        return getter()
    except RuntimeError:  # a mixed legacy/per-op state: the legacy getter refuses to answer
        return None


def tf32_state() -> Dict[str, Any]:
    """The process's TF32 switches: the per-op strings (when this torch has them) and the legacy values (None
    where torch refuses to read them). Reading never raises."""
    state: Dict[str, Any] = {}
    if _per_op_api():
        for backend, op in _RESTORED_OPS:
            owner = getattr(getattr(torch.backends, backend, None), op, None)
            if hasattr(owner, "fp32_precision"):
                state[f"{backend}.{op}"] = owner.fp32_precision
    state["float32_matmul_precision"] = _read(torch.get_float32_matmul_precision)
    state["cudnn.allow_tf32"] = _read(lambda: torch.backends.cudnn.allow_tf32)
    return state


def tf32_enabled() -> bool:
    """Whether a CUDA fp32 matmul or cuDNN convolution may run in TF32 under the current switches."""
    if _per_op_api():
        for backend, op in _TF32_OPS[:2]:
            chain = [getattr(getattr(torch.backends, backend), op), getattr(torch.backends, backend), torch.backends]
            values = [getattr(o, "fp32_precision", "none") for o in chain]
            if next((v for v in values if v != "none"), "none") == "tf32":
                return True
        return False
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def set_tf32_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`tf32_state` returned (legacy values first, then the exact per-op strings)."""
    if state.get("float32_matmul_precision") is not None:
        torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    if state.get("cudnn.allow_tf32") is not None:
        torch.backends.cudnn.allow_tf32 = state["cudnn.allow_tf32"]
    for backend, op in _RESTORED_OPS:
        value = state.get(f"{backend}.{op}")
        if value is not None:
            getattr(getattr(torch.backends, backend), op).fp32_precision = value


def disable_tf32() -> Dict[str, Any]:
    """Turn TF32 off for CUDA matmuls and cuDNN convolutions/RNNs in both APIs; returns the previous state for
    :func:`set_tf32_state`. Nothing here needs a GPU: the switches are process settings."""
    saved = tf32_state()
    torch.set_float32_matmul_precision("highest")  # every matmul switch, legacy and per-op, consistently
    torch.backends.cudnn.allow_tf32 = False
    if _per_op_api():
        for backend, op in _TF32_OPS:
            getattr(getattr(torch.backends, backend), op).fp32_precision = "ieee"
    return saved


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """TF32 off inside the block, the previous switches back after it (tests/conftest.py applies it to the whole
    session when a CUDA device is present).

    Example::

        >>> with no_tf32():
        ...     tf32_enabled()
        False
    """
    saved = disable_tf32()
    try:
        yield
    finally:
        set_tf32_state(saved)


# --------------------------------------------------------------------------------------------------------
# Host synchronisation inside the fast paths' steps
# --------------------------------------------------------------------------------------------------------
#
# The fast paths claim no host synchronisation inside their steps (their docstrings); host_sync_check makes
# that a test. On CUDA it is torch.cuda.set_sync_debug_mode("error") switched on exactly while a step runs: the
# body of every batch that Loop.batches yields (and its next draw, except the first of an epoch: the epoch's
# order is copied to the device once) and, for defenses that draw their batches up front (I-BAU), the bodies of
# the named loop.phase blocks. Work once per round — the loop's history and health reads, a defense's per-round
# statistics — runs outside those scopes and is not checked.
#
# On a CPU there is nothing to synchronise, so the same scopes drive a stand-in (_HostSyncMode, a
# TorchFunctionMode) that raises where CUDA would synchronise: a value read of a device tensor (item, float,
# bool, tolist, ...), a data-dependent shape (nonzero, boolean-mask indexing, unique, ...), a copy of a device
# tensor to the host, and a blocking copy of host data to the device (torch.tensor/as_tensor with device=, .to()
# of a host tensor without non_blocking=True, copy_ from a host tensor). Which tensors are "host" is inferred the
# way CUDA would place them: a factory called without device= (random draws from the loop's CPU generator, index
# lists) makes a host tensor, results of host tensors only stay host, everything else is on the device. The
# stand-in also switches on the fast paths' GPU strategies (backend.launch_bound -> True), so the code that runs is
# the GPU's. What it cannot see: synchronisations inside torch's own C++ (cuDNN autotuning, caching-allocator
# frees) and anything a CUDA-only branch does that a CPU branch does not.
#
# A known synchronisation that another file must fix is named with ``allow=(owner, "attribute", "why")``: it is
# let through (counted) and, strictly, must still happen — once it is fixed the test fails and says to remove it.


class HostSyncError(RuntimeError):
    """A step would synchronise the host with the device (the CPU stand-in of CUDA's sync debug error)."""


_READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__complex__", "numpy", "__format__"}
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
_FACTORIES = {"zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "randperm", "tensor",
              "as_tensor", "linspace", "logspace", "eye", "empty_strided", "scalar_tensor"}


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module (where the offending call was written)."""
    import os
    import sys

    here, torch_dir = os.path.abspath(__file__), os.path.dirname(os.path.abspath(torch.__file__))
    f = sys._getframe(1)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if path != here and not path.startswith(torch_dir) and "contextlib" not in path:
            return f"{os.path.relpath(path)}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


class _HostSyncMode(torch.overrides.TorchFunctionMode):
    """The CPU stand-in (see above). ``scope.active`` says whether a step is being checked; inside an allowance
    the events are counted on it instead of raised."""

    def __init__(self, scope: _SyncScope) -> None:
        super().__init__()
        self.scope = scope
        self._host: Dict[int, Any] = {}

    def _is_host(self, t: torch.Tensor) -> bool:
        import weakref  # noqa: F401  (the values are weak references)

        r = self._host.get(id(t))
        return r is not None and r() is t

    def _mark(self, out, host: bool) -> None:
        import weakref

        for t in _tensors(out):
            if host:
                self._host[id(t)] = weakref.ref(t)
            else:
                self._host.pop(id(t), None)
        if len(self._host) > 4096:  # forget the dead
            self._host = {k: r for k, r in self._host.items() if r() is not None}

    def _event(self, what: str) -> None:
        self.scope.event(f"{what} at {_caller()}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        device_arg = kwargs.get("device")
        if self.scope.in_step:
            on_device = isinstance(first, torch.Tensor) and not self._is_host(first)
            if name in _READS and on_device:
                self._event(f"{name}() reads a device tensor")
            elif name in _DATA_DEPENDENT and on_device:
                self._event(f"{name}() has a data-dependent shape")
            elif name == "repeat_interleave" and on_device and "output_size" not in kwargs:
                self._event("repeat_interleave() without output_size has a data-dependent shape")
            elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and on_device and any(
                    t.dtype == torch.bool and not self._is_host(t) for t in _tensors(args[1:2])):
                self._event(f"{name}() with a boolean mask has a data-dependent shape")
            elif name == "cpu" and on_device:
                self._event("cpu() copies a device tensor to the host")
            elif name in ("tensor", "as_tensor") and (device_arg is not None or (
                    name == "as_tensor" and len(args) > 2 and args[2] is not None)) and not (
                    isinstance(first, torch.Tensor) and not self._is_host(first)):
                self._event(f"torch.{name}(..., device=) copies host data to the device and waits for it")
            elif name in ("to", "cuda") and isinstance(first, torch.Tensor) and self._is_host(first) and (
                    name == "cuda" or device_arg is not None or any(isinstance(a, (torch.device, str))
                                                                    for a in args[1:])) \
                    and not kwargs.get("non_blocking", False) and not any(a is True for a in args[1:]):
                self._event(f".{name}() of a host tensor copies it to the device and waits for it")
            elif name == "copy_" and on_device and len(args) > 1 and isinstance(args[1], torch.Tensor) \
                    and self._is_host(args[1]) and not kwargs.get("non_blocking", False):
                self._event("copy_() from a host tensor waits for the copy")
        out = func(*args, **kwargs)
        # where the result lives under CUDA semantics
        if name in _FACTORIES:
            data_host = not (isinstance(first, torch.Tensor) and not self._is_host(first))
            self._mark(out, device_arg is None and data_host and not (name == "as_tensor" and len(args) > 2))
        elif name in ("to", "cuda"):
            target = name == "cuda" or device_arg is not None or any(isinstance(a, (torch.device, str))
                                                                     for a in args[1:])
            self._mark(out, (not target and isinstance(first, torch.Tensor) and self._is_host(first)))
        elif name in ("cpu", "pin_memory", "numpy"):
            self._mark(out, True)
        else:
            ins = list(_tensors(args)) + list(_tensors(kwargs))
            self._mark(out, bool(ins) and all(self._is_host(t) for t in ins))
        return out


class _SyncScope:
    """Where the check is on: counters of checked and allowed regions, and what happened in them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.checking = 0  # > 0: inside a step (and not inside an allowance)
        self._checked = 0
        self._allowed: List[str] = []  # the labels of the allowances entered (innermost last)
        self.steps = 0  # step bodies checked
        self.suppressed: Dict[str, int] = {}  # allowance label -> synchronisations let through
        self._base = torch.cuda.get_sync_debug_mode() if self.cuda else 0
        # After the check: a batch generator that a failed step left suspended closes when it is collected, later;
        # it must not switch the sync debug mode on again then
        self.closed = False

    @property
    def in_step(self) -> bool:
        """Inside a step, allowed or not."""
        return self._checked > 0

    def _apply(self) -> None:
        self.checking = self._checked if not self._allowed else 0
        if self.cuda and not self.closed:
            # inside an allowance the mode warns (counted), elsewhere in a step it raises
            mode = "error" if self.checking else ("warn" if self._checked else self._base)
            torch.cuda.set_sync_debug_mode(mode)

    def event(self, what: str) -> None:
        """A synchronisation seen by the CPU stand-in: raised inside a step, counted inside an allowance."""
        if self.closed:
            return
        if self._allowed:
            if self._checked:
                self.suppressed[self._allowed[-1]] = self.suppressed.get(self._allowed[-1], 0) + 1
            return
        raise HostSyncError(f"host synchronisation inside a step: {what}")

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        self._checked += 1
        self.steps += 1
        self._apply()
        try:
            yield
        finally:
            self._checked -= 1
            self._apply()

    @contextlib.contextmanager
    def allow(self, label: str) -> Iterator[None]:
        import warnings

        self._allowed.append(label)
        self._apply()
        try:
            if self.cuda and self._checked:
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    yield
                n = sum("synchroniz" in str(w.message) for w in seen)
                if n:
                    self.suppressed[label] = self.suppressed.get(label, 0) + n
            else:
                yield
        finally:
            self._allowed.pop()
            self._apply()


EPOCH_ORDER = "Loop.batches: the epoch's index order (or a phase's draws with replacement), copied to the device once"


@contextlib.contextmanager
def host_sync_check(device, *, phases: Sequence[str] = (), allow: Sequence[Tuple[Any, str, str]] = (),
                    strict: bool = True) -> Iterator[_SyncScope]:
    """Check that the steps of a defense run inside the block never synchronise the host with the device.

    ``device``: the run's device; on CUDA the check is ``torch.cuda.set_sync_debug_mode("error")`` scoped to the
    steps, on a CPU the stand-in described above (with the GPU strategies switched on). ``phases``: names of
    ``loop.phase`` blocks whose whole body is a step (for defenses that draw their batches before the steps).
    ``allow``: ``(owner, attribute, why)`` for known synchronisations that a file other than the test must fix:
    calls of ``owner.attribute`` are let through; with ``strict`` each must still synchronise at least once (else
    the check fails: it was fixed, remove the allowance). Yields the scope (``.steps``: step bodies checked,
    ``.suppressed``: what each allowance let through). A synchronisation inside a step raises (CUDA:
    RuntimeError "called a synchronizing CUDA operation"; CPU: :class:`HostSyncError`).

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> from fastpurify.defenses.bcu import bcu
        >>> with host_sync_check("cpu") as scope:  # doctest: +SKIP
        ...     bcu(SmallVGG(), torch.rand(64, 3, 32, 32), epochs=1, batch_size=32, progress=False)
        >>> scope.steps  # doctest: +SKIP
        2
    """
    import functools
    import sys

    from . import backend as backend_mod
    from .defenses._loop import Loop

    dev = torch.device(device)
    scope = _SyncScope(dev)
    patches: List[Tuple[Any, str, Any]] = []

    def patch(owner, attr, value):
        patches.append((owner, attr, owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)))
        setattr(owner, attr, value)

    orig_batches, orig_phase = Loop.batches, Loop.phase

    draws: List[str] = []  # the label of an allowance of Loop.batches: its per-step draws are let through

    def batches(loop, *args, **kwargs):
        it = orig_batches(loop, *args, **kwargs)
        first = True
        while True:
            # the epoch's order (or all of a phase's draws with replacement) is drawn on the host and copied to the
            # device once, at the first draw; every later draw is a step's
            with scope.step():
                scope.steps -= 1  # the draw belongs to the step whose body follows
                with (scope.allow(EPOCH_ORDER) if first else scope.allow(draws[0]) if draws
                      else contextlib.nullcontext()):
                    try:
                        idx = next(it)
                    except StopIteration:
                        return
            first = False
            with scope.step():
                yield idx

    @contextlib.contextmanager
    def phase(loop, name, **kwargs):
        with orig_phase(loop, name, **kwargs):
            if name in phases:
                with scope.step():
                    yield
            else:
                yield

    def allowed(fn, label):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            with scope.allow(label):
                return fn(*a, **k)
        return wrapper

    mode = None
    try:
        patch(Loop, "batches", batches)
        patch(Loop, "phase", phase)
        labels = []
        for owner, attr, why in allow:
            label = f"{getattr(owner, '__name__', owner)}.{attr}: {why}"
            labels.append(label)
            if owner is Loop and attr == "batches":  # the per-step draws inside the wrapper above
                draws.append(label)
                continue
            fn = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            patch(owner, attr, allowed(fn, label))
        if dev.type != "cuda":
            # the GPU strategies (stacked models, fused optimizers, device-side early exits) on the CPU
            original = backend_mod.launch_bound
            for mod in [m for n, m in list(sys.modules.items()) if n.startswith("fastpurify") and m is not None]:
                if getattr(mod, "launch_bound", None) is original:
                    patch(mod, "launch_bound", lambda device: True)
            mode = _HostSyncMode(scope)
            mode.__enter__()
        yield scope
        if strict:
            stale = [lb for lb in labels if not scope.suppressed.get(lb)]
            if stale:
                raise AssertionError("these allowed synchronisations no longer happen inside a step; remove them "
                                     "from the test's allow=: " + "; ".join(stale))
    finally:
        scope.closed = True
        if mode is not None:
            mode.__exit__(None, None, None)
        for owner, attr, value in reversed(patches):
            setattr(owner, attr, value)
        if scope.cuda:
            torch.cuda.set_sync_debug_mode(scope._base)
