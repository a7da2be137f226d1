"""Triton kernels of the conjugate-gradient vector updates (kernel family 3). Contract: ``fastpurify/ops/cg.py``.

- ``_cg_step_kernel``: ``x += αp; r −= αAp`` for one BLOCK of one system's row, α = rr/pᵀAp read from the
  per-system scalars on the device, and the block's partial ‖r‖² written to a partial-sum buffer (phase 1).
  Grid (blocks, R). Inactive systems mask every load and store: they cost one scalar read per program.
- ``_cg_finalize_kernel``: one program per system adds its partials in a fixed order (phase 2: a
  deterministic grid-wide reduction, no atomics) in fp64, then applies the mask and the status bookkeeping.
- ``_cg_direction_kernel``: ``p = r + βp``, β = rr_new/rr per system.

A list of tensors (parameter-shaped pieces of one vector) launches phase 1 once per tensor into disjoint
slices of one partial buffer, then phase 2 once: one ‖r‖² per system over all pieces, no host sync.
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import triton
import triton.language as tl

_BLOCK = 1024
_FINAL_BLOCK = 512


@triton.jit
def _is_active(rr_ptr, status_ptr, s, tol2):
    rr = tl.load(rr_ptr + s)
    st = tl.load(status_ptr + s)
    return rr, (rr > tl.cast(tol2, rr.dtype)) & (st >= 0)


@triton.jit
def _cg_step_kernel(x_ptr, r_ptr, p_ptr, ap_ptr, rr_ptr, pap_ptr, status_ptr, part_ptr, n, per_sys, first,
                    tol2: tl.float64, BLOCK: tl.constexpr):
    # tol2 arrives as fp64 (a Python float would be typed fp32) and is rounded once to the data type, as
    # torch rounds a Python scalar compared with a tensor.
    pid = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    rr, on = _is_active(rr_ptr, status_ptr, s, tol2)
    pap = tl.load(pap_ptr + s)
    alpha = tl.where(on, rr / tl.where(on, pap, 1.0), 0.0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.where(on, n, 0)  # an inactive system reads and writes nothing
    idx = s * n + offs
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    p = tl.load(p_ptr + idx, mask=mask, other=0.0)
    r = tl.load(r_ptr + idx, mask=mask, other=0.0)
    ap = tl.load(ap_ptr + idx, mask=mask, other=0.0)
    x = x + alpha * p
    r = r - alpha * ap
    tl.store(x_ptr + idx, x, mask=mask)
    tl.store(r_ptr + idx, r, mask=mask)
    tl.store(part_ptr + s * per_sys + first + pid, tl.sum(r * r, axis=0))


@triton.jit
def _cg_finalize_kernel(part_ptr, per_sys, rr_ptr, pap_ptr, rr_new_ptr, iters_ptr, status_ptr, tol2: tl.float64,
                        BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, per_sys, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + s * per_sys + i, mask=i < per_sys, other=0.0).to(tl.float64)
    rr, on = _is_active(rr_ptr, status_ptr, s, tol2)
    total = tl.sum(acc, axis=0).to(rr.dtype)
    pap = tl.load(pap_ptr + s)
    st = tl.load(status_ptr + s)
    it = tl.load(iters_ptr + s) + tl.where(on, 1, 0)
    # x - x == 0 is false exactly for NaN and ±Inf.
    finite = ((total - total) == 0.0) & ((pap - pap) == 0.0)
    bad = on & (finite == 0)
    neg = on & finite & (pap <= 0.0) & (st == 0)
    tl.store(rr_new_ptr + s, tl.where(on, total, rr))
    tl.store(iters_ptr + s, it)
    tl.store(status_ptr + s, tl.where(bad, -it, tl.where(neg, it, st)))


@triton.jit
def _cg_direction_kernel(p_ptr, r_ptr, rr_ptr, rr_new_ptr, status_ptr, n, tol2: tl.float64, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    rr, on = _is_active(rr_ptr, status_ptr, s, tol2)
    beta = tl.where(on, tl.load(rr_new_ptr + s) / tl.where(on, rr, 1.0), 0.0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.where(on, n, 0)  # an inactive system reads and writes nothing
    idx = s * n + offs
    p = tl.load(p_ptr + idx, mask=mask, other=0.0)
    r = tl.load(r_ptr + idx, mask=mask, other=0.0)
    tl.store(p_ptr + idx, r + beta * p, mask=mask)


def cg_step_triton(x, r, p, ap, rr, pap, rr_new, iters, status, tol2):
    """Launcher (backend contract of ``fastpurify.ops.cg``): lists of contiguous tensors updated in place.

    Shapes: ``x``, ``r``, ``p``, ``ap``: matching lists, tensor i with R·n_i elements (row s = system s);
    ``rr``, ``pap``, ``rr_new`` (data dtype), ``iters``, ``status`` (int32): R elements each.
    """
    import torch

    nsys = rr.numel()
    rows = [t.numel() // nsys for t in x]
    blocks = [triton.cdiv(n, _BLOCK) for n in rows]
    per_sys = sum(blocks)
    part = torch.empty(max(1, nsys * per_sys), dtype=rr.dtype, device=rr.device)
    first = 0
    for xi, ri, pi, api, n, nb in zip(x, r, p, ap, rows, blocks):
        if nb:
            _cg_step_kernel[(nb, nsys)](xi, ri, pi, api, rr, pap, status, part, n, per_sys, first, tol2, BLOCK=_BLOCK)
        first += nb
    _cg_finalize_kernel[(nsys,)](part, per_sys, rr, pap, rr_new, iters, status, tol2, BLOCK=_FINAL_BLOCK)


def cg_direction_triton(p, r, rr, rr_new, status, tol2):
    """Launcher: ``p = r + βp`` per system, lists of contiguous tensors (R·n_i elements each)."""
    nsys = rr.numel()
    for pi, ri in zip(p, r):
        n = pi.numel() // nsys
        if n:
            _cg_direction_kernel[(triton.cdiv(n, _BLOCK), nsys)](pi, ri, rr, rr_new, status, n, tol2, BLOCK=_BLOCK)


def aot_cases(full: bool = False):
    """Launches to compile ahead of time (``fastpurify/kernels/aot.py``): one CG iteration (step, then direction)
    in every registered dtype on a flat trigger-space system (3,072 unknowns; R = 1 and R = 4 systems) and on a
    list of parameter-shaped tensors (SmallVGG-sized pieces of one vector)."""
    import torch

    from .aot import meta, triton_dtypes

    def case(dtype, shapes, r):
        vecs = [meta((r,) + s, dtype) for s in shapes]
        rr, st = meta((r,), dtype), meta((r,), torch.int32)

        def run():
            cg_step_triton(vecs, vecs, vecs, vecs, rr, rr, rr, st, st, 1e-12)
            cg_direction_triton(vecs, vecs, rr, rr, st, 1e-12)

        return run

    for dtype in triton_dtypes("cg_step"):
        for r in (1, 4):
            yield f"{str(dtype)[6:]}-trigger-R{r}", case(dtype, [(3, 32, 32)], r)
        yield f"{str(dtype)[6:]}-params", case(dtype, [(64, 3, 3, 3), (64,), (128, 64, 3, 3), (10, 512)], 1)
