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
  finite-loss guard stay on the device (read once per round by the loop helper);
- **CUDA graphs** (``cuda_graph``, CUDA only): the hypergradient step — the outer gradients, the inner gradient
  graph, the K-step solve and the mixed product, ~K+3 backward passes — is captured once per batch shape
  (:class:`HypergradGraphs`, :class:`~fastpurify.ops.CapturedHypergrad`) and replayed: counted on CPU with the
  real SmallVGG badnets checkpoint and 256 images (benchmarks/dispatch.py, dispatch.md) a step dispatches 1,896
  ATen ops (1,361 of them kernels, 86 % of a round's ops) and no host synchronisation, which a replay turns into
  one graph launch and 6 input copies. The default ``None``
  captures a shape that repeats at least ``GRAPH_MIN_STEPS`` = 3 times in the run (the default 5 rounds: every
  full batch, and a ragged last batch too), so short runs do not pay for a capture they cannot amortise; the
  weights still change only at ``loop.step`` (the graph's outputs become ``.grad``; the optimizer, fused on
  CUDA, steps outside it). Replays compute what the eager step computes (tests/test_graphs.py, GPU-marked);
  the CPU path is unchanged.

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

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend import launch_bound
from ..ops.attack import GraphCache
from ..ops.cg import CapturedHypergrad, implicit_hypergrad
from ..ops.universal import universal_update_
from ..reference.defenses.ibau import PASS_SHARE, IBAUConfig, make_optimizer, twice_differentiable_attention
from ._loop import PRECISIONS, PurifyResult, check_choice, check_positive, precision_autocast, run_defense

# With cuda_graph=None (auto), a batch shape is captured when it will run at least this many outer steps in the
# run. A capture costs warmup = 2 eager solves on a side stream (the second one's result is the step's own, so one
# solve is spent) plus the recording, about one more eager solve of host time; a replay replaces the ~K+3
# backward passes' thousands of launches (tens of ms of host time per step at I-BAU's batch 100 on a GPU). So a
# shape seen 3 times breaks even or wins; a ragged last batch seen once per round over 1-2 rounds runs eagerly.
# (An estimate: no GPU has measured capture against replay cost yet.)
GRAPH_MIN_STEPS = 3
GRAPH_WARMUP = 2


@dataclass
class FastIBAUConfig(IBAUConfig):
    """The reference's hyper-parameters (same defaults) plus the fast path's execution options."""

    precision: str = "fp32"  # "bf16": the perturbation pass's forwards under bf16 autocast
    # CUDA graphs of the hypergradient step: None (auto) captures each batch shape that repeats >= GRAPH_MIN_STEPS
    # times in the run on CUDA (never on CPU); True captures every shape (CUDA only); False never captures
    cuda_graph: Optional[bool] = None
    # clean fine-tuning tail (not in the paper): epochs of cross-entropy on the clean data after the last round's
    # unlearning (fresh Adam), to win back the clean accuracy the unlearning cost; 0 = the published algorithm
    finetune_epochs: int = 0
    finetune_lr: float = 1e-4  # the fine-tuning tail's Adam learning rate

    def validate(self) -> None:
        super().validate()
        check_choice("precision", self.precision, PRECISIONS)
        check_positive("finetune_epochs", self.finetune_epochs, integer=True, allow_zero=True)
        check_positive("finetune_lr", self.finetune_lr)
        if self.cuda_graph is not None and not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True, False or None (auto), got {self.cuda_graph!r} "
                            f"({type(self.cuda_graph).__name__})")


