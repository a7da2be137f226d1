"""SAU — Shared Adversarial Unlearning, the fast path (the algorithm of
:mod:`fastpurify.reference.defenses.sau`, with the published code's waste removed).

What changes against the reference, and why it is the same method:

- the attack is :class:`fastpurify.ops.SharedPGD`: clean predictions computed once per batch (they cannot
  change during the attack), input gradients only (the reference's ``loss.backward()`` also fills both
  models' weight gradients), the fused update that also writes the next model input, the early exit
  decided on the device; on CUDA the two models run stacked through ``torch.func`` and the loss is the fused
  :func:`fastpurify.ops.dual_logit_loss`. In fp32 on CPU its δ equals the reference's bit for bit;
- the frozen model ``f0`` runs without autograd (``requires_grad_(False)``, ``no_grad``), and only once per
  unlearning step, on ``x + δ`` (its clean predictions come from the attack);
- the unlearning loss uses masks instead of boolean indexing and host tests (no host synchronisation), and
  skips the adversarial-training term when its weight λ2 is 0 (the reference computes it and multiplies by 0);
- per-round statistics stay on the device and are read once per round; the finite-loss guard records the
  first bad step on the device (checked at the round's end);
- ``precision="bf16"`` runs the attack's forwards under bf16 autocast (the unlearning step stays fp32), and
  ``channels_last=True`` converts the working copy and the inputs (both off by default: measure first).
  Measured on the two real SmallVGG checkpoints (one round, 2,500 clean images, 2 CPU threads, avx512_bf16,
  end_to_end.md): fp32 1.57× / 1.85× the reference (badnets / trojan_wm) with the reference's ACC and ASR
  exactly; bf16 2.02× / 2.46×, ACC and ASR within 0.1 point of the reference's — the quality holds.

Everything else — the defaults, the schedule, δ's initialisation, the potential-poison rule and the clamps of
``L_sar`` — is the reference's (:class:`~fastpurify.reference.defenses.sau.SAUConfig`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend import launch_bound
from ..ops.attack import SharedPGD
from ..reference.defenses.sau import SAUConfig
from ._loop import PRECISIONS, PurifyResult, check_choice, run_defense


@dataclass
class FastSAUConfig(SAUConfig):
    """The reference's hyper-parameters plus the fast path's execution options."""

    precision: str = "fp32"  # "bf16": the attack's forwards under bf16 autocast
    channels_last: bool = False  # run the models on channels_last tensors
    cuda_graph: bool = False  # capture one attack step into a CUDA graph (CUDA only; L∞/L1)

    def validate(self) -> None:
        super().validate()
        check_choice("precision", self.precision, PRECISIONS)
        for name in ("channels_last", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


_NORMS = {"L_inf": "linf", "L2": "l2", "L1": "l1"}  # "Reg" (no projection): _Unprojected


class _Unprojected(SharedPGD):
    """:class:`~fastpurify.ops.SharedPGD` for ``norm="Reg"``, which the published code runs without any projection.

    It is the L∞ attack with a radius no δ reaches — ``|δ0| ≤ max(ε, 1)`` and a step moves an element by α, so the
    radius ``2·(max(ε, 1) + steps·α)`` never binds and every clamp is the identity: each step is exactly the
    reference's ``δ ← δ − α·sign(∇)``. δ0 is the reference's too: built with ε itself for ``'max'``/``'min'`` (±ε),
    with the unreachable radius for ``'random'`` (U[0, 1), unprojected) and ``'zero'``.
    """

    def __init__(self, f: nn.Module, f0: nn.Module, *, eps: float, step: float, steps: int, init: str, **kwargs):
        self.reach = 2.0 * (max(float(eps), 1.0) + steps * float(step))
        super().__init__(f, f0, eps=eps if init in ("max", "min") else self.reach, step=step, steps=steps,
                         norm="linf", init=init, **kwargs)

    def _step(self, st, forward, mean, std) -> None:
        eps, self.eps = self.eps, self.reach  # the steps (and a captured CUDA graph) clamp to the unreachable radius
        try:
            super()._step(st, forward, mean, std)
        finally:
            self.eps = eps


def _attack(net: nn.Module, ref: nn.Module, cfg: FastSAUConfig) -> SharedPGD:
    """The shared PGD of ``cfg`` (any of the reference's norms, ``"Reg"`` included)."""
    kw = dict(eps=cfg.eps, step=cfg.step_size, steps=cfg.pgd_steps, init=cfg.pgd_init, beta1=cfg.beta1,
              beta2=cfg.beta2, precision=cfg.precision, channels_last=cfg.channels_last, cuda_graph=cfg.cuda_graph)
    if cfg.norm == "Reg":
        return _Unprojected(net, ref, **kw)
    return SharedPGD(net, ref, norm=_NORMS[cfg.norm], **kw)


def unlearning_loss_fast(net: nn.Module, ref: nn.Module, x: Tensor, y: Tensor, delta: Tensor, y_hat0: Tensor,
                         cfg: SAUConfig):
    """The reference's unlearning objective with masks (no host sync) and ``f0`` under ``no_grad`` (the
    reference's one-hot needs the class count; ``gather``/``scatter`` here do not).

    Shapes: ``x``, ``delta`` (B, C, H, W), ``y``, ``y_hat0`` (B,) -> the 0-d loss and its 0-d parts."""
    n = x.shape[0]
    x_adv = x + delta
    if cfg.train_mode:
        net.train()
    logits, adv_logits = torch.split(net(torch.cat([x, x_adv], dim=0)), n, dim=0)
    net.eval()
    with torch.no_grad():
        y_adv0 = ref(x_adv).argmax(1)
    poison = (y_adv0 != y) & (y_adv0 != y_hat0)
    loss_clean = F.cross_entropy(logits, y)
    loss = cfg.lmd1 * loss_clean
    if cfg.lmd2 != 0:
        loss = loss + cfg.lmd2 * F.cross_entropy(adv_logits, y)
    # One softmax per term, as the reference and the published code: a (B, C) softmax more, and the backward
    # passes round as theirs do (one shared softmax moved the gradients by up to 8e-4 relative through the
    # 1/(1e-6 + .) factors, enough to flip a potential poison a round later).
    pos = F.softmax(adv_logits, dim=1).gather(1, y_adv0.unsqueeze(1)).squeeze(1)
    # summed directly: 1 − π cancels when π ≈ 1
    neg = F.softmax(adv_logits, dim=1).scatter(1, y_adv0.unsqueeze(1), 0.0).sum(dim=1)
    sar = -torch.log(1e-6 + neg.clamp(max=0.999)) - torch.log(1 + 1e-6 - pos.clamp(min=0.001))
    loss_sar = (sar * poison).sum() / 2 / n
    loss = loss + cfg.lmd3 * loss_sar
    return loss, {"clean": loss_clean.detach(), "sar": loss_sar.detach(), "poison": poison.sum().float()}


def _sau(net: nn.Module, data, cfg: FastSAUConfig, loop) -> Dict[str, Any]:
    net.eval()
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(net).eval().requires_grad_(False)  # f0: frozen, never needs a gradient
    # fused Adam: one launch per step where launches dominate (backend.launch_bound); the default elsewhere
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                           amsgrad=cfg.amsgrad, **({"fused": True} if launch_bound(data.x.device) else {}))
    loop.track(optimizer=opt)  # with the model, all SAU carries from round to round (f0 is the model as given)
    attack = _attack(net, ref, cfg)
    if loop.distributed:
        if cfg.cuda_graph:
            raise ValueError("sau: cuda_graph=True does not run data-parallel (the early exit's all-reduce would be "
                             "inside the graph); pass cuda_graph=False")
        attack.global_sum = loop.global_sum
    dev = data.x.device
    for _ in loop.rounds():
        sums = {k: torch.zeros((), device=dev) for k in ("loss", "clean", "sar", "poison", "shared", "pgd_steps")}
        batches, seen = 0, 0
        for idx in loop.batches(len(data), cfg.batch_size, shuffle=True):
            x, y = data.x[idx], data.y[idx]
            if loop.distributed:  # δ0's random draw is made for the global batch
                attack.rows = (loop.batch_rows, loop.batch_n)
            with loop.phase("attack"):
                delta, info = attack(x, y, generator=loop.generator)
            with loop.phase("unlearn"):
                for _ in range(cfg.outer_steps):
                    loss, parts = unlearning_loss_fast(net, ref, x, y, delta, info["y_hat0"], cfg)
                    loop.check_finite(loss)
                    loop.step(opt, loss)
                    net.eval()
            sums["loss"] += loss.detach()
            sums["clean"] += parts["clean"]
            sums["sar"] += parts["sar"]
            sums["poison"] += parts["poison"]
            sums["shared"] += info["shared"].sum()
            sums["pgd_steps"] += info["steps"]
            batches += 1
            seen += x.shape[0]
        loop.log(loss=sums["loss"] / batches, loss_clean=sums["clean"] / batches, loss_sar=sums["sar"] / batches,
                 poison_frac=sums["poison"] / seen, shared_frac=sums["shared"] / seen,
                 pgd_steps=sums["pgd_steps"] / batches)
    if cfg.channels_last:
        net.to(memory_format=torch.contiguous_format)
    net.eval()
    return {}


