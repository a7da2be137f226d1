"""BCU — Backdoor Cleansing with Unlabeled data (Pang et al., CVPR 2023): the faithful eager reference.

Teacher = the backdoored model (frozen, eval mode). Student = a copy whose convolution and linear weights
are partially re-initialised, layer group by layer group, then trained by distillation on the defender's
images — no labels are used.

1. Re-initialisation: each element of every weight/bias tensor of a Conv/Linear layer is replaced by a
   freshly initialised value (Kaiming normal, fan_out, for conv weights; PyTorch's default for biases and
   Linear layers) with the probability of its layer group: stem 0.01, stage1 0.01, stage2 0.03,
   stage3 0.09, stage4 0.27, classifier 0.10. Normalisation layers (BatchNorm etc.) keep the teacher's
   parameters and buffers.
2. Distillation: ``epochs`` (100) epochs, SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine schedule
   stepped per epoch, batch 256, random crop (pad 4) + horizontal flip; temperature ``T_e = 1 + 3(e+1)/E``;
   ``L = KL(softmax(z_T/T_e) ‖ softmax(z_S/T_e))`` (batchmean, no T² factor); student in train mode.

What this port chose, and why:

- **Layer groups from the module structure, not names.** The authors group parameters by name prefix
  (``layer1..4``, ``fc``), which silently puts PreActResNet18's ``linear`` and every layer of a
  torchvision VGG in the stem group. Here the groups come from one traced forward pass: the first conv is the
  stem; the Linear layers after the last conv are the classifier; the other layers are grouped by the spatial
  resolution of their output, and the resolution groups are numbered so that the deepest is stage 4 (a
  network with more than four resolutions puts the shallow extra ones in stage 1; one with fewer, e.g.
  SmallVGG's three, uses stages 2–4). ``stage_map={"module.name.prefix": "stage3", ...}`` overrides any
  layer. ``result.info["layer_groups"]`` says which group each layer got.
- **Transformers** (fastpurify's extension; the paper groups CNNs only): when Linear / ``nn.MultiheadAttention``
  layers with token outputs (N×L×D, one "resolution" throughout) follow the last conv, the layers before the first
  token layer (a ViT's patch embedding) are the stem; the token layers are split by *block* — the container whose
  direct children hold the most token layers (``encoder.layers`` in torchvision's ViT, ``blocks`` in timm's), ties
  to the outermost — block i of n going to ``stage{1 + ⌊4i/n⌋}`` (n < 4 blocks use the deepest n stages, as a CNN
  with fewer resolutions does); token layers outside every block join the stage of the block before them
  (stage 1 before the first); the layers after the last token layer (the head on the pooled token) are the
  classifier. An attention layer's ``out_proj`` (an nn.Linear that ``F.multi_head_attention_forward`` reads
  without calling) joins its attention layer's group. The re-initialisation of ``nn.MultiheadAttention`` draws its
  own initialisation: Xavier uniform for ``in_proj_weight`` (or q/k/v), 0 for ``in_proj_bias``; ``bias_k`` /
  ``bias_v``, LayerNorms, position embeddings and class tokens are kept, as the norms are. CNNs are grouped as
  before (no token layers after their last conv).
- **Normalisation layers by type**: the authors skip keys containing ``bn`` or ``shortcut.1``; any
  ``_NormBase``/GroupNorm/LayerNorm is skipped here.
- **Frozen parameters are kept**: a parameter with ``requires_grad=False`` is neither re-initialised nor trained
  (fastpurify's policy: a defense never changes what the user froze); the authors re-initialise and train all.
- **Every random number from the run's generator** (``loop.generator``): the fresh values too, which the authors
  draw from the global RNG (``reset_parameters``). The global RNG is one per process, so two runs in two threads
  drew each other's numbers and differed from the same runs made one after the other.
- **No model selection on the test set**: the published script reports the epoch with the best *test*
  accuracy. A defender has no test set: the last model is returned.
- **Kept as published** (the baseline's waste): the teacher's softmax / confidence mask / pseudo-label CE
  computed every batch although the loss does not use them; a ``loss.item()`` host sync per batch; the
  cosine schedule's ``T_max`` fixed at 100 epochs whatever ``epochs`` is (``cosine_t_max``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...defenses._loop import PurifyResult, check_positive, run_defense
from ...train import augment_batch

GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "classifier")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _default_rates() -> Dict[str, float]:
    return {"stem": 0.01, "stage1": 0.01, "stage2": 0.03, "stage3": 0.09, "stage4": 0.27, "classifier": 0.10}


@dataclass
class BCUConfig:
    """BCU hyper-parameters (published defaults)."""

    epochs: int = 100  # distillation epochs E
    batch_size: int = 256  # images per distillation step
    lr: float = 0.01  # SGD
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    cosine_t_max: int = 100  # the published CosineAnnealingLR(T_max=100), stepped per epoch
    reinit_rates: Dict[str, float] = field(default_factory=_default_rates)  # p per layer group
    stage_map: Optional[Dict[str, str]] = None  # module-name prefix -> group, overriding the derived groups
    temperature_start: float = 1.0  # T_e = temperature_start + temperature_rise * (e + 1) / E
    temperature_rise: float = 3.0  # how much the distillation temperature grows over the E epochs
    augment: bool = True  # random crop (pad 4) + horizontal flip
    tau: float = 0.99  # the published (unused by the loss) confidence threshold of the pseudo-label term

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "cosine_t_max"):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("lr", self.lr)
        for name in ("momentum", "weight_decay", "temperature_rise"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_positive("temperature_start", self.temperature_start)
        if not isinstance(self.reinit_rates, dict):
            raise ValueError(f"reinit_rates must be a dict group -> probability, got {self.reinit_rates!r}")
        unknown = sorted(set(self.reinit_rates) - set(GROUPS))
        if unknown:
            raise ValueError(f"reinit_rates has unknown group(s) {unknown}; valid groups: {', '.join(GROUPS)}")
        for g, p in self.reinit_rates.items():
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"reinit_rates[{g!r}] must be a probability in [0, 1], got {p!r}")
        if self.stage_map is not None:
            bad = {k: v for k, v in self.stage_map.items() if v not in GROUPS}
            if bad:
                raise ValueError(f"stage_map assigns unknown group(s) {bad}; valid groups: {', '.join(GROUPS)}")


# --------------------------------------------------------------------------------------------------------
# Layer groups from the module structure
# --------------------------------------------------------------------------------------------------------


_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)
_ATTN_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _trace(model: nn.Module, example: torch.Tensor) -> Tuple[List[str], Dict[str, Optional[int]], Set[str]]:
    """One eval-mode forward of ``example[:2]``: the Conv/Linear/attention layers in the order they first ran,
    the spatial size of each one's output (None below 4-D) and the names of the token layers (3-D outputs)."""
    order: List[str] = []
    res: Dict[str, Optional[int]] = {}
    tokens: Set[str] = set()
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS):
            def hook(mod, inp, out, name=name):
                out = out[0] if isinstance(out, tuple) else out  # attention returns (output, weights)
                if name not in res:
                    order.append(name)
                    res[name] = int(out.shape[-1] * out.shape[-2]) if out.dim() >= 4 else None
                    if out.dim() == 3:
                        tokens.add(name)
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:2])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order, res, tokens


