"""SAU — Shared Adversarial Unlearning (Wei et al., NeurIPS 2023): the faithful eager reference.

Adversarial examples that fool both the backdoored model ``f0`` (a frozen copy made at the start) and the
model being purified ``f`` *in the same way* ("shared" adversarial examples) behave like poisoned samples;
SAU finds them with a two-model PGD attack and unlearns them. Per batch ``(x, y)`` of the clean data, with
``f`` and ``f0`` in eval mode (BatchNorm statistics frozen):

1. **Shared PGD** (:func:`shared_pgd`; L∞ ε = 0.2, step 0.2, 5 steps, δ initialised to +ε): at each step
   ``ŷ = argmax f(x)``, ``ŷ0 = argmax f0(x)``, ``z = f(x+δ)``, ``z0 = f0(x+δ)``; ``a = argmax z ≠ ŷ``,
   ``a0 = argmax z0 ≠ ŷ0``, ``s = a ∧ a0 ∧ (argmax z = argmax z0)``;
   ``L_adv = −[Σ_{¬a} CE(z, y) + Σ_{¬a0} CE(z0, y)] / 2B``, ``L_share = Σ_{¬s} JS(softmax z, softmax z0) / B``
   (probabilities floored at 1e-8); ``δ ← Π(δ − α·sign ∇δ(β1·L_adv + β2·L_share))``, β1 = 0.01, β2 = 1;
   stop when every sample is shared-adversarial (judged on the masks computed *before* the update, which is
   still applied).
2. **Unlearning step**: one forward of ``f`` over ``[x; x+δ]``; ``ỹ0 = argmax f0(x+δ)``; potential poisons
   ``P = (ỹ0 ≠ y) ∧ (ỹ0 ≠ ŷ0)``; with ``π = softmax f(x+δ)[ỹ0]``:
   ``L = λ1·CE(f(x), y) + λ2·CE(f(x+δ), y) + λ3·L_sar``, ``L_sar = Σ_P ½[−log(1e-6 + min(1−π, 0.999))
   − log(1 + 1e-6 − max(π, 0.001))] / B`` (≈ −log(1 − π); λ = 1, 0, 1); one Adam step (lr 1e-4, amsgrad).
3. 100 rounds (epochs over the clean data), batch 256, no augmentation, constant learning rate.

Sources: ``SCLBD/BackdoorBench`` ``defense/sau.py`` (class ``Shared_PGD`` and ``sau.mitigation``) and
``config/defense/sau/config.yaml`` (the defaults). This is an independent re-implementation, not a copy.

Kept as published (the baseline's waste, which the fast path removes):

- the clean predictions ``argmax f(x)``, ``argmax f0(x)`` are recomputed, with autograd graphs, at every PGD
  step although they cannot change during the attack;
- ``loss.backward()`` of the attack fills the weight gradients of *both* models (``f0``'s parameters keep
  ``requires_grad`` and its gradients accumulate, never read);
- the early-stop test, the empty-mask tests of ``L_adv`` and of ``L_sar`` are host syncs per step / batch;
- the L1 and L2 projections rescale the perturbation with a per-sample host loop;
- in the unlearning step ``f0`` runs on ``x`` and on ``x+δ`` separately, with autograd graphs, and the
  adversarial-training term ``CE(f(x+δ), y)`` is computed even with λ2 = 0;
- no clamp of ``x+δ`` to [0, 1] (the published code leaves it commented out);
- evaluation after every round (``eval_every=1``, timed apart by the loop helper).

Choices where the published code leaves room:

- ``pgd_init='random'`` draws U[0, 1) as published (``rand_like``; then projected), from ``loop.generator``
  so that runs are deterministic under ``seed``.
- The BackdoorBench config names a cosine scheduler, but ``mitigation`` never steps it: the learning rate
  is constant here too.
- ``train_mode=True`` reproduces the published ``--train_mode`` flag (``f`` in train mode for the unlearning
  forward only; the attack always runs in eval mode).
- "x + δ" is in pixel units; when the user passes ``normalization`` the network is ``Normalize → model``,
  which is exactly BackdoorBench's denormalise-add-renormalise ``pert_func``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...defenses._loop import PurifyResult, check_choice, check_positive, run_defense

NORMS = ("L_inf", "L1", "L2", "Reg")
INITS = ("max", "zero", "random", "min")


@dataclass
class SAUConfig:
    """SAU hyper-parameters; defaults are BackdoorBench's ``config/defense/sau/config.yaml`` (CIFAR-10)."""

    epochs: int = 100  # rounds = epochs over the clean data (``n_rounds``)
    batch_size: int = 256  # images per unlearning step (and per shared-PGD attack)
    lr: float = 1e-4  # Adam learning rate (constant)
    amsgrad: bool = True  # BackdoorBench builds every Adam with amsgrad=True
    betas: Tuple[float, float] = (0.9, 0.999)  # Adam betas
    weight_decay: float = 0.0  # Adam weight decay (``wd``)
    eps: float = 0.2  # perturbation bound ε in pixel units (``trigger_norm``), under the norm ``norm``
    step_size: float = 0.2  # PGD step α (``adv_lr``)
    pgd_steps: int = 5  # PGD steps per batch (``adv_steps``)
    norm: str = "L_inf"  # projection: 'L_inf' | 'L1' | 'L2' | 'Reg' (no projection)
    pgd_init: str = "max"  # δ init: 'max' (+ε) | 'zero' | 'random' (U[0,1), then projected) | 'min' (−ε)
    beta1: float = 0.01  # weight of the adversarial loss L_adv in the attack
    beta2: float = 1.0  # weight of the shared (JS) loss L_share in the attack
    lmd1: float = 1.0  # weight of the clean loss CE(f(x), y)
    lmd2: float = 0.0  # weight of the adversarial-training loss CE(f(x+δ), y) (computed even when 0)
    lmd3: float = 1.0  # weight of the shared adversarial risk L_sar
    outer_steps: int = 1  # unlearning steps per batch, all with the same δ
    train_mode: bool = False  # published ``--train_mode``: f in train mode for the unlearning forward

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "pgd_steps", "outer_steps"):
            check_positive(name, getattr(self, name), integer=True)
        for name in ("lr", "eps", "step_size"):
            check_positive(name, getattr(self, name))
        for name in ("weight_decay", "beta1", "beta2", "lmd1", "lmd2", "lmd3"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_choice("norm", self.norm, NORMS)
        check_choice("pgd_init", self.pgd_init, INITS)
        for name in ("amsgrad", "train_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")


# --------------------------------------------------------------------------------------------------------
# Shared PGD
# --------------------------------------------------------------------------------------------------------


def project(delta: Tensor, norm: str, eps: float) -> Tensor:
    """Project each sample's perturbation onto the ``norm`` ball of radius ``eps``, in place (``.data``).

    L1/L2 rescale sample by sample in a host loop, as published ('Reg' leaves δ as it is).

    Shapes: ``delta`` N×C×H×W -> the same tensor.

    Example::

        >>> d = project(torch.full((2, 1, 2, 2), 0.5), "L2", 0.5)
        >>> [round(float(v), 4) for v in d.flatten(1).norm(dim=1)]
        [0.5, 0.5]
    """
    if norm == "L_inf":
        delta.data = torch.clamp(delta.data, -eps, eps)
    elif norm in ("L1", "L2"):
        flat = delta.detach().abs() if norm == "L1" else delta.detach() ** 2
        size = torch.sum(flat, dim=tuple(range(1, delta.dim())), keepdim=True)
        size = size if norm == "L1" else size ** 0.5
        for i in range(delta.shape[0]):  # as published: one host sync per sample
            if size[i] > eps:
                delta.data[i] = delta.data[i] * eps / size[i].item()
    elif norm != "Reg":
        check_choice("norm", norm, NORMS)
    return delta


def _init_delta(x: Tensor, init: str, norm: str, eps: float, generator: Optional[torch.Generator]) -> Tensor:
    delta = torch.zeros_like(x, requires_grad=True)
    if init == "zero":
        delta.data = delta.data * 0
    elif init == "random":
        # As published: U[0, 1) (not U[−ε, ε]), then projected. Drawn on the CPU from the seeded generator.
        delta.data = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    elif init == "max":
        delta.data = delta.data + eps
    elif init == "min":
        delta.data = delta.data - eps
    else:
        check_choice("pgd_init", init, INITS)
    return project(delta, norm, eps)


def _js_rows(z: Tensor, z0: Tensor) -> Tensor:
    """Jensen–Shannon divergence per element of the two softmaxes (probabilities floored at 1e-8). N×K."""
    p = F.softmax(z, dim=1).clamp(min=1e-8)
    p0 = F.softmax(z0, dim=1).clamp(min=1e-8)
    m = 0.5 * (p + p0)
    return 0.5 * (p * p.log() + p0 * p0.log()) - 0.5 * (p * m.log() + p0 * m.log())


def shared_pgd(net: nn.Module, ref: nn.Module, x: Tensor, y: Tensor, *, eps: float = 0.2, step_size: float = 0.2,
               steps: int = 5, norm: str = "L_inf", init: str = "max", beta1: float = 0.01, beta2: float = 1.0,
               generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Dict[str, Any]]:
    """Shared adversarial perturbations of ``x`` against ``net`` and ``ref`` (SAU's maximisation step).

    Runs as published: both models are used as they are (the caller puts them in eval mode); the clean
    predictions are recomputed at every step; ``backward`` also fills both models' weight gradients; the
    attack stops once every sample was shared-adversarial before a step (that step's update is kept).

    Shapes: ``x`` B×C×H×W pixels, ``y`` B int64 -> ``delta`` B×C×H×W (detached), and a dict with ``steps``
    (steps run, int), ``shared`` / ``adv`` / ``adv_ref`` (B bool masks of the last step, judged before its
    update), ``loss_adv`` and ``loss_share`` (0-d tensors of the last step).

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> f, f0 = SmallVGG().eval(), SmallVGG().eval()
        >>> d, info = shared_pgd(f, f0, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
        >>> d.shape, bool(d.abs().max() <= 0.2), 1 <= info["steps"] <= 5
        (torch.Size([4, 3, 32, 32]), True, True)
    """
    check_positive("steps", steps, integer=True)
    check_choice("norm", norm, NORMS)
    check_choice("init", init, INITS)
    n = x.shape[0]
    delta = _init_delta(x, init, norm, eps, generator)
    done = 0
    for _ in range(steps):
        x_adv = x + delta  # no clamp to [0, 1], as published
        y_hat = torch.argmax(net(x), dim=1)  # recomputed every step, as published
        y_hat0 = torch.argmax(ref(x), dim=1)
        z = net(x_adv)
        z0 = ref(x_adv)
        pred, pred0 = torch.argmax(z, dim=1), torch.argmax(z0, dim=1)
        adv = pred != y_hat
        adv0 = pred0 != y_hat0
        shared = adv & adv0 & (pred == pred0)

        loss_adv = torch.zeros((), device=x.device)
        if (~adv).sum() != 0:  # host sync, as published
            loss_adv = loss_adv + F.cross_entropy(z, y, reduction="none")[~adv].sum()
        if (~adv0).sum() != 0:
            loss_adv = loss_adv + F.cross_entropy(z0, y, reduction="none")[~adv0].sum()
        loss_adv = -loss_adv / 2 / n
        loss_share = _js_rows(z, z0)[~shared].sum(dim=1).sum() / n

        delta.grad = None
        loss = beta1 * loss_adv + beta2 * loss_share
        loss.backward()  # as published: also fills the weight gradients of net and ref
        delta.data = delta.data - step_size * delta.grad.sign()
        delta = project(delta, norm, eps)
        done += 1
        if (~shared).sum() == 0:  # judged on the masks before this step's update, as published
            break
    info = {"steps": done, "shared": shared, "adv": adv, "adv_ref": adv0,
            "loss_adv": loss_adv.detach(), "loss_share": loss_share.detach()}
    return delta.detach(), info


# --------------------------------------------------------------------------------------------------------
# Unlearning
# --------------------------------------------------------------------------------------------------------


def unlearning_loss(net: nn.Module, ref: nn.Module, x: Tensor, y: Tensor, delta: Tensor, cfg: SAUConfig,
                    num_classes: int) -> Tuple[Tensor, Dict[str, Tensor]]:
    """SAU's minimisation objective ``λ1·L_clean + λ2·L_at + λ3·L_sar`` for one batch and its perturbation.

    One forward of ``net`` over ``[x; x+δ]`` (in train mode when ``cfg.train_mode``); ``ref`` runs on ``x``
    and on ``x+δ`` separately, with graphs, as published.

    Shapes: ``x``, ``delta`` B×C×H×W, ``y`` B -> the 0-d loss and a dict of its 0-d parts (``clean``,
    ``at``, ``sar``) and ``poison`` (the number of potential-poison rows).

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> f, f0 = SmallVGG().eval(), SmallVGG().eval()
        >>> x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
        >>> loss, parts = unlearning_loss(f, f0, x, y, torch.zeros_like(x), SAUConfig(), 10)
        >>> loss.shape, float(parts["poison"])   # δ = 0 makes f0(x+δ) = f0(x): no potential poisons
        (torch.Size([]), 0.0)
    """
    n = x.shape[0]
    x_adv = x + delta.detach()
    if cfg.train_mode:
        net.train()
    logits, adv_logits = torch.split(net(torch.cat([x, x_adv], dim=0)), n, dim=0)
    net.eval()
    ref_logits = ref(x)
    ref_adv_logits = ref(x_adv)
    y_hat0 = torch.argmax(ref_logits, dim=1)
    y_adv0 = torch.argmax(ref_adv_logits, dim=1)
    poison = (y_adv0 != y) & (y_adv0 != y_hat0)

    loss_clean = F.cross_entropy(logits, y)
    loss_at = F.cross_entropy(adv_logits, y)  # as published: computed even when λ2 = 0
    if poison.sum() == 0:  # host sync, as published
        loss_sar = torch.zeros((), device=x.device)
    else:
        one_hot = F.one_hot(y_adv0, num_classes=num_classes)
        # The published code applies the softmax twice, once per term. Equal in exact arithmetic to one shared
        # softmax, but the two backward passes through it round differently (up to 8e-4 relative in the gradient
        # through the 1/(1e-6 + .) factors below): kept as published.
        pos = (F.softmax(adv_logits, dim=1) * one_hot).sum(dim=1)[poison]
        neg = (F.softmax(adv_logits, dim=1) * (1 - one_hot)).sum(dim=1)[poison]
        # Two forms of −log(1 − π), averaged as published: equal in exact arithmetic, they round differently
        # when π is near 1, and the clamps drop samples that are already unlearned (π < 0.001).
        loss_sar = (-torch.sum(torch.log(1e-6 + neg.clamp(max=0.999)))
                    - torch.sum(torch.log(1 + 1e-6 - pos.clamp(min=0.001)))) / 2 / n
    loss = cfg.lmd1 * loss_clean + cfg.lmd2 * loss_at + cfg.lmd3 * loss_sar
    parts = {"clean": loss_clean.detach(), "at": loss_at.detach(), "sar": loss_sar.detach(),
             "poison": poison.sum().float()}
    return loss, parts


def _sau(net: nn.Module, data, cfg: SAUConfig, loop) -> Dict[str, Any]:
    net.eval()
    # f0: a copy of the backdoored model that is never updated. Its parameters keep requires_grad so that,
    # as published, the attack's backward fills (and accumulates) their gradients.
    ref = copy.deepcopy(net).eval()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                           amsgrad=cfg.amsgrad)
    loop.track(optimizer=opt)  # with the model, all SAU carries from round to round (f0 is the model as given)
    dev = data.x.device
    for _ in loop.rounds():
        sums = {k: torch.zeros((), device=dev) for k in ("loss", "clean", "sar", "poison", "shared", "pgd_steps")}
        batches, seen = 0, 0
        for idx in loop.batches(len(data), cfg.batch_size, shuffle=True):
            x, y = data.x[idx], data.y[idx]
            with loop.phase("attack"):
                delta, info = shared_pgd(net, ref, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.pgd_steps,
                                         norm=cfg.norm, init=cfg.pgd_init, beta1=cfg.beta1, beta2=cfg.beta2,
                                         generator=loop.generator)
            with loop.phase("unlearn"):
                for _ in range(cfg.outer_steps):
                    loss, parts = unlearning_loss(net, ref, x, y, delta, cfg, data.num_classes)
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
    net.eval()
    return {}


