"""shared_pgd (SAU's inner loop, fastpurify/ops/attack.py) against the reference shared PGD of
fastpurify/reference/defenses/sau.py on the same PreActResNet18 batch and models.

Providers: ``torch`` (the reference: published loop, clean predictions recomputed each step, weight
gradients filled), ``fast`` (shared_pgd, fp32), and on GPU ``fast-bf16`` (bf16 autocast + channels_last).
``extra_info`` records the steps run and the shared-adversarial rate the final δ reaches (judged by both
models in fp32), so a speed-up is reported together with the attack strength it kept. ``compile-<mode>``:
``torch.compile(shared_pgd_ref)`` (the reference function; its host syncs, boolean-mask indexing and ``backward()``
are graph breaks: ``extra_info["compile"]["graph_breaks"]``). Its check: δ after the attack equals the eager δ on
at least 99 % of the elements (a sign step flips where a gradient element is near zero and rounds differently).
"""

import pytest
import torch

from fastpurify.models import PreActResNet18
from fastpurify.ops.attack import shared_pgd
from fastpurify.reference.defenses.sau import shared_pgd as shared_pgd_ref

from ._compiled import check_compiled, compile_params, compiled_or_skip
from .conftest import HAS_CUDA, sync

CASES = [pytest.param(p, "cpu", id=f"cpu-{p}") for p in ("torch", "fast")] + [
    pytest.param(p, "cuda", id=f"cuda-{p}", marks=pytest.mark.gpu) for p in ("torch", "fast", "fast-bf16")
] + compile_params("cpu", model=True) + compile_params("cuda", model=True)


def _same_delta(out, expected):
    """(fraction of δ elements that differ, at most 1 % differ)."""
    frac = float(((out[0] - expected[0]).abs() > 1e-6).float().mean())
    return frac, frac <= 0.01


def _models(device, channels_last):
    torch.manual_seed(0)
    f, f0 = PreActResNet18().to(device).eval(), PreActResNet18().to(device).eval()
    with torch.no_grad():  # two different models, as in SAU after its first round
        for p in f.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if channels_last:
        f, f0 = f.to(memory_format=torch.channels_last), f0.to(memory_format=torch.channels_last)
    return f, f0


@pytest.mark.parametrize("provider,device", CASES)
def test_shared_pgd(benchmark, env_info, provider, device):
    batch = 256 if device == "cuda" else 32
    if benchmark.disabled:
        batch = 4  # smoke run on CI: same code path
    f, f0 = _models(device, provider == "fast-bf16")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    out = {}
    compiled = None
    if provider.startswith("compile-"):
        compiled = compiled_or_skip(benchmark, shared_pgd_ref, provider, (f, f0, x, y), sync=lambda: sync(device),
                                    check=_same_delta)

    def run():
        if compiled is not None:
            out["d"], info = compiled()
            out["steps"] = info["steps"]
        elif provider == "torch":
            out["d"], info = shared_pgd_ref(f, f0, x, y)
            out["steps"] = info["steps"]
        else:
            kw = dict(precision="bf16", channels_last=True) if provider == "fast-bf16" else {}
            out["d"], info = shared_pgd(f, f0, x, y, **kw)
            out["steps"] = info["steps"]
        sync(device)

    run()  # warm-up
    benchmark.group = f"shared_pgd preact_resnet18 batch {batch} {device}"
    benchmark.extra_info.update(env_info)
    benchmark.pedantic(run, rounds=10 if HAS_CUDA else 3, iterations=1, warmup_rounds=0)
    with torch.no_grad():
        f32, f032 = _models(device, False)
        xa = x + out["d"]
        p, p0 = f32(xa).argmax(1), f032(xa).argmax(1)
        shared = (p != f32(x).argmax(1)) & (p0 != f032(x).argmax(1)) & (p == p0)
    benchmark.extra_info.update({"op": "shared_pgd", "provider": provider, "shape": [batch, 3, 32, 32],
                                 "dtype": "bfloat16" if provider == "fast-bf16" else "float32",
                                 "steps": int(out["steps"]), "shared_rate": float(shared.float().mean())})
    check_compiled(benchmark)
    assert out["d"].abs().max() <= 0.2 + 1e-6
