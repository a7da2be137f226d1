"""AWM — Adversarial Weight Masking, the fast path (the algorithm of :mod:`fastpurify.reference.defenses.awm`,
with the published code's waste removed).

What changes against the reference, and why it is the same method:

- the masks live in a :class:`fastpurify.masked.MaskedModel` (``path="multi"``): every masked weight's
  ``W_eff = θ ⊙ m`` (conv, and with ``mask_layers="conv+linear"`` / ``"linear"`` linear and attention weights)
  is built in one launch per forward and every mask gradient ``∂L/∂W_eff ⊙ θ`` in one launch per backward
  (the reference's parametrisation runs a separate multiply per layer per forward); inside it only the masks
  require grad, so no weight, bias, BN or linear gradient is ever computed (the reference computes all of them
  in both phases);
- **trigger recovery**: the pseudo-labels come from a forward under ``no_grad`` (the reference builds a graph),
  the masks are frozen for the phase (no mask graph), the autograd leaf is the per-sample input ``x + Δ`` and
  only its gradient is computed; the batch mean, the SGD ascent step (lr 10) and — on the last of the T steps —
  the L1 rescale ``Δ·min(1, τ/‖Δ‖₁)`` are one fused :func:`fastpurify.ops.universal_update_` (the reference
  rescales once, after its T steps, with a host read of ``‖Δ‖₁``: fusing the rescale into the last step is the
  same arithmetic);
- **mask update**: the clean and the recovered-trigger batch go through the model as one forward of 2B rows
  (eval mode: the same per-row result, one W_eff build instead of two); the L1 term's subgradient, Adam
  (``eps`` exactly as given) and the clamp to [0, 1] are one :func:`fastpurify.ops.masked_adam_clamp_` for all
  layers, behind a small ``torch.optim.Optimizer`` so that the weights still change at the loop's one step
  point (DESIGN rule 9) and ``lr_decay`` is the same ``ExponentialLR``; the unused L2 norm of the masks and the
  per-step ``loss.item()`` are gone (statistics stay on the device, read once per round);
- ``precision="bf16"`` runs the model's forwards (recovery and mask update) under bf16 autocast; masks, Δ,
  the losses and Adam stay fp32 (off by default: on the tiny test model it purified less in 3 rounds — ASR
  91.9 → 51.5 % against 34.4 % in fp32 — so measure the quality on your model first). On the two real SmallVGG
  checkpoints (one round, 2,500 clean images, 2 CPU threads, avx512_bf16, end_to_end.md) bf16 ran 1.66× / 1.54× the
  reference (fp32: 1.11× / 1.02×) and purified *more* after that round — ASR 71.96 vs 83.60 % (badnets), 8.62
  vs 9.99 % (trojan_wm), ACC within 0.15 point — a different trajectory, so not the reference's outcome;
- the result is folded the reference's way: the conv weights of the model ``run_defense`` returns (the copy,
  or the user's model with ``inplace=True``) become θ ⊙ m in place — a plain model of the user's class.

Everything else — the defaults, T, the batches drawn with replacement from the loop's generator in the
reference's order, the optional shrink pre-phase — is the reference's
(:class:`~fastpurify.reference.defenses.awm.AWMConfig`). In fp32 the first round follows the reference's to
float rounding (loss 4e-5 relative); over more rounds Adam's ±lr steps on masks whose gradient is near zero
take the sign of that rounding and the trajectories drift, while the outcome agrees (tests/test_fast_awm.py,
6 rounds on a tiny backdoored net: ASR 91.9 -> 27.4 % fast, 21.1 % reference; ACC 94.7 -> 82.3 / 82.0 %).

Speed on CPU (1 thread on a loaded 2-core machine, min of 3 interleaved runs; the real SmallVGG BadNets
checkpoint, 500 CIFAR-10 images, one round with the defaults, T = 15): 12.4 s vs 13.3 s for the reference
(1.07×); recovery 4.7 vs 5.6 s, mask update 7.7 vs 7.7 s. On a CPU the mask gradient costs what the weight
gradient it replaces costs (it is the same weight-gradient convolution), so the gain there is the recovery's;
the one-launch W_eff / mask-gradient / optimiser steps and the absent host syncs are for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend import launch_bound
from ..masked import MaskedModel
from ..ops.masked_conv import masked_adam_clamp_
from ..ops.universal import universal_update_
from ..reference.defenses.awm import RECOVERY_SHARE, AWMConfig, _user_name, check_model_layers, maskable_layers
from ._loop import PRECISIONS, PurifyResult, check_choice, precision_autocast, run_defense


@dataclass
class FastAWMConfig(AWMConfig):
    """The reference's hyper-parameters (same defaults) plus the fast path's execution option."""

    precision: str = "fp32"  # "bf16": the model's forwards (recovery and mask update) under bf16 autocast

    def validate(self) -> None:
        super().validate()
        check_choice("precision", self.precision, PRECISIONS)


class MaskedAdamClamp(torch.optim.Optimizer):
    """AWM's mask optimiser — ``Adam(masks, lr, betas, eps)`` on ``loss + l1·Σ|m|``, then ``m ← clamp(m, 0, 1)`` —
    as one :func:`fastpurify.ops.masked_adam_clamp_` call for all masks. The L1 term is applied by the op (its
    subgradient ``l1·sign(m)``), so the loss given to ``backward`` leaves it out; a mask without a gradient gets
    the L1 term alone, as in the reference, where the L1 term gives every mask a gradient.

    Shapes: ``params``: the mask tensors (any shapes). Example::

        >>> m = nn.Parameter(torch.ones(3)); opt = MaskedAdamClamp([m], lr=1e-2, l1=1e-8)
        >>> opt.step(); round(m[0].item(), 6)  # an idle mask shrinks by lr · γ/(γ + eps) = 0.5 · lr
        0.995
    """

    def __init__(self, params, *, lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 l1: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, l1=l1))

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every mask; ``closure`` (optional, as for torch's optimizers) recomputes the loss and its
        gradients first, and its loss is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps: List[Tensor] = group["params"]
            for p in ps:
                if not self.state[p]:
                    self.state[p].update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            # One launch per distinct step count (all masks are stepped together, so normally one).
            by_step: Dict[int, List[Tensor]] = {}
            for p in ps:
                self.state[p]["step"] += 1
                by_step.setdefault(self.state[p]["step"], []).append(p)
            for step, group_ps in by_step.items():
                st = [self.state[p] for p in group_ps]
                masked_adam_clamp_(group_ps, [torch.zeros_like(p) if p.grad is None else p.grad for p in group_ps],
                                   [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], lr=group["lr"],
                                   betas=group["betas"], eps=group["eps"], l1=group["l1"], step=step)
        return loss


def folded_state(net: nn.Module, named: Dict[str, Tensor], weights: Dict[str, str]) -> Dict[str, Tensor]:
    """``net``'s state dict with each masked weight replaced by θ ⊙ m (what AWM returns); ``weights``: mask key ->
    the masked parameter's name in ``net``."""
    sd = dict(net.state_dict())
    for key, m in named.items():
        sd[weights[key]] = sd[weights[key]] * m.detach()
    return sd


