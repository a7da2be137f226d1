"""Public mask-weighted convolution ops (kernel family 2), registered with ``torch.library`` as ``fastpurify::*``.

- ``masked_conv2d(x, weight, mask, ...)``: ``conv2d(x, weight ⊙ mask)``, differentiable: ``∂L/∂x``,
  ``∂L/∂mask = ∂L/∂W_eff ⊙ weight``, ``∂L/∂bias``, and ``∂L/∂weight = ∂L/∂W_eff ⊙ mask`` only when ``weight``
  requires grad (AWM freezes the weights: the weight gradient is then never computed);
  ``fastpurify::masked_conv2d`` + ``fastpurify::masked_conv2d_backward``.
- ``build_masked_weights_(weights, masks, outs)`` / ``mask_grads_(grad_weffs, weights, out_grads)``: every layer's
  ``W_eff`` / mask gradient in one launch (the multi-tensor path around the vendor convolution used by
  :class:`fastpurify.masked.MaskedModel`); ``fastpurify::build_masked_weights_``, ``fastpurify::mask_grads_``.

Each makes one call to :mod:`fastpurify.backend` to pick cuda | triton | cpp | torch. Backend implementations of
``masked_conv2d`` are a pair of callables::

    forward(x, weight, mask, bias, stride, padding, dilation, groups) -> out
    backward(gout, x, weight, mask, stride, padding, dilation, groups, need_x, need_mask, need_weight, need_bias)
        -> (gx, gmask, gweight, gbias)   (None where not needed)

with contiguous ``weight``/``mask`` (C_out, C_in/groups, KH, KW), any-layout ``x``/``gout``, (2,) int lists; the
multi-tensor ones ``impl(a_list, b_list, out_list)`` write ``out[i] = a[i] ⊙ b[i]`` on contiguous tensors.

The Triton implicit-GEMM convolution is not the default anywhere when the CUDA extension is built —
``MaskedModel``'s default multi path runs cuDNN around the one-launch W_eff/mask-gradient kernels, and auto picks
cuda before triton — because no GPU has timed it against cuDNN yet (compiled for sm_90: fp32 runs exact on FMA at
up to 187 registers, bf16/fp16 on wgmma; benchmarks/results/aot/). It runs when asked for (``backend="triton"``,
``MaskedModel(path="layer")``) or on a CUDA machine without the extension.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference.masked_conv import build_masked_weights_ref, masked_conv2d_backward_ref, masked_conv2d_ref

OP = "masked_conv2d"
OP_BUILD = "build_masked_weights"
OP_GRADS = "mask_grads"
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
IntPair = Union[int, Sequence[int]]


def _load_torch():
    def forward(x, weight, mask, bias, stride, padding, dilation, groups):
        return masked_conv2d_ref(x, weight, mask, bias, stride, padding, dilation, groups)

    def backward(gout, x, weight, mask, stride, padding, dilation, groups, need_x, need_mask, need_weight, need_bias):
        # Closed form: custom-op implementations run below autograd, so the reference is not differentiated here.
        gx, gm, gw, gb = masked_conv2d_backward_ref(gout, x, weight, mask, stride, padding, dilation, groups,
                                                    need_bias)
        return gx if need_x else None, gm if need_mask else None, gw if need_weight else None, gb

    return forward, backward


def _load_cpp():
    ext = _backend.extension()
    return ext.masked_conv2d_cpu, ext.masked_conv2d_backward_cpu


def _load_cuda():
    ext = _backend.extension()
    return ext.masked_conv2d_cuda, ext.masked_conv2d_backward_cuda


def _load_triton():
    from fastpurify.kernels.masked_conv import masked_conv2d_backward_triton, masked_conv2d_triton

    return masked_conv2d_triton, masked_conv2d_backward_triton


def _multi(name: str):
    """Loaders of a multi-tensor product op: ``impl(a, b, out)`` writes ``out[i] = a[i] ⊙ b[i]``."""

    def torch_impl():
        def impl(a, b, out):
            torch._foreach_copy_(out, build_masked_weights_ref(a, b))

        return impl

    return {
        "torch": torch_impl,
        "cpp": lambda: getattr(_backend.extension(), f"{name}_cpu_"),
        "cuda": lambda: getattr(_backend.extension(), f"{name}_cuda_"),
        "triton": lambda: getattr(__import__("fastpurify.kernels.masked_conv", fromlist=["x"]), f"{name}_triton_"),
    }


_backend.register_op(_backend.OpSpec(
    name=OP, impls={"torch": _load_torch, "cpp": _load_cpp, "triton": _load_triton, "cuda": _load_cuda},
    dtypes={b: _FLOATS for b in _backend.BACKENDS},
    doc="conv2d(x, weight*mask) with dL/dmask = dL/dW_eff*weight fused (no weight grad unless needed)"))
_backend.register_op(_backend.OpSpec(
    name=OP_BUILD, impls=_multi(OP_BUILD), dtypes={b: _FLOATS for b in _backend.BACKENDS},
    doc="every layer's W_eff = weight*mask in one launch"))
_backend.register_op(_backend.OpSpec(
    name=OP_GRADS, impls=_multi(OP_GRADS), dtypes={b: _FLOATS for b in _backend.BACKENDS},
    doc="every layer's mask gradient dL/dW_eff*weight in one launch"))


# --------------------------------------------------------------------------------------------------------
# Validation (before any work, with the offending value in the message)
# --------------------------------------------------------------------------------------------------------


def _pair(name: str, v: IntPair, minimum: int) -> List[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        vals = [v, v]
    else:
        vals = list(v) if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) != 2 or any(isinstance(e, bool) or not isinstance(e, int) or e < minimum
                                               for e in vals):
        raise ValueError(f"masked_conv2d: {name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return [int(e) for e in vals]


def _padding(padding, weight: Tensor, stride: List[int], dilation: List[int]) -> List[int]:
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0]
        if padding == "same":
            if stride != [1, 1]:
                raise ValueError(f"masked_conv2d: padding='same' needs stride 1, got stride={tuple(stride)}")
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            if any(t % 2 for t in total):
                raise ValueError(f"masked_conv2d: padding='same' with kernel {tuple(weight.shape[2:])} and dilation "
                                 f"{tuple(dilation)} needs asymmetric padding; pad x with F.pad and use padding=0")
            return [t // 2 for t in total]
        raise ValueError(f"masked_conv2d: unsupported padding {padding!r}; valid: an int, a pair of ints, 'valid', "
                         "'same' (padding modes such as 'reflect' are applied with F.pad before the conv, as "
                         "nn.Conv2d does; MaskedModel does this for you)")
    return _pair("padding", padding, 0)


def _check(x, weight, mask, bias, groups) -> None:
    for name, t in (("x", x), ("weight", weight), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"masked_conv2d: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"masked_conv2d: {name} dtype {t.dtype} is not supported; expected one of {_FLOATS}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"masked_conv2d: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, t in (("x", x), ("mask", mask)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype != weight.dtype:
            raise TypeError(f"masked_conv2d: {name} dtype {t.dtype} differs from weight dtype {weight.dtype}")
        if t.device != weight.device:
            raise ValueError(f"masked_conv2d: {name} is on {t.device} but weight is on {weight.device}")
    if weight.dim() != 4:
        raise ValueError(f"masked_conv2d: weight shape {tuple(weight.shape)} must be (C_out, C_in/groups, KH, KW)")
    if mask.shape != weight.shape:
        raise ValueError(f"masked_conv2d: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"masked_conv2d: groups must be an int >= 1, got {groups!r}")
    if x.dim() != 4:
        raise ValueError(f"masked_conv2d: x shape {tuple(x.shape)} must be (N, C_in, H, W) or (C_in, H, W)")
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"masked_conv2d: x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)} and "
                         f"groups={groups} do not fit: need C_in = weight.shape[1]*groups and C_out % groups == 0")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"masked_conv2d: bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")


def out_shape(x_shape, w_shape, stride, padding, dilation) -> Tuple[int, int, int, int]:
    """(N, C_out, OH, OW) of the convolution (raises when the kernel does not fit the padded input)."""
    hw = [(x_shape[2 + i] + 2 * padding[i] - dilation[i] * (w_shape[2 + i] - 1) - 1) // stride[i] + 1 for i in (0, 1)]
    if min(hw) < 1:
        raise ValueError(f"masked_conv2d: kernel {tuple(w_shape[2:])} (dilation {tuple(dilation)}) does not fit "
                         f"input {tuple(x_shape[2:])} padded by {tuple(padding)}")
    return (x_shape[0], w_shape[0], hw[0], hw[1])


def _fmt(x: Tensor) -> torch.memory_format:
    """The layout the output and dL/dx take: channels_last when x is (and is not also plain contiguous)."""
    return torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last)
                                   and not x.is_contiguous()) else torch.contiguous_format


# --------------------------------------------------------------------------------------------------------
# The registered custom ops
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpurify::masked_conv2d", mutates_args=())
def _masked_conv2d(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor], stride: List[int],
                   padding: List[int], dilation: List[int], groups: int, backend: str) -> Tensor:
    forward, _ = _backend.implementation(OP, backend)
    out = forward(x, weight.contiguous(), mask.contiguous(), bias, stride, padding, dilation, groups)
    return out.contiguous(memory_format=_fmt(x))


@_masked_conv2d.register_fake
def _(x, weight, mask, bias, stride, padding, dilation, groups, backend):
    shape = out_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_fmt(x))


@torch.library.custom_op("fastpurify::masked_conv2d_backward", mutates_args=())
def _masked_conv2d_backward(gout: Tensor, x: Tensor, weight: Tensor, mask: Tensor, stride: List[int],
                            padding: List[int], dilation: List[int], groups: int, need: List[bool],
                            backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dmask, dweight, dbias); a gradient that is not needed comes back as an empty (0,) tensor (custom ops
    cannot return None)."""
    _, backward = _backend.implementation(OP, backend)
    grads = backward(gout, x, weight.contiguous(), mask.contiguous(), stride, padding, dilation, groups, *need)
    like = (x, weight, weight, weight[:, 0, 0, 0])
    out = []
    for g, t, n in zip(grads, like, need):
        if not n or g is None:
            out.append(t.new_empty((0,)))
        elif t is x:
            out.append(g.contiguous(memory_format=_fmt(x)))
        else:
            out.append(g.contiguous())
    return tuple(out)


