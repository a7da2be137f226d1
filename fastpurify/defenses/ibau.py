"""I-BAU — Implicit Backdoor Adversarial Unlearning, the fast path (the algorithm of
:mod:`fastpurify.reference.defenses.ibau`, with the published code's waste removed).

What changes against the reference, and why it is the same method:

- **perturbation pass**: the pseudo-labels come from a forward under ``no_grad`` (the reference builds a graph
  for them); the autograd leaf is the per-sample input ``x + δ`` and only its gradient is computed (the
  reference's ``backward(retain_graph=True)`` also fills every θ.grad); the batch mean of those per-sample
  gradients, the ``2·0.001·δ`` penalty gradient and the SGD step (lr 10) are one fused
  :func:`fastpurify.ops.universal_update_` (``reduction="mean"``, ``weight_decay=delta_reg``,
  ``descend=True`` on the gradient of ``−CE``: the reference's ``SGD.step`` on ``L_δ``). The optional L2-ball
  rescale after the pass is computed on the device (the reference reads ``‖δ‖`` on the host);
- **hypergradient**: :func:`fastpurify.ops.implicit_hypergrad` — one autograd call for ``g_δ`` and ``g_θ``
  (the reference makes two over a retained graph), the gradient graph of ``L_in`` built once per outer step
  and every ``Hv`` one backward through it, the fixed point's first step ``v = g_δ`` taken without the
  Hessian-vector product of a zero vector, the tolerance tested on the device (the reference syncs every
  iteration), and the hypergradient assigned to ``.grad`` (no zero-fill then ``+=``). The outer loss gives δ
  to its rows with a 0/1 row mask instead of a zero tensor filled by index assignment, the masks of a whole
  round drawn up front (same generator, same order) and copied to the device at once;
- the batches of a round are gathered once and used by both passes; the per-round statistics and the
  finite-loss guard stay on the device (read once per round by the loop helper).

Options of the fast path only: ``precision="bf16"`` runs the perturbation pass's forwards under bf16 autocast
(the hypergradient, a second-order quantity, stays fp32). ``solver`` keeps the reference's default, the
published fixed point with K = 5:

- measured on CPU (1 thread, the tiny backdoored net of tests/test_fast_ibau.py, ASR 100 %, ACC 91.7 %; 300
  clean images, batch 50, one row of each outer batch gets δ, δ in the L2 ball of radius 10, 2 rounds, seeds
  0, 1, 2): fixed point (K = 5) ASR -> 0.0 / 5.9 / 0.0 %, ACC -> 82.0 / 71.3 / 78.0 % (the reference's
  numbers exactly); CG (K = 5) ASR -> 0.0 / 0.0 / 0.0 %, ACC -> 36.0 / 45.3 / 38.7 %, with 1.7-2.2 CG
  iterations per solve on average. I-BAU's H is indefinite away from the inner optimum, so CG's steps along
  negative curvature make large hypergradients that unlearn the clean task too; the truncated Neumann series is
  a damped, bounded estimate. The fixed point stays the default; ``solver="cg"`` remains available.
  ``precision="bf16"`` on the same runs: ASR 0.0 / 7.8 / 0.0 %, ACC 82.3 / 71.7 / 78.0 % (quality holds).
  On the two real SmallVGG checkpoints it does not (one round, 2,500 clean images, 2 CPU threads, end_to_end.md):
  ASR 17.89 vs the reference's 9.60 % on badnets, 27.10 vs 24.22 % on trojan_wm, at 1.11× / 1.39× (fp32:
  1.29× / 1.24×) — the hypergradient pass, which stays fp32, is most of the time. Keep fp32.

Everything else — defaults, batch order, the random rows of the outer loss (drawn from the loop's generator in
the reference's order), Adam/SGD on θ — is the reference's (:class:`~fastpurify.reference.defenses.ibau.IBAUConfig`).
In fp32 the history follows the reference's to float rounding (tests/test_fast_ibau.py: 2 rounds, ≤ 5e-6 relative).

Speed on CPU (1 thread on a loaded 2-core machine, min of 3 interleaved runs; the real SmallVGG BadNets
checkpoint, 500 CIFAR-10 images, one round with the defaults): 11.0 s vs 13.3 s for the reference (1.21×;
bf16: 10.6 s, 1.25×); perturbation pass 1.18 vs 1.39 s, hypergradient pass 9.8 vs 11.9 s. What remains is
the algorithm: per outer step (2.1 s) the K − 1 = 4 Hessian-vector products of the fixed point take 1.2 s,
the mixed product 0.3 s, the outer and inner forward/backward 0.45 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.cg import implicit_hypergrad
from ..ops.universal import universal_update_
from ..reference.defenses.ibau import PASS_SHARE, IBAUConfig, make_optimizer
from ._loop import PRECISIONS, PurifyResult, check_choice, precision_autocast, run_defense


@dataclass
class FastIBAUConfig(IBAUConfig):
    """The reference's hyper-parameters (same defaults) plus the fast path's execution option."""

    precision: str = "fp32"  # "bf16": the perturbation pass's forwards under bf16 autocast

    def validate(self) -> None:
        super().validate()
        check_choice("precision", self.precision, PRECISIONS)


def perturbation_pass(net: nn.Module, xs, cfg: IBAUConfig, loop) -> Dict[str, Tensor]:
    """Phase 1 of a round: one universal δ from 0, one fused SGD step per batch on
    ``L_δ = −CE(f(x+δ), argmax f(x)) + delta_reg·‖δ‖²``; then the optional L2-ball rescale, on the device.

    Shapes: ``xs``: list of (B_j, C, H, W) batches -> ``{"delta": (1, C, H, W), "loss": 0-d sum of L_δ}``.
    """
    x0 = xs[0]
    delta = torch.zeros((1, *x0.shape[1:]), device=x0.device, dtype=torch.float32)
    loss_sum = torch.zeros((), device=x0.device)
    autocast = precision_autocast(cfg.precision, x0.device)
    for x in xs:
        if loop.out_of_time("perturbation"):  # a time budget ran out: the pass ends here
            break
        with torch.no_grad(), autocast:
            pseudo = net(x).argmax(1)
        # The leaf is the per-sample input x + δ: its gradient is the batch of per-sample ∂CE_b/∂δ, which
        # universal_update_ averages in the same pass as the step; no weight gradient is computed.
        leaf = (x + delta).requires_grad_(True)
        inp = leaf.clamp(0, 1) if cfg.clamp_images else leaf
        with autocast:
            logits = net(inp).float()
        ce_sum = F.cross_entropy(logits, pseudo, reduction="sum")
        (g,) = torch.autograd.grad(-ce_sum, leaf)
        with torch.no_grad():
            # the reference's L_δ at the δ the gradient was taken at (its logged "delta_loss")
            loss = -ce_sum / x.shape[0] + cfg.delta_reg * (delta * delta).sum()
        loop.check_finite(loss, "perturbation loss")
        universal_update_(delta, g.contiguous(), step=cfg.delta_lr, reduction="mean", weight_decay=cfg.delta_reg,
                          descend=True)
        loss_sum += loss
    if cfg.delta_l2_radius is not None:
        delta = delta * torch.clamp(cfg.delta_l2_radius / torch.linalg.vector_norm(delta), max=1.0)
    return {"delta": delta, "loss": loss_sum}


def _row_masks(xs, portion: float, generator: torch.Generator, dev: torch.device):
    """The 0/1 masks Mj of the rows that get δ in each outer batch, (B_j, 1, 1, 1) each: ⌊portion·B_j⌋ rows
    drawn with ``randperm`` from the loop's generator in the reference's order (nothing else draws from it
    between the outer steps), so a seed gives the reference's rows; built on the host and copied to the
    device in one transfer per round (a copy per step would synchronise a GPU stream at every step)."""
    masks = []
    for x in xs:
        rows = torch.randperm(x.shape[0], generator=generator)[:int(x.shape[0] * portion)]
        masks.append(torch.zeros(x.shape[0]).index_fill_(0, rows, 1.0))
    flat = torch.cat(masks).to(dev)
    return [m.view(-1, 1, 1, 1) for m in torch.split(flat, [x.shape[0] for x in xs])]


def ops(cfg: FastIBAUConfig):
    """The fastpurify ops this path calls (resolved against ``backend=`` before any work): the fused universal
    update of the perturbation pass, and the CG kernels when ``solver="cg"`` (the default fixed point runs on
    autograd's Hessian-vector products and PyTorch's own operators)."""
    return ("universal_update",) + (("cg_step", "cg_direction") if cfg.solver == "cg" else ())


def _ibau(net: nn.Module, data, cfg: FastIBAUConfig, loop) -> Dict[str, Any]:
    net.eval()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    loop.track(optimizer=opt)  # θ's optimizer is the only state carried across rounds (δ restarts at 0)
    dev = data.x.device
    pert = torch.zeros((1, *data.x.shape[1:]), device=dev)
    for _ in loop.rounds():
        # drawn whole (both passes use them); the time budget is checked at each step instead
        batches = list(loop.batches(len(data), cfg.batch_size, shuffle=cfg.shuffle, budget=False))
        xs = [data.x[idx] for idx in batches]  # gathered once, used by both passes
        ys = [data.y[idx] for idx in batches]

        with loop.phase("attack"), loop.share(PASS_SHARE):
            p = perturbation_pass(net, xs, cfg, loop)
        pert = p["delta"]

        x1, y1 = xs[0], ys[0]

        def inner_loss(d: Tensor, x1=x1, y1=y1) -> Tensor:  # L_in(δ, θ) on the first batch, true labels
            inp = (x1 + d).clamp(0, 1) if cfg.clamp_images else x1 + d
            return -F.cross_entropy(net(inp), y1) + cfg.delta_reg * (d * d).sum()

        outer_sum = torch.zeros((), device=dev)
        iters_sum = torch.zeros((), device=dev)
        steps = 0
        for xj, yj, mask in zip(xs, ys, _row_masks(xs, cfg.outer_portion, loop.generator, dev)):
            if loop.out_of_time("hypergrad"):
                break

            def outer_loss(d: Tensor, xj=xj, yj=yj, mask=mask) -> Tensor:  # L_out = CE(f(Xj + Mj⊙δ), Yj)
                inp = xj + mask * d
                return F.cross_entropy(net(inp.clamp(0, 1) if cfg.clamp_images else inp), yj)

            with loop.phase("hypergrad"):
                grads, info = implicit_hypergrad(inner_loss, outer_loss, pert, params, solver=cfg.solver, K=cfg.K,
                                                 eta=cfg.inner_lr, tol=cfg.tol, check="none", return_info=True)
                loop.check_finite(info["outer_loss"], "outer loss")
                for prm, g in zip(params, grads):
                    prm.grad = g
            with loop.phase("unlearn"):
                loop.step(opt)
            outer_sum += info["outer_loss"]
            iters_sum += info["solver_iters"]
            steps += 1
        n = max(1, steps)
        loop.log(loss=outer_sum / n, delta_loss=p["loss"] / n, delta_norm=torch.linalg.vector_norm(pert),
                 solver_iters=iters_sum / n)
    for prm in params:
        prm.grad = None
    net.eval()
    return {"delta": pert.detach().cpu()}


def ibau(model: nn.Module, clean_data, **kwargs) -> PurifyResult:
    """Purify ``model`` with I-BAU (Implicit Backdoor Adversarial Unlearning) — the fast path.

    Same arguments, defaults and result as :func:`fastpurify.reference.defenses.ibau.ibau` (the fields of
    :class:`~fastpurify.reference.defenses.ibau.IBAUConfig` and the common options), plus ``precision``
    (``"fp32"`` | ``"bf16"``). ``clean_data``: labelled clean images, ``x`` N×C×H×W in [0, 1], ``y`` (N,).
    ``history`` holds per round the mean outer loss, the perturbation loss, ‖δ‖ and the solver iterations;
    ``info["delta"]`` is the last round's δ (1×C×H×W, CPU). See the module docstring for what is faster and
    why it is the same method.

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> from fastpurify.data import synthetic_dataset
        >>> x, y = synthetic_dataset(n=64)
        >>> r = ibau(SmallVGG(), (x, y), epochs=1, batch_size=32, progress=False)
        >>> r.status, tuple(r.info["delta"].shape)
        ('completed', (1, 3, 32, 32))
    """
    return run_defense("ibau", _ibau, FastIBAUConfig, model, clean_data, ops=ops, sync_checks=False, **kwargs)