def recover_trigger(mm: MaskedModel, data, cfg: AWMConfig, loop, steps: int) -> Tensor:
    """Phase 1: a universal Δ by T SGD ascent steps on ``CE(f(x + Δ), argmax f(x))`` (no clamp, as published),
    the L1 rescale fused into the last step. The masks must not require grad during the call.

    Shapes: ``data.x`` (N, C, H, W) -> Δ (1, C, H, W)."""
    delta = torch.zeros((1, *data.x.shape[1:]), device=data.x.device)
    t = -1
    for t, idx in enumerate(loop.batches(len(data), cfg.batch_size, replacement=True, steps=steps, kind="recovery")):
        x = data.x[idx]
        with torch.no_grad(), precision_autocast(cfg.precision, x.device):
            pseudo = mm(x).argmax(1)
        # The leaf is the per-sample input x + Δ: its gradient is the batch of per-sample gradients, which the
        # fused update averages in the same pass as the step; nothing else in the model requires grad.
        leaf = (x + delta).requires_grad_(True)
        with precision_autocast(cfg.precision, x.device):
            logits = mm(leaf)
        ce_sum = F.cross_entropy(logits.float(), pseudo, reduction="sum")
        (g,) = torch.autograd.grad(ce_sum, leaf)
        loop.check_finite(ce_sum, "trigger-recovery loss")
        last = t == steps - 1
        if loop.distributed:  # the global batch's mean gradient (one all-reduce), the same step on every rank
            g = loop.global_sum(g.sum(0, keepdim=True)) / loop.batch_n
        universal_update_(delta, g.contiguous(), step=cfg.trigger_lr, reduction="mean",
                          norm="l1" if last else None, radius=cfg.trigger_norm if last else None)
    if t < steps - 1:  # a time budget ended the recovery early: the rescale the last step would have fused
        delta.mul_(torch.clamp(cfg.trigger_norm / delta.abs().sum().clamp_min(1e-12), max=1.0))
    return delta


