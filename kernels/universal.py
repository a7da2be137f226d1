"""Triton kernels of the universal-perturbation update (kernel family 1). Contract: ``fastpurify/ops/universal.py``.

delta: K perturbations of S = C·H·W elements; grad: K batches of B rows of S. The grid is (column blocks,
batch splits, K): a batch of 256 CIFAR gradients has only 3 column blocks of 1024, so the B rows are also
split into nsplit slices to fill the GPU.

- ``_universal_update_kernel``: one pass over grad. Unsplit (nsplit = 1) it sums its column block over all B
  rows and finishes the step itself; otherwise (SPLIT) it writes the slice's partial sums (fp32/fp64) to a
  workspace. The split count is a runtime argument, not a constexpr: as a constexpr it compiled one binary per
  count (1 to 88 on a 132-SM H100 as the batch size varies), and a ragged last batch paid a JIT compile.
- ``_universal_finish_kernel`` (split): sums the nsplit partials in slice order (deterministic, no
  atomics), then finishes the step.
- Finishing the step (``_finish_step``): mean, penalty, SGD step; none/linf write δ; l2/l1 write the stepped
  value (fp32/fp64) and the block's partial norm.
- ``_universal_rescale_kernel`` (l2/l1): every program sums its perturbation's partial norms in block order and
  writes ``δ = y·min(1, radius/‖y‖)``.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import triton
import triton.language as tl

_BLOCK = 1024
_ROWS_PER_SPLIT = 16  # fewer rows per slice would make the partials' traffic a sizeable share of grad's


@triton.jit
def _finish_step(d_ptr, y_ptr, part_ptr, acc, cols, mask, kk, nb_pid, S, bf, step, wd2, radius,
                 MEAN: tl.constexpr, HAS_WD: tl.constexpr, NORM: tl.constexpr):
    """acc: the batch sum of this block's columns. NORM: 0 none, 1 l2, 2 l1, 3 linf."""
    d = tl.load(d_ptr + kk * S + cols, mask=mask, other=0.0).to(acc.dtype)
    g = acc
    if MEAN:
        g = g / tl.cast(bf, acc.dtype)
    if HAS_WD:
        g = g + tl.cast(wd2, acc.dtype) * d
    y = d + tl.cast(step, acc.dtype) * g
    if NORM == 3:
        r = tl.cast(radius, acc.dtype)
        y = tl.where(y < -r, -r, y)  # where-based clamps keep NaN like torch.clamp
        y = tl.where(y > r, r, y)
    if NORM == 1 or NORM == 2:
        tl.store(y_ptr + kk * S + cols, y, mask=mask)
        if NORM == 1:
            v = tl.where(mask, y * y, 0.0)
        else:
            v = tl.where(mask, tl.abs(y), 0.0)
        tl.store(part_ptr + kk * nb_pid + tl.program_id(0), tl.sum(v, axis=0))
    else:
        tl.store(d_ptr + kk * S + cols, y.to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _universal_update_kernel(d_ptr, g_ptr, y_ptr, part_ptr, split_ptr, S, B, rows_per_split, nsplit,
                             bf: tl.float64, step: tl.float64, wd2: tl.float64, radius: tl.float64,
                             MEAN: tl.constexpr, HAS_WD: tl.constexpr, NORM: tl.constexpr, SPLIT: tl.constexpr,
                             FP64: tl.constexpr, BLOCK: tl.constexpr):
    # Scalars arrive as fp64 (a plain Python float would be typed fp32) and are rounded once to the compute type.
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    kk = tl.program_id(2).to(tl.int64)
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < S
    if FP64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    b0 = sp * rows_per_split
    b1 = tl.minimum(b0 + rows_per_split, B)
    ptr = g_ptr + (kk * B + b0) * S + cols  # int64 offsets (kk is int64)
    for _ in range(b0, b1):  # rows in order: coalesced loads of one row's column block
        acc += tl.load(ptr, mask=mask, other=0.0).to(acc.dtype)
        ptr += S
    if SPLIT:
        tl.store(split_ptr + (kk * nsplit + sp) * S + cols, acc, mask=mask)
    else:
        _finish_step(d_ptr, y_ptr, part_ptr, acc, cols, mask, kk, tl.num_programs(0), S, bf, step, wd2, radius,
                     MEAN, HAS_WD, NORM)


@triton.jit
def _universal_finish_kernel(d_ptr, y_ptr, part_ptr, split_ptr, S, nsplit, bf: tl.float64, step: tl.float64,
                             wd2: tl.float64, radius: tl.float64, MEAN: tl.constexpr, HAS_WD: tl.constexpr,
                             NORM: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    kk = tl.program_id(1).to(tl.int64)
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < S
    if FP64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for sp in range(0, nsplit):  # slice order: the same sum on every run
        acc += tl.load(split_ptr + (kk * nsplit + sp) * S + cols, mask=mask, other=0.0)
    _finish_step(d_ptr, y_ptr, part_ptr, acc, cols, mask, kk, tl.num_programs(0), S, bf, step, wd2, radius,
                 MEAN, HAS_WD, NORM)


@triton.jit
def _universal_rescale_kernel(d_ptr, y_ptr, part_ptr, S, NB, radius: tl.float64, L2: tl.constexpr,
                              NB_P2: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    kk = tl.program_id(1).to(tl.int64)
    idx = tl.arange(0, NB_P2)
    parts = tl.load(part_ptr + kk * NB + idx, mask=idx < NB, other=0.0)
    total = tl.sum(parts, axis=0)  # every program reduces the same partials the same way: one norm per k
    if L2:
        total = tl.sqrt(total)
    factor = tl.cast(radius, parts.dtype) / total
    factor = tl.where(factor > 1.0, 1.0, factor)  # min(1, radius/norm), keeping a NaN norm NaN
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < S
    y = tl.load(y_ptr + kk * S + cols, mask=mask, other=0.0)
    tl.store(d_ptr + kk * S + cols, (y * factor).to(d_ptr.dtype.element_ty), mask=mask)


def _num_sms(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a few programs, enough to exercise the split path in the tests


def universal_update_triton(delta, grad, k, b, step, mean, weight_decay, norm, radius, descend):
    """Launcher (backend contract of ``fastpurify.ops.universal``): contiguous ``delta`` (K·S) updated in place
    from contiguous ``grad`` (K·B·S)."""
    import torch

    s = delta.numel() // k
    if s == 0:
        return
    acc_dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    nb = triton.cdiv(s, _BLOCK)
    # Split the batch when the column blocks alone would leave most of the GPU idle (2 waves of programs).
    nsplit = max(1, min(triton.cdiv(b, _ROWS_PER_SPLIT), triton.cdiv(2 * _num_sms(delta.device), nb * k)))
    rows = triton.cdiv(b, nsplit)
    nsplit = triton.cdiv(b, rows)
    code = {"none": 0, "l2": 1, "l1": 2, "linf": 3}[norm]
    rescale = code in (1, 2)
    dev = delta.device
    ybuf = torch.empty(k * s if rescale else 1, dtype=acc_dtype, device=dev)
    part = torch.empty(k * nb if rescale else 1, dtype=acc_dtype, device=dev)
    split = torch.empty(k * nsplit * s if nsplit > 1 else 1, dtype=acc_dtype, device=dev)
    args = dict(bf=float(b), step=-step if descend else step, wd2=2.0 * weight_decay, radius=radius,
                MEAN=bool(mean), HAS_WD=weight_decay != 0.0, NORM=code, FP64=acc_dtype == torch.float64,
                BLOCK=_BLOCK)
    _universal_update_kernel[(nb, nsplit, k)](delta, grad, ybuf, part, split, s, b, rows, nsplit,
                                              SPLIT=nsplit > 1, **args)
    if nsplit > 1:
        _universal_finish_kernel[(nb, k)](delta, ybuf, part, split, s, nsplit, **args)
    if rescale:
        _universal_rescale_kernel[(nb, k)](delta, ybuf, part, s, nb, radius=radius, L2=code == 1,
                                           NB_P2=triton.next_power_of_2(nb), BLOCK=_BLOCK)


def aot_cases(full: bool = False):
    """Launches to compile ahead of time (``fastpurify/kernels/aot.py``) on CIFAR perturbations: every registered
    dtype × norm, with (mean, weight decay) on for linf and l2, off for none and l1, and the batch split (256 rows)
    for none and l2, one slice (16 rows) for linf and l1, so that every option value meets every dtype in both the
    update and the finishing kernel (every combination with ``full``); K = 4; the rescale block of a 64×64 and a
    224×224 image."""
    import torch

    from .aot import meta, triton_dtypes

    def case(dtype, norm, mean, wd, b, k=1, chw=(3, 32, 32)):
        delta, grad = meta((k,) + chw, dtype), meta((k * b,) + chw, dtype)
        return lambda: universal_update_triton(delta, grad, k, b, 0.1, mean, wd, norm, 1.0, False)

    for dtype in triton_dtypes("universal_update"):
        for norm in ("none", "l2", "l1", "linf"):
            on, split = norm in ("linf", "l2"), norm in ("none", "l2")
            opts = ([(m, wd, b) for m in (False, True) for wd in (0.0, 1e-3) for b in (16, 256)] if full
                    else [(on, 1e-3 if on else 0.0, 256 if split else 16)])
            for m, wd, b in opts:
                yield f"{str(dtype)[6:]}-{norm}-mean{m:d}-wd{wd > 0:d}-b{b}", case(dtype, norm, m, wd, b)
    yield "float32-l2-K4", case(torch.float32, "l2", True, 0.0, 256, k=4)
    for hw in (64, 224):
        yield f"float32-l2-{hw}x{hw}", case(torch.float32, "l2", True, 0.0, 64, chw=(3, hw, hw))