def perturbation_pass(net: nn.Module, xs, cfg: IBAUConfig, loop, sizes: Optional[List[int]] = None
                      ) -> Dict[str, Tensor]:
    """Phase 1 of a round: one universal δ from 0, one fused SGD step per batch on
    ``L_δ = −CE(f(x+δ), argmax f(x)) + delta_reg·‖δ‖²``; then the optional L2-ball rescale, on the device.

    Shapes: ``xs``: list of (B_j, C, H, W) batches -> ``{"delta": (1, C, H, W), "loss": 0-d sum of L_δ}``.
    Data-parallel (``sizes``: the global batch sizes), the batch mean of the per-sample gradients is the global
    batch's (one all-reduce per step), so every rank takes the same step.
    """
    x0 = xs[0]
    delta = torch.zeros((1, *x0.shape[1:]), device=x0.device, dtype=torch.float32)
    loss_sum = torch.zeros((), device=x0.device)
    autocast = precision_autocast(cfg.precision, x0.device)
    ys_seen: List[None] = []  # steps taken (the index of the global batch size)
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
        if loop.distributed:  # the global batch's mean gradient, then the same fused step on every rank
            g = loop.global_sum(g.sum(0, keepdim=True)) / sizes[len(ys_seen)]
        ys_seen.append(None)
        universal_update_(delta, g.contiguous(), step=cfg.delta_lr, reduction="mean", weight_decay=cfg.delta_reg,
                          descend=True)
        loss_sum += loss
    if cfg.delta_l2_radius is not None:
        delta = delta * torch.clamp(cfg.delta_l2_radius / torch.linalg.vector_norm(delta), max=1.0)
    return {"delta": delta, "loss": loss_sum}


def _row_masks(xs, portion: float, generator: torch.Generator, dev: torch.device, loop=None,
               sizes: Optional[List[int]] = None):
    """The 0/1 masks Mj of the rows that get δ in each outer batch, (B_j, 1, 1, 1) each: ⌊portion·B_j⌋ rows
    drawn with ``randperm`` from the loop's generator in the reference's order (nothing else draws from it
    between the outer steps), so a seed gives the reference's rows; built on the host and copied to the
    device in one transfer per round (a copy per step would synchronise a GPU stream at every step).
    Data-parallel (``sizes``: the global batch sizes): drawn for the global batch, this rank's rows kept."""
    masks = []
    for j, x in enumerate(xs):
        n = x.shape[0] if sizes is None else sizes[j]
        rows = torch.randperm(n, generator=generator)[:int(n * portion)]
        masks.append(loop.local(torch.zeros(n).index_fill_(0, rows, 1.0)) if sizes is not None else
                     torch.zeros(n).index_fill_(0, rows, 1.0))
    flat = torch.cat(masks).to(dev)
    return [m.view(-1, 1, 1, 1) for m in torch.split(flat, [x.shape[0] for x in xs])]


def ops(cfg: FastIBAUConfig):
    """The fastpurify ops this path calls (resolved against ``backend=`` before any work): the fused universal
    update of the perturbation pass, and the CG kernels when ``solver="cg"`` (the default fixed point runs on
    autograd's Hessian-vector products and PyTorch's own operators)."""
    return ("universal_update",) + (("cg_step", "cg_direction") if cfg.solver == "cg" else ())


def inner_loss_fn(net: nn.Module, cfg: IBAUConfig, x1: Tensor, y1: Tensor, share: Optional[Tuple[int, int]] = None
                  ) -> Callable[[Tensor], Tensor]:
    """``L_in(δ, θ) = −CE(f(X1 + δ), Y1) + delta_reg·‖δ‖²`` on the round's first batch, true labels; reads ``x1``,
    ``y1`` when called (a captured graph reads the buffers it was captured with). ``share`` = (global batch size,
    ranks): this rank's share of the global loss (its rows' CE sum over the global count, the penalty over the
    ranks), whose sum over the ranks is the one-process loss."""
    def inner_loss(d: Tensor) -> Tensor:
        inp = (x1 + d).clamp(0, 1) if cfg.clamp_images else x1 + d
        if share is not None:
            return (-F.cross_entropy(net(inp), y1, reduction="sum") / share[0]
                    + cfg.delta_reg * (d * d).sum() / share[1])
        return -F.cross_entropy(net(inp), y1) + cfg.delta_reg * (d * d).sum()

    return inner_loss