def _l1(masks: Sequence[Tensor]) -> Tensor:
    return torch.stack(torch._foreach_norm(list(masks), 1)).sum()


def update_masks(mm: MaskedModel, data, cfg: AWMConfig, loop, steps: int, delta: Tensor, masks: Sequence[Tensor],
                 opt: torch.optim.Optimizer) -> Tuple[Tensor, Tensor]:
    """Phase 2: T mask steps on ``α·CE(f(x), y) + (1−α)·CE(f(clamp(x+Δ, 0, 1)), y) + γ·Σ|m|``; returns the mean
    loss and the clean accuracy on the batches seen (0-d device tensors).

    Shapes: ``delta`` (1, C, H, W); ``masks`` one tensor per conv (its weight's shape)."""
    dev = data.x.device
    total, correct, seen = torch.zeros((), device=dev), torch.zeros((), device=dev), 0
    for idx in loop.batches(len(data), cfg.batch_size, replacement=True, steps=steps, kind="mask"):
        x, y = data.x[idx], data.y[idx]
        n = x.shape[0]
        # eval mode: one forward of the 2B rows gives each row what its own forward would (one W_eff build)
        with precision_autocast(cfg.precision, x.device):
            if launch_bound(x.device):  # one launch sequence for both batches
                out_noise, out_clean = torch.split(mm(torch.cat([torch.clamp(x + delta, 0.0, 1.0), x])).float(), n)
            else:  # on CPU two forwards of B rows measured faster than one of 2B (SmallVGG, 2 threads)
                out_noise, out_clean = mm(torch.clamp(x + delta, 0.0, 1.0)).float(), mm(x).float()
        loss = cfg.alpha * F.cross_entropy(out_clean, y) + (1 - cfg.alpha) * F.cross_entropy(out_noise, y)
        with torch.no_grad():
            logged = loss.detach() + cfg.gamma * _l1(masks)  # the reference's loss, L1 term included
            correct += (out_clean.argmax(1) == y).sum()
        loop.check_finite(logged, "mask loss")
        loop.step(opt, loss)  # the L1 term, Adam and the clamp: one fused launch (MaskedAdamClamp)
        total += logged
        seen += n
    return total / max(1, steps), correct / max(1, seen)


def _shrink(mm: MaskedModel, data, cfg: AWMConfig, loop, steps: int, masks) -> None:
    opt = MaskedAdamClamp(masks, lr=cfg.shrink_lr, l1=cfg.gamma)  # the published torch.optim.Adam(lr) defaults
    for _ in range(cfg.shrink_steps):
        for idx in loop.batches(len(data), cfg.batch_size, replacement=True, steps=steps):
            loss = F.cross_entropy(mm(data.x[idx]), data.y[idx])
            loop.check_finite(loss, "shrink loss")
            loop.step(opt, loss)


