"""Eager reference of the PGD perturbation update (kernel family 1).

This is the ``torch`` backend of ``fastpurify.ops.pgd_update_`` and the ground truth its C++, Triton and
CUDA implementations are tested against. It is written as the chain of eager ops a published attack runs
(e.g. torchattacks' PGD), with fp32 accumulation for half-precision δ.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

NORMS = ("linf",)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pgd_update_ref(
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
) -> Tensor:
    """One projected-gradient step on a perturbation; returns the new δ (differentiable; input unchanged).

    L∞: ``δ' = clamp(δ ± step·sign(grad), −eps, eps)``, ``+`` for ascent (default), ``−`` when
    ``descend``; then, when ``x`` is given, the box constraint ``δ' = clamp(x + δ', lower, upper) − x``
    (``lower``/``upper`` of ``None`` leave that side open).

    Shapes: ``delta``, ``grad``: (..., B, C, H, W) — any shape, e.g. (R, B, C, H, W) for R restarts;
    ``x``: the trailing dimensions of ``delta`` (broadcast over the leading ones). Returns ``delta``'s
    shape and dtype. Accumulates in fp32 (fp64 for fp64 inputs).

    Example::

        >>> d = torch.zeros(2, 3, 4, 4); g = torch.randn(2, 3, 4, 4); x = torch.rand(2, 3, 4, 4)
        >>> pgd_update_ref(d, g, step=2 / 255, eps=8 / 255, x=x).abs().max() <= 8 / 255
        tensor(True)
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; valid norms: {NORMS}")
    acc = _acc_dtype(delta.dtype)
    s = -step if descend else step
    y = delta.to(acc) + s * torch.sign(grad.to(acc))
    y = torch.clamp(y, -eps, eps)
    if x is not None and (lower is not None or upper is not None):
        xa = x.to(acc)
        y = torch.clamp(xa + y, lower, upper) - xa
    return y.to(delta.dtype)
