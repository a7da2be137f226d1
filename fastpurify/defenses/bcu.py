"""BCU — Backdoor Cleansing with Unlabeled data, the fast path (the algorithm of
:mod:`fastpurify.reference.defenses.bcu`, with the published code's waste removed).

What changes against the reference, and why it is the same method:

- the teacher (the backdoored model, copied before the re-initialisation as in the reference) runs in eval mode
  under ``torch.inference_mode()`` with ``requires_grad_(False)``: no graph, no version counters; its
  log-probabilities ``log_softmax(z_T/T_e)`` are computed there too;
- the reference's unused work is gone: the teacher's softmax, confidence mask and the pseudo-label cross-entropy
  on the student's logits (computed every batch, multiplied into nothing), and the per-batch ``loss.item()``;
- the loss is one fused expression, ``F.kl_div(log_softmax(z_S/T_e), log_softmax(z_T/T_e), log_target=True,
  reduction="batchmean")`` = ``Σ p_T (log p_T − log p_S) / B``: one ``log_softmax`` per model (the reference
  takes ``softmax`` of the teacher and lets ``kl_div`` take its log again). The same quantity; it differs from
  the reference's by float rounding only (and is exact where ``p_T`` underflows, where ``log(softmax)`` is not);
- SGD runs with ``foreach=True`` on CPU (bit-identical to the reference's per-tensor loop) and ``fused=True`` on
  CUDA; the per-round loss is summed on the device and read once per round; the finite-loss guard records the
  first bad step on the device (checked at the round's end);
- the cosine learning rate and the temperature are computed each round from ``loop.total_rounds`` (equal to
  ``epochs`` without a time budget): ``lr_e = lr·(1 + cos(π·e/T_max))/2`` — the values of the reference's
  ``CosineAnnealingLR(T_max=cosine_t_max)`` stepped per epoch — and ``T_e = T_0 + ΔT·(e+1)/E``. When
  ``time_budget`` makes the loop compress its schedule to fewer rounds E', both follow: the temperature
  reaches ``T_0 + ΔT`` in the last planned round and ``T_max`` is scaled by ``E'/epochs``;
- the augmentation is the reference's :func:`fastpurify.train.augment_batch` (already one batched gather on the
  device, no per-sample loop, no host sync) drawn from the same generator, so the crops and flips are the same;
- ``precision="bf16"`` runs the teacher's and the student's forwards under bf16 autocast (logits cast back to
  fp32 for the loss; weights, gradients and SGD stay fp32), ``channels_last=True`` converts both models and the
  inputs (both off by default: measure first).

Everything else — the defaults, the layer groups and the re-initialisation (imported from the reference: drawn
from the run's generator, never the process-global RNG, and skipping frozen parameters), the random streams
(re-initialisation, batch order, augmentation seed, dropout) — is the reference's, so in fp32
on CPU the fast path follows the reference to float rounding, which training amplifies (tiny net, 4 rounds:
loss 3e-8 relative in round 1, 2.4e-5 in round 4, weights within 2.4e-5; the same ACC/ASR: see
tests/test_fast_bcu.py). Two differences in what is returned: the history's ``lr`` is the learning rate used
during the round (the reference logs the next round's, read after its scheduler step), and the returned model
carries no ``.grad`` (the reference leaves the last step's).

Speed on CPU (1 thread on a loaded 2-core AMD EPYC with avx512_bf16; SmallVGG, 512 synthetic images, batch 256,
2 epochs; min of 5 interleaved runs, indicative only): reference 6.35 s, fast fp32 4.68 s, fast bf16 +
channels_last 1.92 s. In fp32 the work is the reference's minus the unused pseudo-label terms, so most of that
fp32 gap is the machine's noise (medians 7.27 vs 6.46 s): a step is one teacher forward (~0.4 s) and one
student forward + backward (~1.1 s) in both. bf16 autocast + channels_last is the real gain on a CPU with bf16
support (oneDNN bf16 convolutions), and it keeps the purification (tests/test_fast_bcu.py). On the two real
SmallVGG checkpoints (5 epochs, 2,500 unlabelled images, 2 CPU threads, end_to_end.md): bf16 alone 1.57× / 1.68× the
reference (fp32 1.21× on badnets), ACC/ASR 81.34 / 97.12 % vs the reference's 81.36 / 97.11 % (badnets) and
80.04 / 24.56 % vs 80.01 / 32.21 % (trojan_wm: the bf16 run unlearned the trigger faster in those 5 epochs).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import launch_bound
from ..reference.defenses.bcu import BCUConfig, layer_groups, reinitialize
from ..train import augment_batch
from ._loop import PRECISIONS, PurifyResult, check_choice, precision_autocast, run_defense


@dataclass
class FastBCUConfig(BCUConfig):
    """The reference's hyper-parameters plus the fast path's execution options."""

    precision: str = "fp32"  # "bf16": the teacher's and the student's forwards under bf16 autocast
    channels_last: bool = False  # run both models on channels_last tensors

    def validate(self) -> None:
        super().validate()
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be True or False, got {self.channels_last!r}")


def cosine_lr(base: float, epoch: int, t_max: float) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under ``CosineAnnealingLR(T_max=t_max, eta_min=0)`` stepped
    once per epoch, in closed form (so that ``t_max`` may be rescaled between epochs).

    Example::

        >>> cosine_lr(0.01, 0, 100), round(cosine_lr(0.01, 50, 100), 6), round(cosine_lr(0.01, 100, 100), 12)
        (0.01, 0.005, 0.0)
    """
    return base * (1.0 + math.cos(math.pi * epoch / t_max)) / 2.0


