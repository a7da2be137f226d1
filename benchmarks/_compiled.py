"""The ``compile`` providers of the op benchmarks: ``torch.compile`` of an op's eager reference (issue 17).

Each ``benchmarks/test_bench_<op>.py`` adds ``compile-default`` and ``compile-max-autotune-no-cudagraphs`` (CPU) or
``compile-reduce-overhead`` (GPU) beside its ``torch`` (eager reference) and kernel providers. The compiled provider
calls ``torch.compile(<the op's reference function>, mode=...)`` on the same inputs; :func:`compile_op` compiles it
cold (dynamo reset, inductor's caches off: fastpurify.bench_compile.cold_compile), times the first call (compile +
run) and a second call, and checks the first call's outputs *and* the inputs it mutated against the eager
function's on copies of the inputs (the tolerance table of fastpurify/testing.py), so a wrong compile is flagged
(``matches_eager`` False fails the benchmark). A function that cannot compile returns the exception's first line and
the benchmark is skipped with it.

Which compiled cases run (``--compiled``, conftest.py): ``first`` (default) runs the first compiled case of each file
that compiles an op, not a whole network (mode ``default``; 10-40 s each on 2 shared CPU cores), so that the CI smoke
run (``pytest benchmarks --benchmark-disable``) covers the code path once per file; the cases that compile a network
(``compiled_model``: the masked PreAct-ResNet18 forward + backward, SAU's shared PGD, the I-BAU hypergradient; 1-5
minutes each) and the rest run with ``all`` (the measured results); ``none`` runs none.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import pytest
import torch

from fastpurify.bench_compile import cold_compile, dynamo_counts, first_line
from fastpurify.testing import tolerance

GPU_MODES = ("reduce-overhead",)
CPU_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_params(device: str, model: bool = False) -> list:
    """pytest params ``(provider, device)`` of the compiled providers of ``device``, each marked ``compiled``;
    ``model=True`` (a whole network is compiled: minutes on 2 CPU cores) adds ``compiled_model``, which
    ``--compiled first`` leaves out."""
    modes = GPU_MODES if device == "cuda" else CPU_MODES
    marks = [pytest.mark.compiled] + ([pytest.mark.compiled_model] if model else [])
    marks += [pytest.mark.gpu] if device == "cuda" else []
    return [pytest.param(f"compile-{m}", device, id=f"{device}-compile-{m}", marks=marks) for m in modes]


def mode_of(provider: str) -> Optional[str]:
    return provider[len("compile-"):] if provider.startswith("compile-") else None


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone().requires_grad_(v.requires_grad)
    if isinstance(v, (list, tuple)):
        return type(v)(_clone(t) for t in v)
    return v


def _tensors(v: Any) -> list:
    if isinstance(v, torch.Tensor):
        return [v.detach()]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _tensors(x)]
    return []


def max_abs_err(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rtol: Optional[float] = None,
                atol: Optional[float] = None) -> Tuple[float, bool]:
    """(largest absolute difference, every pair within the tolerance: the dtype's unless given) over matching
    tensor pairs."""
    worst, ok = 0.0, len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if a.shape != e.shape or a.dtype != e.dtype:
            return float("inf"), False
        if a.is_floating_point():
            rt, at = tolerance(e.dtype)
            rt, at = rt if rtol is None else rtol, at if atol is None else atol
            diff = (a.float() - e.float()).abs()
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
            ok = ok and bool(torch.isclose(a.float(), e.float(), rtol=rt, atol=at, equal_nan=True).all())
        else:
            ok = ok and bool(torch.equal(a, e))
    return worst, ok


def compile_op(fn: Callable, mode: str, args: Sequence[Any], *, sync: Callable[[], None] = lambda: None,
               rtol: Optional[float] = None, atol: Optional[float] = None, check: Optional[Callable] = None,
               ) -> Tuple[Optional[Callable[[], Any]], Dict[str, Any]]:
    """``torch.compile(fn, mode=mode)`` checked on ``args``: returns ``(run, info)``, ``run()`` calling the compiled
    function on ``args`` themselves (as the other providers do: in-place ops mutate them), or ``(None, info)``
    when it cannot compile. ``info``: status, error, mode, compile_s (first call − second call), first_call_s,
    max_abs_err and matches_eager (outputs and mutated inputs against eager ``fn`` on copies), graphs and
    graph_breaks of the first call. ``rtol``/``atol``: a looser tolerance (the caller says why); ``check(out,
    expected) -> (error, ok)`` replaces the comparison."""
    info: Dict[str, Any] = {"status": "ok", "error": None, "mode": mode, "compiled": getattr(fn, "__name__", "fn")}
    eager_args, comp_args = _clone(list(args)), _clone(list(args))
    expected = fn(*eager_args)
    with cold_compile(reset_after=False):
        g0, b0 = dynamo_counts()
        try:
            cfn = torch.compile(fn, mode=mode)
            t0 = time.perf_counter()
            out = cfn(*comp_args)
            sync()
            first = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001  (the reason becomes the skip message)
            info.update(status="error", error=first_line(e))
            return None, info
        g1, b1 = dynamo_counts()
    if check is not None:
        info["max_abs_err"], info["matches_eager"] = check(out, expected)
    else:
        info["max_abs_err"], info["matches_eager"] = max_abs_err(
            _tensors([out, comp_args]), _tensors([expected, eager_args]), rtol, atol)
    t0 = time.perf_counter()
    cfn(*comp_args)
    sync()
    second = time.perf_counter() - t0
    info.update(first_call_s=first, compile_s=max(0.0, first - second), graphs=g1 - g0, graph_breaks=b1 - b0)
    return (lambda: cfn(*args)), info


def compiled_or_skip(benchmark, fn: Callable, provider: str, args: Sequence[Any], **kw) -> Callable[[], Any]:
    """:func:`compile_op` for a benchmark: records ``compile`` info in ``extra_info``, skips with the reason when
    ``fn`` cannot compile."""
    run, info = compile_op(fn, mode_of(provider), args, **kw)
    benchmark.extra_info["compile"] = info
    if run is None:
        pytest.skip(f"torch.compile(mode={mode_of(provider)!r}) cannot run {info['compiled']}: {info['error']}")
    return run


def check_compiled(benchmark) -> None:
    """Fail a compiled case whose first call disagreed with the eager reference (after the timings are recorded)."""
    info = benchmark.extra_info.get("compile")
    if info is not None:
        assert info["matches_eager"], f"compiled result differs from the eager reference: {info}"