def _awm(net: nn.Module, data, cfg: FastAWMConfig, loop) -> Dict[str, Any]:
    # as in the reference: the layers of cfg.mask_layers, a weight the user froze gets no mask
    layers = list(dict.fromkeys(n for _, n, _ in maskable_layers(net, cfg.mask_layers)))
    steps = max(1, len(data) // cfg.batch_size) * cfg.inner
    net.eval()
    mm = MaskedModel(net, layers, path="multi").eval()  # works on a copy of net; folded back into net at the end
    weights = mm.weight_names()
    for p in mm.parameters():  # only the masks are learned: no gradient for anything else
        p.requires_grad_(False)
    named = mm.masks()
    masks = list(named.values())
    opt = MaskedAdamClamp(masks, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, l1=cfg.gamma)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    # carried from round to round: the masks, their optimiser and its schedule (Δ is recovered anew each round)
    loop.track(masks=(lambda: [m.detach().cpu().clone() for m in masks],
                      lambda saved: [m.data.copy_(v) for m, v in zip(masks, saved)]),
               optimizer=opt, scheduler=sched)
    loop.set_export(lambda: folded_state(net, named, weights))  # what an interruption returns: θ ⊙ m so far
    delta = torch.zeros((1, *data.x.shape[1:]), device=data.x.device)
    for r in loop.rounds():
        if r == 0 and cfg.shrink_steps:
            for m in masks:
                m.requires_grad_(True)
            with loop.phase("shrink", once=True):  # one-off (first round only)
                _shrink(mm, data, cfg, loop, steps, masks)
        lr = opt.param_groups[0]["lr"]
        for m in masks:  # the recovery needs input gradients only
            m.requires_grad_(False)
        with loop.phase("recover"), loop.share(RECOVERY_SHARE):
            delta = recover_trigger(mm, data, cfg, loop, steps)
        for m in masks:
            m.requires_grad_(True)
        with loop.phase("mask"):
            loss, acc = update_masks(mm, data, cfg, loop, steps, delta, masks, opt)
        sched.step()
        with torch.no_grad():
            n_mask = sum(m.numel() for m in masks)
            mean = torch.stack([m.sum() for m in masks]).sum() / n_mask
            zero = torch.stack([(m == 0).sum() for m in masks]).sum() / n_mask
        loop.log(loss=loss, train_acc=acc, trigger_l1=delta.abs().sum(), mask_mean=mean, mask_zero=zero, lr=lr)
    # Fold θ ⊙ m into net's own weights (the Parameter objects are kept, as the reference's parametrize
    # removal keeps them), so that the returned model is the user's class with no fastpurify module inside.
    with torch.no_grad(), loop.writing("fold the masks"):
        for key, m in named.items():
            net.get_parameter(weights[key]).mul_(m)
    net.eval()
    return {"masks": {_user_name(net, n): m.detach().cpu().clone() for n, m in named.items()},
            "masked_layers": [_user_name(net, n) for n in named], "inner_steps": steps,
            "trigger": delta.detach().cpu()}


#: The fastpurify ops this path calls (checked against ``backend=`` before any work).
OPS = ("universal_update", "build_masked_weights", "mask_grads", "masked_adam_clamp")


def awm(model: nn.Module, clean_data, **kwargs) -> PurifyResult:
    """Purify ``model`` with AWM (Adversarial Weight Masking) — the fast path.

    Same arguments, defaults and result as :func:`fastpurify.reference.defenses.awm.awm` (``mask_layers``:
    ``"conv"`` (published) | ``"conv+linear"`` | ``"linear"`` — Linear and MultiheadAttention weights for
    transformers; the fields of
    :class:`~fastpurify.reference.defenses.awm.AWMConfig` and the common options): ``clean_data`` labelled clean
    images (x N×C×H×W in [0, 1], y (N,)), one image per class suffices. Returns a :class:`PurifyResult` whose
    ``model`` has the input's class with conv weights θ ⊙ m; ``info["masks"]`` maps each conv's name to its
    final mask (its weight's shape), ``info["trigger"]`` is the last recovered Δ (1×C×H×W), ``info["inner_steps"]``
    is T. See the module docstring for what is faster and why it is the same method.

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> from fastpurify.data import synthetic_dataset
        >>> x, y = synthetic_dataset(n=64)
        >>> r = awm(SmallVGG(), (x, y), epochs=1, batch_size=32, inner=1, progress=False)
        >>> r.status, sorted(r.info["masks"])[0], type(r.model).__name__
        ('completed', 'features.0', 'SmallVGG')
    """
    check_model_layers(model, kwargs)
    return run_defense("awm", _awm, FastAWMConfig, model, clean_data, ops=OPS, allow_small=True, sync_checks=False,
                       fast_path=True, **kwargs)
