"""Triton kernels of SAU's dual-logit loss (kernel family 1). Contract: ``fastpurify/ops/dual_logit.py``.

- ``_dual_logit_loss_kernel``: one program per row; the whole row of C logits (C <= 1000 in practice) is one
  register block of BLOCK_C = next_power_of_2(C) lanes: max/argmax, both softmaxes, the masked
  cross-entropies, the Jensen–Shannon term; writes the row's masks and its two loss terms.
- ``_dual_logit_sum_kernel``: one program sums the row terms in a fixed order (deterministic, no atomics) and
  writes the 0-d loss.
- ``_dual_logit_loss_backward_kernel``: one program per row writes dL/dz and dL/dz0 from the saved masks and
  the upstream gradient, loaded from the device (no host sync).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# SAU floors both softmaxes at 1e-8 before the logarithms. A constexpr: the GPU compiler rejects any other
# global in a kernel (a plain float passed the interpreter and failed every sm_80/sm_90 compile).
_FLOOR = tl.constexpr(1e-8)
# One fixed block for the row sum, whatever the batch: min(1024, next_power_of_2(B)) compiled one binary per
# power of two of the batch size (a ragged last batch paid a JIT compile) for a single-program kernel.
_SUM_BLOCK = 1024


@triton.jit
def _softmax_row(ptr, cols, mask, ACC: tl.constexpr):
    """(p, log-sum-exp parts, argmax) of one row: p = exp(z − max)/Σ as F.softmax computes it."""
    z = tl.load(ptr + cols, mask=mask, other=float("-inf")).to(ACC)
    m = tl.max(z, axis=0)
    arg = tl.argmax(z, axis=0, tie_break_left=True)  # the first maximal index, as torch.argmax
    e = tl.where(mask, tl.exp(z - m), 0.0)
    total = tl.sum(e, axis=0)
    return z, e / total, m, tl.log(total), arg


@triton.jit
def _dual_logit_loss_kernel(z_ptr, z0_ptr, y_ptr, yh_ptr, yh0_ptr, a_ptr, a0_ptr, s_ptr, terms_ptr, C,
                            ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    z, p, m, lse, arg = _softmax_row(z_ptr + row * C, cols, mask, ACC)
    z0, p0, m0, lse0, arg0 = _softmax_row(z0_ptr + row * C, cols, mask, ACC)
    y = tl.load(y_ptr + row)
    a = arg != tl.load(yh_ptr + row)
    a0 = arg0 != tl.load(yh0_ptr + row)
    s = a & a0 & (arg == arg0)
    tl.store(a_ptr + row, a.to(tl.int8))
    tl.store(a0_ptr + row, a0.to(tl.int8))
    tl.store(s_ptr + row, s.to(tl.int8))
    # −log_softmax at the label, as F.cross_entropy: −(z_y − max − log Σ); NaN for a label outside [0, C)
    # (the range is not checked on the host: that would sync a GPU).
    valid = (y >= 0) & (y < C)
    zy = tl.sum(tl.where(cols == y, z, 0.0), axis=0)
    z0y = tl.sum(tl.where(cols == y, z0, 0.0), axis=0)
    nan = float("nan")
    ce = tl.where(valid, -(zy - m - lse), nan)
    ce0 = tl.where(valid, -(z0y - m0 - lse0), nan)
    adv = tl.where(a, 0.0, ce) + tl.where(a0, 0.0, ce0)
    q = tl.maximum(p, _FLOOR)
    q0 = tl.maximum(p0, _FLOOR)
    lm = tl.log(0.5 * (q + q0))
    js = 0.5 * (q * tl.log(q) + q0 * tl.log(q0)) - 0.5 * (q * lm + q0 * lm)
    js = tl.sum(tl.where(mask, js, 0.0), axis=0)
    tl.store(terms_ptr + row * 2, adv.to(ACC))
    tl.store(terms_ptr + row * 2 + 1, tl.where(s, 0.0, js).to(ACC))


@triton.jit
def _dual_logit_sum_kernel(terms_ptr, loss_ptr, B, nf: tl.float64, beta1: tl.float64, beta2: tl.float64,
                           ACC: tl.constexpr, BLOCK: tl.constexpr):
    sa = tl.zeros([BLOCK], dtype=ACC)
    ss = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, B, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        mask = rows < B
        sa += tl.load(terms_ptr + rows * 2, mask=mask, other=0.0)
        ss += tl.load(terms_ptr + rows * 2 + 1, mask=mask, other=0.0)
    n = tl.cast(nf, ACC)
    loss_adv = -tl.sum(sa, axis=0) / 2.0 / n
    loss_share = tl.sum(ss, axis=0) / n
    tl.store(loss_ptr, tl.cast(beta1, ACC) * loss_adv + tl.cast(beta2, ACC) * loss_share)


@triton.jit
def _dual_logit_loss_backward_kernel(z_ptr, z0_ptr, y_ptr, a_ptr, a0_ptr, s_ptr, gout_ptr, dz_ptr, dz0_ptr, C,
                                     nf: tl.float64, beta1: tl.float64, beta2: tl.float64, ACC: tl.constexpr,
                                     BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    g = tl.load(gout_ptr).to(ACC)
    _, p, _, _, _ = _softmax_row(z_ptr + row * C, cols, mask, ACC)
    _, p0, _, _, _ = _softmax_row(z0_ptr + row * C, cols, mask, ACC)
    y = tl.load(y_ptr + row)
    a = tl.load(a_ptr + row) != 0
    a0 = tl.load(a0_ptr + row) != 0
    s = tl.load(s_ptr + row) != 0
    # d loss / d CE_i and d loss / d JS_i of an unmasked row, in the reference's order of operations.
    n = tl.cast(nf, ACC)
    ca = -(g * tl.cast(beta1, ACC)) / 2.0 / n
    cs = (g * tl.cast(beta2, ACC)) / n
    bad = tl.where((y >= 0) & (y < C), 0.0, float("nan"))
    onehot = tl.where(cols == y, 1.0, 0.0)
    # JS: dJS/dp_j = 0.5·(log q_j − log m_j) where the 1e-8 floor did not act, then the softmax backward
    # p_j·(u_j − Σ_k p_k u_k).
    q = tl.maximum(p, _FLOOR)
    q0 = tl.maximum(p0, _FLOOR)
    lm = tl.log(0.5 * (q + q0))
    u = tl.where(mask & (p >= _FLOOR), 0.5 * (tl.log(q) - lm), 0.0)
    u0 = tl.where(mask & (p0 >= _FLOOR), 0.5 * (tl.log(q0) - lm), 0.0)
    dot = tl.sum(p * u, axis=0)
    dot0 = tl.sum(p0 * u0, axis=0)
    # CE: dCE/dz = p − onehot(y). Each gradient is stored as soon as it is complete: holding dz and dz0 together
    # spilled 4 bytes on sm_80 at 1,000 classes (benchmarks/results/aot/).
    dz = tl.where(a, 0.0, ca * (p - onehot + bad)) + tl.where(s, 0.0, cs * (p * (u - dot)))
    tl.store(dz_ptr + row * C + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    dz0 = tl.where(a0, 0.0, ca * (p0 - onehot + bad)) + tl.where(s, 0.0, cs * (p0 * (u0 - dot0)))
    tl.store(dz0_ptr + row * C + cols, dz0.to(dz0_ptr.dtype.element_ty), mask=mask)


def dual_logit_loss_triton(z, z0, y, yhat, yhat0, beta1, beta2):
    """Forward launcher (backend contract of ``fastpurify.ops.dual_logit``): contiguous (B, C) logits and (B,)
    int64 labels -> (0-d loss, a, a0, s)."""
    import torch

    b, c = z.shape
    fp64 = z.dtype == torch.float64
    acc, tl_acc = (torch.float64, tl.float64) if fp64 else (torch.float32, tl.float32)
    # Three separate byte tensors written as 0/1 and reinterpreted as bool (the outputs must not alias).
    masks = [torch.empty((b,), dtype=torch.int8, device=z.device) for _ in range(3)]
    terms = torch.empty((b, 2), dtype=acc, device=z.device)
    loss = torch.empty((), dtype=acc, device=z.device)
    _dual_logit_loss_kernel[(b,)](z, z0, y, yhat, yhat0, masks[0], masks[1], masks[2], terms, c, ACC=tl_acc,
                                  BLOCK_C=triton.next_power_of_2(c))
    _dual_logit_sum_kernel[(1,)](terms, loss, b, nf=float(b), beta1=beta1, beta2=beta2, ACC=tl_acc,
                                 BLOCK=_SUM_BLOCK)
    a, a0, s = (m.view(torch.bool) for m in masks)
    return loss, a, a0, s


def dual_logit_loss_backward_triton(z, z0, y, a, a0, s, gout, beta1, beta2):
    """Backward launcher: (dL/dz, dL/dz0) in the logits' dtype; ``gout`` is read on the device."""
    import torch

    b, c = z.shape
    dz, dz0 = torch.empty_like(z), torch.empty_like(z0)
    _dual_logit_loss_backward_kernel[(b,)](z, z0, y, a.view(torch.int8), a0.view(torch.int8), s.view(torch.int8),
                                           gout, dz, dz0, c, nf=float(b), beta1=beta1, beta2=beta2,
                                           ACC=tl.float64 if z.dtype == torch.float64 else tl.float32,
                                           BLOCK_C=triton.next_power_of_2(c))
    return dz, dz0


def aot_cases(full: bool = False):
    """Launches to compile ahead of time (``fastpurify/kernels/aot.py``): forward and backward for every registered
    logits dtype at 10 classes (CIFAR-10), and the smallest and largest row blocks in use, 2 and 1000 (ImageNet)
    classes, in fp32 (with ``full``: also 43 (GTSRB), 100 and 200 (Tiny-ImageNet), in every dtype); batch 128."""
    import torch

    from .aot import meta, triton_dtypes

    def case(dtype, c, b=128):
        z, y, m = meta((b, c), dtype), meta((b,), torch.int64), meta((b,), torch.bool)
        acc = torch.float64 if dtype == torch.float64 else torch.float32

        def run():
            dual_logit_loss_triton(z, z, y, y, y, 1.0, 1.0)
            dual_logit_loss_backward_triton(z, z, y, m, m, m, meta((), acc), 1.0, 1.0)

        return run

    for dtype in triton_dtypes("dual_logit_loss"):
        for c in (2, 10, 43, 100, 200, 1000) if full else (2, 10, 1000) if dtype == torch.float32 else (10,):
            yield f"{str(dtype)[6:]}-C{c}", case(dtype, c)
