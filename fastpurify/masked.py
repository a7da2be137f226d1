"""``MaskedModel``: any ``nn.Module`` whose Conv2d layers compute ``conv(x, weight ⊙ mask)`` with learnable masks
(AWM's parametrisation, kernel family 2), through :func:`fastpurify.ops.masked_conv2d`.

Two paths, same numbers (``path="auto"``, the default, picks ``"multi"``: measured faster on CPU, PreActResNet18
batch 64 forward + backward, 2 threads: 4.9 s vs 7.0 s mean (min 4.1 vs 6.0 s), benchmarks/test_bench_masked_conv.py;
on GPU it keeps cuDNN's convolutions, which the benchmark measures against the Triton ones):

- ``path="layer"``: every selected conv calls ``masked_conv2d`` (W_eff fused into the conv's input
  pass; the backward writes ``∂L/∂mask = ∂L/∂W_eff ⊙ weight`` and skips the weight gradient of frozen weights).
- ``path="multi"``: the multi-tensor path around the vendor convolution: every layer's ``W_eff`` is built in one
  launch (:func:`~fastpurify.ops.build_masked_weights_`) before the model runs, each conv is the plain
  ``F.conv2d``, and the backward writes every layer's mask gradient in one launch
  (:func:`~fastpurify.ops.mask_grads_`).
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.masked_conv import build_masked_weights_, mask_grads_, masked_conv2d

PATHS = ("auto", "layer", "multi")


class _MaskedConv2d(nn.Module):
    """A Conv2d (kept whole, as ``.conv``) plus its mask parameter (same shape as the weight, initialised to 1)."""

    def __init__(self, conv: nn.Conv2d, backend: Optional[str]) -> None:
        super().__init__()
        self.conv = conv
        self.mask = nn.Parameter(torch.ones_like(conv.weight, memory_format=torch.contiguous_format))
        self.backend = backend
        self.weff: Optional[Tensor] = None  # set by MaskedModel on the "multi" path for one forward

    def _input(self, x: Tensor) -> Tuple[Tensor, object]:
        """Apply padding modes (reflect, replicate, circular) and asymmetric 'same' padding with F.pad, as
        nn.Conv2d does; returns (input, the conv's padding argument)."""
        c = self.conv
        if c.padding_mode != "zeros" or isinstance(c.padding, str):
            pads = c._reversed_padding_repeated_twice
            if any(pads):
                mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
                x = F.pad(x, pads, mode=mode)
            return x, 0
        return x, c.padding

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        x, padding = self._input(x)
        if self.weff is not None:
            return F.conv2d(x, self.weff, c.bias, c.stride, padding, c.dilation, c.groups)
        return masked_conv2d(x, c.weight, self.mask, c.bias, c.stride, padding, c.dilation, c.groups,
                             backend=self.backend)


class _BuildWeights(torch.autograd.Function):
    """Every layer's W_eff in one launch; the backward writes every mask gradient (and, for weights that
    require grad, every weight gradient) in one launch."""

    @staticmethod
    def forward(ctx, backend, n, *tensors):
        weights, masks = tensors[:n], tensors[n:]
        ctx.save_for_backward(*tensors)
        ctx.n, ctx.backend = n, backend
        return tuple(build_masked_weights_(weights, masks, [torch.empty_like(w, memory_format=torch.contiguous_format)
                                                            for w in weights], backend=backend))

    @staticmethod
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        n = ctx.n
        weights, masks = tensors[:n], tensors[n:]
        gw: List[Optional[Tensor]] = [None] * n
        gm: List[Optional[Tensor]] = [None] * n
        idx = [i for i in range(n) if grads[i] is not None]
        mi = [i for i in idx if ctx.needs_input_grad[2 + n + i]]
        if mi:
            out = mask_grads_([grads[i] for i in mi], [weights[i] for i in mi],
                              [torch.empty_like(masks[i]) for i in mi], backend=ctx.backend)
            for i, g in zip(mi, out):
                gm[i] = g
        wi = [i for i in idx if ctx.needs_input_grad[2 + i]]
        if wi:
            out = mask_grads_([grads[i] for i in wi], [masks[i] for i in wi],
                              [torch.empty_like(weights[i]) for i in wi], backend=ctx.backend)
            for i, g in zip(wi, out):
                gw[i] = g
        return (None, None, *gw, *gm)


class MaskedModel(nn.Module):
    """Wrap ``model`` so that the selected Conv2d layers compute ``conv(x, weight ⊙ mask)`` with mask parameters
    (initialised to 1: the wrapped model starts as the original). ``model`` itself is never modified: the wrapper
    works on a deep copy.

    Arguments: ``layers``: names of Conv2d modules to mask (as in ``model.named_modules()``; default: every
    ``nn.Conv2d``, any stride, padding, padding mode, dilation or groups); ``backend``: passed to the ops (see
    :func:`fastpurify.ops.masked_conv2d`); ``path``: ``"auto"``, ``"layer"`` or ``"multi"`` (module docstring);
    ``freeze_weights``: the masked convs' weights get ``requires_grad=False`` (AWM learns the masks only, and the
    backward then computes no weight gradient).

    Shapes: as ``model``'s forward. ``.masks()`` -> {layer name: mask Parameter of the weight's shape};
    ``.fold()`` -> a plain model of ``model``'s class whose conv weights are ``weight ⊙ mask``.

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> net = SmallVGG().eval(); mm = MaskedModel(net)
        >>> x = torch.rand(2, 3, 32, 32)
        >>> bool(torch.allclose(mm(x), net(x), atol=1e-5)), len(mm.masks()) > 0
        (True, True)
        >>> type(mm.fold()) is type(net)
        True
    """

    def __init__(self, model: nn.Module, layers: Optional[Iterable[str]] = None, *, backend: Optional[str] = None,
                 path: str = "auto", freeze_weights: bool = True) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MaskedModel: model must be an nn.Module, got {type(model).__name__}")
        if path not in PATHS:
            raise ValueError(f"MaskedModel: unknown path {path!r}; valid: {', '.join(PATHS)}")
        self.model = copy.deepcopy(model)
        self.backend, self.path = backend, "multi" if path == "auto" else path
        convs = {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)}
        if layers is None:
            names = list(convs)
        else:
            names = list(dict.fromkeys([layers] if isinstance(layers, str) else layers))
            modules = dict(self.model.named_modules())
            for n in names:
                if n not in modules:
                    raise ValueError(f"MaskedModel: no module named {n!r}; Conv2d layers: {sorted(convs)}")
                if n not in convs:
                    raise ValueError(f"MaskedModel: {n!r} is a {type(modules[n]).__name__}, not an nn.Conv2d; "
                                     f"Conv2d layers: {sorted(convs)}")
        if "" in names:
            raise ValueError("MaskedModel: model is itself a Conv2d; wrap it, e.g. nn.Sequential(conv)")
        self._names: Tuple[str, ...] = tuple(names)
        self._requires_grad = {n: convs[n].weight.requires_grad for n in names}
        for n in names:
            conv = convs[n]
            if freeze_weights:
                conv.weight.requires_grad_(False)
            _set_submodule(self.model, n, _MaskedConv2d(conv, backend))

    def _wrappers(self) -> List[_MaskedConv2d]:
        return [self.model.get_submodule(n) for n in self._names]

    def masks(self) -> Dict[str, nn.Parameter]:
        """{layer name: mask Parameter}, in module order (the names of ``model.named_modules()``)."""
        return {n: w.mask for n, w in zip(self._names, self._wrappers())}

    def forward(self, *args, **kwargs):
        if self.path == "layer" or not self._names:
            return self.model(*args, **kwargs)
        wraps = self._wrappers()
        weights = [w.conv.weight for w in wraps]
        weffs = _BuildWeights.apply(self.backend, len(wraps), *weights, *[w.mask for w in wraps])
        try:
            for w, e in zip(wraps, weffs):
                w.weff = e
            return self.model(*args, **kwargs)
        finally:
            for w in wraps:
                w.weff = None

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain copy of the wrapped model (``model``'s class, no fastpurify module inside) whose masked conv
        weights are ``weight ⊙ mask``; its parameters' ``requires_grad`` flags are those of the original model's.

        Example::

            >>> from fastpurify.models import SmallVGG
            >>> mm = MaskedModel(SmallVGG().eval())
            >>> for m in mm.masks().values(): _ = m.data.mul_(0.5)
            >>> x = torch.rand(1, 3, 32, 32); bool(torch.allclose(mm.fold()(x), mm(x), atol=1e-5))
            True
        """
        out = copy.deepcopy(self.model)
        for n in self._names:
            wrap = out.get_submodule(n)
            conv = wrap.conv
            conv.weight.copy_(conv.weight * wrap.mask)
            conv.weight.requires_grad_(self._requires_grad[n])
            _set_submodule(out, n, conv)
        return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def masked_modules(model: nn.Module) -> Sequence[str]:
    """Names of the Conv2d layers :class:`MaskedModel` masks by default (every ``nn.Conv2d``)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
