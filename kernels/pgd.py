"""Triton kernels of the PGD perturbation update (kernel family 1). Contract: ``fastpurify/ops/pgd.py``.

- ``_pgd_update_kernel``: L∞, one pass over δ, its gradient and (optionally) the clean input; each program
  handles one BLOCK of the flat view with 64-bit offsets (the update is memory-bound: 12–16 bytes/element).
- ``_pgd_update_sample_kernel``: L2/L1, one program per sample: the gradient norm (L2), the norm of the
  stepped δ, then the rescaled δ — three sweeps over C·H·W elements that stay in cache, no host loop.

Both optionally write the model input ``(x + δ − mean)/std`` into ``out_x`` (its own dtype and strides, e.g.
bf16 channels_last) in their last sweep. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _finish(d_ptr, x_ptr, out_ptr, mean_ptr, std_ptr, offs, mask, y, nx, C, H, W, so_m, so_c, so_h, so_w,
            lo, hi, HAS_X: tl.constexpr, HAS_BOX: tl.constexpr, HAS_OUT: tl.constexpr, HAS_NORM: tl.constexpr):
    """Box clamp, store δ, write the model input (shared last step of both kernels)."""
    if HAS_X:
        xv = tl.load(x_ptr + offs % nx, mask=mask, other=0.0).to(y.dtype)
        if HAS_BOX:
            z = xv + y
            # where-based clamps keep NaN like torch.clamp (min/max instructions would drop it).
            z = tl.where(z < lo, lo, z)
            z = tl.where(z > hi, hi, z)
            y = z - xv
    stored = y.to(d_ptr.dtype.element_ty)
    tl.store(d_ptr + offs, stored, mask=mask)
    if HAS_OUT:
        w = offs % W
        h = (offs // W) % H
        c = (offs // (W * H)) % C
        m = offs // (W * H * C)
        v = xv + stored.to(y.dtype)
        if HAS_NORM:
            mu = tl.load(mean_ptr + c, mask=mask, other=0.0).to(y.dtype)
            sd = tl.load(std_ptr + c, mask=mask, other=1.0).to(y.dtype)
            v = (v - mu) / sd
        tl.store(out_ptr + m * so_m + c * so_c + h * so_h + w * so_w, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_update_kernel(d_ptr, g_ptr, x_ptr, out_ptr, mean_ptr, std_ptr, n, nx, C, H, W, so_m, so_c, so_h, so_w,
                       step: tl.float64, eps: tl.float64, lo: tl.float64, hi: tl.float64,
                       HAS_X: tl.constexpr, HAS_BOX: tl.constexpr, HAS_OUT: tl.constexpr, HAS_NORM: tl.constexpr,
                       FP64: tl.constexpr, BLOCK: tl.constexpr):
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
    y = d + tl.where(g > 0, step, tl.where(g < 0, -step, 0.0))
    y = tl.where(y < -eps, -eps, y)
    y = tl.where(y > eps, eps, y)
    _finish(d_ptr, x_ptr, out_ptr, mean_ptr, std_ptr, offs, mask, y, nx, C, H, W, so_m, so_c, so_h, so_w,
            tl.cast(lo, d.dtype), tl.cast(hi, d.dtype), HAS_X, HAS_BOX, HAS_OUT, HAS_NORM)


@triton.jit
def _pgd_update_sample_kernel(d_ptr, g_ptr, x_ptr, out_ptr, mean_ptr, std_ptr, S, nx, C, H, W,
                              so_m, so_c, so_h, so_w, step: tl.float64, eps: tl.float64, lo: tl.float64,
                              hi: tl.float64, L2: tl.constexpr, HAS_X: tl.constexpr, HAS_BOX: tl.constexpr,
                              HAS_OUT: tl.constexpr, HAS_NORM: tl.constexpr, FP64: tl.constexpr,
                              BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * S
    if FP64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    zero = tl.sum(acc, axis=0)
    st = tl.cast(step, acc.dtype)
    # Sweep 1 (L2): ||g||_2 -> the gradient's scale step / (||g|| + 1e-10) (torchattacks' PGDL2 guard).
    scale = st
    if L2:
        ss = acc
        for start in range(0, S, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            g = tl.load(g_ptr + base + idx, mask=idx < S, other=0.0).to(acc.dtype)
            ss += g * g
        scale = st / (tl.sqrt(tl.sum(ss, axis=0)) + 1e-10)
    # Sweep 2: the norm of the stepped delta (recomputed in sweep 3 rather than stored: one rounding of δ).
    nacc = acc
    for start in range(0, S, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = idx < S
        d = tl.load(d_ptr + base + idx, mask=m, other=0.0).to(acc.dtype)
        g = tl.load(g_ptr + base + idx, mask=m, other=0.0).to(acc.dtype)
        if L2:
            y = d + g * scale
            nacc += y * y
        else:
            y = d + tl.where(g > 0, st, tl.where(g < 0, -st, 0.0))
            nacc += tl.abs(y)
    total = tl.sum(nacc, axis=0) + zero
    if L2:
        total = tl.sqrt(total)
    factor = tl.cast(eps, acc.dtype) / total
    factor = tl.where(factor > 1.0, 1.0, factor)  # min(1, eps/norm) keeping a NaN norm NaN
    # Sweep 3: rescale, box clamp, store, model input.
    for start in range(0, S, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = idx < S
        d = tl.load(d_ptr + base + idx, mask=m, other=0.0).to(acc.dtype)
        g = tl.load(g_ptr + base + idx, mask=m, other=0.0).to(acc.dtype)
        if L2:
            y = (d + g * scale) * factor
        else:
            y = (d + tl.where(g > 0, st, tl.where(g < 0, -st, 0.0))) * factor
        _finish(d_ptr, x_ptr, out_ptr, mean_ptr, std_ptr, base + idx, m, y, nx, C, H, W, so_m, so_c, so_h, so_w,
                tl.cast(lo, acc.dtype), tl.cast(hi, acc.dtype), HAS_X, HAS_BOX, HAS_OUT, HAS_NORM)


def pgd_update_triton(delta, grad, x, out_x, mean, std, step, eps, lower, upper, descend, norm, out_strides):
    """Launcher (backend contract of ``fastpurify.ops.pgd``): contiguous ``delta`` updated in place.

    Shapes: ``delta``, ``grad``: any, same numel; ``x``: ``None`` or the trailing ``x.numel()`` elements of
    ``delta``'s layout; ``out_x``: ``None`` or ``delta``'s shape with (M, C, H, W) strides ``out_strides``.
    """
    import torch

    from fastpurify.ops.pgd import view4

    n = delta.numel()
    if n == 0:
        return
    m, c, h, w = view4(delta.shape)
    has_x = x is not None
    has_box = has_x and (lower is not None or upper is not None)
    has_out = out_x is not None
    so = out_strides if has_out else [0, 0, 0, 0]
    inf = float("inf")
    args = dict(
        step=-step if descend else step, eps=eps, lo=-inf if lower is None else lower,
        hi=inf if upper is None else upper, HAS_X=has_x, HAS_BOX=has_box, HAS_OUT=has_out,
        HAS_NORM=mean is not None, FP64=delta.dtype == torch.float64, BLOCK=_BLOCK,
    )
    ptrs = (delta, grad, x if has_x else delta, out_x if has_out else delta, mean if mean is not None else delta,
            std if std is not None else delta)
    nx = x.numel() if has_x else n
    if norm == "linf":
        _pgd_update_kernel[(triton.cdiv(n, _BLOCK),)](*ptrs, n, nx, c, h, w, *so, **args)
    else:
        _pgd_update_sample_kernel[(m,)](*ptrs, c * h * w, nx, c, h, w, *so, L2=norm == "l2", **args)



def aot_cases(full: bool = False):
    """Launches to compile ahead of time (``fastpurify/kernels/aot.py``) on a CIFAR batch: every registered dtype
    × norm with none and all of (x, box, out_x, normalization), so every option value meets every dtype and path
    (the seven valid combinations with ``full``); out_x in bf16 channels_last (a model under autocast) for an
    (R, B, C, H, W) δ."""
    import torch

    from fastpurify.ops.pgd import _out_strides

    from .aot import meta, triton_dtypes

    def case(dtype, norm, has_x, box, out, normz, shape=(128, 3, 32, 32), out_dtype=None, channels_last=False):
        delta = meta(shape, dtype)
        x = meta(shape[-4:], dtype) if has_x else None
        out_x = meta(shape, out_dtype or dtype, channels_last) if out else None
        mean = meta((shape[-3],)) if normz else None
        return lambda: pgd_update_triton(delta, meta(shape, dtype), x, out_x, mean, mean, 2 / 255, 8 / 255,
                                         0.0 if box else None, 1.0 if box else None, False, norm,
                                         _out_strides(out_x) if out else None)

    flags = [(False, False, False, False), (True, False, False, False), (True, True, False, False),
             (True, False, True, False), (True, True, True, False), (True, False, True, True), (True, True, True, True)]
    for dtype in triton_dtypes("pgd_update"):
        for norm in ("linf", "l2", "l1"):
            for f in flags if full else (flags[0], flags[-1]):
                yield f"{str(dtype)[6:]}-{norm}-x{f[0]:d}box{f[1]:d}out{f[2]:d}norm{f[3]:d}", case(dtype, norm, *f)
    for norm in ("linf", "l2"):
        yield f"float32-{norm}-RB-out-bf16-channels_last", case(torch.float32, norm, True, True, True, True,
                                                                 (4, 128, 3, 32, 32), torch.bfloat16, True)
