"""Triton kernels of the mask-weighted convolution (kernel family 2). Contract: ``fastpurify/ops/masked_conv.py``.

Implicit-GEMM convolutions (no im2col buffer: the input patch of each (row, k) pair is gathered by address), one
program per (row tile, column tile, group):

- ``_masked_conv2d_kernel``: forward, rows = N·OH·OW outputs, columns = C_out/groups, reduction = C_in/groups·KH·KW.
  The mask is applied while loading each weight tile (``W_eff`` is never written to memory); bias in the epilogue.
- ``_masked_conv2d_dx_kernel``: ∂L/∂x, rows = N·H·W inputs, columns = C_in/groups, reduction = C_out/groups·KH·KW
  (with the mask applied to the weight tile again); strided taps that miss the output grid are masked off.
- ``_masked_conv2d_dw_kernel``: ∂L/∂W_eff, rows = C_out/groups, columns = C_in/groups·KH·KW, reduction = N·OH·OW;
  its epilogue multiplies by the weight (→ ∂L/∂mask) and/or by the mask (→ ∂L/∂weight): ∂L/∂W_eff is never
  stored.

x, the output and ∂L/∂x are addressed through their strides (NCHW or channels_last alike); the weight and mask
are contiguous. Accumulation in fp32 (fp64 for fp64). The multi-tensor kernels (``_multi_mul_kernel``,
``_masked_adam_clamp_kernel``) walk a table of tensor addresses: one launch for every layer.
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

Not the default anywhere when the CUDA extension is built: :class:`fastpurify.masked.MaskedModel`'s default
("multi") path builds every W_eff in one launch and runs cuDNN's convolutions, and ``backend="auto"`` picks the
cuda backend (the fused mask around cuDNN) before triton. These convolutions run when asked for
(``backend="triton"``, ``MaskedModel(path="layer")``) or, as auto, on a CUDA machine without the extension. Why:
no GPU has timed them against cuDNN yet (specs/kernels.md: a Triton conv slower than cuDNN is not the default),
and fp32 must multiply exactly (``input_precision="ieee"``, the references run without TF32), so it runs on FMA
units, at up to 187 registers per thread with the tiles below (255 and a 24-byte spill before them); bf16 and
fp16 run on Hopper's wgmma (mma.sync on sm_80). Registers, spills and instructions of every variant:
``benchmarks/results/aot/`` (``python benchmarks/aot_resources.py``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tile sizes (BM, BN, BK) and launch options by dtype (the dot needs >= 16 in every dimension), chosen from the
# ahead-of-time compile of every variant for sm_90 and sm_80 under triton 3.7.1 and 3.9 (benchmarks/results/aot/;
# no GPU has timed them). fp32 runs on FMA (input_precision="ieee": no TF32): at 32x32x32 the forward took 255
# registers and spilled 24 bytes. At 32x32x16 ptxas aims at 128 registers and then spills 8 bytes in one dx variant
# (triton 3.9, channels_last, stride 2; 64x32x16 spilled in two), so maxnreg=255 lifts that target: no variant
# spills, at most 187 registers (16x32x16 would need no option, at half the reuse of each loaded tile). fp64 (DMMA)
# shares the fp32 tiles. bf16/fp16: BM = 64 lets Triton emit Hopper's wgmma (at BM = 32 it falls back to
# mma.sync); 64x64x32 takes 96/168/80 registers (forward/dx/dw), no spills.
_TILES = {torch.float32: (32, 32, 16), torch.float64: (32, 32, 16), torch.float16: (64, 64, 32),
          torch.bfloat16: (64, 64, 32)}
_OPTIONS = {torch.float32: {"maxnreg": 255}, torch.float64: {"maxnreg": 255}}
_BLOCK = 1024
_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _weff_tile(w_ptr, m_ptr, offs, ok, LOWP: tl.constexpr, UPCAST: tl.constexpr):
    """W_eff = weight * mask for one tile, rounded once to the weight dtype as the eager multiply is (under the
    interpreter, UPCAST, it stays fp32: the interpreter rounds fp32 -> bf16/fp16 by truncation, which would bias
    every weight of the tile)."""
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    if UPCAST:
        return w.to(tl.float32) * m.to(tl.float32)
    if LOWP:
        return (w.to(tl.float32) * m.to(tl.float32)).to(w.dtype)
    return w * m


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32/fp64 accumulation; exact fp32 products (no TF32: the references run without it).
    UPCAST: Triton 3.9's interpreter multiplies the raw bits of bf16/fp16 operands in its dot, so under it the
    low-precision tiles are widened first (exact: bf16/fp16 values are fp32 values).
    ``out_dtype=acc.dtype``: Triton 3.7 (torch 2.13's CUDA pin) types the product fp32 without it and then fails
    to add it to an fp64 accumulator (every fp64 variant failed to compile for sm_80/sm_90)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def _masked_conv2d_kernel(x_ptr, w_ptr, m_ptr, b_ptr, o_ptr, N, H, W, OH, OW, KH, KW, CIG, OCG,
                          sxn, sxc, sxh, sxw, son, soc, soh, sow, sh, sw, ph, pw, dh, dw,
                          HAS_BIAS: tl.constexpr, LOWP: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    g = tl.program_id(2)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok = rm < N * OH * OW
    n_ok = rn < OCG
    n = rm // (OH * OW)
    oh = (rm // OW) % OH
    ow = rm % OW
    oc = g * OCG + rn
    ktot = CIG * KH * KW
    x_base = x_ptr + n.to(tl.int64) * sxn + (g * CIG).to(tl.int64) * sxc
    acc = tl.zeros([BM, BN], dtype=tl.float64 if FP64 else tl.float32)
    for k0 in range(0, ktot, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < ktot
        ic = rk // (KH * KW)
        kh = (rk // KW) % KH
        kw = rk % KW
        ih = oh[:, None] * sh - ph + kh[None, :] * dh
        iw = ow[:, None] * sw - pw + kw[None, :] * dw
        a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_base[:, None] + ic[None, :] * sxc + ih * sxh + iw * sxw, mask=a_ok, other=0.0)
        # weight[oc, ic, kh, kw] contiguous: flat offset oc * ktot + rk
        b = _weff_tile(w_ptr, m_ptr, oc[None, :] * ktot + rk[:, None], k_ok[:, None] & n_ok[None, :], LOWP, UPCAST)
        acc = _dot(a, b, acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + oc, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    o_off = n.to(tl.int64)[:, None] * son + oc[None, :] * soc + (oh * soh + ow * sow)[:, None]
    tl.store(o_ptr + o_off, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _masked_conv2d_dx_kernel(g_ptr, w_ptr, m_ptr, dx_ptr, N, H, W, OH, OW, KH, KW, CIG, OCG,
                             sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, sh, sw, ph, pw, dh, dw,
                             LOWP: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    g = tl.program_id(2)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok = rm < N * H * W
    n_ok = rn < CIG
    n = rm // (H * W)
    ih = (rm // W) % H
    iw = rm % W
    khw = KH * KW
    ktot = OCG * khw
    g_base = g_ptr + n.to(tl.int64) * sgn + (g * OCG).to(tl.int64) * sgc
    acc = tl.zeros([BM, BN], dtype=tl.float64 if FP64 else tl.float32)
    for k0 in range(0, ktot, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < ktot
        ocl = rk // khw
        kh = (rk // KW) % KH
        kw = rk % KW
        th = ih[:, None] + ph - kh[None, :] * dh
        tw = iw[:, None] + pw - kw[None, :] * dw
        # output (oh, ow) = (th, tw) / stride when the division is exact and in range (masked before the divide
        # is used, so truncation of negative values does not matter)
        oh = th // sh
        ow = tw // sw
        a_ok = (m_ok[:, None] & k_ok[None, :] & (th >= 0) & (tw >= 0) & (oh * sh == th) & (ow * sw == tw)
                & (oh < OH) & (ow < OW))
        a = tl.load(g_base[:, None] + ocl[None, :] * sgc + oh * sgh + ow * sgw, mask=a_ok, other=0.0)
        # weight[g*OCG + ocl, ic, kh, kw]: flat offset (g*OCG + ocl) * CIG*khw + ic*khw + (kh*KW + kw)
        w_off = (g * OCG + ocl)[:, None] * (CIG * khw) + rn[None, :] * khw + (rk % khw)[:, None]
        b = _weff_tile(w_ptr, m_ptr, w_off, k_ok[:, None] & n_ok[None, :], LOWP, UPCAST)
        acc = _dot(a, b, acc, UPCAST)
    c = g * CIG + rn
    dx_off = n.to(tl.int64)[:, None] * sxn + c[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _masked_conv2d_dw_kernel(g_ptr, x_ptr, w_ptr, m_ptr, gm_ptr, gw_ptr, N, H, W, OH, OW, KH, KW, CIG, OCG,
                             sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, sh, sw, ph, pw, dh, dw,
                             NEED_MASK: tl.constexpr, NEED_WEIGHT: tl.constexpr, FP64: tl.constexpr,
                             UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    g = tl.program_id(2)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)  # output channel within the group
    rn = tl.program_id(1) * BN + tl.arange(0, BN)  # (ic, kh, kw) within the group
    khw = KH * KW
    ktot = CIG * khw
    m_ok = rm < OCG
    n_ok = rn < ktot
    ic = rn // khw
    kh = (rn // KW) % KH
    kw = rn % KW
    npix = N * OH * OW
    acc = tl.zeros([BM, BN], dtype=tl.float64 if FP64 else tl.float32)
    for k0 in range(0, npix, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < npix
        n = rk // (OH * OW)
        oh = (rk // OW) % OH
        ow = rk % OW
        a_off = (g * OCG + rm).to(tl.int64)[:, None] * sgc + (n.to(tl.int64) * sgn + oh * sgh + ow * sgw)[None, :]
        a = tl.load(g_ptr + a_off, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        ih = oh[:, None] * sh - ph + kh[None, :] * dh
        iw = ow[:, None] * sw - pw + kw[None, :] * dw
        b_ok = k_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b_off = n.to(tl.int64)[:, None] * sxn + (g * CIG + ic)[None, :] * sxc + ih * sxh + iw * sxw
        b = tl.load(x_ptr + b_off, mask=b_ok, other=0.0)
        acc = _dot(a, b, acc, UPCAST)
    # Epilogue: dL/dW_eff stays in registers; only its products with the weight / the mask are written.
    off = (g * OCG + rm)[:, None] * ktot + rn[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if NEED_MASK:
        w = tl.load(w_ptr + off, mask=ok, other=0.0).to(acc.dtype)
        tl.store(gm_ptr + off, (acc * w).to(gm_ptr.dtype.element_ty), mask=ok)
    if NEED_WEIGHT:
        m = tl.load(m_ptr + off, mask=ok, other=0.0).to(acc.dtype)
        tl.store(gw_ptr + off, (acc * m).to(gw_ptr.dtype.element_ty), mask=ok)


def _upcast(x) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16) and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _geometry(x, weight, stride, padding, dilation, groups):
    n, _, h, w = x.shape
    oc, cig, kh, kw = weight.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, h, w, oh, ow, kh, kw, cig, oc // groups


def _conv_args(stride, padding, dilation):
    return (int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]), int(dilation[0]), int(dilation[1]))


def _empty_like_layout(x, shape):
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def masked_conv2d_triton(x, weight, mask, bias, stride, padding, dilation, groups):
    """Forward launcher (contract: ``fastpurify/ops/masked_conv.py``); returns (N, C_out, OH, OW) in x's layout."""
    n, h, w, oh, ow, kh, kw, cig, ocg = _geometry(x, weight, stride, padding, dilation, groups)
    out = _empty_like_layout(x, (n, weight.shape[0], oh, ow))
    bm, bn, bk = _TILES[x.dtype]
    grid = (triton.cdiv(n * oh * ow, bm), triton.cdiv(ocg, bn), groups)
    _masked_conv2d_kernel[grid](
        x, weight, mask, bias if bias is not None else weight, out, n, h, w, oh, ow, kh, kw, cig, ocg,
        *x.stride(), *out.stride(), *_conv_args(stride, padding, dilation),
        HAS_BIAS=bias is not None, LOWP=x.dtype in (torch.float16, torch.bfloat16), FP64=x.dtype == torch.float64,
        UPCAST=_upcast(x), BM=bm, BN=bn, BK=bk,
        **_OPTIONS.get(x.dtype, {}))
    return out