@_masked_conv2d_backward.register_fake
def _(gout, x, weight, mask, stride, padding, dilation, groups, need, backend):
    shapes = (x.shape, weight.shape, weight.shape, (weight.shape[0],))
    out = []
    for i, (s, n) in enumerate(zip(shapes, need)):
        fmt = _fmt(x) if i == 0 else torch.contiguous_format
        out.append(torch.empty(s if n else (0,), dtype=x.dtype, device=x.device,
                               memory_format=fmt if n and i == 0 else torch.contiguous_format))
    return tuple(out)


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias, stride, padding, dilation, groups, backend = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.args = (stride, padding, dilation, groups, backend, bias is not None)


def _backward(ctx, gout):
    x, weight, mask = ctx.saved_tensors
    stride, padding, dilation, groups, backend, has_bias = ctx.args
    nx, nw, nm, nb = ctx.needs_input_grad[:4]
    need = [bool(nx), bool(nm), bool(nw), bool(nb and has_bias)]
    if not any(need):
        return (None,) * 9
    gx, gm, gw, gb = _masked_conv2d_backward(gout, x, weight, mask, stride, padding, dilation, groups, need, backend)
    pick = lambda g, n: g if n else None  # noqa: E731
    return pick(gx, need[0]), pick(gw, need[2]), pick(gm, need[1]), pick(gb, need[3]), None, None, None, None, None


