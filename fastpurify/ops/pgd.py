"""Public PGD perturbation ops (kernel family 1), registered with ``torch.library`` as ``fastpurify::*``.

- ``pgd_update_(delta, grad, ...)``: the in-place hot-path update of an attack loop (runs under no_grad,
  like ``optimizer.step``); registered as ``fastpurify::pgd_update_`` (mutates ``delta``).
- ``pgd_update(delta, grad, ...)``: the same step out of place and differentiable with respect to ``delta``
  and ``x`` (``grad`` enters only through ``sign``: zero gradient); ``fastpurify::pgd_update``.

Both validate their inputs, then make one call to :mod:`fastpurify.backend` to pick cuda | triton | cpp |
torch. Backend implementations share one contract, ``impl(delta, grad, x, step, eps, lower, upper,
descend)``: update the contiguous ``delta`` in place from contiguous ``grad`` and (optional) ``x``, where
``x`` holds the trailing ``x.numel()`` elements of ``delta``'s layout and is broadcast over the rest.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference.pgd import NORMS, pgd_update_ref

OP = "pgd_update"
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _load_torch():
    def impl(delta, grad, x, step, eps, lower, upper, descend):
        delta.copy_(pgd_update_ref(delta, grad, step=step, eps=eps, x=x, lower=lower, upper=upper, descend=descend))

    return impl


def _load_cpp():
    return _backend.extension().pgd_update_linf_cpu_


def _load_cuda():
    return _backend.extension().pgd_update_linf_cuda_


def _load_triton():
    from fastpurify.kernels.pgd import pgd_update_triton

    return pgd_update_triton


_backend.register_op(
    _backend.OpSpec(
        name=OP,
        impls={"torch": _load_torch, "cpp": _load_cpp, "triton": _load_triton, "cuda": _load_cuda},
        dtypes={b: _FLOATS for b in _backend.BACKENDS},
        doc="PGD step + projection on the eps-ball + box clamp of x+delta (L-inf)",
    )
)


# --------------------------------------------------------------------------------------------------------
# Validation (before any work, with the offending value in the message)
# --------------------------------------------------------------------------------------------------------


def _check(delta, grad, x, step, eps, norm, lower, upper) -> None:
    for name, t in (("delta", delta), ("grad", grad)):
        if not isinstance(t, Tensor):
            raise TypeError(f"pgd_update: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not delta.is_floating_point():
        raise TypeError(f"pgd_update: delta must be a floating tensor, got dtype {delta.dtype}")
    if delta.dtype not in _FLOATS:
        raise TypeError(f"pgd_update: delta dtype {delta.dtype} is not supported; expected one of {_FLOATS}")
    if grad.dtype != delta.dtype:
        raise TypeError(f"pgd_update: grad dtype {grad.dtype} differs from delta dtype {delta.dtype}")
    if grad.shape != delta.shape:
        raise ValueError(f"pgd_update: grad shape {tuple(grad.shape)} != delta shape {tuple(delta.shape)}")
    if grad.device != delta.device:
        raise ValueError(f"pgd_update: grad is on {grad.device} but delta is on {delta.device}")
    if x is not None:
        if not isinstance(x, Tensor):
            raise TypeError(f"pgd_update: x must be a torch.Tensor or None, got {type(x).__name__}")
        if x.dtype != delta.dtype:
            raise TypeError(f"pgd_update: x dtype {x.dtype} differs from delta dtype {delta.dtype}")
        if x.device != delta.device:
            raise ValueError(f"pgd_update: x is on {x.device} but delta is on {delta.device}")
        if x.dim() > delta.dim() or tuple(delta.shape[delta.dim() - x.dim():]) != tuple(x.shape):
            raise ValueError(
                f"pgd_update: x shape {tuple(x.shape)} must equal the trailing dimensions of delta shape "
                f"{tuple(delta.shape)} (delta may carry extra leading dimensions, e.g. (R, B, C, H, W))"
            )
    if norm not in NORMS:
        raise ValueError(f"pgd_update: unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    for name, v in (("step", step), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"pgd_update: {name} must be a finite number, got {v!r}")
    if eps <= 0:
        raise ValueError(f"pgd_update: eps must be > 0, got {eps!r}")
    if step < 0:
        raise ValueError(f"pgd_update: step must be >= 0 (use descend=True to descend), got {step!r}")
    for name, v in (("lower", lower), ("upper", upper)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
            raise ValueError(f"pgd_update: {name} must be a number or None, got {v!r}")
    if lower is not None and upper is not None and lower > upper:
        raise ValueError(f"pgd_update: lower={lower!r} must be <= upper={upper!r}")


# --------------------------------------------------------------------------------------------------------
# The registered custom ops
# --------------------------------------------------------------------------------------------------------


def _run(backend: str, delta: Tensor, grad: Tensor, x: Optional[Tensor], step, eps, lower, upper, descend) -> None:
    """Run a backend on a contiguous delta (in place)."""
    impl = _backend.implementation(OP, backend)
    impl(delta, grad.contiguous(), None if x is None else x.contiguous(), float(step), float(eps),
         None if lower is None else float(lower), None if upper is None else float(upper), bool(descend))


@torch.library.custom_op("fastpurify::pgd_update_", mutates_args=("delta",))
def _pgd_update_inplace(
    delta: Tensor, grad: Tensor, x: Optional[Tensor], step: float, eps: float, lower: Optional[float],
    upper: Optional[float], descend: bool, backend: str,
) -> None:
    if delta.is_contiguous():
        _run(backend, delta, grad, x, step, eps, lower, upper, descend)
    else:
        tmp = delta.contiguous()
        _run(backend, tmp, grad, x, step, eps, lower, upper, descend)
        delta.copy_(tmp)


@_pgd_update_inplace.register_fake
def _(delta, grad, x, step, eps, lower, upper, descend, backend) -> None:
    return None


@torch.library.custom_op("fastpurify::pgd_update", mutates_args=())
def _pgd_update_functional(
    delta: Tensor, grad: Tensor, x: Optional[Tensor], step: float, eps: float, lower: Optional[float],
    upper: Optional[float], descend: bool, backend: str,
) -> Tensor:
    out = torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)
    out.copy_(delta)
    _run(backend, out, grad, x, step, eps, lower, upper, descend)
    return out


@_pgd_update_functional.register_fake
def _(delta, grad, x, step, eps, lower, upper, descend, backend):
    return torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)


def _setup_context(ctx, inputs, output):
    delta, grad, x, step, eps, lower, upper, descend, _ = inputs
    ctx.save_for_backward(delta, grad, x)
    ctx.args = (step, eps, lower, upper, descend)


def _backward(ctx, gout):
    """Masks of the two clamps (torch.clamp's convention: gradient passes where min <= v <= max)."""
    delta, grad, x = ctx.saved_tensors
    step, eps, lower, upper, descend = ctx.args
    acc = torch.float64 if delta.dtype == torch.float64 else torch.float32
    s = -step if descend else step
    y = delta.to(acc) + s * torch.sign(grad.to(acc))
    pass_delta = (y >= -eps) & (y <= eps)
    g_delta = gout * pass_delta
    g_x = None
    if x is not None and (lower is not None or upper is not None):
        z = x.to(acc) + torch.clamp(y, -eps, eps)
        inside = torch.ones_like(pass_delta)
        if lower is not None:
            inside &= z >= lower
        if upper is not None:
            inside &= z <= upper
        g_delta = g_delta * inside
        if ctx.needs_input_grad[2]:
            g_x = -(gout * ~inside)
            lead = g_x.dim() - x.dim()
            if lead:
                g_x = g_x.sum(dim=tuple(range(lead)))
            g_x = g_x.to(x.dtype)
    return g_delta.to(delta.dtype), None, g_x, None, None, None, None, None, None


_pgd_update_functional.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def pgd_update_(
    delta: Tensor,
    grad: Tensor,
    *,
    step: float,
    eps: float,
    norm: str = "linf",
    x: Optional[Tensor] = None,
    lower: Optional[float] = 0.0,
    upper: Optional[float] = 1.0,
    descend: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Fused PGD step on ``delta`` in place (one pass over memory); returns ``delta``.

    L∞: ``δ ← clamp(δ ± step·sign(grad), −eps, eps)`` (``+`` ascends the loss; ``descend=True`` uses
    ``−``), then, when ``x`` is given, ``δ ← clamp(x + δ, lower, upper) − x`` so the perturbed input stays
    in the box (``None`` leaves a side open). Runs under ``torch.no_grad``.

    Shapes: ``delta``, ``grad``: any shape with the same dtype and device, e.g. (B, C, H, W) or
    (R, B, C, H, W) for R restarts; ``x``: the trailing dimensions of ``delta``, broadcast over the rest.
    ``backend``: ``"auto"``/None (then ``FASTPURIFY_BACKEND``, then CUDA: cuda > triton > torch; CPU:
    cpp > torch), or one of ``"cuda"``, ``"triton"``, ``"cpp"``, ``"torch"`` (an explicit choice that cannot
    run raises :class:`fastpurify.BackendUnavailableError` saying why).

    Example::

        >>> import torch, fastpurify.ops as ops
        >>> x = torch.rand(8, 3, 32, 32); delta = torch.zeros_like(x); g = torch.randn_like(x)
        >>> _ = ops.pgd_update_(delta, g, step=2 / 255, eps=8 / 255, x=x)
        >>> bool(delta.abs().max() <= 8 / 255 + 1e-7) and bool(((x + delta) >= 0).all())
        True
    """
    _check(delta, grad, x, step, eps, norm, lower, upper)
    name = _backend.resolve(OP, backend, device_type=delta.device.type, dtype=delta.dtype)
    with torch.no_grad():
        _pgd_update_inplace(delta, grad, x, float(step), float(eps), lower, upper, bool(descend), name)
    return delta


def pgd_update(
    delta: Tensor,
    grad: Tensor,
    *,
    step: float,
    eps: float,
    norm: str = "linf",
    x: Optional[Tensor] = None,
    lower: Optional[float] = 0.0,
    upper: Optional[float] = 1.0,
    descend: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Out-of-place, differentiable form of :func:`pgd_update_` (same arguments); returns the new δ.

    Gradients flow to ``delta`` (1 where neither clamp is active) and ``x`` (−1 where the box clamp is
    active, summed over broadcast dimensions); ``grad`` gets none (it enters through ``sign``).

    Example::

        >>> d = torch.zeros(4, 3, 8, 8, requires_grad=True); g = torch.randn(4, 3, 8, 8)
        >>> pgd_update(d, g, step=0.01, eps=0.03).sum().backward(); float(d.grad.min())
        1.0
    """
    _check(delta, grad, x, step, eps, norm, lower, upper)
    name = _backend.resolve(OP, backend, device_type=delta.device.type, dtype=delta.dtype)
    return _pgd_update_functional(delta, grad, x, float(step), float(eps), lower, upper, bool(descend), name)
