"""Eager reference of the mask-weighted convolution (kernel family 2).

This is the ``torch`` backend of ``fastpurify.ops.masked_conv2d``, ``build_masked_weights_``, ``mask_grads_`` and
``masked_adam_clamp_``, and the ground truth their C++, Triton and CUDA implementations are tested against. It
is written as AWM's published formulation: a separate elementwise multiply ``W_eff = θ ⊙ m`` per layer per
forward, then the vendor convolution; autograd through the product gives ``∂L/∂m = (∂L/∂W_eff) ⊙ θ``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Pair = Tuple[int, int]


def masked_conv2d_ref(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None, stride: Pair = (1, 1),
                      padding: Pair = (0, 0), dilation: Pair = (1, 1), groups: int = 1) -> Tensor:
    """``conv2d(x, weight ⊙ mask) + bias``, differentiable in every tensor argument.

    Shapes: ``x`` (N, C_in, H, W); ``weight``, ``mask`` (C_out, C_in/groups, KH, KW); ``bias`` (C_out,) or None;
    returns (N, C_out, OH, OW) with ``OH = (H + 2·pad − dil·(KH − 1) − 1)//stride + 1`` (likewise OW).

    Example::

        >>> x = torch.randn(2, 3, 8, 8); w = torch.randn(4, 3, 3, 3); m = torch.rand(4, 3, 3, 3)
        >>> masked_conv2d_ref(x, w, m, padding=(1, 1)).shape
        torch.Size([2, 4, 8, 8])
    """
    return F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)


def masked_conv2d_backward_ref(gout: Tensor, x: Tensor, weight: Tensor, mask: Tensor, stride: Pair, padding: Pair,
                               dilation: Pair, groups: int, has_bias: bool) -> Tuple[Tensor, Tensor, Tensor,
                                                                                       Optional[Tensor]]:
    """``(∂L/∂x, ∂L/∂mask, ∂L/∂weight, ∂L/∂bias)`` of :func:`masked_conv2d_ref` for the upstream gradient ``gout``
    (closed form: ``∂L/∂mask = ∂L/∂W_eff ⊙ weight``, ``∂L/∂weight = ∂L/∂W_eff ⊙ mask``, both from one
    ``∂L/∂W_eff``). Shapes as :func:`masked_conv2d_ref`; ``gout`` the output's shape.

    Example::

        >>> x = torch.randn(2, 3, 5, 5); w = torch.randn(4, 3, 3, 3); m = torch.ones(4, 3, 3, 3)
        >>> gx, gm, gw, gb = masked_conv2d_backward_ref(torch.ones(2, 4, 3, 3), x, w, m, (1, 1), (0, 0), (1, 1), 1,
        ...                                             False)
        >>> gx.shape, gm.shape, gb is None
        (torch.Size([2, 3, 5, 5]), torch.Size([4, 3, 3, 3]), True)
    """
    gx, gw_eff, gb = torch.ops.aten.convolution_backward(
        gout, x, weight * mask, [weight.shape[0]] if has_bias else None, list(stride), list(padding), list(dilation),
        False, [0, 0], groups, [True, True, has_bias])
    return gx, gw_eff * weight, gw_eff * mask, gb if has_bias else None


def build_masked_weights_ref(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> List[Tensor]:
    """Every layer's ``W_eff = weight ⊙ mask`` (one eager multiply per layer).

    Shapes: lists of equal length; ``weights[i]`` and ``masks[i]`` the same shape; returns a list of those shapes.

    Example::

        >>> build_masked_weights_ref([torch.full((2, 2), 3.0)], [torch.eye(2)])[0]
        tensor([[3., 0.],
                [0., 3.]])
    """
    return [w * m for w, m in zip(weights, masks)]


def mask_grads_ref(grad_weffs: Sequence[Tensor], weights: Sequence[Tensor]) -> List[Tensor]:
    """Every layer's mask gradient ``∂L/∂mask = ∂L/∂W_eff ⊙ weight`` (one eager multiply per layer).

    Shapes: as :func:`build_masked_weights_ref`.

    Example::

        >>> mask_grads_ref([torch.ones(3)], [torch.tensor([1.0, -2.0, 0.5])])[0]
        tensor([ 1.0000, -2.0000,  0.5000])
    """
    return [g * w for g, w in zip(grad_weffs, weights)]


def masked_adam_clamp_ref(masks: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                          exp_avg_sqs: Sequence[Tensor], *, lr: float, betas: Tuple[float, float], eps: float,
                          l1: float, step: int) -> None:
    """AWM's mask step in place, as the eager chain ``torch.optim.Adam`` runs (single-tensor path) followed by a
    clamp: ``g = grad + l1·sign(m)``; ``exp_avg ← lerp(exp_avg, g, 1 − β1)``; ``exp_avg_sq ← β2·exp_avg_sq +
    (1 − β2)·g²``; ``m ← m − lr/(1 − β1^step) · exp_avg / (sqrt(exp_avg_sq)/sqrt(1 − β2^step) + eps)``; then
    ``m ← clamp(m, 0, 1)``. ``step`` is the 1-based number of this update (Adam's ``state["step"]`` after its
    increment). ``grads`` are not modified.

    Shapes: four lists of equal length; the i-th tensors of each share one shape.

    Example::

        >>> m = [torch.ones(3)]; v = [torch.zeros(3)]; s = [torch.zeros(3)]
        >>> masked_adam_clamp_ref(m, [torch.tensor([1.0, -1.0, 0.0])], v, s, lr=0.1, betas=(0.9, 0.999), eps=1e-8,
        ...                       l1=0.0, step=1)
        >>> m[0]
        tensor([0.9000, 1.0000, 1.0000])
    """
    beta1, beta2 = betas
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    step_size = lr / bias_correction1
    for m, g, ea, es in zip(masks, grads, exp_avgs, exp_avg_sqs):
        g = g + l1 * torch.sign(m) if l1 != 0 else g
        ea.lerp_(g, 1 - beta1)
        es.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (es.sqrt() / bias_correction2_sqrt).add_(eps)
        m.addcdiv_(ea, denom, value=-step_size)
        m.clamp_(0.0, 1.0)