_masked_conv2d.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastpurify::build_masked_weights_", mutates_args=("outs",))
def _build_masked_weights(weights: List[Tensor], masks: List[Tensor], outs: List[Tensor], backend: str) -> None:
    _backend.implementation(OP_BUILD, backend)(weights, masks, outs)


@_build_masked_weights.register_fake
def _(weights, masks, outs, backend) -> None:
    return None


@torch.library.custom_op("fastpurify::mask_grads_", mutates_args=("out_grads",))
def _mask_grads(grad_weffs: List[Tensor], weights: List[Tensor], out_grads: List[Tensor], backend: str) -> None:
    _backend.implementation(OP_GRADS, backend)(grad_weffs, weights, out_grads)


@_mask_grads.register_fake
def _(grad_weffs, weights, out_grads, backend) -> None:
    return None


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def masked_conv2d(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                  padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1,
                  backend: Optional[str] = None) -> Tensor:
    """``conv2d(x, weight ⊙ mask) + bias`` without materialising an eager ``weight * mask`` per call (cpp: one
    fused pass builds W_eff; triton: the mask is applied while loading weight tiles), with the fused backward
    ``∂L/∂mask = ∂L/∂W_eff ⊙ weight``; ``∂L/∂weight`` is computed only when ``weight.requires_grad``.

    Shapes: ``x`` (N, C_in, H, W) or unbatched (C_in, H, W), NCHW or channels_last (the output follows x's
    layout); ``weight``, ``mask`` (C_out, C_in/groups, KH, KW); ``bias`` (C_out,) or None; all one float dtype and
    device. Returns (N, C_out, OH, OW). ``padding``: int, pair, ``'valid'`` or ``'same'`` (stride 1); padding modes
    such as ``'reflect'`` are not conv arguments: apply ``F.pad`` first. ``backend``: ``"auto"``/None (then
    ``FASTPURIFY_BACKEND``, then CUDA: cuda > triton > torch; CPU: cpp > torch) or an explicit one.

    Example::

        >>> import torch, fastpurify.ops as ops
        >>> x = torch.randn(2, 3, 8, 8); w = torch.randn(4, 3, 3, 3); m = torch.ones(4, 3, 3, 3, requires_grad=True)
        >>> y = ops.masked_conv2d(x, w, m, padding=1)
        >>> y.sum().backward(); y.shape, m.grad.shape, w.grad is None
        (torch.Size([2, 4, 8, 8]), torch.Size([4, 3, 3, 3]), True)
    """
    unbatched = isinstance(x, Tensor) and x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    _check(x, weight, mask, bias, groups)
    s, d = _pair("stride", stride, 1), _pair("dilation", dilation, 1)
    p = _padding(padding, weight, s, d)
    out_shape(x.shape, weight.shape, s, p, d)
    name = _backend.resolve(OP, backend, device_type=x.device.type, dtype=x.dtype)
    out = _masked_conv2d(x, weight, mask, bias, s, p, d, int(groups), name)
    return out.squeeze(0) if unbatched else out


