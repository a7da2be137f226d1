"""BAERASE — Backdoor Defense with Machine Unlearning, the fast path (the algorithm of
:mod:`fastpurify.reference.defenses.baerase`, with the published code's waste removed).

What changes against the reference, and why it is the same method:

- **f is frozen during the recovery** (``requires_grad_(False)`` on its parameters): the generator loss flows
  through f to the stamped images and on to G only; the reference's backward also computes every weight
  gradient of f (and of the MINE network T during G's step), which nobody uses. The generators' step computes
  G's gradients only, T's step T's only;
- **T's training draws** regenerate G(z) under ``no_grad`` (G still in train mode, so its BatchNorm running
  statistics move exactly as in the reference; T's step never needed a graph into G), and T reads the joint
  and the marginal draws in one batched call (T has no batch-dependent layer: the same per-row values);
- G and T are the reference's modules (same parameters, initialisation and BatchNorm), run by :func:`generate`
  and :func:`statistics`, whose layers compute ``(W xᵀ)ᵀ`` instead of ``x Wᵀ``: the weight gradients come out in
  the weights' layout (no transposing copy of each 2048-wide weight per step);
- **MINE's moving average** lives on the device, in float64 like the reference's host float (the same
  arithmetic, no host read per step);
- **stamping** writes the K×B stamped images straight into one buffer (in channels_last order when asked) and
  all K generators' images go through f in one forward (as in the reference); the flip-rate passes (the class
  scores and the early-stop check) run without autograd, count hits on the device, and on CUDA stamp several
  batches and run f once over them, with the same random draws per batch as the reference;
- **unlearning patches** come from G under ``no_grad`` (train mode, as in the reference: its batch statistics
  and running-statistics updates are kept); the reference builds a graph into G's weights it never uses;
- **the clean and the stamped batch of the unlearning step**: f is in train mode there, so one plain forward of
  the concatenated 2B rows would be a different method — BatchNorm would normalise both halves with mixed
  statistics and update its running statistics once instead of twice. Measured on the tiny test model
  (tests/_tiny.py, target given, 4 rounds, seeds 0/1): the first round's patch cross-entropy 3.02/2.48 instead of
  4.40/3.57, ACC after 78.8/81.5 % instead of 83.7/82.8 %, RA 60.0/74.1 instead of 70.7/73.5 %. So the one
  forward (:func:`unlearn_forward`, on CUDA) runs every BatchNorm of f on each half separately
  (:func:`split_batchnorm`: clean half then stamped half, running statistics updated twice, in the reference's
  order) and everything else once over 2B rows: the same values, gradients and running statistics as two
  forwards (measured: the same 4-round history to 1e-4, gradients to 9e-6). Layers with per-row behaviour
  (Dropout, GroupNorm, LayerNorm) are unaffected by the concatenation. On a CPU the two forwards stay: there the
  one forward was slower (see ``unlearn_forward``; chosen by ``backend.launch_bound``);
- **the L1 anchor** ``Σ|θ − θ0|`` is one ``torch._foreach_sub`` + ``torch._foreach_norm`` (skipped when its weight
  is 0); per-round statistics stay on the device and are read once per round; the finite-loss guard records
  the first bad step on the device; the only host reads are the recovery's logs and the class scores (once, at
  the end of the recovery) and the early-stop flip rate (once per round);
- the random numbers are the reference's (drawn from the loop's host generator in the same order); on CUDA they
  reach the device through pinned memory without blocking, and G's and T's Adam steps are fused;
- ``precision="bf16"`` runs f's eval-mode forwards (the recovery and the flip-rate passes) under bf16 autocast;
  the unlearning step, G and T stay fp32. ``channels_last=True`` converts f and the stamped batches;
- **time budget**: the first recovery epoch is timed and only as many further epochs as fit in half the
  remaining budget run (``result.schedule["recovery_epochs"]``); the recovery is marked one-off work
  (``loop.phase(..., once=True)``), so the rounds are planned on the unlearning's cost; scoring and flip-rate
  passes run whole.

**Data-parallel** (torch.distributed, ``_dist.py``; one process runs the code above unchanged): every per-image
draw (z, z', the patch noise; in the recovery, the unlearning and the flip-rate passes) is made for the global batch
on every rank and sliced to the rank's rows, so the generator stream and each image's draws are one process's;
G's BatchNorm (one BatchNorm1d over K·H channels) normalises over the global batch through the loop's BatchNorm sync;
the hinge, MINE's Donsker–Varadhan bound and its moving average ā use the global batch's means (one differentiable
all-reduce per step, :func:`_global_means`), every rank computing the same loss and backpropagating 1/world of it;
the flip counts and the recovery's logged counts are summed over the ranks; the unlearning loss is each rank's rows'
sums over the global count, with the data-independent L1 anchor added once (rank 0). Measured on 2 gloo ranks
(tests/test_distributed_baerase.py, tiny net): purified weights within 7e-7 relative of one process (batches split
evenly or 16/15 and 1/1), the same detected target and flip rates.

Everything else — the defaults, the random draws in the reference's order (z, z', noise, location), the
detection rule, the early stop — is the reference's (:class:`~fastpurify.reference.defenses.baerase.BAERASEConfig`).
In fp32 the fast path follows the reference to float rounding (tests/test_fast_baerase.py: the tiny backdoored
net, 2 rounds, loss 1.4e-4 relative; ASR 91 -> 0.0 %, ACC 94 -> 85.3 % for both).

Speed on CPU (1 thread on a loaded 2-core machine, min of 2 interleaved runs; SmallVGG, 300 synthetic images, one
round with the recovery): target given, published defaults (width 2048, 10 recovery epochs) 15.2 s vs 23.9 s for
the reference (1.57×; recovery 13.3 vs 21.7 s); detection (K = 10, width 256, 2 recovery epochs) 26.4 vs 31.9 s
(1.21×; f's forward and input backward over the 1,280 stamped images per step dominate). On that CPU
(avx512_bf16) ``precision="bf16"`` brings the detection run to 15.5 s and ``channels_last=True`` to 21.6 s
(single runs). On the two real SmallVGG checkpoints (target given, 2 recovery + 1 unlearning epoch, 2,500 clean
images, 2 CPU threads, end_to_end.md): fp32 1.28× / 1.38× the reference (badnets / trojan_wm), bf16 1.65× / 1.65×
with ACC/ASR 82.29 / 96.89 % vs the reference's 82.42 / 96.92 % (badnets) and 71.64 / 6.86 % vs 70.60 / 7.88 %
(trojan_wm).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend import launch_bound
from ..reference.defenses.baerase import (
    BAERASEConfig,
    Generator,
    Mine,
    _Linear,
    dv_bound,
    location,
    track_carried,
)
from . import _dist
from ._loop import PRECISIONS, PurifyResult, check_choice, precision_autocast, run_defense

# On CUDA the flip-rate passes run f over several batches at once, up to this many input elements per forward
# (4,096 CIFAR images; one batch when a single batch is larger). On a CPU a bigger forward costs more per image
# (tiny test net, 1 thread: 0.38 ms/image at 320 images, 0.72 ms at 1,600), so there it runs batch by batch.
SCORE_ELEMENTS = 4096 * 3 * 32 * 32
# The unlearning step runs the clean and the stamped batch as one forward (split BatchNorm) on launch-bound
# devices only (backend.launch_bound: CUDA). Not on a CPU: there it was slower than two forwards (1 thread,
# B = 128: tiny test net 104 vs 95 ms per forward+backward, SmallVGG 740 vs 598 ms; the 2B-row convolutions cost
# more per image, and BatchNorm runs per half anyway).


@dataclass
class FastBAERASEConfig(BAERASEConfig):
    """The reference's hyper-parameters plus the fast path's execution options."""

    precision: str = "fp32"  # "bf16": f's eval-mode forwards (recovery, flip rates) under bf16 autocast
    channels_last: bool = False  # run f on channels_last tensors

    def validate(self) -> None:
        super().validate()
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be True or False, got {self.channels_last!r}")


# --------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------


def stamp_into(x: Tensor, patches: Tensor, row: int, col: int, *, keep_clean: bool = False,
               channels_last: bool = False) -> Tensor:
    """Paste one patch per image and generator at (row, col) into one new buffer; differentiable in ``patches``.

    Shapes: ``x`` B×C×H×W, ``patches`` K×B×(C·k·k) -> (K·B)×C×H×W (generator-major), or (B + K·B)×C×H×W with
    the clean images first when ``keep_clean``. The result has channels_last strides when asked. ``x`` is not
    modified.

    Example::

        >>> out = stamp_into(torch.zeros(4, 3, 8, 8), torch.ones(2, 4, 27), 5, 5, keep_clean=True)
        >>> out.shape, out[:4].sum().item(), out[4:, :, 5:, 5:].min().item()
        (torch.Size([12, 3, 8, 8]), 0.0, 1.0)
    """
    b, c, h, w = x.shape
    kk = patches.shape[0]
    k = math.isqrt(patches.shape[-1] // c)
    n = kk + int(keep_clean)
    p = patches.view(kk, b, c, k, k)
    if channels_last:
        out = torch.empty((n, b, h, w, c), dtype=x.dtype, device=x.device)
        out.copy_(x.permute(0, 2, 3, 1).unsqueeze(0))
        out[n - kk:, :, row:row + k, col:col + k, :] = p.permute(0, 1, 3, 4, 2)
        return out.view(n * b, h, w, c).permute(0, 3, 1, 2)
    out = torch.empty((n, b, c, h, w), dtype=x.dtype, device=x.device)
    out.copy_(x.unsqueeze(0))
    out[n - kk:, :, :, row:row + k, col:col + k] = p
    return out.view(n * b, c, h, w)


def mine_loss_device(t_joint: Tensor, t_marginal: Tensor, ma: Optional[Tensor], rate: float
                     ) -> Tuple[Tensor, Tensor]:
    """The reference's :func:`~fastpurify.reference.defenses.baerase.mine_loss` with the moving average ``ā`` on
    the device: returns ``(mean T_joint − log(e + 1e-8)·e/ā, ā)``, ā updated first (``ā ← ā + rate·(e − ā)``,
    started at the first e; float64 like the reference's host float). No host synchronisation.

    Shapes: ``t_joint``, ``t_marginal`` K×B; ``ma`` K float64 or None -> (K, K float64).

    Example::

        >>> v, ma = mine_loss_device(torch.zeros(1, 4), torch.zeros(1, 4), None, rate=0.001)
        >>> ma.tolist(), v.abs().item() < 1e-6
        ([1.0], True)
    """
    return _mine_objective(t_joint.mean(-1), torch.exp(t_marginal).mean(-1), ma, rate)


def _mine_objective(joint: Tensor, et: Tensor, ma: Optional[Tensor], rate: float) -> Tuple[Tensor, Tensor]:
    """:func:`mine_loss_device` from the batch means ``joint`` = mean T_joint and ``et`` = mean exp T_marginal
    (K each; data-parallel: the global batch's, :func:`_global_means`)."""
    e = et.detach().double()
    ma = e.clone() if ma is None else ma + rate * (e - ma)
    scale = et.detach() / ma.to(et.dtype)
    return joint - torch.log(et + 1e-8) * scale, ma


def _global_means(loop, *rows: Tensor) -> Tuple[Tensor, ...]:
    """Data-parallel: the global batch's means along the last dimension of K×b tensors (this rank's b rows), in one
    differentiable all-reduce (:func:`~fastpurify.defenses._dist.differentiable_sum`): the same values on every
    rank, and a loss built from them, divided by the world size, is the rank's share. Shapes: each K×b -> K."""
    sums = _dist.differentiable_sum(torch.stack([r.sum(-1) for r in rows]), loop.group)
    return tuple((sums / loop.batch_n).unbind(0))


@contextlib.contextmanager
def split_batchnorm(net: nn.Module, parts: int):
    """While active, every BatchNorm of ``net`` splits its input into ``parts`` equal row blocks and normalises
    (and updates its running statistics with) each block in turn, as if each block had been its own forward.

    This lets one forward of a concatenated batch ``[x; x_p]`` compute what two forwards of a train-mode model
    compute, with every other layer run once. Example::

        >>> bn = nn.BatchNorm1d(2).train(); a, b = torch.randn(4, 2), torch.randn(4, 2) + 3
        >>> with split_batchnorm(bn, 2):
        ...     out = bn(torch.cat([a, b]))
        >>> bool(torch.allclose(out[4:], (b - b.mean(0)) / (b.var(0, unbiased=False) + 1e-5).sqrt(), atol=1e-5))
        True
    """
    patched: List[Tuple[nn.Module, Any]] = []

    def wrap(forward):
        def split_forward(x: Tensor) -> Tensor:
            return torch.cat([forward(block) for block in x.chunk(parts)])
        return split_forward

    try:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                patched.append((m, m.__dict__.get("forward")))
                m.forward = wrap(m.forward)
        yield
    finally:
        for m, old in patched:
            if old is None:
                del m.forward
            else:
                m.forward = old


def _linear(layer: _Linear, x: Tensor) -> Tensor:
    """A reference :class:`~fastpurify.reference.defenses.baerase._Linear` (K×out×in weights) computed as
    ``(W xᵀ)ᵀ``: the same product, but its weight gradient comes out in the weight's own K×out×in layout. The
    reference's ``x Wᵀ`` yields it as K×in×out, and accumulating it into ``.grad`` is a transposing copy of
    every 2048×2064 weight at every step (SmallVGG, width 2048: 36 ms each on 1 thread, 12 % of the recovery).

    Shapes: ``x`` K×B×in -> K×B×out (a transposed view)."""
    out = torch.bmm(layer.weight, x.transpose(1, 2)).transpose(1, 2)
    return out if layer.bias is None else out + layer.bias.unsqueeze(1)


def generate(gen: Generator, z: Tensor) -> Tensor:
    """``gen(z)`` — the reference generator's forward (same parameters, BatchNorm modules and mode) with
    :func:`_linear`. Shapes: ``z`` K×B×noise_dim -> K×B×out."""
    s = gen.skip
    h = _linear(gen.fc[0], z[..., :s])
    for i in range(1, 4):
        h = F.leaky_relu(gen.bn[i - 1](h), 0.2)
        h = _linear(gen.fc[i], torch.cat([h, z[..., i * s:(i + 1) * s]], dim=-1))
    return torch.sigmoid(h)


def statistics(mine: Mine, z: Tensor, p: Tensor) -> Tensor:
    """``mine(z, p)`` — the reference MINE network's forward with :func:`_linear`.
    Shapes: ``z`` K×B×noise_dim, ``p`` K×B×out -> K×B."""
    h = F.leaky_relu(_linear(mine.fc_z, z) + _linear(mine.fc_p, p) + mine.bias, 0.2)
    h = F.leaky_relu(_linear(mine.fc2, h), 0.2)
    return F.leaky_relu(_linear(mine.fc3, h), 0.2).squeeze(-1)


def _to_device(t: Tensor, dev: torch.device) -> Tensor:
    """Random numbers drawn on the host (the loop's generator: the reference's stream on every device) to the
    device; on CUDA through pinned memory without blocking (a pageable copy would wait for the GPU each step)."""
    if dev.type == "cuda":  # a transfer mechanism, not a strategy: pinned memory exists only for CUDA copies
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# --------------------------------------------------------------------------------------------------------
# Scoring: flip rates of generated patches on D
# --------------------------------------------------------------------------------------------------------


def flip_rates(net: nn.Module, gen: Generator, data, classes: Sequence[int], cfg: FastBAERASEConfig, loop) -> Tensor:
    """For each generator i, the fraction of D's images with label != classes[i] that ``net`` classifies as
    classes[i] once stamped with generated patches (both in eval mode, no noise): the reference's scoring, with
    its random draws per batch (on CUDA several batches per forward of ``net``). Returns K floats on the device."""
    was_net, was_gen = net.training, gen.training
    net.eval()
    gen.eval()
    dev = data.x.device
    kk = len(classes)
    cls = torch.as_tensor(list(classes), device=dev).unsqueeze(1)
    hits = torch.zeros(kk, device=dev)
    total = torch.zeros(kk, device=dev)
    per_batch = kk * cfg.batch_size * math.prod(data.x.shape[1:])
    group = max(1, SCORE_ELEMENTS // per_batch) if launch_bound(dev) else 1
    pending: List[Tuple[Tensor, Tensor]] = []

    def flush() -> None:
        nonlocal hits, total
        with precision_autocast(cfg.precision, dev):
            pred = net(torch.cat([s for s, _ in pending]) if len(pending) > 1 else pending[0][0]).argmax(1)
        for p, y in zip(torch.split(pred, [s.shape[0] for s, _ in pending]), (y for _, y in pending)):
            p = p.view(kk, y.shape[0])  # (explicit: a rank may hold no rows of a batch)
            other = y.unsqueeze(0) != cls
            hits = hits + ((p == cls) & other).sum(1)
            total = total + other.sum(1)
        pending.clear()

    try:
        with torch.no_grad():
            for idx in loop.batches(len(data), cfg.batch_size, shuffle=False, budget=False):
                x, y = data.x[idx], data.y[idx]
                # drawn for the global batch (the same stream on every rank), this rank's rows kept
                z = torch.rand(kk, loop.batch_n, cfg.noise_dim, generator=loop.generator)
                z = _to_device(loop.local(z, 1), dev)
                row, col = location(x.shape[2], x.shape[3], cfg.patch_size, cfg.position, loop.generator)
                pending.append((stamp_into(x, generate(gen, z), row, col, channels_last=cfg.channels_last), y))
                if len(pending) == group:
                    flush()
            if pending:
                flush()
    finally:
        net.train(was_net)
        gen.train(was_gen)
    if loop.distributed:  # the counts over every rank's rows (one all-reduce per pass)
        hits, total = loop.global_sum(torch.stack([hits, total])).unbind(0)
    return hits / total.clamp_min(1)


# --------------------------------------------------------------------------------------------------------
# The two stages
# --------------------------------------------------------------------------------------------------------


def recover(net: nn.Module, data, classes: Sequence[int], cfg: FastBAERASEConfig, loop) -> Tuple[Generator, List[dict]]:
    """Stage 1: train one generator (and MINE network) per class in ``classes``, together, f frozen (its
    parameters must not require grad). Returns the batched generator and per-epoch logs (mean capped target
    probability, MI estimate, flip rate, per class). With a time budget, the first epoch is timed and the
    further epochs that fit in half the remaining budget run."""
    kk, c = len(classes), data.x.shape[1]
    out = c * cfg.patch_size ** 2
    dev = data.x.device
    # initialised from the run's generator, as in the reference (not the process-global RNG: thread safety)
    gen = Generator(kk, cfg.noise_dim, out, cfg.hidden_size, generator=loop.generator).to(dev)
    mine = Mine(kk, cfg.noise_dim, out, cfg.hidden_size, generator=loop.generator).to(dev)
    fused = {"fused": True} if launch_bound(dev) else {}  # one launch per Adam step on the GPU
    g_opt = torch.optim.Adam(gen.parameters(), lr=cfg.gen_lr, betas=tuple(cfg.gen_betas), **fused)
    m_opt = torch.optim.Adam(mine.parameters(), lr=cfg.gen_lr, betas=tuple(cfg.gen_betas), **fused)
    cls = torch.as_tensor(list(classes), device=dev)
    ma: Optional[Tensor] = None
    stats: List[Tensor] = []  # per epoch: K×4 (hinge, mi, hits, total) sums and the batch count, read at the end
    gen.train()
    mine.train()
    net.eval()
    dp = loop.distributed  # G's BatchNorm (train mode) normalises over the global batch: _dist.sync_batchnorm

    def rand(k: int, n: int, d: int, normal: bool = False) -> Tensor:
        """Per-image draws: made for the global batch of ``n`` rows (the same stream on every rank), this rank's
        rows kept (one process: all)."""
        t = (torch.randn if normal else torch.rand)(k, n, d, generator=loop.generator)
        return _to_device(loop.local(t, 1), dev)

    planned, epoch = cfg.recovery_epochs, 0
    while epoch < planned:
        t0 = loop.clock()
        sums = torch.zeros(4, kk, device=dev)
        count = 0
        for idx in loop.batches(len(data), cfg.batch_size, shuffle=True):
            n, b = loop.batch_n, len(idx)  # the global batch's rows, this rank's (one process: the same)
            if n < 2:  # G's BatchNorm cannot train on one sample
                continue
            x, y = data.x[idx], data.y[idx]
            # Generator step (G's gradients only: f is frozen, T's parameters are switched off).
            z, z1 = rand(kk, n, cfg.noise_dim), rand(kk, n, cfg.noise_dim)
            noise = rand(kk, n, out, normal=True) * cfg.patch_noise
            patch = generate(gen, z)
            row, col = location(x.shape[2], x.shape[3], cfg.patch_size, cfg.position, loop.generator)
            with precision_autocast(cfg.precision, dev):
                logits = net(stamp_into(x, patch + noise, row, col, channels_last=cfg.channels_last))
            logits = logits.float().view(kk, b, logits.shape[-1])
            prob = F.softmax(logits, dim=-1).gather(2, cls.view(kk, 1, 1).expand(kk, b, 1)).squeeze(-1)
            mine.requires_grad_(False)
            t = statistics(mine, torch.cat([z, z1], 1), torch.cat([patch, patch], 1))  # joint and marginal at once
            if dp:  # the global batch's means; every rank the same loss, backpropagated as its share 1/world
                hinge, joint, et = _global_means(loop, torch.clamp(prob, max=cfg.beta), t[:, :b], torch.exp(t[:, b:]))
                mi = joint - torch.log(et + 1e-8)  # dv_bound over the global batch
                g_loss = (-hinge - cfg.mi_weight * mi).sum() / loop.world
            else:
                hinge = torch.clamp(prob, max=cfg.beta).mean(1)
                mi = dv_bound(t[:, :b], t[:, b:])
                g_loss = (-hinge - cfg.mi_weight * mi).sum()  # K independent losses: their gradients do not mix
            loop.check_finite(g_loss, "generator loss")
            loop.step(g_opt, g_loss, updates_model=False, shares=True)
            # Statistics-network step on fresh draws: no graph into G (its BatchNorm statistics still move).
            z, z1 = rand(kk, n, cfg.noise_dim), rand(kk, n, cfg.noise_dim)
            with torch.no_grad():
                patch = generate(gen, z)
            mine.requires_grad_(True)
            t = statistics(mine, torch.cat([z, z1], 1), torch.cat([patch, patch], 1))
            if dp:  # ā moves with the global batch's mean exp T: the same on every rank
                value, ma = _mine_objective(*_global_means(loop, t[:, :b], torch.exp(t[:, b:])), ma, cfg.ma_rate)
                m_loss = -value.sum() / loop.world
            else:
                value, ma = mine_loss_device(t[:, :b], t[:, b:], ma, cfg.ma_rate)
                m_loss = -value.sum()
            loop.check_finite(m_loss, "MINE loss")
            loop.step(m_opt, m_loss, updates_model=False, shares=True)
            with torch.no_grad():
                other = y.unsqueeze(0) != cls.unsqueeze(1)
                hits = ((logits.argmax(-1) == cls.unsqueeze(1)) & other).sum(1)
                sums += torch.stack([hinge.detach(), mi.detach(), hits.float(), other.sum(1).float()])
                count += 1
        if not count:  # the time budget stopped the batches
            break
        stats.append(torch.cat([sums.flatten(), _to_device(torch.tensor([float(count), epoch + 1.0]), dev)]))
        if epoch == 0 and planned > 1:
            _sync(dev)
            planned = 1 + loop.fit(planned - 1, loop.clock() - t0, share=0.5)
        epoch += 1
    loop.schedule["recovery_epochs"] = len(stats)  # the epochs that ran
    logs = []
    if stats:
        table = torch.stack(stats)
        if dp:  # the flip counts over every rank's rows (hinge and mi are the global batch's already)
            table[:, 2 * kk:4 * kk] = loop.global_sum(table[:, 2 * kk:4 * kk])
        stats = table.tolist()  # the one host read of the recovery's logs
    for row in stats:
        h, m, hits, total = (row[i * kk:(i + 1) * kk] for i in range(4))
        n, e = row[4 * kk], int(row[4 * kk + 1])
        logs.append({"epoch": e, "hinge": [v / n for v in h], "mi": [v / n for v in m],
                     "flip_rate": [a / max(1.0, t) for a, t in zip(hits, total)]})
    return gen, logs


def unlearn_forward(net: nn.Module, x: Tensor, patch: Tensor, row: int, col: int, one_forward: bool,
                    channels_last: bool = False) -> Tuple[Tensor, Tensor]:
    """The unlearning step's logits of f (train mode) on the clean batch and on the batch stamped with ``patch``
    at (row, col): two forwards (clean first, as in the reference), or — ``one_forward`` — one forward of the 2B
    rows with every BatchNorm normalising each half on its own (:func:`split_batchnorm`), which computes the
    same values, gradients and running statistics.

    Shapes: ``x`` B×C×H×W, ``patch`` 1×B×(C·k·k) -> (B×classes, B×classes)."""
    b = x.shape[0]
    if one_forward:
        both = stamp_into(x, patch, row, col, keep_clean=True, channels_last=channels_last)
        with split_batchnorm(net, 2):
            logits = net(both)
        return logits[:b], logits[b:]
    clean = net(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return clean, net(stamp_into(x, patch, row, col, channels_last=channels_last))


def _l1_anchor(params: List[Tensor], theta0: List[Tensor]) -> Tensor:
    return torch.stack(torch._foreach_norm(torch._foreach_sub(params, theta0), 1)).sum()


def _baerase(net: nn.Module, data, cfg: FastBAERASEConfig, loop) -> Dict[str, Any]:
    if cfg.target is not None and cfg.target >= data.num_classes:
        raise ValueError(f"target={cfg.target} is outside [0, {data.num_classes}) (the model has "
                         f"{data.num_classes} classes)")
    k = cfg.patch_size
    if k > min(data.x.shape[2], data.x.shape[3]):
        raise ValueError(f"patch_size={k} does not fit images of size {tuple(data.x.shape[2:])}")
    classes = list(range(data.num_classes)) if cfg.target is None else [cfg.target]
    dev = data.x.device
    everything = list(net.parameters())
    flags = [p.requires_grad for p in everything]
    params = [p for p in everything if p.requires_grad]  # the unlearned ones: a frozen parameter is never changed
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    theta0 = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    info: Dict[str, Any] = {}
    stopped = False
    one_forward = launch_bound(dev)
    dp = loop.distributed
    gen: Optional[Generator] = None
    target = classes[0]
    out = data.x.shape[1] * k * k

    def _write(g, t, st):
        nonlocal gen, target, stopped
        gen, target, stopped = g, t, st

    track_carried(loop, opt, cfg, out, dev, info, lambda: (gen, target, stopped), _write)
    try:
        for r in loop.rounds():
            if stopped:
                break
            if r == 0:
                with loop.phase("recover", once=True):  # one-off: not part of a round's cost for the budget
                    net.requires_grad_(False)  # f is frozen: gradients reach only the stamped images and G
                    gen, logs = recover(net, data, classes, cfg, loop)
                    scores = flip_rates(net, gen, data, classes, cfg, loop).tolist()  # one host read
                    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the lowest class on ties
                    target = classes[best]
                    gen = gen.select(best) if len(classes) > 1 else gen
                info.update(target=target, class_scores={c: float(s) for c, s in zip(classes, scores)},
                            recovery=logs)
                if cfg.target is None:
                    info["detected_target"] = target
                for p in params:  # as in the reference: every weight of f is unlearned, except the frozen ones
                    p.requires_grad_(True)
            sums = torch.zeros(3, device=dev)  # loss, clean CE, patch CE
            batches = 0
            with loop.phase("unlearn"):
                net.train()
                gen.train()  # as in the reference: patches from G in train mode (batch statistics)
                for idx in loop.batches(len(data), cfg.batch_size, shuffle=True):
                    n_all = loop.batch_n  # the global batch's rows (this rank holds loop.batch_rows of them)
                    if n_all < 2:
                        continue
                    x, y = data.x[idx], data.y[idx]
                    z = _to_device(loop.local(torch.rand(1, n_all, cfg.noise_dim, generator=loop.generator), 1), dev)
                    with torch.no_grad():
                        patch = generate(gen, z)
                    row, col = location(x.shape[2], x.shape[3], k, cfg.position, loop.generator)
                    clean_logits, patch_logits = unlearn_forward(net, x, patch, row, col, one_forward,
                                                                 cfg.channels_last)
                    if dp:  # this rank's shares: its rows' sums over the global count; the anchor (no data) on rank 0
                        clean_loss = F.cross_entropy(clean_logits, y, reduction="sum") / n_all
                        poison_loss = -F.cross_entropy(patch_logits, torch.full_like(y, target),
                                                       reduction="sum") / n_all
                    else:
                        clean_loss = F.cross_entropy(clean_logits, y)
                        poison_loss = -F.cross_entropy(patch_logits, torch.full_like(y, target))
                    loss = cfg.clean_weight * clean_loss + poison_loss
                    if cfg.l1_weight and (not dp or loop.rank == 0):
                        loss = loss + cfg.l1_weight * _l1_anchor(params, theta0)
                    loop.check_finite(loss, "unlearning loss")
                    loop.step(opt, loss, shares=True)
                    # data-parallel: the shares times the world, whose mean over the ranks (the history) is the loss
                    part = torch.stack([loss.detach(), clean_loss.detach(), -poison_loss.detach()])
                    sums += part * loop.world if dp else part
                    batches += 1
            with loop.phase("stop_check"):
                rate = flip_rates(net, gen, data, [target], cfg, loop)[0]
            n = max(1, batches)
            loop.log(loss=sums[0] / n, clean_ce=sums[1] / n, patch_ce=sums[2] / n, patch_flip_rate=rate)
            if cfg.stop_rate is not None and float(rate) < cfg.stop_rate:  # one host read per round
                stopped = True
                info["stopped_early"] = r + 1
    finally:
        for p, flag in zip(everything, flags):
            p.grad = None
            p.requires_grad_(flag)
        if cfg.channels_last:
            net.to(memory_format=torch.contiguous_format)
    info.setdefault("stopped_early", None)
    net.eval()
    return info


def baerase(model: nn.Module, clean_data, **kwargs) -> PurifyResult:
    """Purify ``model`` with BAERASE (trigger-distribution recovery, then unlearning) — the fast path.

    Same arguments, defaults and result as :func:`fastpurify.reference.defenses.baerase.baerase` (the fields of
    :class:`~fastpurify.reference.defenses.baerase.BAERASEConfig` and the common options; ``target=None``
    detects the target), plus ``precision`` (``"fp32"`` | ``"bf16"``) and ``channels_last``. See the module
    docstring for what is faster and why it is the same method.

    Shapes: ``clean_data`` x N×C×H×W in [0, 1], y N int. Example::

        >>> from fastpurify.models import SmallVGG
        >>> from fastpurify.data import synthetic_dataset
        >>> x, y = synthetic_dataset(n=64)
        >>> r = baerase(SmallVGG(), (x, y), target=0, epochs=1, recovery_epochs=1, hidden_size=32,
        ...             batch_size=32, progress=False)
        >>> r.status, r.info["target"]
        ('completed', 0)
    """
    return run_defense("baerase", _baerase, FastBAERASEConfig, model, clean_data, sync_checks=False,
                       fast_path=True, **kwargs)
