"""BAERASE — Backdoor Defense with Machine Unlearning (Liu et al., INFOCOM 2022): the faithful eager reference.

Two stages, both on the defender's clean data D, in pixel space:

1. **Trigger distribution recovery** (an entropy-maximising generator after Qiao et al., NeurIPS 2019). A
   generator G maps noise z ~ U[0, 1]^64 to a k×k×C patch in [0, 1] (k = 3): an MLP of width 2048 whose
   four layers each also read one quarter of z (skip inputs), with BatchNorm and LeakyReLU(0.2), sigmoid
   output. A MINE statistics network T(z, p) (width 2048) estimates the mutual information of z and p = G(z).
   For ``recovery_epochs`` = 10 epochs (batch 128, f in eval mode), per batch: stamp ``G(z) + N(0, 0.1²)`` at
   one random location (the same for the whole batch) into the clean images;
   ``L_G = −mean(min(softmax f(x_p)[t], β)) − α·MI(z; G(z))`` with β = 0.5, α = 0.1, where MI is the
   Donsker–Varadhan bound ``mean T(z, G(z)) − log mean exp T(z', G(z))`` (z' an independent draw); then T
   is trained on fresh draws to maximise the same bound with MINE's bias-corrected gradient (a moving
   average of ``mean exp T``, rate 0.001). Adam(2e-4, betas (0.5, 0.999)) for G and T.
2. **Unlearning** (``epochs`` = 10 epochs, SGD lr 1e-4, momentum 0.9, f in train mode): per batch,
   ``L = α_u·CE(f(x), y) − CE(f(x_p), t) + 1e-6·‖θ − θ0‖₁`` with α_u = 100 and x_p stamped with fresh
   generated patches (no noise) at one random location.

Rounds: one round is one unlearning epoch (``epochs``). The recovery (and, without a target, the detection)
runs at the start of the first round, so the first round's time and ``timings["recover"]`` include it.

What this port chose, and why (read against ``fmy266/Pytorch-Backdoor-Unlearning``, which does not run as
published: a mis-unpacked parameter loop, a regulariser that iterates over modules, and ``GM.search`` —
the generator training — is never called before unlearning):

- **The generator is trained** (``GM.search``) before unlearning, as the paper describes.
- **Pixel space**: the published code pastes *normalised* patch values into [0, 1] images. Patches are
  stamped here into pixel images in front of the model's normalisation (if any). Patch + noise is not
  clipped, as published.
- **The L1 anchor** is ``Σ|θ − θ0|`` over all parameters (the intent of the broken ``zip`` over modules).
- **Frozen parameters are kept**: the unlearning updates every parameter of f except those the user froze
  (``requires_grad=False``; fastpurify's policy: a defense never changes them). The published code unlearns all.
- **G and T are initialised from the run's generator** (``loop.generator``), not the process-global RNG, which two
  runs in two threads would share (their results then differed from the same runs made one after the other).
- **Random location**: ``⌊u·(H − k)⌋`` per axis with u ~ U[0, 1) as published (the last offset H − k is never
  drawn); ``position="corner"`` is the published bottom-right alternative.
- **Early stop on defender data**: the published loop evaluates the *test set with the true trigger* after
  every batch and stops below 0.05 % attack success. A defender has neither: here, after each unlearning
  epoch, the flip rate of generated patches (G in eval mode, no noise, random location) on D's non-target
  images is measured, and unlearning stops when it falls below ``stop_rate`` (default 0.0005, the published
  threshold; ``None`` disables). ``result.info["stopped_early"]`` says whether it did.
- **Target detection** (``target=None``, not in the published code, which knows t): the recovery runs for
  every class at once — K = num_classes independent generator/MINE pairs held as one batched network
  (stacked per-class weights, one ``bmm`` per layer, per-class BatchNorm), all stamping the same clean batch
  at the same location, trained together in one call (their losses are summed, so their gradients and Adam
  states stay independent). Each class c is scored by the flip rate of its generated patches on D's
  images whose label is not c (the quantity the published recovery logs as its "ASR"); the highest score
  (lowest class on ties) is the detected target, whose generator then drives the unlearning.
  ``result.info["class_scores"]``, ``info["detected_target"]``. With a given target, K = 1.
- **Batches**: the published loader iterates over a fixed random subset in fixed order; here D is reshuffled
  each epoch (seeded). A last batch of one image is skipped (G's BatchNorm cannot train on one sample).
- **Left out**: the statistics network's convolutional branch, which the published code builds (about 270 M
  parameters at width 2048) and never uses.
- **Kept as published** (the baseline's waste): the generator's loss is backpropagated through f, so f's
  weights collect gradients during the recovery; T's training draws regenerate G(z) with a graph; the moving
  average is a host float (a sync per step); unlearning generates patches with G in train mode and a graph
  into G's weights; clean and stamped batches are two separate forwards of f.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...defenses._loop import PurifyResult, check_choice, check_positive, run_defense

POSITIONS = ("random", "corner")


@dataclass
class BAERASEConfig:
    """BAERASE hyper-parameters (published defaults)."""

    epochs: int = 10  # unlearning epochs (one round each); the recovery runs inside the first round
    batch_size: int = 128  # both stages
    target: Optional[int] = None  # the attack's target label; None = detect it (recovery for every class at once)
    recovery_epochs: int = 10  # generator/MINE training epochs over D
    patch_size: int = 3  # k: G makes k×k×C patches
    noise_dim: int = 64  # dimension of z ~ U[0, 1]; a multiple of 4 (each generator layer reads one quarter)
    hidden_size: int = 2048  # width of G and of the MINE network T
    patch_noise: float = 0.1  # std of the Gaussian noise added to the patches during the recovery
    beta: float = 0.5  # the target probability is capped at beta in L_G
    mi_weight: float = 0.1  # α: weight of the mutual-information (entropy) term in L_G
    gen_lr: float = 2e-4  # Adam lr of G and T
    gen_betas: Tuple[float, float] = (0.5, 0.999)  # Adam betas of G and T
    ma_rate: float = 0.001  # MINE moving-average rate of mean exp T (bias-corrected gradient)
    lr: float = 1e-4  # SGD lr of the unlearning
    momentum: float = 0.9  # SGD momentum of the unlearning
    weight_decay: float = 0.0  # SGD weight decay of the unlearning
    clean_weight: float = 100.0  # α_u: weight of the clean CE in the unlearning loss
    l1_weight: float = 1e-6  # weight of ‖θ − θ0‖₁
    position: str = "random"  # where patches are stamped: "random" (one location per batch) or "corner"
    stop_rate: Optional[float] = 0.0005  # stop when generated patches flip fewer of D's images (None = never)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "recovery_epochs", "patch_size", "noise_dim", "hidden_size"):
            check_positive(name, getattr(self, name), integer=True)
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 for BAERASE (its generator's BatchNorm and the unlearning "
                             f"skip batches of one image, so nothing would be purified), got {self.batch_size}")
        if self.noise_dim % 4:
            raise ValueError(f"noise_dim must be a multiple of 4 (each generator layer reads a quarter of z), "
                             f"got {self.noise_dim!r}")
        if self.target is not None and (isinstance(self.target, bool) or not isinstance(self.target, int)
                                        or self.target < 0):
            raise ValueError(f"target must be None (detect) or a class index >= 0, got {self.target!r}")
        for name in ("patch_noise", "mi_weight", "momentum", "weight_decay", "l1_weight"):
            check_positive(name, getattr(self, name), allow_zero=True)
        for name in ("gen_lr", "lr", "clean_weight", "ma_rate"):
            check_positive(name, getattr(self, name))
        if self.ma_rate > 1:
            raise ValueError(f"ma_rate must lie in (0, 1], got {self.ma_rate!r}")
        check_positive("beta", self.beta)
        if self.beta > 1:
            raise ValueError(f"beta must lie in (0, 1] (a cap on a probability), got {self.beta!r}")
        ok = isinstance(self.gen_betas, (tuple, list)) and len(self.gen_betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in self.gen_betas)
        if not ok:
            raise ValueError(f"gen_betas must be a pair of numbers in [0, 1), got {self.gen_betas!r}")
        check_choice("position", self.position, POSITIONS)
        if self.stop_rate is not None:
            check_positive("stop_rate", self.stop_rate, allow_zero=True)


# --------------------------------------------------------------------------------------------------------
# K independent networks held as one batched network
# --------------------------------------------------------------------------------------------------------


class _Linear(nn.Module):
    """K independent Linear layers: (K, B, in) -> (K, B, out), each initialised as ``nn.Linear``, on the CPU, from
    ``generator`` (None: the global RNG). The defense passes the run's generator: the global RNG is one per process,
    and two runs in two threads drew each other's initial weights through it (issue 13)."""

    def __init__(self, k: int, n_in: int, n_out: int, bias: bool = True,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, n_out, n_in, device="cpu"))
        self.bias = nn.Parameter(torch.empty(k, n_out, device="cpu")) if bias else None
        bound = 1.0 / math.sqrt(n_in)
        for i in range(k):
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5), generator=generator)  # nn.Linear's default
            if self.bias is not None:
                nn.init.uniform_(self.bias[i], -bound, bound, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.bmm(x, self.weight.transpose(1, 2))
        return out if self.bias is None else out + self.bias.unsqueeze(1)


class _BatchNorm(nn.BatchNorm1d):
    """K independent BatchNorm1d(H) as one BatchNorm1d(K·H) over (K, B, H)."""

    def __init__(self, k: int, h: int) -> None:
        super().__init__(k * h)
        self.k, self.h = k, h

    def forward(self, x: Tensor) -> Tensor:
        k, b, h = x.shape
        y = super().forward(x.transpose(0, 1).reshape(b, k * h))
        return y.view(b, k, h).transpose(0, 1)


class Generator(nn.Module):
    """K patch generators (Qiao et al.'s MLP with a quarter of z fed to each layer).

    Shapes: ``z`` K×B×noise_dim in [0, 1] -> patches K×B×out in (0, 1) (out = C·k·k). Initialised on the CPU from
    ``generator`` (None: the global RNG).
    """

    def __init__(self, k: int, noise_dim: int, out: int, hidden: int,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        s = self.skip = noise_dim // 4
        g = generator
        self.fc = nn.ModuleList([_Linear(k, s, hidden, generator=g), _Linear(k, hidden + s, hidden, generator=g),
                                 _Linear(k, hidden + s, hidden, generator=g), _Linear(k, hidden + s, out, generator=g)])
        self.bn = nn.ModuleList([_BatchNorm(k, hidden) for _ in range(3)])

    def forward(self, z: Tensor) -> Tensor:
        s = self.skip
        h = self.fc[0](z[..., :s])
        for i in range(1, 4):
            h = F.leaky_relu(self.bn[i - 1](h), 0.2)
            h = self.fc[i](torch.cat([h, z[..., i * s:(i + 1) * s]], dim=-1))
        return torch.sigmoid(h)

    def select(self, i: int) -> Generator:
        """Generator ``i`` alone (K = 1), with its weights, BatchNorm statistics and train/eval mode."""
        one = copy.deepcopy(self)
        with torch.no_grad():
            for fc in one.fc:
                fc.weight = nn.Parameter(fc.weight[i:i + 1].clone())
                fc.bias = nn.Parameter(fc.bias[i:i + 1].clone())
            for bn in one.bn:
                sl = slice(i * bn.h, (i + 1) * bn.h)
                bn.weight = nn.Parameter(bn.weight[sl].clone())
                bn.bias = nn.Parameter(bn.bias[sl].clone())
                bn.running_mean = bn.running_mean[sl].clone()
                bn.running_var = bn.running_var[sl].clone()
                bn.k, bn.num_features = 1, bn.h
        return one


class Mine(nn.Module):
    """K MINE statistics networks T(z, p) (the published MLP, LeakyReLU 0.2 after every layer, the last too).

    Shapes: ``z`` K×B×noise_dim, ``p`` K×B×out -> K×B. Initialised on the CPU from ``generator`` (None: the global
    RNG).
    """

    def __init__(self, k: int, noise_dim: int, out: int, hidden: int,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.fc_z = _Linear(k, noise_dim, hidden, bias=False, generator=generator)
        self.fc_p = _Linear(k, out, hidden, bias=False, generator=generator)
        self.bias = nn.Parameter(torch.zeros(k, 1, hidden, device="cpu"))
        self.fc2 = _Linear(k, hidden, hidden, generator=generator)
        self.fc3 = _Linear(k, hidden, 1, generator=generator)

    def forward(self, z: Tensor, p: Tensor) -> Tensor:
        h = F.leaky_relu(self.fc_z(z) + self.fc_p(p) + self.bias, 0.2)
        h = F.leaky_relu(self.fc2(h), 0.2)
        return F.leaky_relu(self.fc3(h), 0.2).squeeze(-1)


def dv_bound(t_joint: Tensor, t_marginal: Tensor) -> Tensor:
    """The Donsker–Varadhan lower bound on mutual information, as published (with ``+1e-8`` in the log).

    ``mean T(joint) − log(mean exp T(marginal) + 1e-8)`` along the last dimension.
    Shapes: ``t_joint`` K×B, ``t_marginal`` K×B' -> K.

    Example::

        >>> dv_bound(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])).abs() < 1e-6
        tensor([True])
    """
    return t_joint.mean(-1) - torch.log(torch.exp(t_marginal).mean(-1) + 1e-8)


def mine_loss(t_joint: Tensor, t_marginal: Tensor, ma: List[Optional[float]], rate: float) -> Tensor:
    """MINE's bias-corrected objective (to maximise): ``mean T_joint − log(e + 1e-8)·e/ā`` with
    ``e = mean exp T_marginal`` (e held constant in the factor) and ``ā`` its moving average, updated in place
    first (``ā ← ā + rate·(e − ā)``, started at the first e). Its gradient is ``∇mean T_joint − ∇e/ā``.

    Shapes: ``t_joint``, ``t_marginal`` K×B; ``ma`` K host floats (or None) -> K.

    Example::

        >>> ma = [None]
        >>> v = mine_loss(torch.zeros(1, 4), torch.zeros(1, 4), ma, rate=0.001)
        >>> ma, v.abs().item() < 1e-6
        ([1.0], True)
    """
    et = torch.exp(t_marginal).mean(-1)
    values = et.detach().tolist()  # as published: the moving average lives on the host
    for i, v in enumerate(values):
        ma[i] = v if ma[i] is None else ma[i] + rate * (v - ma[i])
    scale = et.detach() / torch.tensor(ma, dtype=et.dtype, device=et.device)
    return t_joint.mean(-1) - torch.log(et + 1e-8) * scale


# --------------------------------------------------------------------------------------------------------
# Stamping and scoring
# --------------------------------------------------------------------------------------------------------


def location(h: int, w: int, k: int, position: str, generator: torch.Generator) -> Tuple[int, int]:
    """Top-left corner ``(row, col)`` of a k×k patch in an H×W image: ``⌊u·(H − k)⌋, ⌊u'·(W − k)⌋`` with u, u'
    from ``generator`` (published "random"; the offset H − k is never drawn), or ``(H − k, W − k)`` ("corner").

    Example::

        >>> location(32, 32, 3, "corner", torch.Generator())
        (29, 29)
    """
    if position == "corner":
        return h - k, w - k
    u = torch.rand(2, generator=generator).tolist()
    return int(u[0] * (h - k)), int(u[1] * (w - k))


def stamp(x: Tensor, patches: Tensor, row: int, col: int) -> Tensor:
    """Paste one patch per image and generator at (row, col); differentiable in ``patches``.

    Shapes: ``x`` B×C×H×W, ``patches`` K×B×(C·k·k) -> (K·B)×C×H×W (generator-major). ``x`` is not modified.

    Example::

        >>> out = stamp(torch.zeros(4, 3, 8, 8), torch.ones(2, 4, 27), 5, 5)
        >>> out.shape, out[:, :, 5:, 5:].min().item(), out.sum().item()
        (torch.Size([8, 3, 8, 8]), 1.0, 216.0)
    """
    b, c, h, w = x.shape
    kk, k = patches.shape[0], math.isqrt(patches.shape[-1] // c)
    out = x.unsqueeze(0).repeat(kk, 1, 1, 1, 1)
    out[:, :, :, row:row + k, col:col + k] = patches.view(kk, b, c, k, k)
    return out.view(kk * b, c, h, w)


def _flip_rates(net: nn.Module, gen: Generator, data, classes: List[int], cfg: BAERASEConfig, loop) -> Tensor:
    """For each generator i, the fraction of D's images with label != classes[i] that ``net`` classifies as
    classes[i] once stamped with generated patches (both in eval mode, no noise). Returns K floats (CPU)."""
    was_net, was_gen = net.training, gen.training
    net.eval()
    gen.eval()
    cls = torch.as_tensor(classes, device=data.x.device)
    hits = torch.zeros(len(classes), device=data.x.device)
    total = torch.zeros(len(classes), device=data.x.device)
    try:
        with torch.no_grad():
            for idx in loop.batches(len(data), cfg.batch_size, shuffle=False, budget=False):
                x, y = data.x[idx], data.y[idx]
                z = torch.rand(len(classes), len(idx), cfg.noise_dim, generator=loop.generator).to(x.device)
                row, col = location(x.shape[2], x.shape[3], cfg.patch_size, cfg.position, loop.generator)
                pred = net(stamp(x, gen(z), row, col)).argmax(1).view(len(classes), -1)
                other = y.unsqueeze(0) != cls.unsqueeze(1)
                hits += ((pred == cls.unsqueeze(1)) & other).sum(1)
                total += other.sum(1)
    finally:
        net.train(was_net)
        gen.train(was_gen)
    return (hits / total.clamp_min(1)).cpu()


# --------------------------------------------------------------------------------------------------------
# The two stages
# --------------------------------------------------------------------------------------------------------


def _recover(net: nn.Module, data, classes: List[int], cfg: BAERASEConfig, loop) -> Tuple[Generator, List[dict]]:
    """Stage 1: train one generator (and MINE network) per class in ``classes``, together. Returns the batched
    generator and per-epoch logs (mean capped target probability, MI estimate, flip rate, per class)."""
    kk, c = len(classes), data.x.shape[1]
    out = c * cfg.patch_size ** 2
    dev = data.x.device
    # initialised from the run's generator, not the process-global RNG (thread safety)
    gen = Generator(kk, cfg.noise_dim, out, cfg.hidden_size, generator=loop.generator).to(dev)
    mine = Mine(kk, cfg.noise_dim, out, cfg.hidden_size, generator=loop.generator).to(dev)
    g_opt = torch.optim.Adam(gen.parameters(), lr=cfg.gen_lr, betas=tuple(cfg.gen_betas))
    m_opt = torch.optim.Adam(mine.parameters(), lr=cfg.gen_lr, betas=tuple(cfg.gen_betas))
    cls = torch.as_tensor(classes, device=dev)
    ma: List[Optional[float]] = [None] * kk
    logs = []
    gen.train()
    mine.train()
    net.eval()

    def rand(*shape):
        return torch.rand(*shape, generator=loop.generator).to(dev)

    # With a time budget, the epochs after the first are fitted into half of what remains (loop.fit).
    epochs, epoch, t_first = cfg.recovery_epochs, 0, None
    while epoch < epochs:
        if epoch == 1:
            epochs = 1 + loop.fit(cfg.recovery_epochs - 1, t_first, share=0.5)
            loop.schedule["recovery_epochs"] = epochs
            if epoch >= epochs:
                break
        t0 = loop.clock()
        hinge_sum, mi_sum, hits, total, count = 0.0, 0.0, 0.0, 0.0, 0
        for idx in loop.batches(len(data), cfg.batch_size, shuffle=True):
            b = len(idx)
            if b < 2:  # G's BatchNorm cannot train on one sample
                continue
            x, y = data.x[idx], data.y[idx]
            # Generator step: fool f into the class with diverse patches (high MI between z and the patch).
            z, z1 = rand(kk, b, cfg.noise_dim), rand(kk, b, cfg.noise_dim)
            noise = torch.randn(kk, b, out, generator=loop.generator).to(dev) * cfg.patch_noise
            patch = gen(z)
            row, col = location(x.shape[2], x.shape[3], cfg.patch_size, cfg.position, loop.generator)
            logits = net(stamp(x, patch + noise, row, col)).view(kk, b, -1)
            prob = F.softmax(logits, dim=-1).gather(2, cls.view(kk, 1, 1).expand(kk, b, 1)).squeeze(-1)
            hinge = torch.clamp(prob, max=cfg.beta).mean(1)
            mi = dv_bound(mine(z, patch), mine(z1, patch))
            g_loss = (-hinge - cfg.mi_weight * mi).sum()  # K independent losses: their gradients do not mix
            loop.check_finite(g_loss, "generator loss")
            loop.step(g_opt, g_loss, updates_model=False)  # as published: the backward also fills f's and T's .grad
            # Statistics-network step on fresh draws: maximise the bias-corrected bound.
            z, z1 = rand(kk, b, cfg.noise_dim), rand(kk, b, cfg.noise_dim)
            patch = gen(z)
            m_loss = -mine_loss(mine(z, patch), mine(z1, patch), ma, cfg.ma_rate).sum()
            loop.check_finite(m_loss, "MINE loss")
            loop.step(m_opt, m_loss, updates_model=False)
            with torch.no_grad():
                other = y.unsqueeze(0) != cls.unsqueeze(1)
                hits = hits + ((logits.argmax(-1) == cls.unsqueeze(1)) & other).sum(1)
                total = total + other.sum(1)
                hinge_sum, mi_sum, count = hinge_sum + hinge, mi_sum + mi, count + 1
        if count:
            logs.append({"epoch": epoch + 1, "hinge": (hinge_sum / count).tolist(), "mi": (mi_sum / count).tolist(),
                         "flip_rate": (hits / torch.clamp(torch.as_tensor(total), min=1)).tolist()})
        t_first = loop.clock() - t0 if t_first is None else t_first
        epoch += 1
    loop.schedule.setdefault("recovery_epochs", epoch)
    return gen, logs


def track_carried(loop, opt, cfg: BAERASEConfig, out: int, dev: torch.device, info: dict, read, write) -> None:
    """Register with the loop what BAERASE's first round hands to the later ones — the selected generator, the
    target, the early-stop flag and the info — and the unlearning optimiser, so that a checkpoint can resume it.
    ``read()`` gives ``(gen, target, stopped)``; ``write(gen, target, stopped)`` puts them back."""

    def carried():
        gen, target, stopped = read()
        return {"gen": None if gen is None else gen.state_dict(), "target": target, "stopped": stopped, "info": info}

    def restore(st):
        gen = None
        if st["gen"] is not None:
            gen = Generator(1, cfg.noise_dim, out, cfg.hidden_size).to(dev)  # the selected one (K = 1)
            gen.load_state_dict(st["gen"])
        write(gen, st["target"], st["stopped"])
        info.clear()
        info.update(st["info"])

    loop.track(optimizer=opt, recovered=(carried, restore))


def _baerase(net: nn.Module, data, cfg: BAERASEConfig, loop) -> dict:
    if cfg.target is not None and cfg.target >= data.num_classes:
        raise ValueError(f"target={cfg.target} is outside [0, {data.num_classes}) (the model has "
                         f"{data.num_classes} classes)")
    k = cfg.patch_size
    if k > min(data.x.shape[2], data.x.shape[3]):
        raise ValueError(f"patch_size={k} does not fit images of size {tuple(data.x.shape[2:])}")
    classes = list(range(data.num_classes)) if cfg.target is None else [cfg.target]
    flags = [(p, p.requires_grad) for p in net.parameters()]
    # As published, every weight of f requires grad in both stages and is unlearned, except the parameters the
    # user froze (requires_grad=False): a defense never changes those (fastpurify's policy).
    params = [p for p in net.parameters() if p.requires_grad]
    theta0 = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    info: dict = {}
    stopped = False
    gen: Optional[Generator] = None
    target = classes[0]
    out = data.x.shape[1] * k * k

    def _write(g, t, st):
        nonlocal gen, target, stopped
        gen, target, stopped = g, t, st

    track_carried(loop, opt, cfg, out, data.x.device, info, lambda: (gen, target, stopped), _write)
    try:
        for r in loop.rounds():
            if stopped:
                break
            if r == 0:
                with loop.phase("recover", once=True):  # one-off: the budget's planner leaves it out
                    gen, logs = _recover(net, data, classes, cfg, loop)
                    scores = _flip_rates(net, gen, data, classes, cfg, loop)
                    best = int(torch.argmax(scores))  # the first maximum: the lowest class on ties
                    target = classes[best]
                    gen = gen.select(best) if len(classes) > 1 else gen
                info.update(target=target, class_scores={c: float(s) for c, s in zip(classes, scores)},
                            recovery=logs)
                if cfg.target is None:
                    info["detected_target"] = target
            total, clean_sum, poison_sum, batches = 0.0, 0.0, 0.0, 0
            with loop.phase("unlearn"):
                net.train()
                gen.train()  # as published: patches from G in train mode, with a graph into G
                for idx in loop.batches(len(data), cfg.batch_size, shuffle=True):
                    if len(idx) < 2:
                        continue
                    x, y = data.x[idx], data.y[idx]
                    patch = gen(torch.rand(1, len(idx), cfg.noise_dim, generator=loop.generator).to(x.device))
                    clean_loss = F.cross_entropy(net(x), y)
                    row, col = location(x.shape[2], x.shape[3], k, cfg.position, loop.generator)
                    x_p = stamp(x, patch, row, col)
                    poison_loss = -F.cross_entropy(net(x_p), torch.full_like(y, target))
                    anchor = sum((p - p0).abs().sum() for p, p0 in zip(params, theta0))  # frozen ones add 0
                    loss = cfg.clean_weight * clean_loss + poison_loss + cfg.l1_weight * anchor
                    loop.check_finite(loss, "unlearning loss")
                    loop.step(opt, loss)
                    total, clean_sum = total + loss.detach(), clean_sum + clean_loss.detach()
                    poison_sum, batches = poison_sum - poison_loss.detach(), batches + 1
            with loop.phase("stop_check"):
                rate = float(_flip_rates(net, gen, data, [target], cfg, loop)[0])
            n = max(1, batches)
            loop.log(loss=total / n, clean_ce=clean_sum / n, patch_ce=poison_sum / n, patch_flip_rate=rate)
            if cfg.stop_rate is not None and rate < cfg.stop_rate:
                stopped = True
                info["stopped_early"] = r + 1
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
    info.setdefault("stopped_early", None)
    net.eval()
    return info


def baerase(model: nn.Module, clean_data, **kwargs) -> PurifyResult:
    """Purify ``model`` with BAERASE: recover the trigger distribution with an entropy-maximising patch generator,
    then unlearn it by gradient ascent on generated-patch images while fitting the clean data.

    ``clean_data``: labelled clean images — an ``(x, y)`` pair (x N×C×H×W in [0, 1], y N int), a Dataset or a
    DataLoader. ``target``: the attack's target label, or None (default) to detect it by running the recovery
    for every class at once. Hyper-parameters: the fields of :class:`BAERASEConfig` (published defaults: 10
    recovery epochs, 3×3 patches, width 2048, β = 0.5, α = 0.1, Adam 2e-4; 10 unlearning epochs, SGD 1e-4
    momentum 0.9, α_u = 100, L1 anchor 1e-6); common options as in every defense (``normalization``,
    ``epochs``, ``device``, ``seed``, ``time_budget``, ``eval_data``, ``eval_every``, ``progress``, ``inplace``,
    ``check_range``). See the module docstring for the choices made where the published code is broken.

    Returns a :class:`PurifyResult`; ``info["target"]`` is the target used, ``info["class_scores"]`` the flip
    rate of each candidate class's generated patches, ``info["detected_target"]`` (detection only),
    ``info["recovery"]`` per-epoch generator logs, ``info["stopped_early"]`` the round unlearning stopped at.

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> from fastpurify.data import synthetic_dataset
        >>> x, y = synthetic_dataset(n=64)
        >>> r = baerase(SmallVGG(), (x, y), target=0, epochs=1, recovery_epochs=1, hidden_size=32,
        ...             batch_size=32, progress=False)
        >>> r.status, r.info["target"]
        ('completed', 0)
    """
    return run_defense("baerase", _baerase, BAERASEConfig, model, clean_data, **kwargs)
