"""Eager reference of the universal-perturbation update (kernel family 1).

This is the ``torch`` backend of ``fastpurify.ops.universal_update_`` and the ground truth its C++, Triton and
CUDA implementations are tested against. It is written as the chain of eager ops the published code runs on
its universal perturbation: I-BAU's perturbation pass (``loss = −CE(f(x+δ), ŷ) + 0.001‖δ‖²``, one SGD step of
lr 10 on δ; its notebook rescales δ into the L2 ball of radius 10) and AWM's trigger recovery (``Δ ← Δ + 10·∇Δ
CE``, then ``Δ ← Δ·min(1, τ/‖Δ‖₁)``, τ = 1000): the batch gradient is the sum (or mean) of the per-sample
gradients, the penalty's gradient is added, one step is taken, and the result is rescaled into a ball.
Accumulates in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

REDUCTIONS = ("sum", "mean")
NORMS = (None, "l2", "l1", "linf")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def universal_views(delta_shape: Tuple[int, ...], grad_shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """(K, B, S) of a valid (delta, grad) pair: K perturbations, B per-sample gradients each, S = C·H·W.

    ``delta``: (K, C, H, W) or (C, H, W) (K = 1); ``grad``: (B, C, H, W) (needs K = 1) or (K, B, C, H, W).
    """
    k = delta_shape[0] if len(delta_shape) == 4 else 1
    b = grad_shape[-4]
    s = delta_shape[-3] * delta_shape[-2] * delta_shape[-1]
    return k, b, s


def universal_update_ref(
    delta: Tensor,
    grad: Tensor,
    *,
    step: float,
    reduction: str = "sum",
    weight_decay: float = 0.0,
    norm: Optional[str] = None,
    radius: Optional[float] = None,
    descend: bool = False,
) -> Tensor:
    """One SGD step on a universal perturbation from a batch of per-sample gradients, then an optional
    ball rescale; returns the new δ (differentiable in ``delta`` and ``grad``; inputs unchanged).

    Per perturbation k:

    1. ``g = Σ_b grad[k, b]`` (``reduction="sum"``) or ``g = (1/B) Σ_b grad[k, b]`` (``"mean"``);
    2. when ``weight_decay > 0``: ``g ← g + 2·weight_decay·δ_k``, the gradient of the penalty
       ``weight_decay·‖δ_k‖₂²`` (I-BAU's ``0.001‖δ‖²``) added to the objective ``grad`` is the gradient of;
       ``weight_decay = 0`` adds nothing (not even ``0·δ``, so an infinite δ does not become NaN);
    3. ``δ_k ← δ_k + step·g`` (ascent), or ``δ_k − step·g`` with ``descend=True``;
    4. ``norm=None``: nothing; ``"l2"``: ``δ_k ← δ_k·min(1, radius/‖δ_k‖₂)``; ``"l1"``: ``δ_k ← δ_k·min(1,
       radius/‖δ_k‖₁)``; ``"linf"``: ``δ_k ← clamp(δ_k, −radius, radius)``. A zero δ_k stays zero.

    Shapes: ``delta`` (K, C, H, W) or (C, H, W) (one perturbation); ``grad`` (B, C, H, W) when K = 1 (all B
    rows reduce into the one δ) or (K, B, C, H, W) (perturbation k from its own batch ``grad[k]``), same dtype.
    Returns ``delta``'s shape and dtype.

    Example::

        >>> d = torch.zeros(1, 3, 4, 4); g = torch.ones(8, 3, 4, 4)
        >>> out = universal_update_ref(d, g, step=10.0, reduction="mean", norm="l2", radius=10.0)
        >>> round(float(torch.linalg.vector_norm(out)), 4)   # 10·1 per element, then rescaled to radius 10
        10.0
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; valid reductions: {REDUCTIONS}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; valid norms: {NORMS}")
    acc = _acc_dtype(delta.dtype)
    k = delta.shape[0] if delta.dim() == 4 else 1
    d = delta.to(acc).reshape(k, *delta.shape[-3:])  # (K, C, H, W)
    g = grad.to(acc).reshape(k, -1, *delta.shape[-3:])  # (K, B, C, H, W)
    g = g.sum(dim=1) if reduction == "sum" else g.mean(dim=1)  # grad.sum(0) / .mean(0) of the published code
    if weight_decay != 0:
        g = g + 2 * weight_decay * d  # d/dδ of weight_decay·‖δ‖²
    y = d - step * g if descend else d + step * g
    if norm == "linf":
        y = torch.clamp(y, -radius, radius)
    elif norm is not None:
        size = torch.linalg.vector_norm(y, ord=2 if norm == "l2" else 1, dim=(1, 2, 3), keepdim=True)
        y = y * torch.clamp(radius / size, max=1.0)
    return y.reshape(delta.shape).to(delta.dtype)
