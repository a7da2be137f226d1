"""CG hypergradient solves: the eager formulation against every backend on the same inputs.

Cases:

- one CG iteration (everything but the matvec: pᵀAp, the update ``x += αp; r −= αAp; ‖r‖²`` and the new
  direction ``p = r + βp``) at n = 11.2 M fp32 (PreAct-ResNet18's parameter count), α and β as device
  scalars. ``torch``: the eager ATen formulation (``add_``/``sub_`` with tensor scalars, ``dot``; 3 passes
  plus temporaries); ``cpp``/``cuda``/``triton``: :func:`fastpurify.ops.cg_step_` + :func:`cg_direction_`.
  The matvec (A = diag(1..2)) runs untimed before each round. ``extra_info["bytes"]``: the fused minimum
  traffic (x, r, p, Ap read; x, r written; r, p read, p written; plus p, Ap read by the dot), so GB/s is the
  effective bandwidth;
- a K = 5 I-BAU hypergradient on SmallVGG (fixed-point solver, the authors' setting): the reference
  :func:`~fastpurify.reference.defenses.ibau.implicit_hypergradient` against
  :func:`fastpurify.ops.implicit_hypergrad`;
- one Hessian-vector product on SmallVGG by each ``hvp`` mode, w.r.t. δ (3×32×32) and w.r.t. the parameters.

``compile-<mode>`` (benchmarks/_compiled.py): the CG iteration's eager formulation under ``torch.compile`` (checked
against eager with rtol 1e-4: the two 11 M-element dots reduce in another order; measured difference ~1e-6
relative); the hypergradient with ``torch.compile(net)`` in the reference's closures — skipped with the error when it
cannot run (torch 2.13: its fixed-point map differentiates a gradient, a double backward).

``python -m benchmarks.test_bench_cg`` prints the hvp-mode comparison (best of interleaved runs) without pytest.
"""

import importlib
import time

import pytest
import torch
import torch.nn.functional as F

from fastpurify.bench_compile import cold_compile, first_line
from fastpurify.models import SmallVGG
from fastpurify.ops import cg_direction_, cg_step_, hvp, implicit_hypergrad

from ._compiled import check_compiled, compile_params, compiled_or_skip, mode_of
from .conftest import HAS_CUDA, sync

ibau_ref = importlib.import_module("fastpurify.reference.defenses.ibau")

N_PARAMS = 11_173_962  # PreAct-ResNet18 (CIFAR-10)
CPU_PROVIDERS = ["torch", "cpp"]
GPU_PROVIDERS = ["torch", "cuda", "triton"]
CASES = [pytest.param(p, "cpu", id=f"cpu-{p}") for p in CPU_PROVIDERS] + [
    pytest.param(p, "cuda", id=f"cuda-{p}", marks=pytest.mark.gpu) for p in GPU_PROVIDERS
] + compile_params("cpu") + compile_params("cuda")


def _eager_iteration(x, r, p, ap, rr):
    """One CG iteration as plain eager ATen with device scalars (no host sync): the ``torch`` provider."""
    alpha = rr / torch.dot(p, ap)
    x.add_(p * alpha)
    r.sub_(ap * alpha)
    rr_new = torch.dot(r, r)
    p.mul_(rr_new / rr).add_(r)
    rr.copy_(rr_new)


@pytest.mark.parametrize("provider,device", CASES)
def test_cg_iteration(benchmark, env_info, provider, device):
    n = 70_001 if benchmark.disabled and device == "cpu" else N_PARAMS  # smoke run on CI: same code, small n
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, device=device)
    r = torch.randn(n, generator=g).to(device)
    diag = torch.linspace(1.0, 2.0, n, device=device)  # A = diag(1..2): SPD, so every iteration is a real one
    p, ap = r.clone(), torch.empty_like(r)
    rr = torch.dot(r, r)
    rr_new, iters = torch.empty_like(rr), torch.zeros((), dtype=torch.int32, device=device)
    status = torch.zeros_like(iters)

    compiled = None
    if provider.startswith("compile-"):
        torch.mul(p, diag, out=ap)
        compiled = compiled_or_skip(benchmark, _eager_iteration, provider, (x, r, p, ap, rr),
                                    sync=lambda: sync(device), rtol=1e-4, atol=1e-6)

    def run():
        if compiled is not None:
            compiled()
        elif provider == "torch":
            _eager_iteration(x, r, p, ap, rr)
        else:
            pap = torch.dot(p, ap)
            cg_step_(x, r, p, ap, rr, pap, rr_new, iters, status, backend=provider)
            cg_direction_(p, r, rr, rr_new, status, backend=provider)
        sync(device)

    def matvec():  # untimed (pedantic's setup): Ap for the current p
        torch.mul(p, diag, out=ap)
        sync(device)

    matvec()
    run()  # warm-up: lazy module loading, Triton compilation
    benchmark.group = f"cg iteration n={n} fp32 {device}"
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"op": "cg_step_+cg_direction_", "provider": provider, "shape": [n],
                                 "dtype": "float32", "bytes": 4 * n * (6 + 3 + 2)})
    benchmark.pedantic(run, setup=matvec, rounds=100 if HAS_CUDA else 10, iterations=1, warmup_rounds=1)
    check_compiled(benchmark)
    assert torch.isfinite(x).all() and int(status) == 0