def masked_conv2d_backward_triton(gout, x, weight, mask, stride, padding, dilation, groups, need_x, need_mask,
                                  need_weight, need_bias):
    """Backward launcher: (dx, dmask, dweight, dbias), None where not needed."""
    n, h, w, oh, ow, kh, kw, cig, ocg = _geometry(x, weight, stride, padding, dilation, groups)
    conv = _conv_args(stride, padding, dilation)
    fp64 = x.dtype == torch.float64
    bm, bn, bk = _TILES[x.dtype]
    gx = gm = gw = gb = None
    if need_x:
        gx = _empty_like_layout(x, x.shape)
        grid = (triton.cdiv(n * h * w, bm), triton.cdiv(cig, bn), groups)
        _masked_conv2d_dx_kernel[grid](gout, weight, mask, gx, n, h, w, oh, ow, kh, kw, cig, ocg, *gout.stride(),
                                       *gx.stride(), *conv, LOWP=x.dtype in (torch.float16, torch.bfloat16),
                                       FP64=fp64, UPCAST=_upcast(x), BM=bm, BN=bn, BK=bk,
                                       **_OPTIONS.get(x.dtype, {}))
    if need_mask or need_weight:
        gm = torch.empty_like(weight) if need_mask else None
        gw = torch.empty_like(weight) if need_weight else None
        grid = (triton.cdiv(ocg, bm), triton.cdiv(cig * kh * kw, bn), groups)
        _masked_conv2d_dw_kernel[grid](gout, x, weight, mask, gm if gm is not None else weight,
                                       gw if gw is not None else weight, n, h, w, oh, ow, kh, kw, cig, ocg,
                                       *gout.stride(), *x.stride(), *conv, NEED_MASK=need_mask,
                                       NEED_WEIGHT=need_weight, FP64=fp64, UPCAST=_upcast(x), BM=bm, BN=bn, BK=bk,
                                       **_OPTIONS.get(x.dtype, {}))
    if need_bias:
        gb = gout.sum(dim=(0, 2, 3), dtype=torch.float64 if fp64 else torch.float32).to(gout.dtype)
    return gx, gm, gw, gb


