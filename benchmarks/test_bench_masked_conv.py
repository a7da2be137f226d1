"""Mask-weighted convolution (kernel family 2): the eager formulation against MaskedModel's paths on the same inputs.

Cases:
- masked forward + backward (gradients to the masks only, weights frozen, as in AWM) of PreActResNet18 on a
  (64, 3, 32, 32) batch. Providers: ``eager`` = AWM's published formulation (each conv weight parametrised as
  ``weight * mask``, one eager multiply per layer per forward, plain autograd); ``torch`` / ``cpp`` / ``cuda`` /
  ``triton`` = :class:`fastpurify.masked.MaskedModel` on that backend (``path="layer"``); ``cpp-multi`` /
  ``cuda-multi`` = the multi-tensor path (one W_eff launch, the vendor convolution, one mask-gradient launch);
  ``unmasked`` = the plain model's forward + backward with weight gradients (the target's yardstick).
- AWM's mask optimiser step over every PreActResNet18 conv mask (11 M elements): ``torch.optim.Adam`` + clamp
  (``eager``) against :func:`fastpurify.ops.masked_adam_clamp_`.
``compile-<mode>`` (benchmarks/_compiled.py): ``torch.compile`` of the ``eager`` formulation — the parametrised
model's loss for the forward + backward (its backward is AOTAutograd's; checked on the loss, rtol 1e-4: the compiled
convolutions reduce in another order), and ``masked_adam_clamp_ref`` for the mask step (at a fixed Adam step 1: an
int argument that changes every call makes dynamo recompile; the work per call is the same).
CPU smoke run (``--benchmark-disable``): batch 2, same code paths.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

from fastpurify.masked import MaskedModel
from fastpurify.models import PreActResNet18
from fastpurify.ops import masked_adam_clamp_
from fastpurify.reference.masked_conv import masked_adam_clamp_ref

from ._compiled import check_compiled, compile_params, compiled_or_skip
from .conftest import HAS_CUDA, sync

CPU_PROVIDERS = ["unmasked", "eager", "torch", "cpp", "cpp-multi"]
GPU_PROVIDERS = ["unmasked", "eager", "torch", "cuda", "cuda-multi", "triton"]
CASES = [pytest.param(p, "cpu", id=f"cpu-{p}") for p in CPU_PROVIDERS] + [
    pytest.param(p, "cuda", id=f"cuda-{p}", marks=pytest.mark.gpu) for p in GPU_PROVIDERS
] + compile_params("cpu", model=True) + compile_params("cuda", model=True)


class _Mul(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.mask = nn.Parameter(torch.ones_like(weight))

    def forward(self, w):
        return w * self.mask


def _model(provider, device):
    torch.manual_seed(0)
    net = PreActResNet18().to(device).eval()
    if provider == "unmasked":
        return net, list(net.parameters())
    if provider == "eager" or provider.startswith("compile-"):
        net = copy.deepcopy(net)
        masks = []
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.requires_grad_(False)
                parametrize.register_parametrization(m, "weight", _Mul(m.weight))
                masks.append(m.parametrizations.weight[0].mask)
        return net, masks
    backend, _, multi = provider.partition("-")
    mm = MaskedModel(net, backend=backend, path="multi" if multi else "layer")
    return mm, list(mm.masks().values())


@pytest.mark.parametrize("provider,device", CASES)
def test_masked_forward_backward(benchmark, env_info, provider, device):
    batch = 2 if benchmark.disabled else 64
    model, params = _model(provider, device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    compiled = None
    if provider.startswith("compile-"):
        compiled = compiled_or_skip(benchmark, lambda xx, yy: F.cross_entropy(model(xx), yy), provider, (x, y),
                                    rtol=1e-4, atol=1e-5, sync=lambda: sync(device))

    def run():
        for p in params:
            p.grad = None
        (compiled() if compiled is not None else F.cross_entropy(model(x), y)).backward()
        sync(device)

    run()  # warm-up: lazy module loading, Triton compilation, oneDNN/cuDNN plans
    benchmark.group = f"masked fwd+bwd preact_resnet18 {batch}x3x32x32 fp32 {device}"
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"op": "masked_conv2d", "provider": provider, "shape": [batch, 3, 32, 32],
                                 "dtype": "float32", "model": "preact_resnet18"})
    benchmark.pedantic(run, rounds=10 if HAS_CUDA else 5, iterations=1, warmup_rounds=1)
    check_compiled(benchmark)
    assert all(p.grad is not None for p in params)


ADAM_CASES = [pytest.param(p, "cpu", id=f"cpu-{p}") for p in ("eager", "torch", "cpp")] + [
    pytest.param(p, "cuda", id=f"cuda-{p}", marks=pytest.mark.gpu) for p in ("eager", "cuda", "triton")
] + compile_params("cpu") + compile_params("cuda")


@pytest.mark.parametrize("provider,device", ADAM_CASES)
def test_masked_adam_clamp(benchmark, env_info, provider, device):
    shapes = [m.weight.shape for m in PreActResNet18().modules() if isinstance(m, nn.Conv2d)]
    if benchmark.disabled:
        shapes = shapes[:3]
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(s, generator=g).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device) * 1e-3 for s in shapes]
    state = {"step": 0}
    if provider == "eager":
        params = [nn.Parameter(m) for m in masks]
        opt = torch.optim.Adam(params, lr=1e-2, eps=1e-8)

        def run():
            for p, gr in zip(params, grads):
                p.grad = gr + 1e-8 * torch.sign(p.detach())
            opt.step()
            with torch.no_grad():
                for p in params:
                    p.clamp_(0, 1)
            sync(device)
    elif provider.startswith("compile-"):
        ea, es = [torch.zeros_like(m) for m in masks], [torch.zeros_like(m) for m in masks]

        def step(ms, gs, a, s):
            masked_adam_clamp_ref(ms, gs, a, s, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, l1=1e-8, step=1)

        compiled = compiled_or_skip(benchmark, step, provider, (masks, grads, ea, es), sync=lambda: sync(device))

        def run():
            compiled()
            sync(device)
    else:
        ea = [torch.zeros_like(m) for m in masks]
        es = [torch.zeros_like(m) for m in masks]

        def run():
            state["step"] += 1
            masked_adam_clamp_(masks, grads, ea, es, lr=1e-2, eps=1e-8, l1=1e-8, step=state["step"],
                               backend=provider)
            sync(device)

    run()
    n = sum(m.numel() for m in masks)
    benchmark.group = f"masked_adam_clamp preact_resnet18 masks ({n} elements) fp32 {device}"
    benchmark.extra_info.update(env_info)
    # minimum traffic: mask, exp_avg, exp_avg_sq read and written, grad read
    benchmark.extra_info.update({"op": "masked_adam_clamp_", "provider": provider, "shape": [n], "dtype": "float32",
                                 "bytes": 7 * 4 * n})
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    check_compiled(benchmark)