def _check_lists(op: str, names: Tuple[str, str, str], lists) -> None:
    lens = [len(v) for v in lists]
    if len(set(lens)) != 1:
        raise ValueError(f"{op}: {', '.join(names)} have different lengths {lens}")
    for i, ts in enumerate(zip(*lists)):
        for n, t in zip(names, ts):
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {n}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOATS:
                raise TypeError(f"{op}: {n}[{i}] dtype {t.dtype} is not supported; expected one of {_FLOATS}")
            if t.shape != ts[0].shape or t.dtype != lists[0][0].dtype or t.device != lists[0][0].device:
                raise ValueError(f"{op}: {n}[{i}] ({tuple(t.shape)}, {t.dtype}, {t.device}) does not match "
                                 f"{names[0]}[{i}] ({tuple(ts[0].shape)}, {ts[0].dtype}, {ts[0].device}) / "
                                 f"{names[0]}[0] ({lists[0][0].dtype}, {lists[0][0].device})")


def _multi_run(op: str, fn, names, a, b, out, backend) -> List[Tensor]:
    a, b, out = list(a), list(b), list(out)
    _check_lists(op, names, (a, b, out))
    if not a:
        return out
    name = _backend.resolve(op, backend, device_type=a[0].device.type, dtype=a[0].dtype)
    tmp = [o if o.is_contiguous() else o.contiguous() for o in out]
    with torch.no_grad():
        fn([t.contiguous() for t in a], [t.contiguous() for t in b], tmp, name)
        for o, t in zip(out, tmp):
            if o is not t:
                o.copy_(t)
    return out