def sau(model: nn.Module, clean_data, **kwargs) -> PurifyResult:
    """Purify ``model`` with SAU (Shared Adversarial Unlearning), the faithful eager port.

    ``clean_data``: labelled clean images — an ``(x, y)`` pair (``x`` N×C×H×W in [0, 1], ``y`` N integer
    labels), a Dataset or a DataLoader. Hyper-parameters: the fields of :class:`SAUConfig` (published defaults:
    100 rounds, batch 256, Adam lr 1e-4 with amsgrad, L∞ ε = 0.2, step 0.2, 5 PGD steps from δ = +ε,
    β1 = 0.01, β2 = 1, λ = (1, 0, 1)); common options as in every defense (``normalization``, ``epochs``,
    ``device``, ``seed``, ``time_budget``, ``eval_data``, ``eval_every``, ``progress``, ``inplace``,
    ``check_range``). The published quirks kept here are listed in the module docstring. Returns a
    :class:`~fastpurify.defenses.PurifyResult`; ``history`` holds per round the mean unlearning loss and its
    parts, the fraction of potential-poison rows and of shared adversarial examples, and the PGD steps run.

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> from fastpurify.data import synthetic_dataset
        >>> x, y = synthetic_dataset(n=64)
        >>> r = sau(SmallVGG(), (x, y), epochs=1, batch_size=32, progress=False)
        >>> r.status, sorted(r.timings)[:2]
        ('completed', ['attack', 'defense'])
    """
    return run_defense("sau", _sau, SAUConfig, model, clean_data, **kwargs)
