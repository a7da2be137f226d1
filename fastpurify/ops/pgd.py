"""Public PGD perturbation ops (kernel family 1), registered with ``torch.library`` as ``fastpurify::*``.

- ``pgd_update_(delta, grad, ...)``: the in-place hot-path update of an attack loop (runs under no_grad,
  like ``optimizer.step``); ``fastpurify::pgd_update_`` (mutates ``delta`` and the optional ``out_x``).
- ``pgd_update(delta, grad, ...)``: the same step out of place and differentiable with respect to ``delta``
  and ``x``; ``fastpurify::pgd_update``. Its backward is the reference's (vector-Jacobian product of
  :func:`fastpurify.reference.pgd.pgd_update_ref`), so every backend has the same gradient.

Both validate their inputs, then make one call to :mod:`fastpurify.backend` to pick cuda | triton | cpp |
torch. Backend implementations share one contract::

    impl(delta, grad, x, out_x, mean, std, step, eps, lower, upper, descend, norm, out_strides)

update the contiguous ``delta`` in place from contiguous ``grad`` and (optional) contiguous ``x`` (the
trailing ``x.numel()`` elements of ``delta``'s layout, broadcast over the rest); when ``out_x`` is given,
also write the perturbed model input ``(x + δ − mean)/std`` (``mean``/``std``: None or contiguous fp32 (C,)
tensors) into it with the element strides ``out_strides`` of its (M, C, H, W) view, where M folds every
dimension before the sample's (C, H, W) (:func:`fastpurify.reference.pgd.sample_dims`).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference.pgd import NORMS, model_input_ref, pgd_update_ref, sample_ndim

OP = "pgd_update"
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
Normalization = Optional[Tuple[Union[Sequence[float], Tensor], Union[Sequence[float], Tensor]]]


def _load_torch():
    def impl(delta, grad, x, out_x, mean, std, step, eps, lower, upper, descend, norm, out_strides):
        new = pgd_update_ref(delta, grad, step=step, eps=eps, norm=norm, x=x, lower=lower, upper=upper,
                             descend=descend)
        delta.copy_(new)
        if out_x is not None:
            out_x.copy_(model_input_ref(x, new, None if mean is None else (mean, std)))

    return impl


def _load_cpp():
    return _backend.extension().pgd_update_cpu_


def _load_cuda():
    return _backend.extension().pgd_update_cuda_


def _load_triton():
    from fastpurify.kernels.pgd import pgd_update_triton

    return pgd_update_triton


_backend.register_op(
    _backend.OpSpec(
        name=OP,
        impls={"torch": _load_torch, "cpp": _load_cpp, "triton": _load_triton, "cuda": _load_cuda},
        dtypes={b: _FLOATS for b in _backend.BACKENDS},
        doc="PGD step (L-inf/L2/L1) + eps-ball projection + box clamp, optionally writing the model input",
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


def view4(shape: Sequence[int]) -> Tuple[int, int, int, int]:
    """(M, C, H, W) of a perturbation shape: the sample's (C, H, W) padded with ones on the left, M the rest."""
    shape = tuple(shape)
    lead = len(shape) - sample_ndim(len(shape))
    chw = (1,) * (3 - (len(shape) - lead)) + shape[lead:]
    return (math.prod(shape[:lead]),) + chw  # type: ignore[return-value]


def _out_strides(out_x: Tensor) -> Optional[List[int]]:
    """Element strides of ``out_x``'s (M, C, H, W) view, or None when its leading dimensions do not fold."""
    sizes, strides = list(out_x.shape), list(out_x.stride())
    lead = out_x.dim() - sample_ndim(out_x.dim())
    for i in range(lead - 1):  # leading dims fold into M when each stride = next stride * next size
        if sizes[i] > 1 and strides[i] != strides[i + 1] * sizes[i + 1]:
            return None
    return [strides[lead - 1] if lead else 0] + [0] * (3 - (out_x.dim() - lead)) + strides[lead:]


