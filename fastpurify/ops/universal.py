"""Public universal-perturbation update ops (kernel family 1), registered as ``fastpurify::universal_update*``.

- ``universal_update_(delta, grad, ...)``: the in-place update of I-BAU's perturbation pass and AWM's trigger
  recovery (runs under no_grad, like ``optimizer.step``); ``fastpurify::universal_update_`` (mutates ``delta``).
- ``universal_update(delta, grad, ...)``: the same step out of place and differentiable with respect to
  ``delta`` and ``grad``; ``fastpurify::universal_update``. Its backward is the reference's (vector-Jacobian
  product of :func:`fastpurify.reference.universal.universal_update_ref`), so every backend has the same
  gradient.

Both validate their inputs, then make one call to :mod:`fastpurify.backend` to pick cuda | triton | cpp |
torch. Backend implementations share one contract::

    impl(delta, grad, k, b, step, mean, weight_decay, norm, radius, descend)

update the contiguous ``delta`` (K·S elements, S = C·H·W) in place from the contiguous ``grad`` (K·B·S
elements: perturbation k reduces rows ``grad[k, 0..B)``); ``mean``: bool (divide the batch sum by B);
``norm``: ``"none"`` | ``"l2"`` | ``"l1"`` | ``"linf"``; ``radius``: float (unused for ``"none"``). The batch
reduction is fused with the step (one pass over ``grad``); L2/L1 add a short pass over δ for the rescale.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference.universal import NORMS, REDUCTIONS, universal_update_ref, universal_views

OP = "universal_update"
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _load_torch():
    def impl(delta, grad, k, b, step, mean, weight_decay, norm, radius, descend):
        chw = tuple(delta.shape[-3:])
        new = universal_update_ref(delta.view(k, *chw), grad.view(k, b, *chw), step=step,
                                   reduction="mean" if mean else "sum", weight_decay=weight_decay,
                                   norm=None if norm == "none" else norm, radius=radius, descend=descend)
        delta.copy_(new.view(delta.shape))

    return impl


def _load_cpp():
    return _backend.extension().universal_update_cpu_


def _load_cuda():
    return _backend.extension().universal_update_cuda_


def _load_triton():
    from fastpurify.kernels.universal import universal_update_triton

    return universal_update_triton


_backend.register_op(
    _backend.OpSpec(
        name=OP,
        impls={"torch": _load_torch, "cpp": _load_cpp, "triton": _load_triton, "cuda": _load_cuda},
        dtypes={b: _FLOATS for b in _backend.BACKENDS},
        doc="universal perturbation: batch-gradient reduction + L2 penalty + SGD step + L2/L1/Linf ball, fused",
    )
)


# --------------------------------------------------------------------------------------------------------
# Validation (before any work, with the offending value in the message)
# --------------------------------------------------------------------------------------------------------


def _check(delta, grad, step, reduction, weight_decay, norm, radius) -> None:
    for name, t in (("delta", delta), ("grad", grad)):
        if not isinstance(t, Tensor):
            raise TypeError(f"universal_update: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not delta.is_floating_point():
        raise TypeError(f"universal_update: delta must be a floating tensor, got dtype {delta.dtype}")
    if delta.dtype not in _FLOATS:
        raise TypeError(f"universal_update: delta dtype {delta.dtype} is not supported; expected one of {_FLOATS}")
    if grad.dtype != delta.dtype:
        raise TypeError(f"universal_update: grad dtype {grad.dtype} differs from delta dtype {delta.dtype}")
    if grad.device != delta.device:
        raise ValueError(f"universal_update: grad is on {grad.device} but delta is on {delta.device}")
    ds, gs = tuple(delta.shape), tuple(grad.shape)
    if delta.dim() not in (3, 4):
        raise ValueError(f"universal_update: delta shape {ds} must be (K, C, H, W) or (C, H, W)")
    k, chw = (ds[0] if delta.dim() == 4 else 1), ds[-3:]
    if grad.dim() == 4:
        if k != 1:
            raise ValueError(f"universal_update: grad shape {gs} (B, C, H, W) needs one perturbation, but delta shape "
                             f"{ds} holds K={k}; pass grad of shape (K, B, C, H, W) = "
                             f"({k}, B, {', '.join(map(str, chw))})")
        ok = gs[1:] == chw
    elif grad.dim() == 5:
        ok = gs[0] == k and gs[2:] == chw
    else:
        ok = False
    if not ok:
        want = f"(B, {', '.join(map(str, chw))})" if k == 1 else ""
        want = (want + " or " if want else "") + f"({k}, B, {', '.join(map(str, chw))})"
        raise ValueError(f"universal_update: grad shape {gs} does not fit delta shape {ds}; expected {want}")
    if gs[-4] == 0:
        raise ValueError(f"universal_update: grad shape {gs} holds an empty batch (B = 0)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"universal_update: unknown reduction {reduction!r}; valid reductions: "
                         f"{', '.join(REDUCTIONS)}")
    if norm not in NORMS:
        raise ValueError(f"universal_update: unknown norm {norm!r}; valid norms: None, "
                         f"{', '.join(n for n in NORMS if n)}")
    for name, v in (("step", step), ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"universal_update: {name} must be a finite number, got {v!r}")
        if v < 0:
            extra = " (use descend=True to descend)" if name == "step" else ""
            raise ValueError(f"universal_update: {name} must be >= 0{extra}, got {v!r}")
    if norm is None:
        if radius is not None:
            raise ValueError(f"universal_update: radius={radius!r} needs a norm ('l2', 'l1' or 'linf'); norm is None")
    else:
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or math.isnan(radius):
            raise ValueError(f"universal_update: norm={norm!r} needs a number radius, got {radius!r}")
        if radius <= 0:
            raise ValueError(f"universal_update: radius must be > 0, got {radius!r}")


# --------------------------------------------------------------------------------------------------------
# The registered custom ops
# --------------------------------------------------------------------------------------------------------


def _run(backend: str, delta: Tensor, grad: Tensor, step, reduction, weight_decay, norm, radius, descend) -> None:
    """Run a backend on a contiguous delta (in place)."""
    k, b, _ = universal_views(tuple(delta.shape), tuple(grad.shape))
    impl = _backend.implementation(OP, backend)
    impl(delta, grad.contiguous(), k, b, float(step), reduction == "mean", float(weight_decay),
         "none" if norm is None else norm, 0.0 if radius is None else float(radius), bool(descend))


@torch.library.custom_op("fastpurify::universal_update_", mutates_args=("delta",))
def _universal_update_inplace(
    delta: Tensor, grad: Tensor, step: float, reduction: str, weight_decay: float, norm: Optional[str],
    radius: Optional[float], descend: bool, backend: str,
) -> None:
    if delta.is_contiguous():
        _run(backend, delta, grad, step, reduction, weight_decay, norm, radius, descend)
    else:
        tmp = delta.contiguous()
        _run(backend, tmp, grad, step, reduction, weight_decay, norm, radius, descend)
        delta.copy_(tmp)


@_universal_update_inplace.register_fake
def _(delta, grad, step, reduction, weight_decay, norm, radius, descend, backend) -> None:
    return None


@torch.library.custom_op("fastpurify::universal_update", mutates_args=())
def _universal_update_functional(
    delta: Tensor, grad: Tensor, step: float, reduction: str, weight_decay: float, norm: Optional[str],
    radius: Optional[float], descend: bool, backend: str,
) -> Tensor:
    out = torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)
    out.copy_(delta)
    _run(backend, out, grad, step, reduction, weight_decay, norm, radius, descend)
    return out


@_universal_update_functional.register_fake
def _(delta, grad, step, reduction, weight_decay, norm, radius, descend, backend):
    return torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)


def _setup_context(ctx, inputs, output):
    delta, grad, step, reduction, weight_decay, norm, radius, descend, _ = inputs
    ctx.save_for_backward(delta, grad)
    ctx.args = dict(step=step, reduction=reduction, weight_decay=weight_decay, norm=norm, radius=radius,
                    descend=descend)


def _backward(ctx, gout):
    """The reference's vector-Jacobian product (linear in grad; through the per-perturbation norm for L2/L1)."""
    delta, grad = ctx.saved_tensors
    with torch.enable_grad():
        d = delta.detach().requires_grad_(True)
        g = grad.detach().requires_grad_(ctx.needs_input_grad[1])
        out = universal_update_ref(d, g, **ctx.args)
        wrt = [d] + ([g] if g.requires_grad else [])
        grads = torch.autograd.grad(out, wrt, gout, allow_unused=True)
    g_delta = grads[0] if grads[0] is not None else torch.zeros_like(delta)
    g_grad = grads[1] if len(grads) > 1 else None
    return g_delta, g_grad, None, None, None, None, None, None, None


