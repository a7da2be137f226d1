"""AWM — Adversarial Weight Masking (Chai & Chen, NeurIPS 2022): the faithful eager reference.

Every Conv2d weight θ stays frozen; a soft mask m of the same shape (initialised to 1) is learned and each
conv computes ``conv(x, θ ⊙ m)``. Linear layers, normalisation layers and biases are not masked. The model
stays in eval mode throughout. Per outer epoch (``epochs`` = 20), with ``T = max(1, ⌊n/B⌋)·inner`` batches
drawn with replacement (``inner`` = 5, B = 128):

1. **Trigger recovery**: Δ ← 0 (one universal 1×C×H×W perturbation); for T batches, pseudo-labels
   ``ŷ = argmax f(x)`` and one SGD ascent step ``Δ ← Δ + 10·∇Δ CE(f(x + Δ), ŷ)`` (x + Δ is *not* clamped);
   then ``Δ ← Δ·min(1, τ/‖Δ‖₁)``, τ = 1000.
2. **Mask update**: for T fresh batches, ``L = α·CE(f(x), y) + (1−α)·CE(f(clamp(x + Δ, 0, 1)), y) + γ·Σ|m|``
   (α = 0.9, γ = 1e-8); Adam on the masks only (lr 1e-2, betas (0.9, 0.999), eps 1e-8), then clamp m to
   [0, 1]. Adam's eps is part of the method: with γ = eps = 1e-8 a mask with no task gradient moves by
   ``lr·γ/(γ + eps) = 0.5·lr`` per step, which is what prunes the weights the clean loss does not need.

The returned model is the plain input architecture with the masks folded in (θ ← θ ⊙ m), so it runs without
fastpurify. ``result.info["masks"]`` holds the final masks (module name -> tensor, on the CPU).

**Which layers** (``mask_layers``): ``"conv"`` (the default) is the published method — every Conv2d weight.
``"conv+linear"`` and ``"linear"`` are fastpurify's extension for models with few or no convolutions
(transformers): every ``nn.Linear`` weight, and every ``nn.MultiheadAttention``'s q/k/v projection
(``in_proj_weight``, or ``q/k/v_proj_weight``; its mask key is ``"<module>.in_proj_weight"``) — its ``out_proj`` is
an ``nn.Linear`` and is masked as one. Biases, norms, embeddings and tokens are never masked; ``"linear"`` includes
the classifier head. A model with nothing to mask under the option is an error before any work, and so is
``"conv"`` on a model whose one Conv2d feeds a body of Linear layers (a ViT's patch embedding): the published
choice would leave the whole transformer unmasked, so the error names ``mask_layers="conv+linear"``.

What this port chose, and why (read against ``jinghuichen/AWM: main.py, models/maskedconv.py``):

- **Any model, not only the authors' architectures.** The authors build their networks from a
  ``MaskedConv2d`` class. Here every ``nn.Conv2d`` found by module type (any stride, padding, groups,
  dilation, 1×1 shortcuts) is temporarily parametrised as ``weight = θ ⊙ m`` (``torch.nn.utils.parametrize``),
  which is the published separate elementwise multiply per layer per forward; the parametrisation is removed
  at the end with the product left in the weight.
- **Frozen convs are not masked**: a conv whose weight the user froze (``requires_grad=False``) keeps its weight
  (fastpurify's policy: a defense never changes a frozen parameter); the authors mask every conv.
- **Pseudo-labels in the recovery**: the code uses ``argmax f(x)``, the paper writes the true labels; the
  code is followed.
- **T for small data**: the published ``T = int(n/B)·inner`` is 0 when n < B, and the authors' one-shot
  recipe (``--batch-size 32 --samples 10 --trigger-norm 100 --alpha 0.99`` with 9 augmented copies per
  image) relies on n ≥ B. Here ``T = max(1, ⌊n/B⌋)·inner``, so one image per class runs with the defaults;
  the augmentation of that recipe is not part of this reference.
- **lr decay**: early versions of ``main.py`` always applied ``ExponentialLR(gamma=0.9)`` per outer epoch;
  the current one applies it only with ``--lr-decay``, off by default. ``lr_decay`` (default 1.0 = off)
  is that gamma.
- **Shrink steps**: the optional published pre-phase (``--shrink-steps``, default 0: that many passes of
  ``CE(f(x), y) + γ·Σ|m|`` with a separate Adam, lr 1e-3) runs at the start of the first round.
- **Kept as published** (the baseline's waste): the pseudo-label forward is built with a graph; the
  recovery loss is backpropagated with ``retain_graph=True`` into Δ *and* into every weight and mask
  (every parameter of the model the user did not freeze requires grad during the defense, as in the authors'
  freshly built network, and θ.grad accumulates without ever being used or zeroed); the unused L2 norm of the
  masks and a ``loss.item()`` host sync are computed at every mask step. Gradients are cleared and the caller's
  ``requires_grad`` flags restored at the end.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import Tensor, nn

from ...defenses._inputs import Normalize
from ...defenses._loop import PurifyResult, check_choice, check_positive, run_defense
from ...masked import MASK_LAYERS, mask_weights, masked_modules


@dataclass
class AWMConfig:
    """AWM hyper-parameters (published defaults of ``main.py``)."""

    epochs: int = 20  # outer epochs E (--outer); one round = one trigger recovery + one mask update
    batch_size: int = 128  # B; batches are drawn with replacement
    inner: int = 5  # --inner: T = max(1, n // B) * inner steps in each of the two phases of a round
    alpha: float = 0.9  # weight of the clean CE; the recovered-trigger CE gets 1 - alpha
    gamma: float = 1e-8  # weight of the L1 norm of all masks
    trigger_norm: float = 1000.0  # τ: Δ is rescaled to ‖Δ‖₁ <= τ after the recovery
    trigger_lr: float = 10.0  # SGD ascent step of the recovery
    lr: float = 1e-2  # Adam learning rate of the masks (--lr2)
    betas: Tuple[float, float] = (0.9, 0.999)  # Adam betas (torch default, as published)
    eps: float = 1e-8  # Adam eps; keep it: with gamma = eps an idle mask shrinks by 0.5 * lr per step
    lr_decay: float = 1.0  # ExponentialLR gamma per outer epoch (1.0 = off, the current --lr-decay default)
    shrink_steps: int = 0  # optional pre-phase of L1-only mask shrinking (--shrink-steps), in rounds of T steps
    shrink_lr: float = 1e-3  # Adam learning rate of the shrink pre-phase (--lr1)
    mask_layers: str = "conv"  # "conv" (published) | "conv+linear" | "linear" (+ attention projections)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "inner"):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("shrink_steps", self.shrink_steps, integer=True, allow_zero=True)
        for name in ("trigger_norm", "trigger_lr", "lr", "shrink_lr"):
            check_positive(name, getattr(self, name))
        for name in ("gamma", "eps"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_positive("alpha", self.alpha, allow_zero=True)
        if self.alpha > 1:
            raise ValueError(f"alpha must lie in [0, 1] (the clean-loss weight), got {self.alpha!r}")
        check_positive("lr_decay", self.lr_decay)
        if self.lr_decay > 1:
            raise ValueError(f"lr_decay must lie in (0, 1] (1.0 = no decay), got {self.lr_decay!r}")
        ok = isinstance(self.betas, (tuple, list)) and len(self.betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in self.betas)
        if not ok:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {self.betas!r}")
        check_choice("mask_layers", self.mask_layers, MASK_LAYERS)


# --------------------------------------------------------------------------------------------------------
# Pieces (unit-tested on their own)
# --------------------------------------------------------------------------------------------------------


class _Mask(nn.Module):
    """The parametrisation ``θ -> θ ⊙ m`` of one conv weight; ``m`` starts at 1."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.ones_like(weight))

    def forward(self, theta: Tensor) -> Tensor:
        return theta * self.mask


