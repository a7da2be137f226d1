"""Eager reference of SAU's dual-logit loss (kernel family 1, the loss of one shared-PGD step).

This is the ``torch`` backend of ``fastpurify.ops.dual_logit_loss`` and the ground truth its C++, Triton and
CUDA implementations are tested against. It is the chain of eager ops the reference port of SAU runs at every
PGD step (:func:`fastpurify.reference.defenses.sau.shared_pgd`, its JS term :func:`~fastpurify.reference.
defenses.sau._js_rows`), with the published code's host syncs (``if (~adv).sum() != 0``) replaced by masked
sums, which give the same value (an empty masked sum is 0). Accumulates in fp32 (fp64 for fp64 logits).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

PROB_FLOOR = 1e-8  # SAU floors both softmaxes at 1e-8 before the logarithms of the JS divergence


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dual_logit_masks_ref(z: Tensor, z0: Tensor, yhat: Tensor, yhat0: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """SAU's masks ``a = argmax z ≠ ŷ``, ``a0 = argmax z0 ≠ ŷ0``, ``s = a ∧ a0 ∧ (argmax z = argmax z0)``.

    Shapes: ``z``, ``z0`` (B, C); ``yhat``, ``yhat0`` (B,) integers -> three (B,) bool tensors. Ties in the
    argmax go to the first maximal index (``torch.argmax``).
    """
    pred, pred0 = torch.argmax(z, dim=1), torch.argmax(z0, dim=1)
    a = pred != yhat
    a0 = pred0 != yhat0
    return a, a0, a & a0 & (pred == pred0)


def js_rows_ref(z: Tensor, z0: Tensor) -> Tensor:
    """Per-element Jensen–Shannon terms of the two softmaxes, exactly as SAU's reference port computes them
    (probabilities floored at 1e-8; ``0.5·(p log p + p0 log p0) − 0.5·(p log m + p0 log m)``, ``m = (p+p0)/2``).
    Shapes: (B, C), (B, C) -> (B, C); sum over dim 1 for the per-row divergence."""
    p = F.softmax(z, dim=1).clamp(min=PROB_FLOOR)
    p0 = F.softmax(z0, dim=1).clamp(min=PROB_FLOOR)
    m = 0.5 * (p + p0)
    return 0.5 * (p * p.log() + p0 * p0.log()) - 0.5 * (p * m.log() + p0 * m.log())


def dual_logit_masked_loss_ref(z: Tensor, z0: Tensor, y: Tensor, a: Tensor, a0: Tensor, s: Tensor, *,
                               beta1: float = 0.01, beta2: float = 1.0) -> Tensor:
    """``beta1·L_adv + beta2·L_share`` for given masks (differentiable in ``z``, ``z0``; the masks are constants).

    ``L_adv = −[Σ_{¬a} CE(z_i, y_i) + Σ_{¬a0} CE(z0_i, y_i)] / (2B)``, ``L_share = (1/B) Σ_{¬s} JS_i``.
    Shapes: ``z``, ``z0`` (B, C); ``y`` (B,) int64 in [0, C); ``a``, ``a0``, ``s`` (B,) bool -> 0-d tensor in
    fp32 (fp64 for fp64 logits).
    """
    acc = _acc_dtype(z.dtype)
    z, z0 = z.to(acc), z0.to(acc)
    n = z.shape[0]
    zero = torch.zeros((), dtype=acc, device=z.device)
    ce = F.cross_entropy(z, y, reduction="none")
    ce0 = F.cross_entropy(z0, y, reduction="none")
    loss_adv = torch.where(a, zero, ce).sum() + torch.where(a0, zero, ce0).sum()  # CE of the not-yet-fooled rows
    loss_adv = -loss_adv / 2 / n
    loss_share = torch.where(s, zero, js_rows_ref(z, z0).sum(dim=1)).sum() / n  # JS of the not-yet-shared rows
    return beta1 * loss_adv + beta2 * loss_share


def dual_logit_loss_ref(z: Tensor, z0: Tensor, y: Tensor, yhat: Tensor, yhat0: Tensor, *, beta1: float = 0.01,
                        beta2: float = 1.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """SAU's shared-PGD loss on the logits of the two models at ``x + δ`` and the masks it is built from.

    Per row: ``p = softmax z``, ``p0 = softmax z0``; ``a = argmax z ≠ ŷ``; ``a0 = argmax z0 ≠ ŷ0``;
    ``s = a ∧ a0 ∧ (argmax z = argmax z0)``; ``L_adv = −[Σ_{¬a} CE(z_i, y_i) + Σ_{¬a0} CE(z0_i, y_i)] / (2B)``;
    ``L_share = (1/B) Σ_{¬s} JS(p_i, p0_i)`` (probabilities floored at 1e-8, :func:`js_rows_ref`);
    ``loss = beta1·L_adv + beta2·L_share``. Differentiable in ``z`` and ``z0``.

    Shapes: ``z = f(x+δ)``, ``z0 = f0(x+δ)`` (B, C); ``y`` true labels, ``yhat = argmax f(x)``, ``yhat0 =
    argmax f0(x)`` (B,) int64 -> (loss 0-d in fp32 (fp64 for fp64 logits), ``a``, ``a0``, ``s`` (B,) bool).

    Example::

        >>> z = torch.tensor([[2.0, 0.0], [0.0, 1.0]]); z0 = torch.tensor([[0.0, 3.0], [0.0, 1.0]])
        >>> y = yhat = yhat0 = torch.tensor([0, 0])
        >>> loss, a, a0, s = dual_logit_loss_ref(z, z0, y, yhat, yhat0)
        >>> a.tolist(), a0.tolist(), s.tolist()
        ([False, True], [True, True], [False, True])
    """
    a, a0, s = dual_logit_masks_ref(z, z0, yhat, yhat0)
    return dual_logit_masked_loss_ref(z, z0, y, a, a0, s, beta1=beta1, beta2=beta2), a, a0, s


def dual_logit_loss_backward_ref(z: Tensor, z0: Tensor, y: Tensor, a: Tensor, a0: Tensor, s: Tensor, gout: Tensor, *,
                                 beta1: float = 0.01, beta2: float = 1.0) -> Tuple[Tensor, Tensor]:
    """``(dL/dz, dL/dz0)`` of :func:`dual_logit_masked_loss_ref` times the 0-d upstream gradient ``gout``, in
    closed form (what its autograd computes; the ``torch`` backend's backward, which runs where autograd is off):

    - CE: ``dCE_i/dz_i = p_i − onehot(y_i)``, weight ``−beta1/(2B)`` on rows with ``¬a`` (``¬a0`` for ``z0``);
    - JS: with ``q = max(p, 1e-8)``, ``m = (q + q0)/2``: ``dJS/dp = ½(log q − log m)`` where the floor did not
      act (``p ≥ 1e-8``, as ``clamp``'s gradient), else 0; through the softmax ``dJS/dz = p·(u − Σ p·u)``;
      weight ``beta2/B`` on rows with ``¬s``.

    Shapes: ``z``, ``z0`` (B, C); ``y`` (B,) int64; masks (B,) bool; ``gout`` 0-d -> two (B, C) tensors in the
    logits' dtype.
    """
    acc = _acc_dtype(z.dtype)
    n = z.shape[0]
    g = gout.to(acc).reshape(())
    p, p0 = F.softmax(z.to(acc), dim=1), F.softmax(z0.to(acc), dim=1)
    onehot = F.one_hot(y, z.shape[1]).to(acc)
    c_adv = -(g * beta1) / 2 / n
    c_js = (g * beta2) / n
    q, q0 = p.clamp(min=PROB_FLOOR), p0.clamp(min=PROB_FLOOR)
    lm = (0.5 * (q + q0)).log()
    u = torch.where(p >= PROB_FLOOR, 0.5 * (q.log() - lm), 0.0)
    u0 = torch.where(p0 >= PROB_FLOOR, 0.5 * (q0.log() - lm), 0.0)
    js_z = p * (u - (p * u).sum(dim=1, keepdim=True))
    js_z0 = p0 * (u0 - (p0 * u0).sum(dim=1, keepdim=True))
    zero = torch.zeros((), dtype=acc, device=z.device)
    dz = torch.where(a[:, None], zero, c_adv * (p - onehot)) + torch.where(s[:, None], zero, c_js * js_z)
    dz0 = torch.where(a0[:, None], zero, c_adv * (p0 - onehot)) + torch.where(s[:, None], zero, c_js * js_z0)
    return dz.to(z.dtype), dz0.to(z0.dtype)