def _cnn_groups(order: List[str], res: Dict[str, Optional[int]], convs: List[str]) -> Dict[str, str]:
    last_conv = order.index(convs[-1])
    tail = [n for n in order[last_conv + 1:] if res[n] is None]
    resolutions = sorted({res[n] for n in convs[1:]}, reverse=True)
    k = len(resolutions)
    stage_of = {r: f"stage{max(1, 4 - (k - 1 - i))}" for i, r in enumerate(resolutions)}
    groups: Dict[str, str] = {}
    current = "stem"
    for n in order:
        if n == convs[0]:
            current = "stem"
        elif n in tail:
            current = "classifier"
        elif res[n] is not None:
            current = stage_of[res[n]]
        groups[n] = current  # a Linear inside the body (e.g. squeeze-excitation) joins its stage
    return groups


def _block_of(model: nn.Module, body: List[str]) -> Dict[str, int]:
    """Token layer -> index of its block: the direct children of the container that holds the most token layers
    in distinct children (ties: the outermost), numbered in forward order. Layers outside it are left out."""
    best, best_count = None, 1
    for cname, _ in model.named_modules():
        prefix = f"{cname}." if cname else ""
        children = {n[len(prefix):].split(".")[0] for n in body if n.startswith(prefix) and n != cname}
        if len(children) > best_count:
            best, best_count = prefix, len(children)
    if best is None:
        return {}
    firsts: List[str] = []
    out: Dict[str, int] = {}
    for n in body:
        if n.startswith(best):
            child = n[len(best):].split(".")[0]
            if child not in firsts:
                firsts.append(child)
            out[n] = firsts.index(child)
    return out


