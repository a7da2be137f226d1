"""dual_logit_loss: the eager reference against every backend on the same inputs, forward and backward.

The loss of one SAU shared-PGD step on the two models' logits: (256, 10) (CIFAR-10, SAU's batch),
(512, 100) and (256, 1000) fp32. ``fwd`` times the loss and its masks; ``fwd+bwd`` adds
``torch.autograd.grad(loss, [z, z0])``. CPU: torch vs cpp; GPU: torch vs cuda vs triton. ``compile-<mode>``:
``torch.compile`` of ``dual_logit_loss_ref`` (its backward is AOTAutograd's; the correctness check compares the
forward outputs: loss and masks; benchmarks/_compiled.py).
``extra_info["bytes"]`` is the minimum memory traffic (both logit tensors read once per pass, the gradients
written once), so GB/s is the effective bandwidth.
"""

import pytest
import torch

from fastpurify.ops import dual_logit_loss
from fastpurify.reference.dual_logit import dual_logit_loss_ref

from ._compiled import check_compiled, compile_params, compiled_or_skip
from .conftest import HAS_CUDA, sync

SHAPES = [(256, 10), (512, 100), (256, 1000)]
CPU_PROVIDERS = ["torch", "cpp"]
GPU_PROVIDERS = ["torch", "cuda", "triton"]
CASES = [pytest.param(p, "cpu", id=f"cpu-{p}") for p in CPU_PROVIDERS] + [
    pytest.param(p, "cuda", id=f"cuda-{p}", marks=pytest.mark.gpu) for p in GPU_PROVIDERS
] + compile_params("cpu") + compile_params("cuda")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider,device", CASES)
def test_dual_logit_loss(benchmark, env_info, provider, device, variant, shape):
    if benchmark.disabled and device == "cpu":
        shape = (8, shape[1])  # smoke run on CI: same code path, small batch
    b, c = shape
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(shape, generator=g) * 3).to(device).requires_grad_(variant != "fwd")
    z0 = (torch.randn(shape, generator=g) * 3).to(device).requires_grad_(variant != "fwd")
    y = torch.randint(0, c, (b,), generator=g).to(device)
    yhat = torch.randint(0, c, (b,), generator=g).to(device)
    yhat0 = torch.randint(0, c, (b,), generator=g).to(device)
    nbytes = 2 * 4 * z.numel() + (4 * 4 * z.numel() if variant != "fwd" else 0)

    compiled = None
    if provider.startswith("compile-"):
        compiled = compiled_or_skip(benchmark, dual_logit_loss_ref, provider, (z, z0, y, yhat, yhat0),
                                    sync=lambda: sync(device))

    def run():
        loss, *_ = compiled() if compiled else dual_logit_loss(z, z0, y, yhat, yhat0, backend=provider)
        if variant != "fwd":
            torch.autograd.grad(loss, [z, z0])
        sync(device)
        return loss

    run()  # warm-up: lazy module loading, Triton compilation
    benchmark.group = f"dual_logit_loss {variant} {b}x{c} fp32 {device}"
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"op": "dual_logit_loss", "provider": provider, "variant": variant,
                                 "shape": list(shape), "dtype": "float32", "bytes": nbytes})
    loss = benchmark.pedantic(run, rounds=20 if HAS_CUDA else 10, iterations=5 if HAS_CUDA else 1, warmup_rounds=1)
    check_compiled(benchmark)
    assert torch.isfinite(loss)