# --------------------------------------------------------------------------------------------------------
# Multi-tensor kernels: one launch over every layer's tensors through a table of addresses
# --------------------------------------------------------------------------------------------------------


def _tables(tensors, device):
    """(block -> tensor index, tensor -> first block, tensor -> numel) as device int64 tensors, and the grid."""
    numels = [t.numel() for t in tensors]
    blocks = [triton.cdiv(k, _BLOCK) for k in numels]
    first, owner = [], []
    for i, b in enumerate(blocks):
        first.append(len(owner))
        owner.extend([i] * b)
    mk = lambda v: torch.tensor(v, dtype=torch.int64).to(device)  # noqa: E731
    return mk(owner), mk(first), mk(numels), len(owner)


def _ptrs(tensors, device):
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device)


@triton.jit
def _multi_mul_kernel(a_tab, b_tab, o_tab, owner, first, numel, DT: tl.constexpr, LOWP: tl.constexpr,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(owner + pid)
    offs = (pid - tl.load(first + t)) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < tl.load(numel + t)
    a = tl.load(tl.load(a_tab + t).to(tl.pointer_type(DT)) + offs, mask=ok, other=0.0)
    b = tl.load(tl.load(b_tab + t).to(tl.pointer_type(DT)) + offs, mask=ok, other=0.0)
    if LOWP:
        v = (a.to(tl.float32) * b.to(tl.float32)).to(DT)
    else:
        v = a * b
    tl.store(tl.load(o_tab + t).to(tl.pointer_type(DT)) + offs, v, mask=ok)


def _multi_mul(a, b, out):
    if not a:
        return
    dev = a[0].device
    owner, first, numel, nblocks = _tables(a, dev)
    _multi_mul_kernel[(nblocks,)](_ptrs(a, dev), _ptrs(b, dev), _ptrs(out, dev), owner, first, numel,
                                  DT=_TL[a[0].dtype], LOWP=a[0].dtype in (torch.float16, torch.bfloat16),
                                  BLOCK=_BLOCK)


def build_masked_weights_triton_(weights, masks, outs):
    """``outs[i] = weights[i] * masks[i]``, one launch (contiguous tensors of one dtype)."""
    _multi_mul(weights, masks, outs)


def mask_grads_triton_(grad_weffs, weights, out_grads):
    """``out_grads[i] = grad_weffs[i] * weights[i]``, one launch (contiguous tensors of one dtype)."""
    _multi_mul(grad_weffs, weights, out_grads)


@triton.jit
def _masked_adam_clamp_kernel(m_tab, g_tab, a_tab, s_tab, owner, first, numel, w1: tl.float64, b2: tl.float64,
                              w2: tl.float64, c2: tl.float64, eps: tl.float64, neg_step: tl.float64, l1: tl.float64,
                              DT: tl.constexpr, HAS_L1: tl.constexpr, BLOCK: tl.constexpr):
    # Scalars arrive as fp64 (a plain Python float would be typed fp32, losing precision for fp64 masks).
    pid = tl.program_id(0)
    t = tl.load(owner + pid)
    offs = (pid - tl.load(first + t)) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < tl.load(numel + t)
    mp = tl.load(m_tab + t).to(tl.pointer_type(DT)) + offs
    ap = tl.load(a_tab + t).to(tl.pointer_type(DT)) + offs
    sp = tl.load(s_tab + t).to(tl.pointer_type(DT)) + offs
    m = tl.load(mp, mask=ok, other=0.0)
    g = tl.load(tl.load(g_tab + t).to(tl.pointer_type(DT)) + offs, mask=ok, other=0.0)
    ea = tl.load(ap, mask=ok, other=0.0)
    es = tl.load(sp, mask=ok, other=0.0)
    # Scalars rounded once to the compute type, then torch.optim.Adam's operations in its order (see the C++).
    w1 = tl.cast(w1, DT)
    if HAS_L1:
        lam = tl.cast(l1, DT)
        g = g + tl.where(m > 0, lam, tl.where(m < 0, -lam, 0.0))
    a = ea + w1 * (g - ea)
    s = es * tl.cast(b2, DT) + tl.cast(w2, DT) * g * g
    if DT == tl.float32:  # IEEE round-to-nearest sqrt and divisions, as torch's
        denom = tl.div_rn(tl.sqrt_rn(s), tl.cast(c2, DT)) + tl.cast(eps, DT)
        nm = m + tl.div_rn(tl.cast(neg_step, DT) * a, denom)
    else:  # fp64 sqrt and division are always correctly rounded
        denom = tl.sqrt(s) / tl.cast(c2, DT) + tl.cast(eps, DT)
        nm = m + (tl.cast(neg_step, DT) * a) / denom
    nm = tl.where(nm < 0.0, 0.0, nm)  # where-based clamp keeps NaN as torch.clamp does
    nm = tl.where(nm > 1.0, 1.0, nm)
    tl.store(ap, a, mask=ok)
    tl.store(sp, s, mask=ok)
    tl.store(mp, nm, mask=ok)


def masked_adam_clamp_triton_(masks, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, l1, step):
    """AWM's mask step over every layer in one launch (contract: ``fastpurify/ops/masked_conv.py``)."""
    if not masks:
        return
    dev = masks[0].device
    owner, first, numel, nblocks = _tables(masks, dev)
    bc1 = 1.0 - beta1 ** step
    c2 = (1.0 - beta2 ** step) ** 0.5
    _masked_adam_clamp_kernel[(nblocks,)](
        _ptrs(masks, dev), _ptrs(grads, dev), _ptrs(exp_avgs, dev), _ptrs(exp_avg_sqs, dev), owner, first, numel,
        1.0 - beta1, beta2, 1.0 - beta2, c2, eps, -(lr / bc1), l1, DT=_TL[masks[0].dtype], HAS_L1=l1 != 0.0,
        BLOCK=_BLOCK)


def aot_cases(full: bool = False):
    """Launches to compile ahead of time (``fastpurify/kernels/aot.py``) on PreAct-ResNet18 layers and a CIFAR
    batch of 128: forward with and without bias, dx, dmask and dweight of a 3×3 stride-1 layer in every
    registered dtype (NCHW), and in fp32 and bf16 channels_last, and the 1×1 stride-2 shortcut in fp32 (with
    ``full``: also the 3→64 stem and a 3×3 stride-2 layer, both layouts, every dtype, dmask and dweight together);
    the multi-tensor W_eff/mask-gradient product and AWM's Adam step (with and without L1) on SmallVGG-sized
    tensors."""
    from .aot import meta, triton_dtypes

    layers = {"3x3s1": (64, 64, 3, 1, 1), "1x1s2": (64, 128, 1, 2, 0), "stem": (3, 64, 3, 1, 1),
              "3x3s2": (64, 128, 3, 2, 1)}
    needs = [(True, True, False, True), (False, False, True, False)] + ([(False, True, True, False)] if full else [])

    def conv(dtype, layer, channels_last, n=128, hw=32):
        cin, cout, k, s, p = layers[layer]
        x, w = meta((n, cin, hw, hw), dtype, channels_last), meta((cout, cin, k, k), dtype)
        oh = (hw + 2 * p - k) // s + 1
        g = meta((n, cout, oh, oh), dtype, channels_last)
        geo = ((s, s), (p, p), (1, 1), 1)

        def run():
            masked_conv2d_triton(x, w, w, None, *geo)
            masked_conv2d_triton(x, w, w, meta((cout,), dtype), *geo)
            for need in needs:
                masked_conv2d_backward_triton(g, x, w, w, *geo, *need)

        return run

    for dtype in triton_dtypes("masked_conv2d"):
        name = str(dtype)[6:]
        for layer in layers if full else ("3x3s1",):
            for cl in (False, True) if full or dtype in (torch.float32, torch.bfloat16) else (False,):
                yield f"{name}-{layer}-{'channels_last' if cl else 'nchw'}", conv(dtype, layer, cl)
    if not full:
        yield "float32-1x1s2-nchw", conv(torch.float32, "1x1s2", False)
    shapes = [(64, 3, 3, 3), (64,), (128, 64, 3, 3), (128,), (10, 512)]
    for dtype in triton_dtypes("build_masked_weights"):
        ts = [meta(s, dtype) for s in shapes]
        yield f"{str(dtype)[6:]}-multi-mul", lambda ts=ts: build_masked_weights_triton_(ts, ts, ts)
    for dtype in triton_dtypes("masked_adam_clamp"):
        for l1 in (0.0, 1e-4):
            ts = [meta(s, dtype) for s in shapes]
            yield (f"{str(dtype)[6:]}-adam-l1{l1 > 0:d}",
                   lambda ts=ts, l1=l1: masked_adam_clamp_triton_(ts, ts, ts, ts, 0.1, 0.9, 0.999, 1e-8, l1, 3))
