"""The ONE place that picks the implementation of an op: ``cuda`` | ``triton`` | ``cpp`` | ``torch``.

Order (DESIGN.md rule 3): the ``backend=`` argument, then the ``FASTPURIFY_BACKEND`` environment variable,
then auto — CUDA tensors: cuda > triton > torch; CPU tensors: cpp > torch. An explicit choice that cannot
run raises :class:`BackendUnavailableError` saying why (not built, no GPU, dtype unsupported); it never
falls back silently. Triton runs on CPU tensors only under its interpreter (``TRITON_INTERPRET=1``), and
auto never picks it there (the interpreter runs each program instance in numpy: tests only).

Nothing here touches the extension, Triton or a GPU at import time (rule 4): everything is probed lazily
on the first call and cached.

Example::

    >>> from fastpurify import backend
    >>> backend.resolve("pgd_update", None, device_type="cpu", dtype=torch.float32)   # doctest: +SKIP
    'cpp'
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("cuda", "triton", "cpp", "torch")
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
ENV_VAR = "FASTPURIFY_BACKEND"
BUILD_CMD = "pip install --no-build-isolation -e ."
TRITON_CMD = "pip install 'triton>=3.0'   (or: pip install 'fastpurify[triton]')"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why and how to fix it."""


# The backend a defense was given (``fastpurify.sau(..., backend="cpp")``): every op the defense calls without a
# backend of its own resolves to it. A context variable, so that two threads purifying at once do not see each
# other's choice.
_DEFAULT: contextvars.ContextVar = contextvars.ContextVar("fastpurify_backend", default=None)


@contextlib.contextmanager
def use(backend: Optional[str], source: str = "backend= argument"):
    """Make ``backend`` the choice of every op resolved inside the block that was not given one itself
    (``None`` or ``"auto"``: no change). Used by the defenses for their ``backend=`` option.

    Example::

        >>> with use("torch"):                                      # doctest: +SKIP
        ...     ops.pgd_update_(delta, grad, step=0.1, eps=0.3)     # runs the eager reference
    """
    token = _DEFAULT.set(None if backend in (None, "auto") else (backend.lower(), source))
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def requested(backend: Optional[str] = None) -> Tuple[Optional[str], str]:
    """The explicit choice in force for a call given ``backend``: ``(name, where it came from)``, or
    ``(None, "auto")``. Order: the argument, then an enclosing :func:`use` (a defense's ``backend=``), then
    ``FASTPURIFY_BACKEND``. Raises ``ValueError`` for a name that is no backend, naming where it came from."""
    if backend is not None and backend != "auto":
        choice, source = backend, "backend= argument"
    elif _DEFAULT.get() is not None:
        choice, source = _DEFAULT.get()
    else:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if not env or env == "auto":
            return None, "auto"
        choice, source = env, f"{ENV_VAR}={env}"
    if not isinstance(choice, str) or choice.lower() not in BACKENDS:
        raise ValueError(f"unknown backend {choice!r} (from {source}); valid: {', '.join(BACKENDS)}, auto")
    return choice.lower(), source


def launch_bound(device: torch.device) -> bool:
    """Whether work on ``device`` is bound by kernel launches and host synchronisation rather than by arithmetic:
    true on CUDA, false on CPU. The fast paths use it (and nothing else) to pick strategies that trade extra
    arithmetic for fewer launches or syncs (stacked models, fused optimizers, one forward for two batches, the
    fused SAU loss kernel): on CPU each of them was measured slower or no faster, so they stay GPU-only. This is
    a choice of strategy, not of an op's backend; an explicit ``backend=`` still decides which kernel runs."""
    return torch.device(device).type == "cuda"


# --------------------------------------------------------------------------------------------------------
# Lazy probes of the optional pieces.
# --------------------------------------------------------------------------------------------------------


@functools.cache
def _extension() -> Tuple[Optional[object], Optional[str]]:
    """Import ``fastpurify._C`` once; return (module, None) or (None, why-not)."""
    try:
        mod = importlib.import_module("fastpurify._C")
    except ImportError as e:  # not built, or built against another torch
        return None, f"fastpurify._C is not built or does not load ({e}); build it with: {BUILD_CMD}"
    return mod, None