def build_masked_weights_(weights: Sequence[Tensor], masks: Sequence[Tensor], outs: Sequence[Tensor], *,
                          backend: Optional[str] = None) -> List[Tensor]:
    """``outs[i] = weights[i] ⊙ masks[i]`` for every layer in one launch (not differentiable; runs under no_grad);
    returns ``outs``.

    Shapes: three lists of equal length; the i-th tensors share one shape; every tensor one float dtype and device.

    Example::

        >>> w = [torch.randn(4, 3, 3, 3), torch.randn(8, 4, 1, 1)]; m = [torch.rand_like(t) for t in w]
        >>> out = build_masked_weights_(w, m, [torch.empty_like(t) for t in w])
        >>> all(torch.equal(o, a * b) for o, a, b in zip(out, w, m))
        True
    """
    return _multi_run(OP_BUILD, _build_masked_weights, ("weights", "masks", "outs"), weights, masks, outs, backend)


def mask_grads_(grad_weffs: Sequence[Tensor], weights: Sequence[Tensor], out_grads: Sequence[Tensor], *,
                backend: Optional[str] = None) -> List[Tensor]:
    """``out_grads[i] = grad_weffs[i] ⊙ weights[i]`` (every layer's ``∂L/∂mask``) in one launch; returns
    ``out_grads``. Shapes as :func:`build_masked_weights_`.

    Example::

        >>> g = [torch.ones(2, 1, 3, 3)]; w = [torch.full((2, 1, 3, 3), 0.5)]
        >>> float(mask_grads_(g, w, [torch.empty(2, 1, 3, 3)])[0].sum())
        9.0
    """
    return _multi_run(OP_GRADS, _mask_grads, ("grad_weffs", "weights", "out_grads"), grad_weffs, weights, out_grads,
                      backend)


# --------------------------------------------------------------------------------------------------------
# AWM's mask optimiser step
# --------------------------------------------------------------------------------------------------------

OP_ADAM = "masked_adam_clamp"
_ADAM_FLOATS = (torch.float32, torch.float64)


def _load_torch_adam():
    from ..reference.masked_conv import masked_adam_clamp_ref

    def impl(masks, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, l1, step):
        masked_adam_clamp_ref(masks, grads, exp_avgs, exp_avg_sqs, lr=lr, betas=(beta1, beta2), eps=eps, l1=l1,
                              step=step)

    return impl


_backend.register_op(_backend.OpSpec(
    name=OP_ADAM,
    impls={"torch": _load_torch_adam, "cpp": lambda: _backend.extension().masked_adam_clamp_cpu_,
           "cuda": lambda: _backend.extension().masked_adam_clamp_cuda_,
           "triton": lambda: __import__("fastpurify.kernels.masked_conv", fromlist=["x"]).masked_adam_clamp_triton_},
    dtypes={b: _ADAM_FLOATS for b in _backend.BACKENDS},
    doc="AWM mask step: L1 subgradient + Adam (bias-corrected, torch's arithmetic) + clamp to [0, 1], all layers"))