def l1_rescale(delta: Tensor, tau: float) -> Tensor:
    """``Δ·min(1, τ/‖Δ‖₁)``: shrink Δ onto the L1 ball of radius τ when it is outside (never grow it).

    Shapes: ``delta`` any shape (1×C×H×W in AWM) -> same shape. A zero Δ is returned unchanged.

    Example::

        >>> l1_rescale(torch.tensor([3.0, -1.0]), 2.0)
        tensor([ 1.5000, -0.5000])
    """
    norm = delta.abs().sum()
    if float(norm) <= tau:
        return delta
    return delta * (tau / norm)


def mask_regularization(masks: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(Σ|m|, Σ‖m‖₂)`` over all masks, as the published ``Regularization`` (only the L1 term is used).

    Shapes: ``masks`` any shapes -> two scalars.

    Example::

        >>> [round(v.item(), 4) for v in mask_regularization([torch.ones(2, 2), torch.full((3,), -0.5)])]
        [5.5, 2.866]
    """
    l1 = sum(m.abs().sum() for m in masks)
    l2 = sum(torch.norm(m, 2) for m in masks)
    return l1, l2


def mask_optimizer(masks: List[Tensor], cfg: AWMConfig) -> torch.optim.Adam:
    """The published mask optimiser: Adam(lr, betas, eps) over the masks only (θ is never stepped).

    Example::

        >>> mask_optimizer([nn.Parameter(torch.ones(3))], AWMConfig()).defaults["eps"]
        1e-08
    """
    return torch.optim.Adam(masks, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def mask_step(loop, optimizer: torch.optim.Optimizer, masks: List[Tensor], loss: Optional[Tensor]) -> None:
    """One mask update: (backward of ``loss``,) the Adam step, then the projection ``m ← clamp(m, 0, 1)``.

    Shapes: ``masks`` — one tensor per conv, each the shape of its weight.

    Example::

        >>> from fastpurify.defenses._loop import Loop
        >>> loop = Loop("awm", 1, device=torch.device("cpu"), seed=0, progress=False, time_budget=None,
        ...             eval_fn=None, eval_every=1)
        >>> m = nn.Parameter(torch.ones(3))
        >>> mask_step(loop, mask_optimizer([m], AWMConfig()), [m], 1e-8 * m.abs().sum())  # only the L1 term
        >>> round(m[0].item(), 6)  # an idle mask shrinks by lr * gamma / (gamma + eps) = 0.5 * lr
        0.995
    """
    def clamp() -> None:
        with torch.no_grad():
            for m in masks:
                m.clamp_(0.0, 1.0)

    loop.step(optimizer, loss, project=clamp)


def maskable_layers(net: nn.Module, mask_layers: str = "conv") -> List[Tuple[str, str, str]]:
    """``(mask key, module name, parameter name)`` of every weight AWM masks under ``mask_layers`` (see the module
    docstring), in module order: every one that is trainable. A weight the user froze (``requires_grad=False``)
    gets no mask, since a defense never changes a frozen parameter. Raises ``ValueError`` when nothing can be
    masked, and for ``"conv"`` on a model whose single Conv2d feeds several Linear / attention layers.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> [k for k, _, _ in maskable_layers(net)], [k for k, _, _ in maskable_layers(net, "linear")]
        (['0', '2'], ['4'])
        >>> [k for k, _, _ in maskable_layers(net[0].requires_grad_(False) and net)]
        ['2']
    """
    check_choice("mask_layers", mask_layers, MASK_LAYERS)
    modules = dict(net.named_modules())
    found = [(key, n, p) for n in masked_modules(net, mask_layers) for key, p in mask_weights(n, modules[n])]
    what = {"conv": "Conv2d layers", "linear": "Linear / MultiheadAttention layers",
            "conv+linear": "Conv2d, Linear and MultiheadAttention layers"}[mask_layers]
    if not found:
        other = "'conv+linear'" if mask_layers == "conv" else "'conv' or 'conv+linear'"
        raise ValueError(f"AWM with mask_layers={mask_layers!r} masks the model's {what}, and this model has none: "
                         f"pass mask_layers={other}, or use another defense")
    if mask_layers == "conv":
        dense = masked_modules(net, "linear")
        if len(found) == 1 and len(dense) >= 2:
            raise ValueError(f"AWM with mask_layers='conv' (the published choice) would mask only the model's one "
                             f"Conv2d ({found[0][1]!r}, e.g. a transformer's patch embedding) and leave its "
                             f"{len(dense)} Linear / MultiheadAttention layers unmasked: pass "
                             "mask_layers='conv+linear' (or 'linear')")
    names = [(k, n, p) for k, n, p in found if getattr(modules[n], p).requires_grad]
    if not names:
        raise ValueError(f"AWM masks the weights of the model's {what} (mask_layers={mask_layers!r}), and all "
                         f"{len(found)} are frozen (requires_grad=False); a defense never changes a frozen "
                         "parameter: unfreeze those weights to purify with AWM, or use another defense")
    return names


def _user_name(net: nn.Module, name: str) -> str:
    """A layer's name in the *user's* model (the defenses may wrap it as Sequential(Normalize, model))."""
    wrapped = isinstance(net, nn.Sequential) and len(net) == 2 and isinstance(net[0], Normalize)
    return name[2:] if wrapped and name.startswith("1.") else name


# --------------------------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------------------------


# With a time budget, the first round's trigger recovery may take at most this share of the budget, so that the
# first mask update still fits (the two phases have T steps of about the same cost).
RECOVERY_SHARE = 1 / 3


def folded_state(net: nn.Module, targets: List[Tuple[nn.Module, str]]) -> Dict[str, Tensor]:
    """The state dict AWM returns now: every masked weight as θ ⊙ m, without the parametrisation's own entries
    (``parametrizations.<name>.original`` / ``.mask``). ``targets``: (module, parameter name) pairs."""
    masked = {}
    for m, p in targets:
        masked.setdefault(id(m), []).append(p)
    out: Dict[str, Tensor] = {}
    for name, m in net.named_modules():
        for p in masked.get(id(m), ()):
            if parametrize.is_parametrized(m, p):
                out[f"{name}.{p}" if name else p] = getattr(m, p).detach()
    for k, v in net.state_dict().items():
        if ".parametrizations." not in f".{k}":
            out[k] = v
    return out


def _recover(net: nn.Module, data, cfg: AWMConfig, loop, steps: int) -> Tensor:
    """Phase 1: a universal Δ by SGD ascent on CE against the model's own predictions, then the L1 rescale."""
    delta = torch.zeros((1, *data.x.shape[1:]), device=data.x.device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=cfg.trigger_lr)
    for idx in loop.batches(len(data), cfg.batch_size, replacement=True, steps=steps, kind="recovery"):
        x = data.x[idx]
        pseudo = torch.argmax(net(x), dim=1).long()  # as published: a forward with a graph nobody uses
        loss = -F.cross_entropy(net(x + delta), pseudo)  # no clamp of x + Δ here, as published
        loop.check_finite(loss, "trigger-recovery loss")
        opt.zero_grad()
        loss.backward(retain_graph=True)  # as published: also fills every weight's and mask's .grad
        loop.step(opt, updates_model=False)  # Δ's step: the model is not changed (for the time budget)
    with torch.no_grad():
        return l1_rescale(delta.detach(), cfg.trigger_norm)


def _update_masks(net, data, cfg: AWMConfig, loop, steps: int, delta: Tensor, masks, opt) -> Tuple[float, float]:
    """Phase 2: T Adam steps on the masks against the clean and the recovered-trigger loss; returns the mean
    loss and the clean accuracy on the batches seen."""
    total, correct, seen = 0.0, 0, 0
    for idx in loop.batches(len(data), cfg.batch_size, replacement=True, steps=steps, kind="mask"):
        x, y = data.x[idx], data.y[idx]
        out_noise = net(torch.clamp(x + delta, 0.0, 1.0))
        out_clean = net(x)
        l1, _l2 = mask_regularization(masks)  # as published: the L2 norm is computed and never used
        loss = (cfg.alpha * F.cross_entropy(out_clean, y) + (1 - cfg.alpha) * F.cross_entropy(out_noise, y)
                + cfg.gamma * l1)
        loop.check_finite(loss, "mask loss")
        mask_step(loop, opt, masks, loss)
        total += loss.item()  # as published: one host sync per step
        correct += int((out_clean.detach().argmax(1) == y).sum())
        seen += y.numel()
    return total / max(1, steps), correct / max(1, seen)


def _shrink(net, data, cfg: AWMConfig, loop, steps: int, masks) -> None:
    opt = torch.optim.Adam(masks, lr=cfg.shrink_lr)
    for _ in range(cfg.shrink_steps):
        for idx in loop.batches(len(data), cfg.batch_size, replacement=True, steps=steps):
            l1, _l2 = mask_regularization(masks)
            loss = F.cross_entropy(net(data.x[idx]), data.y[idx]) + cfg.gamma * l1
            loop.check_finite(loss, "shrink loss")
            mask_step(loop, opt, masks, loss)


def _awm(net: nn.Module, data, cfg: AWMConfig, loop) -> dict:
    layers = maskable_layers(net, cfg.mask_layers)  # a frozen weight gets no mask
    targets = [(net.get_submodule(n), p) for _, n, p in layers]
    keys = [_user_name(net, k) for k, _, _ in layers]
    steps = max(1, len(data) // cfg.batch_size) * cfg.inner
    flags = [(p, p.requires_grad) for p in net.parameters()]
    finished = False
    delta = torch.zeros((1, *data.x.shape[1:]), device=data.x.device)
    done: List[Tuple[str, nn.Module, str]] = []
    try:
        # As published, every parameter requires grad (the authors' freshly built network), except the ones the
        # user froze: they stay frozen and unmasked. Only the masks are stepped either way.
        masks = []
        with loop.writing("mask parametrisation"):  # the weights become θ ⊙ m (m = 1: the same values)
            for key, (mod, p) in zip(keys, targets):
                parametrize.register_parametrization(mod, p, _Mask(getattr(mod, p)))
                done.append((key, mod, p))
                masks.append(getattr(mod.parametrizations, p)[0].mask)
        opt = mask_optimizer(masks, cfg)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
        # carried from round to round: the masks (in the model's state), their optimiser and its schedule
        loop.track(optimizer=opt, scheduler=sched)
        loop.set_export(lambda: folded_state(net, targets))  # what an interruption returns: θ ⊙ m so far
        for r in loop.rounds():
            net.eval()
            if r == 0 and cfg.shrink_steps:
                with loop.phase("shrink", once=True):  # one-off (first round only)
                    _shrink(net, data, cfg, loop, steps, masks)
            lr = opt.param_groups[0]["lr"]
            with loop.phase("recover"), loop.share(RECOVERY_SHARE):
                delta = _recover(net, data, cfg, loop, steps)
            with loop.phase("mask"):
                loss, acc = _update_masks(net, data, cfg, loop, steps, delta, masks, opt)
            sched.step()
            with torch.no_grad():
                n_mask = sum(m.numel() for m in masks)
                mean = sum(m.sum() for m in masks) / n_mask
                zero = sum((m == 0).sum() for m in masks) / n_mask
            loop.log(loss=loss, train_acc=acc, trigger_l1=delta.abs().sum(), mask_mean=mean, mask_zero=zero, lr=lr)
        finished = True
    finally:
        # Fold θ ⊙ m into each weight (the Parameter object is kept); on an error, restore θ instead.
        final = {key: getattr(mod.parametrizations, p)[0].mask.detach().cpu().clone() for key, mod, p in done}
        with loop.writing("fold the masks") if finished else contextlib.nullcontext():
            for _, mod, p in done:
                parametrize.remove_parametrizations(mod, p, leave_parametrized=finished)
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
    net.eval()
    return {"masks": final, "masked_layers": keys, "inner_steps": steps, "trigger": delta.detach().cpu()}


def awm(model: nn.Module, clean_data, **kwargs) -> PurifyResult:
    """Purify ``model`` with AWM: learn soft masks on every Conv2d weight (``mask_layers="conv"``, published; or
    ``"conv+linear"`` / ``"linear"`` for transformers, see the module docstring) against a recovered universal
    trigger, then fold them into the weights.

    ``clean_data``: labelled clean images — an ``(x, y)`` pair (x N×C×H×W in [0, 1], y N int), a Dataset or a
    DataLoader; works one-shot (one image per class: batches are drawn with replacement). Hyper-parameters: the
    fields of :class:`AWMConfig` (published defaults: 20 outer epochs, batch 128, T = max(1, ⌊n/B⌋)·5,
    α = 0.9, γ = 1e-8, τ = 1000, recovery lr 10, Adam lr 1e-2 / eps 1e-8); common options as in every
    defense (``normalization``, ``epochs``, ``device``, ``seed``, ``time_budget``, ``eval_data``,
    ``eval_every``, ``progress``, ``inplace``, ``check_range``). Kept quirks: pseudo-labels and no clamp in
    the recovery, gradients into every weight during the recovery (see the module docstring).

    Returns a :class:`PurifyResult` whose ``model`` has the input's architecture with conv weights θ ⊙ m;
    ``info["masks"]`` maps each conv's name to its final mask (its weight's shape), ``info["trigger"]`` is the
    last recovered Δ (1×C×H×W, pixel units), ``info["inner_steps"]`` is T.

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> from fastpurify.data import synthetic_dataset
        >>> x, y = synthetic_dataset(n=64)
        >>> r = awm(SmallVGG(), (x, y), epochs=1, batch_size=32, inner=1, progress=False)
        >>> r.status, sorted(r.info["masks"])[0], type(r.model).__name__
        ('completed', 'features.0', 'SmallVGG')
    """
    check_model_layers(model, kwargs)
    return run_defense("awm", _awm, AWMConfig, model, clean_data, allow_small=True, **kwargs)


def check_model_layers(model: nn.Module, kwargs: Dict[str, Any]) -> None:
    """Before any work: ``mask_layers`` (from the defense's keyword arguments) is valid and finds weights to mask
    in ``model`` (see :func:`maskable_layers`)."""
    if isinstance(model, nn.Module):  # anything else gets run_defense's own error
        maskable_layers(model, kwargs.get("mask_layers", AWMConfig.mask_layers))