def _check_out(out_x: Tensor, delta: Tensor, x: Optional[Tensor]) -> None:
    if x is None:
        raise ValueError("pgd_update: out_x needs x (the clean input it adds the perturbation to)")
    if not isinstance(out_x, Tensor) or not out_x.is_floating_point():
        raise TypeError(f"pgd_update: out_x must be a floating tensor, got {getattr(out_x, 'dtype', type(out_x))}")
    if out_x.shape != delta.shape:
        raise ValueError(f"pgd_update: out_x shape {tuple(out_x.shape)} != delta shape {tuple(delta.shape)}")
    if out_x.device != delta.device:
        raise ValueError(f"pgd_update: out_x is on {out_x.device} but delta is on {delta.device}")


def _norm_tensors(normalization: Normalization, delta: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if normalization is None:
        return None, None
    try:
        mean, std = normalization
    except (TypeError, ValueError):
        raise ValueError(f"pgd_update: normalization must be (mean, std), got {normalization!r}") from None
    c = view4(delta.shape)[1]
    out = []
    for name, v in (("mean", mean), ("std", std)):
        t = v if isinstance(v, Tensor) else torch.as_tensor(v, dtype=torch.float32)
        t = t.to(device=delta.device, dtype=torch.float32).reshape(-1).contiguous()
        if t.numel() != c:
            raise ValueError(f"pgd_update: normalization {name} has {t.numel()} values; the samples have {c} "
                             "channels")
        out.append(t)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------------
# The registered custom ops
# --------------------------------------------------------------------------------------------------------


def _run(backend: str, delta: Tensor, grad: Tensor, x: Optional[Tensor], out_x: Optional[Tensor],
         mean: Optional[Tensor], std: Optional[Tensor], step, eps, lower, upper, descend, norm) -> None:
    """Run a backend on a contiguous delta (in place), writing ``out_x`` through a temporary when its layout
    does not fold to (M, C, H, W) strides."""
    impl = _backend.implementation(OP, backend)
    out, strides = out_x, None
    if out_x is not None:
        strides = _out_strides(out_x)
        if strides is None:
            out = torch.empty(out_x.shape, dtype=out_x.dtype, device=out_x.device)
            strides = _out_strides(out)
    impl(delta, grad.contiguous(), None if x is None else x.contiguous(), out, mean, std, float(step), float(eps),
         None if lower is None else float(lower), None if upper is None else float(upper), bool(descend), norm,
         strides)
    if out is not out_x:
        out_x.copy_(out)


@torch.library.custom_op("fastpurify::pgd_update_", mutates_args=("delta", "out_x"))
def _pgd_update_inplace(
    delta: Tensor, grad: Tensor, x: Optional[Tensor], out_x: Optional[Tensor], mean: Optional[Tensor],
    std: Optional[Tensor], step: float, eps: float, lower: Optional[float], upper: Optional[float], descend: bool,
    norm: str, backend: str,
) -> None:
    if delta.is_contiguous():
        _run(backend, delta, grad, x, out_x, mean, std, step, eps, lower, upper, descend, norm)
    else:
        tmp = delta.contiguous()
        _run(backend, tmp, grad, x, out_x, mean, std, step, eps, lower, upper, descend, norm)
        delta.copy_(tmp)


@_pgd_update_inplace.register_fake
def _(delta, grad, x, out_x, mean, std, step, eps, lower, upper, descend, norm, backend) -> None:
    return None


@torch.library.custom_op("fastpurify::pgd_update", mutates_args=())
def _pgd_update_functional(
    delta: Tensor, grad: Tensor, x: Optional[Tensor], step: float, eps: float, lower: Optional[float],
    upper: Optional[float], descend: bool, norm: str, backend: str,
) -> Tensor:
    out = torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)
    out.copy_(delta)
    _run(backend, out, grad, x, None, None, None, step, eps, lower, upper, descend, norm)
    return out


@_pgd_update_functional.register_fake
def _(delta, grad, x, step, eps, lower, upper, descend, norm, backend):
    return torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)


def _setup_context(ctx, inputs, output):
    delta, grad, x, step, eps, lower, upper, descend, norm, _ = inputs
    ctx.save_for_backward(delta, grad, x)
    ctx.args = dict(step=step, eps=eps, lower=lower, upper=upper, descend=descend, norm=norm)