@torch.library.custom_op("fastpurify::masked_adam_clamp_", mutates_args=("masks", "exp_avgs", "exp_avg_sqs"))
def _masked_adam_clamp(masks: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                       lr: float, beta1: float, beta2: float, eps: float, l1: float, step: int, backend: str) -> None:
    _backend.implementation(OP_ADAM, backend)(masks, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, l1, step)


@_masked_adam_clamp.register_fake
def _(masks, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, l1, step, backend) -> None:
    return None


def masked_adam_clamp_(masks: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                       exp_avg_sqs: Sequence[Tensor], *, lr: float, betas: Tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8, l1: float = 0.0, step: int, backend: Optional[str] = None) -> None:
    """AWM's mask optimiser step for every layer in one launch, in place (runs under no_grad):

    ``g = grad + l1·sign(m)`` (the L1 penalty's subgradient, sign(0) = 0); Adam with bias correction exactly as
    ``torch.optim.Adam`` (``exp_avg ← lerp(exp_avg, g, 1 − β1)``, ``exp_avg_sq ← β2·exp_avg_sq + (1 − β2)·g²``,
    ``m ← m − lr/(1 − β1^step) · exp_avg/(sqrt(exp_avg_sq)/sqrt(1 − β2^step) + eps)`` with ``eps`` as given, added
    after the square root); then ``m ← clamp(m, 0, 1)``. ``step`` is the 1-based number of this update (Adam's
    ``state["step"]`` after its increment); the caller counts steps. Masks given outside [0, 1] come back clamped
    into it; ``grads`` are read only (the L1 term is not written back).

    Shapes: four lists of equal length; the i-th tensors share one shape, all contiguous or not, fp32 or fp64, one
    device. Matches ``torch.optim.Adam`` + clamp to within 1e-6 in fp32 over 100 steps (tests/test_masked_conv.py).

    Example::

        >>> m = [torch.ones(4, 3, 3, 3)]; g = [torch.randn(4, 3, 3, 3)]
        >>> st = [torch.zeros_like(m[0])], [torch.zeros_like(m[0])]
        >>> masked_adam_clamp_(m, g, *st, lr=1e-2, l1=1e-8, step=1)
        >>> bool(((m[0] >= 0) & (m[0] <= 1)).all())
        True
    """
    masks, grads, exp_avgs, exp_avg_sqs = list(masks), list(grads), list(exp_avgs), list(exp_avg_sqs)
    names = ("masks", "grads", "exp_avgs", "exp_avg_sqs")
    _check_lists("masked_adam_clamp_", names[:3], (masks, grads, exp_avgs))
    _check_lists("masked_adam_clamp_", (names[0], names[3], names[2]), (masks, exp_avg_sqs, exp_avgs))
    for name, v in (("lr", lr), ("eps", eps), ("l1", l1)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ValueError(f"masked_adam_clamp_: {name} must be a finite number >= 0, got {v!r}")
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
    if not ok:
        raise ValueError(f"masked_adam_clamp_: betas must be a pair of numbers in [0, 1), got {betas!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"masked_adam_clamp_: step must be an int >= 1 (1-based, after the increment), got {step!r}")
    if not masks:
        return
    name = _backend.resolve(OP_ADAM, backend, device_type=masks[0].device.type, dtype=masks[0].dtype)
    state = [masks, exp_avgs, exp_avg_sqs]
    work = [[t if t.is_contiguous() else t.contiguous() for t in ts] for ts in state]
    with torch.no_grad():
        _masked_adam_clamp(work[0], [g.contiguous() for g in grads], work[1], work[2], float(lr), float(betas[0]),
                           float(betas[1]), float(eps), float(l1), int(step), name)
        for ts, ws in zip(state, work):
            for t, w in zip(ts, ws):
                if t is not w:
                    t.copy_(w)