def _transformer_groups(model: nn.Module, order: List[str], tokens: Set[str]) -> Dict[str, str]:
    first = order.index(next(n for n in order if n in tokens))
    last = max(i for i, n in enumerate(order) if n in tokens)
    body = [n for n in order[first:last + 1]]
    block = _block_of(model, [n for n in body if n in tokens])
    nblocks = max(block.values()) + 1 if block else 1

    def stage(i: int) -> str:
        return f"stage{1 + (4 * i) // nblocks if nblocks >= 4 else 4 - (nblocks - 1) + i}"

    groups = {n: "stem" for n in order[:first]}
    current = stage(0)
    for n in body:
        if n in block:
            current = stage(block[n])
        groups[n] = current
    groups.update({n: "classifier" for n in order[last + 1:]})
    return groups


def layer_groups(model: nn.Module, example: torch.Tensor, stage_map: Optional[Dict[str, str]] = None
                 ) -> Dict[str, str]:
    """Group every Conv/Linear/MultiheadAttention layer of ``model`` into stem / stage1..4 / classifier (see the
    module docstring: CNNs by the spatial size of each layer's output, transformers by block).

    Shapes: ``example`` 1..N×C×H×W (one forward pass in eval mode is traced). Returns module name -> group,
    in forward order.

    Example::

        >>> from fastpurify.models import PreActResNet18
        >>> g = layer_groups(PreActResNet18(), torch.rand(2, 3, 32, 32))
        >>> g["conv1"], g["layer1.0.conv1"], g["layer4.1.conv2"], g["linear"]
        ('stem', 'stage1', 'stage4', 'classifier')
    """
    order, res, tokens = _trace(model, example)
    convs = [n for n in order if res[n] is not None]
    last_conv = order.index(convs[-1]) if convs else -1
    if any(n in tokens for n in order[last_conv + 1:]):
        groups = _transformer_groups(model, order, tokens)
    elif convs:
        groups = _cnn_groups(order, res, convs)
    else:  # an MLP: everything but the last layer is the body
        groups = {n: "stage4" for n in order}
        if order:
            groups[order[-1]] = "classifier"
    for n, m in model.named_modules():  # layers the forward pass never reached keep a group too
        if isinstance(m, _LAYERS) and n not in groups:
            owner = n.rpartition(".")[0]  # an attention layer's out_proj (read, never called) joins its group
            if isinstance(m, nn.Linear) and isinstance(model.get_submodule(owner), nn.MultiheadAttention) \
                    and owner in groups:
                groups[n] = groups[owner]
            else:
                groups[n] = "classifier" if isinstance(m, nn.Linear) else "stage4"
    if stage_map:
        for n in groups:
            for prefix, g in stage_map.items():
                if n == prefix or n.startswith(prefix + "."):
                    groups[n] = g
    return groups