def _backward(ctx, gout):
    """The reference's vector-Jacobian product (clamp masks for L∞; through the norms for L2/L1)."""
    delta, grad, x = ctx.saved_tensors
    with torch.enable_grad():
        d = delta.detach().requires_grad_(True)
        xx = None if x is None else x.detach().requires_grad_(ctx.needs_input_grad[2])
        out = pgd_update_ref(d, grad.detach(), x=xx, **ctx.args)
        wrt = [d] + ([xx] if xx is not None and xx.requires_grad else [])
        grads = torch.autograd.grad(out, wrt, gout, allow_unused=True)
    g_delta = grads[0] if grads[0] is not None else torch.zeros_like(delta)
    g_x = grads[1] if len(grads) > 1 else None
    return g_delta, None, g_x, None, None, None, None, None, None, None


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
    out_x: Optional[Tensor] = None,
    normalization: Normalization = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Fused PGD step on ``delta`` in place (one pass over memory for L∞; per-sample norms reduced on the
    device for L2/L1, no host loop); returns ``delta``.

    - ``norm="linf"``: ``δ ← clamp(δ ± step·sign(grad), −eps, eps)``;
    - ``norm="l2"``: ``δ ← δ ± step·grad/‖grad‖₂``, then ``δ ← δ·min(1, eps/‖δ‖₂)`` per sample;
    - ``norm="l1"``: ``δ ← δ ± step·sign(grad)``, then ``δ ← δ·min(1, eps/‖δ‖₁)`` per sample.

    ``+`` ascends the loss (``descend=True`` uses ``−``). When ``x`` is given, ``δ ← clamp(x + δ, lower,
    upper) − x`` keeps the perturbed image in the box (``None`` leaves a side open). When ``out_x`` is given
    (any float dtype and memory format, e.g. bf16 channels_last), the perturbed model input ``x + δ`` — or
    ``(x + δ − mean)/std`` with ``normalization=(mean, std)`` — is written into it in the same pass.
    Runs under ``torch.no_grad``.

    Shapes: ``delta``, ``grad``: (..., C, H, W) with the same dtype and device, e.g. (B, C, H, W) or
    (R, B, C, H, W) for R restarts (a sample spans the last three dimensions); ``x``: the trailing
    dimensions of ``delta``, broadcast over the rest; ``out_x``: ``delta``'s shape. ``backend``: ``"auto"``/
    None (then ``FASTPURIFY_BACKEND``, then CUDA: cuda > triton > torch; CPU: cpp > torch), or one of
    ``"cuda"``, ``"triton"``, ``"cpp"``, ``"torch"`` (an explicit choice that cannot run raises
    :class:`fastpurify.BackendUnavailableError` saying why).

    Example::

        >>> import torch, fastpurify.ops as ops
        >>> x = torch.rand(8, 3, 32, 32); delta = torch.zeros_like(x); g = torch.randn_like(x)
        >>> xin = torch.empty_like(x, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        >>> _ = ops.pgd_update_(delta, g, step=2 / 255, eps=8 / 255, x=x, out_x=xin)
        >>> bool(delta.abs().max() <= 8 / 255 + 1e-7) and bool(((x + delta) >= 0).all())
        True
    """
    _check(delta, grad, x, step, eps, norm, lower, upper)
    if out_x is not None:
        _check_out(out_x, delta, x)
    elif normalization is not None:
        raise ValueError("pgd_update: normalization only applies to out_x (the model input); pass out_x too")
    mean, std = _norm_tensors(normalization, delta)
    name = _backend.resolve(OP, backend, device_type=delta.device.type, dtype=delta.dtype)
    with torch.no_grad():
        _pgd_update_inplace(delta, grad, x, out_x, mean, std, float(step), float(eps), lower, upper, bool(descend),
                            norm, name)
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
    """Out-of-place, differentiable form of :func:`pgd_update_` (same arguments, no ``out_x``); returns the new
    δ. Gradients flow to ``delta`` and ``x`` as through the reference; ``grad`` gets none.

    Example::

        >>> d = torch.zeros(4, 3, 8, 8, requires_grad=True); g = torch.randn(4, 3, 8, 8)
        >>> pgd_update(d, g, step=0.01, eps=0.03).sum().backward(); float(d.grad.min())
        1.0
    """
    _check(delta, grad, x, step, eps, norm, lower, upper)
    name = _backend.resolve(OP, backend, device_type=delta.device.type, dtype=delta.dtype)
    return _pgd_update_functional(delta, grad, x, float(step), float(eps), lower, upper, bool(descend), norm, name)