def outer_loss_fn(net: nn.Module, cfg: IBAUConfig, xj: Tensor, yj: Tensor, mask: Tensor,
                  share: Optional[int] = None) -> Callable[[Tensor], Tensor]:
    """``L_out(δ, θ) = CE(f(Xj + Mj⊙δ), Yj)`` on outer batch j (``mask``: its (B_j, 1, 1, 1) 0/1 row mask);
    ``share`` = the global batch size: this rank's share (its rows' CE sum over the global count)."""
    def outer_loss(d: Tensor) -> Tensor:
        inp = xj + mask * d
        logits = net(inp.clamp(0, 1) if cfg.clamp_images else inp)
        if share is not None:
            return F.cross_entropy(logits, yj, reduction="sum") / share
        return F.cross_entropy(logits, yj)

    return outer_loss


def hypergrad_step(net: nn.Module, cfg: IBAUConfig, params: List[Tensor], x1: Tensor, y1: Tensor, xj: Tensor,
                   yj: Tensor, mask: Tensor, delta: Tensor, loop=None, n1: int = 0, nj: int = 0
                   ) -> Tuple[List[Tensor], Dict[str, Any]]:
    """One outer step's hypergradient, eagerly: :func:`fastpurify.ops.implicit_hypergrad` of ``L_out`` on batch j
    through ``L_in`` on the first batch, the tolerance tested on the device (no host sync). Data-parallel
    (``loop.distributed``; ``n1``, ``nj``: the two global batch sizes): the losses are this rank's shares, g_δ and
    every Hv are summed over the ranks, and the θ-gradients returned are shares (summed at ``loop.step``)."""
    dp = loop is not None and loop.distributed
    inner = inner_loss_fn(net, cfg, x1, y1, (n1, loop.world) if dp else None)
    outer = outer_loss_fn(net, cfg, xj, yj, mask, nj if dp else None)
    return implicit_hypergrad(inner, outer, delta, params, solver=cfg.solver, K=cfg.K, eta=cfg.inner_lr, tol=cfg.tol,
                              check="none", return_info=True, reduce=loop.global_sum if dp else None)


def captures(mode: Optional[bool], device: torch.device, steps: int) -> bool:
    """Whether the hypergradient steps of one batch shape run as a CUDA graph: never off CUDA or with
    ``cuda_graph=False``; always with ``True``; with ``None`` (auto) when the shape will run ``steps`` >=
    :data:`GRAPH_MIN_STEPS` outer steps in the run (the capture must pay for itself)."""
    if mode is False or torch.device(device).type != "cuda":
        return False
    return mode is True or steps >= GRAPH_MIN_STEPS