_universal_update_functional.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def universal_update_(
    delta: Tensor,
    grad: Tensor,
    *,
    step: float,
    reduction: str = "sum",
    weight_decay: float = 0.0,
    norm: Optional[str] = None,
    radius: Optional[float] = None,
    descend: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Fused update of universal perturbation(s) ``delta`` in place from a batch of per-sample gradients
    (one pass over ``grad``: the batch reduction, the penalty and the step; the L2/L1 norm of each
    perturbation reduced on the device, no host sync); returns ``delta``.

    Per perturbation k: ``g = Σ_b grad[k, b]`` (``reduction="sum"``) or its mean over b (``"mean"``); when
    ``weight_decay > 0``, ``g ← g + 2·weight_decay·δ_k`` (the gradient of the penalty ``weight_decay·‖δ_k‖₂²``
    added to the objective, as I-BAU's ``0.001‖δ‖²``); ``δ_k ← δ_k + step·g`` (ascent; ``descend=True``: ``−``);
    then ``norm=None`` (no projection; I-BAU's ``defense.py``), ``"l2"``: ``δ_k ← δ_k·min(1, radius/‖δ_k‖₂)``
    (I-BAU's notebook, radius 10), ``"l1"``: ``δ_k ← δ_k·min(1, radius/‖δ_k‖₁)`` (AWM, τ = 1000), ``"linf"``:
    ``δ_k ← clamp(δ_k, −radius, radius)``. Accumulates in fp32 (fp64 for fp64); runs under ``torch.no_grad``.

    Shapes: ``delta`` (K, C, H, W) or (C, H, W) (K = 1); ``grad`` (B, C, H, W) when K = 1 (every row reduces
    into the one δ) or (K, B, C, H, W) (perturbation k from its own batch), same dtype and device.
    ``backend``: ``"auto"``/None (then ``FASTPURIFY_BACKEND``, then CUDA: cuda > triton > torch; CPU:
    cpp > torch), or one of ``"cuda"``, ``"triton"``, ``"cpp"``, ``"torch"``.

    Example::

        >>> import torch, fastpurify.ops as ops
        >>> delta = torch.zeros(1, 3, 32, 32); per_sample = torch.randn(64, 3, 32, 32)
        >>> _ = ops.universal_update_(delta, per_sample, step=10.0, reduction="mean", weight_decay=1e-3,
        ...                           norm="l2", radius=10.0)
        >>> bool(torch.linalg.vector_norm(delta) <= 10.0 * (1 + 1e-6))
        True
    """
    _check(delta, grad, step, reduction, weight_decay, norm, radius)
    name = _backend.resolve(OP, backend, device_type=delta.device.type, dtype=delta.dtype)
    with torch.no_grad():
        _universal_update_inplace(delta, grad, float(step), reduction, float(weight_decay), norm,
                                  None if radius is None else float(radius), bool(descend), name)
    return delta


def universal_update(
    delta: Tensor,
    grad: Tensor,
    *,
    step: float,
    reduction: str = "sum",
    weight_decay: float = 0.0,
    norm: Optional[str] = None,
    radius: Optional[float] = None,
    descend: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Out-of-place, differentiable form of :func:`universal_update_` (same arguments); returns the new δ.
    Gradients flow to ``delta`` and ``grad`` as through the reference.

    Example::

        >>> d = torch.zeros(1, 3, 4, 4, requires_grad=True); g = torch.randn(4, 3, 4, 4, requires_grad=True)
        >>> universal_update(d, g, step=0.5, reduction="mean").sum().backward(); float(g.grad.max())
        0.125
    """
    _check(delta, grad, step, reduction, weight_decay, norm, radius)
    name = _backend.resolve(OP, backend, device_type=delta.device.type, dtype=delta.dtype)
    return _universal_update_functional(delta, grad, float(step), reduction, float(weight_decay), norm,
                                        None if radius is None else float(radius), bool(descend), name)