def extension():
    """The compiled module ``fastpurify._C``; raises :class:`BackendUnavailableError` with the fix if absent."""
    mod, why = _extension()
    if mod is None:
        raise BackendUnavailableError(why)
    return mod


def extension_has_cuda() -> bool:
    mod, _ = _extension()
    return bool(mod is not None and mod.has_cuda())


@functools.cache
def _triton() -> Tuple[Optional[str], Optional[str]]:
    """(triton version, None) or (None, why-not)."""
    try:
        import triton
    except ImportError as e:
        return None, f"triton is not importable ({e}); install it with: {TRITON_CMD}"
    return triton.__version__, None


def triton_interpret() -> bool:
    """Whether Triton kernels run on CPU through the interpreter (decided by TRITON_INTERPRET at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_available() -> bool:
    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------------
# The op registry: each op module declares its implementations and the dtypes each accepts.
# --------------------------------------------------------------------------------------------------------


@dataclass
class OpSpec:
    """Implementations of one op. ``impls[backend]`` is a zero-argument loader returning the callable, so
    that registering an op imports nothing heavy; ``dtypes[backend]`` lists the floating dtypes accepted."""

    name: str
    impls: Dict[str, Callable[[], Callable]]
    dtypes: Dict[str, Tuple[torch.dtype, ...]]
    doc: str = ""
    _loaded: Dict[str, Callable] = field(default_factory=dict, repr=False)

    def load(self, backend: str) -> Callable:
        if backend not in self._loaded:
            self._loaded[backend] = self.impls[backend]()
        return self._loaded[backend]


_OPS: Dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    unknown = set(spec.impls) - set(BACKENDS)
    if unknown:
        raise ValueError(f"op {spec.name!r} registers unknown backends {sorted(unknown)}; valid: {BACKENDS}")
    _OPS[spec.name] = spec
    return spec


def registered_ops() -> Dict[str, OpSpec]:
    # The op modules register themselves on import; import them so `info()` lists every op.
    importlib.import_module("fastpurify.ops")
    return dict(_OPS)


def why_not(op: str, backend: str, device_type: str, dtype: torch.dtype) -> Optional[str]:
    """None if ``backend`` can run ``op`` on tensors of this device type and dtype, else the reason."""
    spec = _OPS.get(op)
    if spec is None:
        registered_ops()
        spec = _OPS.get(op)
    if spec is None:
        raise ValueError(f"unknown op {op!r}; registered ops: {sorted(_OPS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)} (or 'auto')")
    if backend not in spec.impls:
        return f"op {op!r} has no {backend} implementation"
    if dtype not in spec.dtypes[backend]:
        names = ", ".join(str(d).replace("torch.", "") for d in spec.dtypes[backend])
        return f"dtype {str(dtype).replace('torch.', '')} is not supported by the {backend} backend (supports {names})"
    if backend == "torch":
        return None
    if backend == "cpp":
        if device_type != "cpu":
            return f"the cpp backend runs on CPU tensors; these are on {device_type}"
        _, err = _extension()
        return err
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors; these are on {device_type}"
        mod, err = _extension()
        if mod is None:
            return err
        if not mod.has_cuda():
            return (
                "fastpurify._C was built without CUDA (torch "
                f"{torch.__version__} {'has no CUDA' if torch.version.cuda is None else 'found no nvcc at build time'})"
                f"; rebuild on a CUDA machine with: {BUILD_CMD}  (or FASTPURIFY_FORCE_CUDA=1 {BUILD_CMD})"
            )
        return None
    if backend == "triton":
        _, err = _triton()
        if err:
            return err
        if device_type == "cpu" and not triton_interpret():
            return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run its interpreter on CPU)"
        if device_type not in ("cpu", "cuda"):
            return f"the triton backend does not run on {device_type} tensors"
        return None
    raise AssertionError(backend)


def resolve(op: str, backend: Optional[str], *, device_type: str, dtype: torch.dtype) -> str:
    """Name of the backend that will run ``op``; raises if an explicit choice cannot run (the argument, an
    enclosing :func:`use`, or ``FASTPURIFY_BACKEND``: see :func:`requested`)."""
    choice, source = requested(backend)
    if choice is not None:
        reason = why_not(op, choice, device_type, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {choice!r} (from {source}) cannot run: {reason}")
        return choice
    tried = []
    for name in AUTO_ORDER.get(device_type, ("torch",)):
        reason = why_not(op, name, device_type, dtype)
        if reason is None:
            return name
        tried.append(f"{name}: {reason}")
    raise BackendUnavailableError(f"{op}: no backend can run on {device_type} {dtype}: " + "; ".join(tried))


def plan(who: str, ops: Tuple[str, ...], backend: Optional[str], *, device_type: str,
         dtype: torch.dtype = torch.float32) -> Dict[str, str]:
    """Resolve, before any work, the backend of every op a defense calls: ``{op: backend}``. An explicit choice
    (``backend``, else ``FASTPURIFY_BACKEND``) must run every one of them, else :class:`BackendUnavailableError`
    names the op and why; an unknown name is a ``ValueError``. A defense that calls no fastpurify op (``ops``
    empty: it runs on PyTorch's own operators) accepts ``backend="torch"``/``"auto"`` only as an argument; a
    ``FASTPURIFY_BACKEND`` preference has nothing to choose there and is ignored."""
    choice, source = requested(backend)
    if choice is None:
        return {op: resolve(op, None, device_type=device_type, dtype=dtype) for op in ops}
    if not ops:
        if choice == "torch" or source.startswith(ENV_VAR):
            return {}
        raise BackendUnavailableError(
            f"{who}: backend={choice!r} (from {source}) cannot apply: this defense calls no fastpurify kernel (it "
            "runs on PyTorch's own operators), so there is no backend to choose; pass backend='auto' (or 'torch')")
    out = {}
    for op in ops:
        reason = why_not(op, choice, device_type, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"{who}: backend {choice!r} (from {source}) cannot run op {op!r} on "
                                          f"{device_type} tensors: {reason}")
        out[op] = choice
    return out


def select(op: str, backend: Optional[str], *, device_type: str, dtype: torch.dtype) -> Tuple[str, Callable]:
    """(backend name, implementation callable) for ``op``."""
    name = resolve(op, backend, device_type=device_type, dtype=dtype)
    return name, _OPS[op].load(name)


def implementation(op: str, backend: str) -> Callable:
    """The callable of a concrete backend (no availability check: callers resolved it already)."""
    if op not in _OPS:
        registered_ops()
    return _OPS[op].load(backend)


# --------------------------------------------------------------------------------------------------------
# fastpurify.info()
# --------------------------------------------------------------------------------------------------------


def info() -> dict:
    """What this installation can run: versions, the extension, Triton, the GPU, and for every op which
    backends can run it (on CPU and, when present, CUDA tensors, in float32) and why the others cannot.

    Example::

        >>> import fastpurify
        >>> fastpurify.info()["ops"]["pgd_update"]["cpu"]["cpp"]     # doctest: +SKIP
        {'available': True, 'reason': None}
    """
    mod, ext_err = _extension()
    tri_version, tri_err = _triton()
    gpu = None
    if cuda_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(),
               "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}"}
    devices = ["cpu"] + (["cuda"] if gpu else [])
    ops = {}
    for name, spec in sorted(registered_ops().items()):
        ops[name] = {"doc": spec.doc}
        for dev in devices:
            per = {}
            for b in BACKENDS:
                reason = why_not(name, b, dev, torch.float32)
                per[b] = {"available": reason is None, "reason": reason}
            try:
                auto = resolve(name, "auto", device_type=dev, dtype=torch.float32)
            except (BackendUnavailableError, ValueError) as e:
                auto = f"error: {e}"
            ops[name][dev] = per
            ops[name][f"{dev}_auto"] = auto
    return {
        "fastpurify": importlib.import_module("fastpurify").__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": tri_version,
        "triton_error": tri_err,
        "triton_interpret": triton_interpret(),
        "extension": {
            "built": mod is not None,
            "with_cuda": bool(mod is not None and mod.has_cuda()),
            "error": ext_err,
            "path": getattr(mod, "__file__", None),
        },
        "gpu": gpu,
        "backend_env": os.environ.get(ENV_VAR) or None,
        "ops": ops,
        "defenses": importlib.import_module("fastpurify.defenses").status(),
    }