def _hypergrad_problem(batch, device, seed=0, wrap=None):
    torch.manual_seed(seed)
    net = SmallVGG().to(device).eval()
    params = [q for q in net.parameters() if q.requires_grad]
    net = wrap(net) if wrap is not None else net  # torch.compile(net): the closures below call the compiled model
    x1, y1 = torch.rand(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    xj, yj = torch.rand(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    rows = torch.arange(max(1, batch // 100), device=device)
    delta = (torch.rand(1, 3, 32, 32, device=device) - 0.5) * 0.1

    def inner(d):
        return -F.cross_entropy(net(x1 + d), y1) + 0.001 * torch.norm(d) ** 2

    def fp_map(d):
        (gd,) = torch.autograd.grad(inner(d), [d], create_graph=True)
        return d - 0.1 * gd

    def outer(d):
        patch = torch.zeros_like(xj)
        patch[rows] = d.expand(rows.numel(), -1, -1, -1)
        return F.cross_entropy(net(xj + patch), yj)

    return params, delta, inner, fp_map, outer


HYPER_CASES = [pytest.param(i, "cpu", id=f"{i}-cpu") for i in ("reference", "ours")] + [
    pytest.param(i, "cuda", id=f"{i}-cuda", marks=pytest.mark.gpu) for i in ("reference", "ours")
] + compile_params("cpu", model=True) + compile_params("cuda", model=True)


@pytest.mark.parametrize("impl,device", HYPER_CASES)
def test_ibau_hypergradient_k5(benchmark, env_info, impl, device):
    batch = 4 if benchmark.disabled else (100 if device == "cuda" else 32)
    mode = mode_of(impl)
    wrap = (lambda net: torch.compile(net, mode=mode)) if mode else None
    params, delta, inner, fp_map, outer = _hypergrad_problem(batch, device, wrap=wrap)

    def run():
        if impl != "ours":  # the reference, with the model compiled for compile-<mode>
            ibau_ref.implicit_hypergradient(delta, params, fp_map, outer, K=5, solver="fixed_point")
        else:
            implicit_hypergrad(inner, outer, delta, params, solver="fixed_point", K=5, eta=0.1)
        sync(device)

    if mode:
        with cold_compile(reset_after=False):
            try:
                run()
            except Exception as e:  # noqa: BLE001
                pytest.skip(f"torch.compile(net, mode={mode!r}) in the reference hypergradient: {first_line(e)}")
    run()
    benchmark.group = f"I-BAU hypergradient K=5 SmallVGG batch {batch} fp32 {device}"
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"op": "implicit_hypergrad", "provider": impl, "shape": [batch, 3, 32, 32],
                                 "dtype": "float32", "K": 5, "solver": "fixed_point"})
    benchmark.pedantic(run, rounds=10 if HAS_CUDA else 3, iterations=1, warmup_rounds=0)


def _hvp_cases(batch, device):
    torch.manual_seed(0)
    net = SmallVGG().to(device).eval()
    x, y = torch.rand(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    names = [n for n, _ in net.named_parameters()]
    params = [q.detach() for q in net.parameters()]
    d = torch.zeros(1, 3, 32, 32, device=device)
    return {
        "delta": (lambda dd: F.cross_entropy(net(x + dd), y), d, torch.randn_like(d)),
        "params": (lambda *ps: F.cross_entropy(torch.func.functional_call(net, dict(zip(names, ps)), (x,)), y),
                   params, [torch.randn_like(q) for q in params]),
    }


@pytest.mark.parametrize("wrt", ["delta", "params"])
@pytest.mark.parametrize("mode", ["rev_rev", "fwd_rev"])
def test_hvp_mode(benchmark, env_info, wrt, mode):
    batch = 4 if benchmark.disabled else 100
    fn, inputs, v = _hvp_cases(batch, "cpu")[wrt]
    hvp(fn, inputs, v, mode=mode)
    benchmark.group = f"hvp SmallVGG w.r.t. {wrt} batch {batch} fp32 cpu"
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"op": "hvp", "provider": mode, "wrt": wrt, "dtype": "float32"})
    benchmark.pedantic(lambda: hvp(fn, inputs, v, mode=mode), rounds=5, iterations=1, warmup_rounds=0)


def main(batch: int = 100, rounds: int = 6) -> None:
    """Best-of-``rounds`` interleaved timings of both hvp modes (interleaving evens out a shared machine's load)."""
    cases = _hvp_cases(batch, "cpu")
    best = {}
    for rnd in range(rounds + 1):  # round 0 warms up and is discarded
        for wrt, (fn, inputs, v) in cases.items():
            for mode in ("rev_rev", "fwd_rev"):
                t0 = time.perf_counter()
                hvp(fn, inputs, v, mode=mode)
                if rnd:
                    best[(wrt, mode)] = min(best.get((wrt, mode), float("inf")), time.perf_counter() - t0)
    for (wrt, mode), t in best.items():
        print(f"hvp SmallVGG batch {batch} w.r.t. {wrt:6s} {mode}: {t * 1e3:8.1f} ms "
              f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