def kd_loss(z_s: torch.Tensor, log_p_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(p_T ‖ softmax(z_S/T))`` averaged over the batch (no T² factor), from the teacher's log-probabilities.

    Shapes: ``z_s`` (B, K) student logits, ``log_p_t`` (B, K) ``log_softmax(z_T/T)`` -> 0-d loss (fp32).

    Example::

        >>> z = torch.randn(4, 10)
        >>> float(kd_loss(z, F.log_softmax(z / 2, dim=1), 2.0)) < 1e-6
        True
    """
    return F.kl_div(F.log_softmax(z_s.float() / temperature, dim=1), log_p_t, reduction="batchmean", log_target=True)


def _bcu(net: nn.Module, data, cfg: FastBCUConfig, loop) -> Dict[str, Any]:
    # The teacher is the backdoored model as given: copied before the re-initialisation, frozen, eval mode.
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    with loop.phase("reinit"), loop.writing("re-initialisation"):
        groups = layer_groups(net, data.x[loop.probe(2)], cfg.stage_map)
        counts = reinitialize(net, groups, cfg.reinit_rates, loop.generator)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    dev = data.x.device
    # Only the trainable parameters: a parameter the user froze is never changed (nor re-initialised above).
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          **({"fused": True} if launch_bound(dev) else {"foreach": True}))
    # The reference's augmentation stream: seeded from the loop's generator right after the re-initialisation.
    aug_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**62, (1,), generator=loop.generator)))
    # carried from round to round besides the model (the teacher is the model as given, rebuilt by the setup)
    loop.track(optimizer=opt, augmentation=aug_gen)

    for e in loop.rounds():
        rounds = loop.total_rounds  # cfg.epochs, or fewer when a time budget compressed the schedule
        temp = cfg.temperature_start + cfg.temperature_rise * (e + 1) / rounds
        lr = cosine_lr(cfg.lr, e, cfg.cosine_t_max * rounds / cfg.epochs)
        for g in opt.param_groups:
            g["lr"] = lr
        total = torch.zeros((), device=dev)
        batches = 0
        net.train()
        with loop.phase("distill"):
            for idx in loop.batches(len(data), cfg.batch_size, shuffle=True):
                x = data.x[idx]
                if cfg.augment:
                    x = augment_batch(x, aug_gen, rows=loop.batch_rows, total=loop.batch_n)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), precision_autocast(cfg.precision, dev):
                    log_p_t = F.log_softmax(teacher(x).float() / temp, dim=1)
                with precision_autocast(cfg.precision, dev):
                    z_s = net(x)
                loss = kd_loss(z_s, log_p_t, temp)
                loop.check_finite(loss)
                loop.step(opt, loss)
                total += loss.detach()
                batches += 1
        loop.log(loss=total / max(1, batches), temperature=temp, lr=lr)
    opt.zero_grad(set_to_none=True)  # the returned model carries no gradient of the last step
    if cfg.channels_last:
        net.to(memory_format=torch.contiguous_format)
    net.eval()
    return {"layer_groups": groups, "reinit_counts": {g: c for g, c in counts.items() if c["total"]}}


def bcu(model: nn.Module, clean_data, **kwargs) -> PurifyResult:
    """Purify ``model`` with BCU, using unlabeled clean images (labels, if given, are ignored) — the fast path.

    Same arguments, defaults and result as :func:`fastpurify.reference.defenses.bcu.bcu` (the fields of
    :class:`~fastpurify.reference.defenses.bcu.BCUConfig` and the common options): ``clean_data`` images
    N×C×H×W in [0, 1] (a tensor, an ``(x, y)`` pair, a Dataset or a DataLoader), plus ``precision``
    (``"fp32"`` | ``"bf16"``) and ``channels_last``. ``result.info["layer_groups"]`` maps each layer to its group,
    ``result.info["reinit_counts"]`` gives the replaced and total elements per group. See the module docstring
    for what is faster and why it is the same method.

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> from fastpurify.data import synthetic_dataset
        >>> x, _ = synthetic_dataset(n=64)
        >>> r = bcu(SmallVGG(), x, epochs=1, batch_size=32, progress=False)
        >>> r.status, r.info["layer_groups"]["classifier"]
        ('completed', 'classifier')
    """
    return run_defense("bcu", _bcu, FastBCUConfig, model, clean_data, labels=False, sync_checks=False,
                       fast_path=True, **kwargs)
