"""Public dual-logit loss op of SAU's shared PGD (kernel family 1), registered as ``fastpurify::dual_logit_loss``.

- ``dual_logit_loss(z, z0, y, yhat, yhat0, ...)``: the loss of one shared-PGD step on the logits of the two
  models, and its masks; differentiable in ``z`` and ``z0``. The forward is one row kernel (both softmaxes,
  the masked cross-entropies, the Jensen–Shannon term, the masks) plus a deterministic sum over rows on the
  device; the backward (``fastpurify::dual_logit_loss_backward``) is one row kernel writing ``dL/dz`` and
  ``dL/dz0`` from the saved masks and the upstream gradient (read on the device: no host sync).

Both passes make one call to :mod:`fastpurify.backend` to pick cuda | triton | cpp | torch. Backend
implementations are a pair of callables::

    forward(z, z0, y, yhat, yhat0, beta1, beta2) -> (loss, a, a0, s)
    backward(z, z0, y, a, a0, s, gout, beta1, beta2) -> (dz, dz0)

on contiguous (B, C) logits ``z``, ``z0`` and contiguous (B,) int64 labels; ``loss`` is a 0-d tensor in fp32
(fp64 for fp64 logits), ``a``, ``a0``, ``s`` (B,) bool, ``gout`` the loss's 0-d upstream gradient (a tensor
on the logits' device), ``dz``, ``dz0`` (B, C) in the logits' dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference.dual_logit import dual_logit_loss_backward_ref, dual_logit_loss_ref

OP = "dual_logit_loss"
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _load_torch():
    def forward(z, z0, y, yhat, yhat0, beta1, beta2):
        loss, a, a0, s = dual_logit_loss_ref(z, z0, y, yhat, yhat0, beta1=beta1, beta2=beta2)
        return loss.detach(), a, a0, s

    def backward(z, z0, y, a, a0, s, gout, beta1, beta2):
        # Closed form: custom-op implementations run below autograd, so the reference cannot be differentiated here.
        return dual_logit_loss_backward_ref(z, z0, y, a, a0, s, gout, beta1=beta1, beta2=beta2)

    return forward, backward


def _load_cpp():
    ext = _backend.extension()
    return ext.dual_logit_loss_cpu, ext.dual_logit_loss_backward_cpu


def _load_cuda():
    ext = _backend.extension()
    return ext.dual_logit_loss_cuda, ext.dual_logit_loss_backward_cuda


def _load_triton():
    from fastpurify.kernels.dual_logit import dual_logit_loss_backward_triton, dual_logit_loss_triton

    return dual_logit_loss_triton, dual_logit_loss_backward_triton


_backend.register_op(
    _backend.OpSpec(
        name=OP,
        impls={"torch": _load_torch, "cpp": _load_cpp, "triton": _load_triton, "cuda": _load_cuda},
        dtypes={b: _FLOATS for b in _backend.BACKENDS},
        doc="SAU shared-PGD loss: two softmaxes, masked CE, Jensen-Shannon, masks; row kernels fwd + bwd",
    )
)


# --------------------------------------------------------------------------------------------------------
# Validation (before any work, with the offending value in the message)
# --------------------------------------------------------------------------------------------------------


def _check(z, z0, y, yhat, yhat0, beta1, beta2) -> None:
    for name, t in (("z", z), ("z0", z0), ("y", y), ("yhat", yhat), ("yhat0", yhat0)):
        if not isinstance(t, Tensor):
            raise TypeError(f"dual_logit_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"dual_logit_loss: z must be floating logits, got dtype {z.dtype}")
    if z.dtype not in _FLOATS:
        raise TypeError(f"dual_logit_loss: z dtype {z.dtype} is not supported; expected one of {_FLOATS}")
    if z0.dtype != z.dtype:
        raise TypeError(f"dual_logit_loss: z0 dtype {z0.dtype} differs from z dtype {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"dual_logit_loss: z shape {tuple(z.shape)} must be (B, C) logits")
    if z0.shape != z.shape:
        raise ValueError(f"dual_logit_loss: z0 shape {tuple(z0.shape)} != z shape {tuple(z.shape)}")
    b, c = z.shape
    if b == 0 or c < 2:
        raise ValueError(f"dual_logit_loss: z shape {tuple(z.shape)} needs B >= 1 rows and C >= 2 classes")
    for name, t in (("z0", z0), ("y", y), ("yhat", yhat), ("yhat0", yhat0)):
        if t.device != z.device:
            raise ValueError(f"dual_logit_loss: {name} is on {t.device} but z is on {z.device}")
    for name, t in (("y", y), ("yhat", yhat), ("yhat0", yhat0)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"dual_logit_loss: {name} must hold integer class indices, got dtype {t.dtype}")
        if tuple(t.shape) != (b,):
            raise ValueError(f"dual_logit_loss: {name} shape {tuple(t.shape)} must be ({b},), one label per row of z")
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"dual_logit_loss: {name} must be a finite number >= 0, got {v!r}")


# --------------------------------------------------------------------------------------------------------
# The registered custom ops
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpurify::dual_logit_loss", mutates_args=())
def _dual_logit_loss(z: Tensor, z0: Tensor, y: Tensor, yhat: Tensor, yhat0: Tensor, beta1: float, beta2: float,
                     backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    forward, _ = _backend.implementation(OP, backend)
    return forward(z.contiguous(), z0.contiguous(), y.contiguous(), yhat.contiguous(), yhat0.contiguous(),
                   float(beta1), float(beta2))


@_dual_logit_loss.register_fake
def _(z, z0, y, yhat, yhat0, beta1, beta2, backend):
    b = z.shape[0]
    mask = lambda: torch.empty((b,), dtype=torch.bool, device=z.device)  # noqa: E731
    return torch.empty((), dtype=_acc_dtype(z.dtype), device=z.device), mask(), mask(), mask()


@torch.library.custom_op("fastpurify::dual_logit_loss_backward", mutates_args=())
def _dual_logit_loss_backward(z: Tensor, z0: Tensor, y: Tensor, a: Tensor, a0: Tensor, s: Tensor, gout: Tensor,
                              beta1: float, beta2: float, backend: str) -> Tuple[Tensor, Tensor]:
    _, backward = _backend.implementation(OP, backend)
    dz, dz0 = backward(z.contiguous(), z0.contiguous(), y.contiguous(), a.contiguous(), a0.contiguous(),
                       s.contiguous(), gout.contiguous(), float(beta1), float(beta2))
    return dz, dz0


@_dual_logit_loss_backward.register_fake
def _(z, z0, y, a, a0, s, gout, beta1, beta2, backend):
    return torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(
        z0, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    z, z0, y, _, _, beta1, beta2, backend = inputs
    _, a, a0, s = output
    ctx.save_for_backward(z, z0, y, a, a0, s)
    ctx.args = (beta1, beta2, backend)


def _backward(ctx, gloss, _ga, _ga0, _gs):
    z, z0, y, a, a0, s = ctx.saved_tensors
    beta1, beta2, backend = ctx.args
    if gloss is None:
        return None, None, None, None, None, None, None, None
    dz, dz0 = _dual_logit_loss_backward(z, z0, y, a, a0, s, gloss, beta1, beta2, backend)
    return dz, dz0, None, None, None, None, None, None


_dual_logit_loss.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def dual_logit_loss(
    z: Tensor,
    z0: Tensor,
    y: Tensor,
    yhat: Tensor,
    yhat0: Tensor,
    *,
    beta1: float = 0.01,
    beta2: float = 1.0,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """SAU's shared-PGD loss on the two models' logits at ``x + δ``, and the masks it is built from.

    Per row: ``p = softmax z``, ``p0 = softmax z0``; ``a = argmax z ≠ ŷ``; ``a0 = argmax z0 ≠ ŷ0``;
    ``s = a ∧ a0 ∧ (argmax z = argmax z0)`` (argmax ties go to the first index, as ``torch.argmax``);
    ``L_adv = −[Σ_{¬a} CE(z_i, y_i) + Σ_{¬a0} CE(z0_i, y_i)] / (2B)``; ``L_share = (1/B) Σ_{¬s} JS(p_i, p0_i)``
    with both probabilities floored at 1e-8 (the formula of :func:`fastpurify.reference.dual_logit.js_rows_ref`);
    ``loss = beta1·L_adv + beta2·L_share``. Rows whose terms are all masked contribute 0. Differentiable in
    ``z`` and ``z0`` (``torch.autograd.grad(loss, [z, z0])``); the masks are constants. No host sync.

    Shapes: ``z = f(x+δ)``, ``z0 = f0(x+δ)`` (B, C) floating (same dtype and device); ``y`` true labels,
    ``yhat = argmax f(x)``, ``yhat0 = argmax f0(x)`` (B,) integers in [0, C) — the range is not checked
    (that would sync the host): an out-of-range ``y`` gives a NaN loss in the compiled backends and an error
    in the ``torch`` one. Returns ``(loss, a, a0, s)``: ``loss`` 0-d in fp32 (fp64 for fp64 logits);
    ``a``, ``a0``, ``s`` (B,) bool. ``backend``: ``"auto"``/None (then ``FASTPURIFY_BACKEND``, then CUDA:
    cuda > triton > torch; CPU: cpp > torch), or one of ``"cuda"``, ``"triton"``, ``"cpp"``, ``"torch"``.

    Example::

        >>> import torch, fastpurify.ops as ops
        >>> z = torch.randn(8, 10, requires_grad=True); z0 = torch.randn(8, 10, requires_grad=True)
        >>> y = torch.randint(0, 10, (8,)); yhat, yhat0 = z.argmax(1), z0.argmax(1)
        >>> loss, a, a0, s = ops.dual_logit_loss(z, z0, y, yhat, yhat0)
        >>> dz, dz0 = torch.autograd.grad(loss, [z, z0]); bool(a.any())   # at the clean point nothing is fooled
        False
    """
    _check(z, z0, y, yhat, yhat0, beta1, beta2)
    name = _backend.resolve(OP, backend, device_type=z.device.type, dtype=z.dtype)
    labels = [t if t.dtype == torch.int64 else t.long() for t in (y, yhat, yhat0)]
    return _dual_logit_loss(z, z0, *labels, float(beta1), float(beta2), name)
