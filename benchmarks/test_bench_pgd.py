"""pgd_update_: the eager reference against every backend on the same inputs.

Cases: the L∞ step with the box clamp (the SAU/PGD hot path), the L2 step (per-sample norms reduced on the
device), and the L∞ step that also writes the model input ``(x + δ − mean)/std`` in bf16 channels_last
(the fused "perturb and feed" pass). CPU: torch vs cpp at (256, 3, 32, 32) and (512, 3, 224, 224) fp32.
GPU: torch vs cuda vs triton. ``compile-<mode>``: ``torch.compile`` of the reference (``pgd_update_ref``, then
``model_input_ref`` for the fused variant, written back in place as the torch backend does; benchmarks/_compiled.py).
``extra_info["bytes"]`` is the minimum memory traffic of the op (δ read and
written, grad and x read, the model input written), so GB/s is the effective bandwidth.
"""

import pytest
import torch

from fastpurify.ops import pgd_update_
from fastpurify.reference.pgd import model_input_ref, pgd_update_ref

from ._compiled import check_compiled, compile_params, compiled_or_skip
from .conftest import HAS_CUDA, sync

SHAPES = [(256, 3, 32, 32), (512, 3, 224, 224)]
CPU_PROVIDERS = ["torch", "cpp"]
GPU_PROVIDERS = ["torch", "cuda", "triton"]
CASES = [pytest.param(p, "cpu", id=f"cpu-{p}") for p in CPU_PROVIDERS] + [
    pytest.param(p, "cuda", id=f"cuda-{p}", marks=pytest.mark.gpu) for p in GPU_PROVIDERS
] + compile_params("cpu") + compile_params("cuda")
VARIANTS = ["linf", "l2", "linf+input_bf16_cl"]
CIFAR = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("provider,device", CASES)
def test_pgd_update(benchmark, env_info, provider, device, variant, shape):
    if benchmark.disabled and device == "cpu" and shape[-1] > 32:
        shape = (4,) + tuple(shape[1:])  # smoke run on CI: same code path, small batch
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g).to(device)
    grad = torch.randn(shape, generator=g).to(device)
    delta = torch.zeros(shape, device=device)
    norm = "l2" if variant == "l2" else "linf"
    eps = 0.5 if norm == "l2" else 8 / 255
    kw = dict(step=2 / 255 if norm == "linf" else 0.1, eps=eps, norm=norm, x=x, backend=provider)
    nbytes = 4 * delta.numel() * 4
    if variant.endswith("bf16_cl"):
        kw["out_x"] = torch.empty(shape, dtype=torch.bfloat16, device=device, memory_format=torch.channels_last)
        kw["normalization"] = CIFAR
        nbytes += 2 * delta.numel()

    def run():
        pgd_update_(delta, grad, **kw)
        sync(device)

    if provider.startswith("compile-"):
        ref_kw = {k: kw[k] for k in ("step", "eps", "norm")}

        def reference(d, g, xx, out_x):  # the torch backend of pgd_update_, as a function to compile
            new = pgd_update_ref(d, g, x=xx, **ref_kw)
            d.copy_(new)
            if out_x is not None:
                out_x.copy_(model_input_ref(xx, new, CIFAR))

        compiled = compiled_or_skip(benchmark, reference, provider, (delta, grad, x, kw.get("out_x")),
                                    sync=lambda: sync(device))

        def run():
            compiled()
            sync(device)

    run()  # warm-up: lazy module loading, Triton compilation
    benchmark.group = f"pgd_update {variant} {'x'.join(map(str, shape))} fp32 {device}"
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"op": "pgd_update_", "provider": provider, "variant": variant, "shape": list(shape),
                                 "dtype": "float32", "bytes": nbytes})
    benchmark.pedantic(run, rounds=20 if HAS_CUDA else 10, iterations=5 if HAS_CUDA else 1, warmup_rounds=1)
    check_compiled(benchmark)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert (torch.linalg.vector_norm(delta, dim=(1, 2, 3)) <= eps * (1 + 1e-5)).all()
