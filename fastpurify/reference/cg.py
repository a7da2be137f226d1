"""Eager reference of the conjugate-gradient vector updates (kernel family 3).

This is the ``torch`` backend of ``fastpurify.ops.cg_step_`` / ``cg_direction_`` and the ground truth their
C++, Triton and CUDA implementations are tested against: the chain of eager ops one CG iteration runs
(hypertorch's ``CG_torch.cg``), with α, β and ‖r‖² kept as device tensors and a per-system mask.

Conventions shared by every backend (contract of ``fastpurify/ops/cg.py``):

- R systems are solved at once. The per-system scalars ``rr`` (‖r‖²), ``pap`` (pᵀAp), ``rr_new``, ``iters``
  (int32) and ``status`` (int32) have shape (R,) — or () for one system. Every vector argument is a tensor
  or a list of tensors (the multi-tensor case: parameter-shaped pieces of one vector, never concatenated);
  each tensor's elements split into R equal contiguous rows, row s belonging to system s.
- A system is *active* while ``rr > tol²`` and ``status >= 0``; inactive systems do not change (α = β = 0
  is never applied to them: their x, r, p stay bit-identical).
- ``status`` records trouble on the device: ``-k`` freezes a system whose k-th iteration produced a
  non-finite pᵀAp or ‖r‖²; ``+k`` records (without freezing, as hypertorch continues) that its k-th
  iteration met non-positive curvature pᵀAp ≤ 0. k counts the system's own iterations (``iters + 1``).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

Vec = Union[Tensor, Sequence[Tensor]]


def as_list(v: Vec) -> List[Tensor]:
    """A vector argument as a list of tensors (a single tensor becomes a one-element list)."""
    return [v] if isinstance(v, Tensor) else list(v)


def rows(t: Tensor, nsys: int) -> Tensor:
    """``t`` viewed as (R, n): R systems, one contiguous row each."""
    return t.reshape(nsys, -1)


def sq_norm_ref(v: Vec, nsys: int) -> Tensor:
    """Per-system ‖v‖² over all tensors of ``v``: shape (R,)."""
    vs = as_list(v)
    return sum(rows(t, nsys).pow(2).sum(dim=1) for t in vs) if vs else torch.zeros(nsys)


def dot_ref(a: Vec, b: Vec, nsys: int) -> Tensor:
    """Per-system aᵀb over all tensors: shape (R,)."""
    return sum((rows(x, nsys) * rows(y, nsys)).sum(dim=1) for x, y in zip(as_list(a), as_list(b)))


def cg_step_ref(x: Vec, r: Vec, p: Vec, ap: Vec, rr: Tensor, pap: Tensor, iters: Tensor, status: Tensor, *,
                tol: float = 0.0) -> Tuple[List[Tensor], List[Tensor], Tensor, Tensor, Tensor]:
    """One CG update ``x += αp; r −= αAp; rr_new = ‖r‖²`` with ``α = rr/pAp``, masked per system.

    Returns new ``(x, r, rr_new, iters, status)`` (inputs unchanged): inactive systems (``rr ≤ tol²`` or
    ``status < 0``) keep x, r and rr; active ones count one more iteration; a non-finite pᵀAp or ‖r‖² sets
    ``status = −iters`` (frozen from then on), a first pᵀAp ≤ 0 sets ``status = +iters``.

    Shapes: ``x``, ``r``, ``p``, ``ap``: tensors or lists of tensors, matching, each with R·n_i elements;
    ``rr``, ``pap``, ``iters``, ``status``: (R,) or () — R = ``rr.numel()``.

    Example::

        >>> x, r, p = torch.zeros(3), torch.ones(3), torch.ones(3); ap = 2 * p
        >>> zero = torch.zeros((), dtype=torch.int32)
        >>> (x2,), (r2,), rr, it, st = cg_step_ref(x, r, p, ap, torch.tensor(3.0), torch.tensor(6.0), zero, zero)
        >>> x2.tolist(), float(rr), int(it)
        ([0.5, 0.5, 0.5], 0.0, 1)
    """
    nsys = rr.numel()
    shape = rr.shape
    rr1, pap1 = rr.reshape(nsys), pap.reshape(nsys)
    active = (rr1 > tol * tol) & (status.reshape(nsys) >= 0)
    alpha = torch.where(active, rr1 / pap1, torch.zeros_like(rr1)).unsqueeze(1)
    keep = active.unsqueeze(1)
    xs = [torch.where(keep, rows(t, nsys) + alpha * rows(q, nsys), rows(t, nsys)).reshape(t.shape)
          for t, q in zip(as_list(x), as_list(p))]
    rs = [torch.where(keep, rows(t, nsys) - alpha * rows(q, nsys), rows(t, nsys)).reshape(t.shape)
          for t, q in zip(as_list(r), as_list(ap))]
    total = sq_norm_ref(rs, nsys).to(rr.dtype)
    rr_new = torch.where(active, total, rr1)
    it = iters.reshape(nsys) + active.to(iters.dtype)
    bad = active & ~(torch.isfinite(total) & torch.isfinite(pap1))
    neg = active & ~bad & (pap1 <= 0) & (status.reshape(nsys) == 0)
    st = torch.where(bad, -it, torch.where(neg, it, status.reshape(nsys)))
    return xs, rs, rr_new.reshape(shape), it.reshape(shape), st.reshape(shape)


def cg_direction_ref(p: Vec, r: Vec, rr: Tensor, rr_new: Tensor, status: Tensor, *, tol: float = 0.0
                     ) -> List[Tensor]:
    """The new search direction ``p = r + βp`` with ``β = rr_new/rr`` for active systems (``rr > tol²`` and
    ``status ≥ 0``); returns the new ``p`` (a list; inputs unchanged). The caller then sets ``rr ← rr_new``.

    Shapes: ``p``, ``r``: tensors or lists of matching tensors with R·n_i elements; ``rr``, ``rr_new``,
    ``status``: (R,) or ().

    Example::

        >>> (p,) = cg_direction_ref(torch.ones(2), torch.tensor([1.0, -1.0]), torch.tensor(4.0), torch.tensor(2.0),
        ...                         torch.tensor(0, dtype=torch.int32))
        >>> p.tolist()
        [1.5, -0.5]
    """
    nsys = rr.numel()
    rr1 = rr.reshape(nsys)
    active = ((rr1 > tol * tol) & (status.reshape(nsys) >= 0)).unsqueeze(1)
    beta = (rr_new.reshape(nsys) / rr1).unsqueeze(1)
    return [torch.where(active, rows(rt, nsys) + beta * rows(pt, nsys), rows(pt, nsys)).reshape(pt.shape)
            for pt, rt in zip(as_list(p), as_list(r))]