class HypergradGraphs:
    """The fast I-BAU's hypergradient step as CUDA graphs (:class:`~fastpurify.ops.CapturedHypergrad`), one per
    (inner batch, outer batch) shape in a :class:`~fastpurify.ops.attack.GraphCache` of two entries (the full
    batch and a ragged last one). Each entry owns static copies of X1, Y1, Xj, Yj, Mj and δ that its graph reads:
    a call copies the step's inputs in and replays (7 launches instead of the solve's thousands); the first call
    of a shape captures, and its result is the capture's last warm-up. The returned tensors are the graph's
    outputs, overwritten by the next replay of the same shape — assign them to ``.grad`` and step before then.
    ``capture``: the capturing class (tests pass an eager stand-in to check the buffers' wiring on a CPU).

    A capture that fails (a model whose forward reads a device value on the host, say) raises with
    ``cuda_graph=True``; in auto mode it warns once, and that shape runs eagerly from then on.

    Shapes: as :func:`fastpurify.ops.implicit_hypergrad`; returns ``(grads, {"outer_loss", "solver_iters"})``."""

    def __init__(self, net: nn.Module, cfg: IBAUConfig, params: List[Tensor], capture=None,
                 warmup: int = GRAPH_WARMUP) -> None:
        self.net, self.cfg, self.params, self.capture, self.warmup = net, cfg, params, capture, warmup
        self.cache = GraphCache(2)
        self.failed: set = set()  # keys whose capture failed (auto mode: run eagerly)

    @staticmethod
    def key(x1: Tensor, xj: Tensor) -> tuple:
        return str(x1.device), tuple(x1.shape), tuple(xj.shape), x1.dtype

    def use(self, x1: Tensor, xj: Tensor, steps: int) -> bool:
        """Whether this step replays (or captures) a graph: its shape was captured before, or :func:`captures`
        says so for the ``steps`` outer steps the shape has left in the run (only falls: decided at first sight)."""
        key = self.key(x1, xj)
        return key in self.cache or (key not in self.failed and captures(self.cfg.cuda_graph, x1.device, steps))

    def __call__(self, x1: Tensor, y1: Tensor, xj: Tensor, yj: Tensor, mask: Tensor, delta: Tensor
                 ) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        inputs = (x1, y1, xj, yj, mask, delta)
        built: List[Any] = []

        def build():
            static = tuple(t.detach().clone() for t in inputs)
            sx1, sy1, sxj, syj, smask, sdelta = static
            capture = self.capture or CapturedHypergrad  # looked up at call time (tests replace it)
            cfg = self.cfg
            cap = capture(inner_loss_fn(self.net, cfg, sx1, sy1), outer_loss_fn(self.net, cfg, sxj, syj, smask), sdelta,
                          self.params, solver=cfg.solver, K=cfg.K, eta=cfg.inner_lr, tol=cfg.tol, warmup=self.warmup)
            built.append(cap.first)
            cap.first = None
            return cap, static

        key = self.key(x1, xj)
        try:
            cap, static = self.cache.get(key, build)
        except RuntimeError as e:  # CUDA errors are RuntimeErrors; the cache is left as it was
            if self.cfg.cuda_graph is True:
                raise
            self.failed.add(key)
            warnings.warn(f"ibau: the hypergradient step of batch shape {tuple(xj.shape)} could not be captured into "
                          f"a CUDA graph ({type(e).__name__}: {e}); it runs eagerly (cuda_graph=False skips the "
                          "attempt, cuda_graph=True makes it an error)", RuntimeWarning, stacklevel=2)
            return hypergrad_step(self.net, self.cfg, self.params, *inputs)
        if built:  # just captured: the last warm-up computed this step
            return built[0]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        cap()
        return cap.grads, cap.info


def _optimizer(params: List[Tensor], cfg: IBAUConfig, dev: torch.device) -> torch.optim.Optimizer:
    """θ's optimiser: the reference's on CPU; fused (one launch per step) where launches dominate
    (``backend.launch_bound``), as the other fast paths do."""
    if not launch_bound(dev):
        return make_optimizer(params, cfg)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, amsgrad=cfg.amsgrad, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, fused=True)


