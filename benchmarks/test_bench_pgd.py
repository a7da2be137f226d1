"""pgd_update_ (L∞, with the box clamp): the eager reference against every backend on the same inputs.

CPU: torch vs cpp at (256, 3, 32, 32) and (512, 3, 224, 224) fp32. GPU: torch vs cuda vs triton, plus the
achieved bandwidth (bytes of delta read+written, grad and x read) in ``extra_info``.
"""

import pytest
import torch

from fastpurify.ops import pgd_update_

from .conftest import HAS_CUDA, sync

SHAPES = [(256, 3, 32, 32), (512, 3, 224, 224)]
CPU_PROVIDERS = ["torch", "cpp"]
GPU_PROVIDERS = ["torch", "cuda", "triton"]
CASES = [pytest.param(p, "cpu", id=f"cpu-{p}") for p in CPU_PROVIDERS] + [
    pytest.param(p, "cuda", id=f"cuda-{p}", marks=pytest.mark.gpu) for p in GPU_PROVIDERS
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider,device", CASES)
def test_pgd_update_linf(benchmark, env_info, provider, device, shape):
    if benchmark.disabled and device == "cpu" and shape[-1] > 32:
        shape = (4,) + tuple(shape[1:])  # smoke run on CI: same code path, small batch
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g).to(device)
    grad = torch.randn(shape, generator=g).to(device)
    delta = torch.zeros(shape, device=device)

    def run():
        pgd_update_(delta, grad, step=2 / 255, eps=8 / 255, x=x, backend=provider)
        sync(device)

    run()  # warm-up: lazy module loading, Triton compilation
    benchmark.group = f"pgd_update_linf {'x'.join(map(str, shape))} fp32 {device}"
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"op": "pgd_update_", "provider": provider, "shape": list(shape), "dtype": "float32",
                                 "bytes": 4 * delta.numel() * 4})
    benchmark.pedantic(run, rounds=20 if HAS_CUDA else 10, iterations=5 if HAS_CUDA else 1, warmup_rounds=1)
    assert delta.abs().max() <= 8 / 255 + 1e-6