def ops(cfg: FastSAUConfig):
    """The fastpurify ops this path calls (checked against ``backend=`` before any work): the fused PGD update
    (every norm but L2, whose per-sample rescale stays eager), and SAU's fused loss, which runs on launch-bound
    devices (``backend.launch_bound``; on CPU the eager formula keeps the reference's δ bit for bit)."""
    return (() if cfg.norm == "L2" else ("pgd_update",)) + ("dual_logit_loss",)


def sau(model: nn.Module, clean_data, **kwargs) -> PurifyResult:
    """Purify ``model`` with SAU (Shared Adversarial Unlearning) — the fast path.

    Same arguments, defaults and result as :func:`fastpurify.reference.defenses.sau.sau` (the fields of
    :class:`~fastpurify.reference.defenses.sau.SAUConfig` and the common options), plus ``precision``
    (``"fp32"`` | ``"bf16"``), ``channels_last`` and ``cuda_graph``. See the module docstring for what is
    faster and why it is the same method.

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> from fastpurify.data import synthetic_dataset
        >>> x, y = synthetic_dataset(n=64)
        >>> r = sau(SmallVGG(), (x, y), epochs=1, batch_size=32, progress=False)
        >>> r.status
        'completed'
    """
    return run_defense("sau", _sau, FastSAUConfig, model, clean_data, ops=ops, sync_checks=False,
                       fast_path=True, **kwargs)
