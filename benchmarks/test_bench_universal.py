"""universal_update_: the eager reference against every backend on the same inputs.

Cases: I-BAU's perturbation step (mean of the per-sample gradients, the 0.001‖δ‖² penalty, lr 10, no
projection: ``ibau``), the same with its notebook's L2 ball of radius 10 (``ibau_l2``), and AWM's recovery step
with the L1 rescale to τ = 1000 (``awm_l1``). One universal δ (1, 3, H, W) from a batch of B per-sample
gradients: (256, 3, 32, 32) and (128, 3, 224, 224) fp32. CPU: torch vs cpp; GPU: torch vs cuda vs triton.
``compile-<mode>``: ``torch.compile`` of ``universal_update_ref`` written back in place (benchmarks/_compiled.py).
``extra_info["bytes"]`` is the minimum memory traffic (the gradient batch read once, δ read and written), so
GB/s is the effective bandwidth.
"""

import pytest
import torch

from fastpurify.ops import universal_update_
from fastpurify.reference.universal import universal_update_ref

from ._compiled import check_compiled, compile_params, compiled_or_skip
from .conftest import HAS_CUDA, sync

SHAPES = [(256, 3, 32, 32), (128, 3, 224, 224)]
CPU_PROVIDERS = ["torch", "cpp"]
GPU_PROVIDERS = ["torch", "cuda", "triton"]
CASES = [pytest.param(p, "cpu", id=f"cpu-{p}") for p in CPU_PROVIDERS] + [
    pytest.param(p, "cuda", id=f"cuda-{p}", marks=pytest.mark.gpu) for p in GPU_PROVIDERS
] + compile_params("cpu") + compile_params("cuda")
VARIANTS = {
    "ibau": dict(step=10.0, reduction="mean", weight_decay=0.001, descend=True),
    "ibau_l2": dict(step=10.0, reduction="mean", weight_decay=0.001, descend=True, norm="l2", radius=10.0),
    "awm_l1": dict(step=10.0, reduction="mean", norm="l1", radius=1000.0),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("provider,device", CASES)
def test_universal_update(benchmark, env_info, provider, device, variant, shape):
    if benchmark.disabled and device == "cpu":
        shape = (4,) + tuple(shape[1:3]) + (min(shape[3], 32),)  # smoke run on CI: same code path, small batch
    g = torch.Generator().manual_seed(0)
    grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
    delta = torch.zeros((1,) + tuple(shape[1:]), device=device)
    kw = dict(VARIANTS[variant], backend=provider)
    nbytes = 4 * (grad.numel() + 2 * delta.numel())

    def run():
        universal_update_(delta, grad, **kw)
        sync(device)

    if provider.startswith("compile-"):
        def reference(d, g):  # the torch backend of universal_update_, as a function to compile
            d.copy_(universal_update_ref(d, g, **VARIANTS[variant]))

        compiled = compiled_or_skip(benchmark, reference, provider, (delta, grad), sync=lambda: sync(device))

        def run():
            compiled()
            sync(device)

    run()  # warm-up: lazy module loading, Triton compilation
    benchmark.group = f"universal_update {variant} {'x'.join(map(str, shape))} fp32 {device}"
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"op": "universal_update_", "provider": provider, "variant": variant,
                                 "shape": list(shape), "dtype": "float32", "bytes": nbytes})
    benchmark.pedantic(run, rounds=20 if HAS_CUDA else 10, iterations=5 if HAS_CUDA else 1, warmup_rounds=1)
    check_compiled(benchmark)
    assert torch.isfinite(delta).all()
    if "radius" in kw:
        p = 2 if kw["norm"] == "l2" else 1
        assert float(torch.linalg.vector_norm(delta, ord=p)) <= kw["radius"] * (1 + 1e-5)
