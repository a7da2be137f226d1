"""Eager reference of the PGD perturbation update (kernel family 1).

This is the ``torch`` backend of ``fastpurify.ops.pgd_update_`` and the ground truth its C++, Triton and
CUDA implementations are tested against. It is written as the chain of eager ops a published attack runs
(torchattacks' PGD / PGDL2, BackdoorBench's SAU projections), with fp32 accumulation for half-precision δ.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

NORMS = ("linf", "l2", "l1")
L2_EPS = 1e-10  # torchattacks' PGDL2 guard against a zero gradient norm


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample_ndim(ndim: int) -> int:
    """How many trailing dimensions one sample spans: three (C, H, W) of a 4-D (B, C, H, W) or 5-D
    (R, B, C, H, W) tensor; all but the first of a 2-D/3-D one; the whole of a 1-D one."""
    return ndim if ndim <= 1 else min(3, ndim - 1)


def sample_dims(t: Tensor) -> Tuple[int, ...]:
    """The dimensions one sample spans, over which L2/L1 norms are taken (see :func:`sample_ndim`)."""
    return tuple(range(t.dim() - sample_ndim(t.dim()), t.dim()))


def _norm(t: Tensor, p: float) -> Tensor:
    return torch.linalg.vector_norm(t, ord=p, dim=sample_dims(t), keepdim=True)


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

    Direction and projection (``+`` ascends the loss; ``descend=True`` uses ``−``):

    - ``"linf"``: ``δ' = clamp(δ ± step·sign(g), −eps, eps)``;
    - ``"l2"``: ``δ' = δ ± step·g/(‖g‖₂ + 1e-10)``, then ``δ' ← δ'·min(1, eps/‖δ'‖₂)`` (per sample);
    - ``"l1"``: ``δ' = δ ± step·sign(g)``, then ``δ' ← δ'·min(1, eps/‖δ'‖₁)`` (per sample; the rescale of
      SAU's published projection, not the exact Euclidean projection onto the L1 ball).

    Then, when ``x`` is given, the box ``δ' = clamp(x + δ', lower, upper) − x`` (``None`` leaves a side open).

    Shapes: ``delta``, ``grad``: (..., C, H, W), e.g. (B, C, H, W) or (R, B, C, H, W) for R restarts; a
    sample spans the last three dimensions (see :func:`sample_dims`); ``x``: the trailing dimensions of
    ``delta`` (broadcast over the leading ones). Returns ``delta``'s shape and dtype. Accumulates in fp32
    (fp64 for fp64 inputs).

    Example::

        >>> d = torch.zeros(2, 3, 4, 4); g = torch.randn(2, 3, 4, 4); x = torch.rand(2, 3, 4, 4)
        >>> out = pgd_update_ref(d, g, step=0.5, eps=0.25, norm="l2", x=x, lower=None, upper=None)
        >>> bool((torch.linalg.vector_norm(out, dim=(1, 2, 3)) <= 0.25 + 1e-6).all())
        True
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; valid norms: {NORMS}")
    acc = _acc_dtype(delta.dtype)
    s = -step if descend else step
    d, g = delta.to(acc), grad.to(acc)
    if norm == "linf":
        y = torch.clamp(d + s * torch.sign(g), -eps, eps)
    elif norm == "l2":
        y = d + s * (g / (_norm(g, 2) + L2_EPS))
        y = y * torch.clamp(eps / _norm(y, 2), max=1.0)
    else:
        y = d + s * torch.sign(g)
        y = y * torch.clamp(eps / _norm(y, 1), max=1.0)
    if x is not None and (lower is not None or upper is not None):
        xa = x.to(acc)
        y = torch.clamp(xa + y, lower, upper) - xa
    return y.to(delta.dtype)


def model_input_ref(x: Tensor, delta: Tensor, normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None
                    ) -> Tensor:
    """The perturbed model input in fp32: ``x + δ``, or ``(x + δ − mean)/std`` channel-wise (channel = the
    third-last dimension) when ``normalization=(mean, std)`` — i.e. ``x_n + δ/σ`` for the normalised clean
    image ``x_n``. Shapes: ``x`` the trailing dimensions of ``delta``; returns ``delta``'s shape."""
    acc = _acc_dtype(delta.dtype)
    v = x.to(acc) + delta.to(acc)
    if normalization is not None:
        mean, std = (torch.as_tensor(t, dtype=acc, device=v.device).view(-1, 1, 1) for t in normalization)
        v = (v - mean) / std
    return v
