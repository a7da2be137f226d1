"""Triton kernels of the PGD perturbation update (kernel family 1).

``_pgd_update_kernel`` is one pass over δ, its gradient and (optionally) the clean input: the update is
memory-bound (12–16 bytes per fp32 element), so each program handles one BLOCK of a flat view with 64-bit
offsets. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _pgd_update_kernel(d_ptr, g_ptr, x_ptr, n, nx, step: tl.float64, eps: tl.float64, lo: tl.float64, hi: tl.float64,
                       HAS_BOX: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    # Scalars arrive as fp64 (a plain Python float would be typed fp32, losing precision for fp64 δ) and are
    # rounded once to the compute type, as torch does with Python scalars.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if FP64:
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    step = tl.cast(step, d.dtype)
    eps = tl.cast(eps, d.dtype)
    # step * sign(g) with torch.sign's convention: sign(0) = sign(NaN) = 0.
    s = tl.where(g > 0, step, tl.where(g < 0, -step, 0.0))
    y = d + s
    # where-based clamps keep NaN like torch.clamp (min/max instructions would drop it).
    y = tl.where(y < -eps, -eps, y)
    y = tl.where(y > eps, eps, y)
    if HAS_BOX:
        if FP64:
            xv = tl.load(x_ptr + offs % nx, mask=mask, other=0.0).to(tl.float64)
        else:
            xv = tl.load(x_ptr + offs % nx, mask=mask, other=0.0).to(tl.float32)
        lo = tl.cast(lo, d.dtype)
        hi = tl.cast(hi, d.dtype)
        z = xv + y
        z = tl.where(z < lo, lo, z)
        z = tl.where(z > hi, hi, z)
        y = z - xv
    tl.store(d_ptr + offs, y.to(d_ptr.dtype.element_ty), mask=mask)


def pgd_update_triton(delta, grad, x, step, eps, lower, upper, descend):
    """Launcher (backend contract of ``fastpurify.ops.pgd``): contiguous ``delta`` updated in place.

    Shapes: ``delta``, ``grad``: any, same numel; ``x``: ``None`` or the trailing ``x.numel()`` elements of
    ``delta``'s layout (broadcast over leading dimensions).
    """
    import torch

    n = delta.numel()
    if n == 0:
        return
    has_box = x is not None and (lower is not None or upper is not None)
    nx = x.numel() if has_box else n
    inf = float("inf")
    grid = (triton.cdiv(n, _BLOCK),)
    _pgd_update_kernel[grid](
        delta, grad, x if has_box else delta, n, nx,
        -step if descend else step, eps,
        -inf if lower is None else lower, inf if upper is None else upper,
        HAS_BOX=has_box, FP64=delta.dtype == torch.float64, BLOCK=_BLOCK,
    )
