"""``MaskedModel``: any ``nn.Module`` whose Conv2d layers compute ``conv(x, weight ⊙ mask)`` with learnable masks
(AWM's parametrisation, kernel family 2), through :func:`fastpurify.ops.masked_conv2d` — and, on request, whose
``nn.Linear`` layers compute ``F.linear(x, weight ⊙ mask, bias)`` and whose ``nn.MultiheadAttention`` layers use
``in_proj_weight ⊙ mask`` (transformers have almost no convolutions).

Two paths, same numbers (``path="auto"``, the default, picks ``"multi"``: measured faster on CPU, PreActResNet18
batch 64 forward + backward, 2 threads: 4.9 s vs 7.0 s mean (min 4.1 vs 6.0 s), benchmarks/test_bench_masked_conv.py;
on GPU it keeps cuDNN's convolutions, which the benchmark measures against the Triton ones):

- ``path="layer"``: every selected conv calls ``masked_conv2d`` (W_eff fused into the conv's input
  pass; the backward writes ``∂L/∂mask = ∂L/∂W_eff ⊙ weight`` and skips the weight gradient of frozen weights);
  every selected linear / attention weight is the product ``weight * mask`` (autograd's multiply) for the forward.
- ``path="multi"``: the multi-tensor path around the vendor convolution: every layer's ``W_eff`` (conv, linear and
  attention weights alike: the ops are elementwise over any shape) is built in one launch
  (:func:`~fastpurify.ops.build_masked_weights_`) before the model runs, each conv is the plain ``F.conv2d``, and
  the backward writes every layer's mask gradient in one launch (:func:`~fastpurify.ops.mask_grads_`).

Linear and attention weights are not wrapped in modules: the masked products are swapped in for the duration of
the forward with :func:`torch.func.functional_call` (the model's own modules run unchanged). That is what lets
``nn.MultiheadAttention`` work, since it reads ``in_proj_weight`` and ``out_proj.weight`` as attributes inside
``F.multi_head_attention_forward`` and never calls ``out_proj`` as a module. Its ``out_proj`` is an ``nn.Linear``
and is masked as one; its projection biases, ``bias_k`` / ``bias_v``, LayerNorms, embeddings and tokens are not.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .ops.masked_conv import build_masked_weights_, mask_grads_, masked_conv2d

PATHS = ("auto", "layer", "multi")
#: Which layer types AWM / MaskedModel mask by default (``"conv"``: the published AWM).
MASK_LAYERS = ("conv", "conv+linear", "linear")
_ATTN_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


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


def _kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Conv2d):
        return "conv"
    if isinstance(m, (nn.Linear, nn.MultiheadAttention)):
        return "linear"
    return None


def mask_weights(name: str, m: nn.Module) -> List[Tuple[str, str]]:
    """``(mask key, parameter name in the module)`` of the weights a mask covers: a conv's or linear's ``weight``
    (key: the module name); an attention layer's packed ``in_proj_weight`` (or its separate q/k/v projections
    when ``kdim``/``vdim`` differ from ``embed_dim``; key: ``"<module>.<parameter>"``)."""
    if isinstance(m, nn.MultiheadAttention):
        return [(f"{name}.{p}" if name else p, p) for p in _ATTN_WEIGHTS if getattr(m, p, None) is not None]
    return [(name, "weight")]


def masked_modules(model: nn.Module, mask_layers: str = "conv") -> List[str]:
    """Names of the modules :class:`MaskedModel` masks by default: every ``nn.Conv2d`` (``mask_layers="conv"``),
    every ``nn.Linear`` and ``nn.MultiheadAttention`` (``"linear"``; an attention layer's ``out_proj`` is one of
    those Linear layers), or both (``"conv+linear"``), in module order.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> masked_modules(net), masked_modules(net, "conv+linear")
        (['0'], ['0', '2'])
    """
    if mask_layers not in MASK_LAYERS:
        raise ValueError(f"unknown mask_layers {mask_layers!r}; valid: {', '.join(MASK_LAYERS)}")
    kinds = set(mask_layers.split("+"))
    return [n for n, m in model.named_modules() if _kind(m) in kinds]


class MaskedModel(nn.Module):
    """Wrap ``model`` so that the selected layers compute with ``weight ⊙ mask`` for mask parameters (initialised
    to 1: the wrapped model starts as the original). ``model`` itself is never modified: the wrapper works on a
    deep copy.

    Arguments: ``layers``: names of modules to mask (as in ``model.named_modules()``): ``nn.Conv2d`` (any stride,
    padding, padding mode, dilation or groups), ``nn.Linear`` or ``nn.MultiheadAttention``; default: those of
    :func:`masked_modules` for ``mask_layers`` (``"conv"``: every Conv2d, the default; ``"linear"``;
    ``"conv+linear"``); ``backend``: passed to the ops (see :func:`fastpurify.ops.masked_conv2d`); ``path``:
    ``"auto"``, ``"layer"`` or ``"multi"`` (module docstring); ``freeze_weights``: the masked weights get
    ``requires_grad=False`` (AWM learns the masks only, and the backward then computes no weight gradient).

    Shapes: as ``model``'s forward. ``.masks()`` -> {mask key: mask Parameter of the weight's shape} (the key is
    the module name, or ``"<attention module>.in_proj_weight"``); ``.weight_names()`` -> {mask key: the masked
    parameter's name in ``model``}; ``.fold()`` -> a plain model of ``model``'s class whose masked weights are
    ``weight ⊙ mask``.

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
                 path: str = "auto", freeze_weights: bool = True, mask_layers: str = "conv") -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MaskedModel: model must be an nn.Module, got {type(model).__name__}")
        if path not in PATHS:
            raise ValueError(f"MaskedModel: unknown path {path!r}; valid: {', '.join(PATHS)}")
        if mask_layers not in MASK_LAYERS:
            raise ValueError(f"MaskedModel: unknown mask_layers {mask_layers!r}; valid: {', '.join(MASK_LAYERS)}")
        self.model = copy.deepcopy(model)
        self.backend, self.path = backend, "multi" if path == "auto" else path
        modules = dict(self.model.named_modules())
        if layers is None:
            names = masked_modules(self.model, mask_layers)
        else:
            names = list(dict.fromkeys([layers] if isinstance(layers, str) else layers))
            valid = sorted(n for n, m in modules.items() if _kind(m))
            for n in names:
                if n not in modules:
                    raise ValueError(f"MaskedModel: no module named {n!r}; maskable layers: {valid}")
                if _kind(modules[n]) is None:
                    raise ValueError(f"MaskedModel: {n!r} is a {type(modules[n]).__name__}, not an nn.Conv2d, "
                                     f"nn.Linear or nn.MultiheadAttention; maskable layers: {valid}")
        if "" in names:
            raise ValueError("MaskedModel: model is itself a single layer; wrap it, e.g. nn.Sequential(layer)")
        # (mask key, parameter name in model, index into self.param_masks or -1 for a conv wrapper), module order
        self._targets: List[Tuple[str, str, int]] = []
        self._requires_grad: Dict[str, bool] = {}
        pmasks = []
        for n in names:
            m = modules[n]
            for key, pname in mask_weights(n, m):
                w = getattr(m, pname)
                self._requires_grad[key] = w.requires_grad
                if freeze_weights:
                    w.requires_grad_(False)
                if isinstance(m, nn.Conv2d):
                    self._targets.append((key, f"{n}.{pname}", -1))
                    _set_submodule(self.model, n, _MaskedConv2d(m, backend))
                else:
                    self._targets.append((key, f"{n}.{pname}", len(pmasks)))
                    pmasks.append(nn.Parameter(torch.ones_like(w, memory_format=torch.contiguous_format)))
        self.param_masks = nn.ParameterList(pmasks)  # masks of linear / attention weights, in _targets' order
        self._names: Tuple[str, ...] = tuple(k for k, _, i in self._targets if i < 0)  # the conv wrappers

    def _wrappers(self) -> List[_MaskedConv2d]:
        return [self.model.get_submodule(n) for n in self._names]

    def _swapped(self) -> List[Tuple[str, Tensor, nn.Parameter]]:
        """(parameter name in self.model, the weight, its mask) of every linear / attention target."""
        return [(p, self.model.get_parameter(p), self.param_masks[i]) for _, p, i in self._targets if i >= 0]

    def masks(self) -> Dict[str, nn.Parameter]:
        """{mask key: mask Parameter}, in module order (keys: module names of ``model.named_modules()``, or
        ``"<attention module>.in_proj_weight"``)."""
        convs = dict(zip(self._names, (w.mask for w in self._wrappers())))
        return {k: convs[k] if i < 0 else self.param_masks[i] for k, _, i in self._targets}

    def weight_names(self) -> Dict[str, str]:
        """{mask key: name of the masked parameter in the wrapped model} (e.g. ``"fc"`` -> ``"fc.weight"``)."""
        return {k: p for k, p, _ in self._targets}

    def forward(self, *args, **kwargs):
        swapped = self._swapped()
        if self.path == "layer" or not self._targets:
            if not swapped:
                return self.model(*args, **kwargs)
            return functional_call(self.model, {p: w * m for p, w, m in swapped}, args, kwargs)
        wraps = self._wrappers()
        weights = [w.conv.weight for w in wraps] + [w for _, w, _ in swapped]
        masks = [w.mask for w in wraps] + [m for _, _, m in swapped]
        weffs = _BuildWeights.apply(self.backend, len(weights), *weights, *masks)
        try:
            for w, e in zip(wraps, weffs):
                w.weff = e
            if not swapped:
                return self.model(*args, **kwargs)
            return functional_call(self.model, {p: e for (p, _, _), e in zip(swapped, weffs[len(wraps):])},
                                   args, kwargs)
        finally:
            for w in wraps:
                w.weff = None

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain copy of the wrapped model (``model``'s class, no fastpurify module inside) whose masked
        weights are ``weight ⊙ mask``; its parameters' ``requires_grad`` flags are those of the original model's.

        Example::

            >>> from fastpurify.models import SmallVGG
            >>> mm = MaskedModel(SmallVGG().eval())
            >>> for m in mm.masks().values(): _ = m.data.mul_(0.5)
            >>> x = torch.rand(1, 3, 32, 32); bool(torch.allclose(mm.fold()(x), mm(x), atol=1e-5))
            True
        """
        out = copy.deepcopy(self.model)
        for key, pname, i in self._targets:
            if i < 0:
                wrap = out.get_submodule(key)
                conv = wrap.conv
                conv.weight.copy_(conv.weight * wrap.mask)
                conv.weight.requires_grad_(self._requires_grad[key])
                _set_submodule(out, key, conv)
            else:
                w = out.get_parameter(pname)
                w.copy_(w * self.param_masks[i])
                w.requires_grad_(self._requires_grad[key])
        return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