def finetune_tail(net: nn.Module, data, cfg: FastIBAUConfig, loop) -> Tensor:
    """The clean fine-tuning tail (``finetune_epochs`` > 0): epochs of ``CE(f(x), y)`` on the clean data with a
    fresh Adam (lr ``finetune_lr``), the model in eval mode (BatchNorm statistics kept, as in the unlearning).
    Returns the mean loss (0-d, on the device)."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.finetune_lr)
    total, steps = torch.zeros((), device=data.x.device), 0
    for _ in range(cfg.finetune_epochs):
        for idx in loop.batches(len(data), cfg.batch_size, shuffle=True, kind="finetune"):
            loss = F.cross_entropy(net(data.x[idx]), data.y[idx])
            loop.check_finite(loss, "fine-tuning loss")
            loop.step(opt, loss)
            total += loss.detach()
            steps += 1
    return total / max(1, steps)


def _ibau(net: nn.Module, data, cfg: FastIBAUConfig, loop) -> Dict[str, Any]:
    dev = data.x.device
    if cfg.cuda_graph is True and dev.type != "cuda":
        raise ValueError(f"ibau: cuda_graph=True needs a CUDA device; the run is on {dev} (use cuda_graph=None: "
                         "graphs on CUDA where they pay, none elsewhere)")
    net.eval()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = _optimizer(params, cfg, dev)
    loop.track(optimizer=opt)  # θ's optimizer is the only state carried across rounds (δ restarts at 0)
    graphs = HypergradGraphs(net, cfg, params)  # captures nothing off CUDA (graphs.use says so)
    pert = torch.zeros((1, *data.x.shape[1:]), device=dev)
    for _ in loop.rounds():
        # drawn whole (both passes use them); the time budget is checked at each step instead
        batches, sizes = [], []  # this rank's rows of each batch, and the global batch sizes
        for idx in loop.batches(len(data), cfg.batch_size, shuffle=cfg.shuffle, budget=False):
            batches.append(idx)
            sizes.append(loop.batch_n)
        xs = [data.x[idx] for idx in batches]  # gathered once, used by both passes
        ys = [data.y[idx] for idx in batches]
        dp = loop.distributed

        with loop.phase("attack"), loop.share(PASS_SHARE):
            p = perturbation_pass(net, xs, cfg, loop, sizes)
        pert = p["delta"]

        x1, y1 = xs[0], ys[0]
        rounds_left = loop.total_rounds - loop.round
        outer_sum = torch.zeros((), device=dev)
        iters_sum = torch.zeros((), device=dev)
        steps = 0
        masks = _row_masks(xs, cfg.outer_portion, loop.generator, dev, loop, sizes if dp else None)
        for j, (xj, yj, mask) in enumerate(zip(xs, ys, masks)):
            if loop.out_of_time("hypergrad"):
                break
            with loop.phase("hypergrad"):
                # the outer steps this batch shape will run in the rest of the run (the auto rule's count)
                same = sum(x.shape == xj.shape for x in xs) * rounds_left
                if not dp and graphs.use(x1, xj, same):  # (the solve's all-reduces stay out of graphs)
                    grads, info = graphs(x1, y1, xj, yj, mask, pert)
                else:
                    grads, info = hypergrad_step(net, cfg, params, x1, y1, xj, yj, mask, pert, loop, sizes[0],
                                                 sizes[j])
                loop.check_finite(info["outer_loss"], "outer loss")
                for prm, g in zip(params, grads):
                    prm.grad = g
            with loop.phase("unlearn"):
                loop.step(opt, shares=True)
            # data-parallel: the rank's share times the ranks, whose mean over the ranks (the history) is the loss
            outer_sum += info["outer_loss"] * loop.world if dp else info["outer_loss"]
            iters_sum += info["solver_iters"]
            steps += 1
        n = max(1, steps)
        loop.log(loss=outer_sum / n, delta_loss=p["loss"] / n, delta_norm=torch.linalg.vector_norm(pert),
                 solver_iters=iters_sum / n)
        if cfg.finetune_epochs and loop.round == loop.total_rounds - 1:
            with loop.phase("finetune"):
                loop.log(finetune_loss=finetune_tail(net, data, cfg, loop))
    for prm in params:
        prm.grad = None
    net.eval()
    return {"delta": pert.detach().cpu()}


def ibau(model: nn.Module, clean_data, **kwargs) -> PurifyResult:
    """Purify ``model`` with I-BAU (Implicit Backdoor Adversarial Unlearning) — the fast path.

    Same arguments, defaults and result as :func:`fastpurify.reference.defenses.ibau.ibau` (the fields of
    :class:`~fastpurify.reference.defenses.ibau.IBAUConfig` and the common options), plus ``precision``
    (``"fp32"`` | ``"bf16"``) and ``cuda_graph`` (``None``: auto on CUDA, ``True`` | ``False``). ``clean_data``:
    labelled clean images, ``x`` N×C×H×W in [0, 1], ``y`` (N,). ``history`` holds per round the mean outer loss,
    the perturbation loss, ‖δ‖ and the solver iterations;
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
    return run_defense("ibau", twice_differentiable_attention(_ibau), FastIBAUConfig, model, clean_data, ops=ops,
                       sync_checks=False, fast_path=True, **kwargs)