def _fresh(module: nn.Module, name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A freshly initialised value (on the CPU) for the parameter ``name`` of a Conv/Linear layer: Kaiming normal
    (fan_out, ReLU) for conv weights, PyTorch's default initialisation (``reset_parameters``: Kaiming uniform with
    a = √5 for weights, U(±1/√fan_in) for biases) otherwise; for ``nn.MultiheadAttention`` its own: Xavier
    uniform for the q/k/v projection weights, 0 for ``in_proj_bias``.

    Drawn from ``generator`` (the run's), never from the global RNG: the global RNG is one per process, so two
    runs in two threads drew each other's numbers through it and their results differed (issue 13)."""
    out = torch.empty(param.shape, dtype=torch.float32, device="cpu")
    if isinstance(module, nn.MultiheadAttention):  # its own _reset_parameters
        if name in _ATTN_WEIGHTS:
            return nn.init.xavier_uniform_(out, generator=generator)
        return out.zero_()
    if name == "weight":
        if isinstance(module, nn.modules.conv._ConvNd):
            return nn.init.kaiming_normal_(out, mode="fan_out", nonlinearity="relu", generator=generator)
        return nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return nn.init.uniform_(out, -bound, bound, generator=generator)


def reinitialize(model: nn.Module, groups: Dict[str, str], rates: Dict[str, float], generator: torch.Generator
                 ) -> Dict[str, Dict[str, int]]:
    """Replace each weight/bias element of the grouped layers by a fresh value with its group's probability,
    in place, drawing every random number from ``generator``. Returns per-group counts of replaced and total
    elements.

    Frozen parameters (``requires_grad=False``) are left as they are and not counted: a defense never changes
    a parameter the user froze. Other parameters a layer may hold besides ``weight`` and ``bias`` are kept.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
        >>> net[0].requires_grad_(False)  # doctest: +ELLIPSIS
        Conv2d(...)
        >>> c = reinitialize(net, {"0": "stem", "2": "classifier"}, {"classifier": 1.0}, torch.Generator())
        >>> c["stem"], c["classifier"]["replaced"] == c["classifier"]["total"]
        ({'replaced': 0, 'total': 0}, True)
    """
    modules = dict(model.named_modules())
    counts: Dict[str, Dict[str, int]] = {g: {"replaced": 0, "total": 0} for g in GROUPS}
    full = dict(_default_rates(), **rates)
    with torch.no_grad():
        for name, group in groups.items():
            m = modules[name]
            if isinstance(m, _NORMS):
                continue
            p = full[group]
            for pname, param in m.named_parameters(recurse=False):
                if pname not in ("weight", "bias", "in_proj_bias") + _ATTN_WEIGHTS or not param.requires_grad:
                    continue
                new = _fresh(m, pname, param, generator).to(param.device, param.dtype)
                keep = torch.bernoulli(torch.full(param.shape, 1.0 - p), generator=generator).to(param.device)
                param.copy_(param * keep + new * (1 - keep))  # 1 keeps the teacher's value, 0 takes the fresh one
                counts[group]["replaced"] += int((keep == 0).sum())
                counts[group]["total"] += keep.numel()
    return counts


# --------------------------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------------------------


def _bcu(net: nn.Module, data, cfg: BCUConfig, loop) -> dict:
    teacher = copy.deepcopy(net).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    with loop.phase("reinit"):
        with loop.writing("re-initialisation"):
            groups = layer_groups(net, data.x[loop.probe(2)], cfg.stage_map)
            counts = reinitialize(net, groups, cfg.reinit_rates, loop.generator)
    # Only the trainable parameters: a parameter the user froze is never changed (nor re-initialised above).
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.cosine_t_max)
    aug_gen = torch.Generator(device=data.x.device).manual_seed(int(torch.randint(0, 2**62, (1,),
                                                                                generator=loop.generator)))
    # carried from round to round besides the model (the teacher is the model as given, rebuilt by the setup)
    loop.track(optimizer=opt, scheduler=sched, augmentation=aug_gen)
    for e in loop.rounds():
        # loop.total_rounds is cfg.epochs unless a time budget compressed the schedule (then the temperature
        # ramp and the cosine run over the rounds that fit)
        temp = cfg.temperature_start + cfg.temperature_rise * (e + 1) / loop.total_rounds
        if loop.total_rounds != cfg.epochs:
            t_max = cfg.cosine_t_max * loop.total_rounds / cfg.epochs
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (1 + math.cos(math.pi * e / t_max)) / 2
        total, batches = 0.0, 0
        with loop.phase("distill"):
            for idx in loop.batches(len(data), cfg.batch_size, shuffle=True):
                x = data.x[idx]
                if cfg.augment:
                    x = augment_batch(x, aug_gen)
                net.train()
                with torch.no_grad():
                    teacher.eval()
                    z_t = teacher(x).detach()
                    # As published: pseudo-labels and a confidence mask the loss never uses.
                    max_p, p_hat = torch.max(torch.softmax(z_t, dim=1), dim=1)
                    mask = max_p.ge(cfg.tau).float()
                z_s = net(x)
                _unused = (F.cross_entropy(z_s, p_hat, reduction="none") * mask).mean()
                loss = F.kl_div(F.log_softmax(z_s / temp, dim=1), F.softmax(z_t / temp, dim=1), reduction="batchmean")
                loop.check_finite(loss)
                loop.step(opt, loss)
                total += loss.item()  # as published: one host sync per batch
                batches += 1
        sched.step()
        loop.log(loss=total / max(1, batches), temperature=temp, lr=opt.param_groups[0]["lr"])
    net.eval()
    return {"layer_groups": groups, "reinit_counts": {g: c for g, c in counts.items() if c["total"]}}


def bcu(model: nn.Module, clean_data, **kwargs) -> PurifyResult:
    """Purify ``model`` with BCU, using unlabeled clean images (labels, if given, are ignored).

    ``clean_data``: images N×C×H×W in [0, 1] (a tensor, an ``(x, y)`` pair, a Dataset or a DataLoader).
    Hyper-parameters: the fields of :class:`BCUConfig`; common options as in every defense
    (``normalization``, ``epochs``, ``device``, ``seed``, ``time_budget``, ``eval_data``, ``eval_every``,
    ``progress``, ``inplace``, ``check_range``). ``result.info["layer_groups"]`` maps each layer to its group.

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> from fastpurify.data import synthetic_dataset
        >>> x, _ = synthetic_dataset(n=64)
        >>> r = bcu(SmallVGG(), x, epochs=1, batch_size=32, progress=False)
        >>> r.status, r.info["layer_groups"]["classifier"]
        ('completed', 'classifier')
    """
    return run_defense("bcu", _bcu, BCUConfig, model, clean_data, labels=False, **kwargs)

