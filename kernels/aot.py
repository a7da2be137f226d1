"""Ahead-of-time compilation of every Triton kernel variant the launchers produce (DESIGN.md rule 6).

The interpreter is not the compiler: it runs kernels that no GPU compiler accepts (a non-constexpr global, an
fp64 ``tl.dot`` on Triton 3.7). So every variant is also compiled for real GPU targets, here on a CPU machine:
LLVM and the ptxas that ships inside the triton wheel run on the host.

How the variants are found — from the launchers, not from a hand-kept list:

1. each kernels module has ``aot_cases(full)``: ``(label, thunk)`` pairs, each thunk calling the module's
   launchers on representative inputs (every dtype the op registers for the triton backend, every launcher
   option, NCHW and channels_last, the block sizes the launchers choose over their range). The test suite's set
   (130 variants) gives every option value in every dtype; ``full`` (550) every combination, for the resource
   tables of ``benchmarks/aot_resources.py``; ``tests/test_aot_compile.py`` checks that every ``_*_kernel`` is
   launched and that every boolean constexpr takes both values in every dtype, so a new one cannot hide;
2. :func:`record` runs the thunks with every ``@triton.jit`` object of the module replaced by a recorder, so
   nothing executes and no GPU is needed; each launch is kept as its arguments;
3. :func:`specialize` turns a launch into what ``JITFunction.run`` would hand the compiler on a GPU —
   signature, constexprs, and the runtime specialisation (16-divisible ints and pointers, ints equal to 1 made
   constexpr, which is how NCHW and channels_last strides become different binaries) — with Triton's own
   binder, and distinct results are the variants;
4. :func:`compile_variant` compiles one for a ``GPUTarget`` and reads the cubin's resources (registers,
   local memory = spills, shared memory; spill instructions counted in the SASS) with the ``cuobjdump`` that
   ships inside the triton wheel.

This must run without ``TRITON_INTERPRET`` (the flag makes ``@triton.jit`` build interpreter objects at import,
and the launchers choose interpreter-only paths, e.g. ``UPCAST`` in masked_conv): the test suite runs it in a
subprocess::

    python -m fastpurify.kernels.aot --arch 90 --arch 80 --jobs 2 --json out.json

Measured on the 2-core CI machine, empty triton cache, 2 processes: the test suite's 130 variants × 2 archs in
43 s (triton 3.9.0; 77 s of CPU, so the second process pays), the 550 of ``--full`` in about 2.5 min; with the
cache warm, 5 s. Triton 3.7.1 and 3.9.0 agree on every internal used here (``ASTSource(fn, signature,
constexprs, attrs)``, ``create_function_from_signature``, ``JITFunction._pack_args``, ``knobs.nvidia.cuobjdump``);
3.9 runs ptxas-blackwell for sm_90 and ptxas for sm_80, 3.7.1 ptxas for both.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import triton

MODULES = ("pgd", "universal", "dual_logit", "masked_conv", "cg")
ARCHS = (90, 80)


# --------------------------------------------------------------------------------------------------------
# Helpers of the modules' aot_cases()
# --------------------------------------------------------------------------------------------------------


def triton_dtypes(op: str) -> Tuple[torch.dtype, ...]:
    """The dtypes ``op`` registers for the triton backend: the cases follow the registry, so a dtype added there
    is compiled here without another edit."""
    from fastpurify import backend

    return backend.registered_ops()[op].dtypes["triton"]


def meta(shape, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """A tensor without storage: launchers read only shapes, strides and dtypes, so cases can use real model sizes
    (its address, 0, counts as 16-byte aligned, as every fresh CUDA allocation is)."""
    if not channels_last:
        return torch.empty(shape, dtype=dtype, device="meta")
    # channels_last samples under any leading dimensions, e.g. (R, B, C, H, W) viewed from (R·B, C, H, W)
    shape = tuple(shape)
    flat = torch.empty((math.prod(shape[:-3]),) + shape[-3:], dtype=dtype, device="meta")
    return flat.contiguous(memory_format=torch.channels_last).view(shape)


# --------------------------------------------------------------------------------------------------------
# Recording the launches the launchers make
# --------------------------------------------------------------------------------------------------------


def _encode(v: Any) -> Any:
    """A launch argument as JSON: tensors by dtype and 16-byte alignment (all the compiler sees of them)."""
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).replace("torch.", ""), "aligned": v.data_ptr() % 16 == 0}
    if isinstance(v, triton.language.dtype):
        return {"tl": v.name}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot record a kernel argument of type {type(v).__name__}")


@dataclass
class Launch:
    kernel: str  # "<module>:<name>"
    args: List[Any]
    kwargs: Dict[str, Any]
    case: str = ""


class _Recorder:
    def __init__(self, key: str, sink: List[Launch]):
        self.key, self.sink = key, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.key, [_encode(a) for a in args],
                                    {k: _encode(v) for k, v in kwargs.items()}))

        return launch


def _is_jit(obj) -> bool:
    from triton.runtime.jit import KernelInterface

    return isinstance(obj, KernelInterface)


def kernels_of(module) -> List[str]:
    """The launchable kernels of a module: its ``@triton.jit`` objects named ``_<op>_kernel`` (DESIGN.md rule 1)."""
    return sorted(n for n, o in vars(module).items() if _is_jit(o) and n.startswith("_") and n.endswith("_kernel"))


@contextmanager
def _recording(module, sink: List[Launch]):
    """Every @triton.jit object of ``module`` replaced by a recorder (device helpers are never launched from
    Python, so replacing them too is harmless), restored afterwards so that compilation sees the real ones."""
    saved = {n: o for n, o in vars(module).items() if _is_jit(o)}
    try:
        for n in saved:
            setattr(module, n, _Recorder(f"{module.__name__.rsplit('.', 1)[-1]}:{n}", sink))
        yield
    finally:
        for n, o in saved.items():
            setattr(module, n, o)


def record(modules=MODULES, full: bool = False) -> List[Launch]:
    """Every launch the ``aot_cases(full)`` of the kernels modules make, labelled with its case. ``full``: every
    combination of the launchers' options in every dtype; otherwise every option value in every dtype and
    every combination in the default dtype (fp32), which is what the test suite compiles."""
    out: List[Launch] = []
    for name in modules:
        mod = importlib.import_module(f"fastpurify.kernels.{name}")
        for label, thunk in mod.aot_cases(full):
            sink: List[Launch] = []
            with _recording(mod, sink):
                thunk()
            if not sink:
                raise AssertionError(f"{name}: aot case {label!r} launched no kernel")
            for launch in sink:
                launch.case = f"{name}:{label}"
            out.extend(sink)
    return out


# --------------------------------------------------------------------------------------------------------
# From a launch to the compiler's input, as JITFunction.run builds it
# --------------------------------------------------------------------------------------------------------


class _Ptr:
    """A tensor argument as the binder sees it: a dtype and an address (0: 16-aligned, 4: not)."""

    def __init__(self, dtype: str, aligned: bool):
        self.dtype = getattr(torch, dtype)
        self._ptr = 0 if aligned else 4

    def data_ptr(self):
        return self._ptr


def _decode(v: Any) -> Any:
    if isinstance(v, dict) and "tensor" in v:
        return _Ptr(v["tensor"], v["aligned"])
    if isinstance(v, dict) and "tl" in v:
        return triton.language.dtype(v["tl"])
    return v


def _kernel(key: str):
    mod, name = key.split(":")
    return getattr(importlib.import_module(f"fastpurify.kernels.{mod}"), name)


@dataclass
class Variant:
    kernel: str
    signature: Dict[str, str]  # non-constexpr parameters and their types
    constexprs: Dict[str, Any]  # constexpr parameters (declared, or specialised ints equal to 1) and values
    attrs: Dict[str, str]  # "D": the JIT specialised the int/pointer as divisible by 16
    cases: List[str] = field(default_factory=list)
    launch: Launch = None  # type: ignore[assignment]  # one launch that produces it (compiled from)

    @property
    def label(self) -> str:
        ptrs = ",".join(f"{n}={t[1:]}" for n, t in self.signature.items() if t.startswith("*"))
        cons = ",".join(f"{n}={_show(v)}" for n, v in self.constexprs.items())  # ints equal to 1 included
        return f"{self.kernel.split(':')[1]}[{cons}|{ptrs}]"

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, {k: _show(v) for k, v in self.constexprs.items()},
                           self.attrs], sort_keys=True)


def _show(v: Any) -> Any:
    return v.name if isinstance(v, triton.language.dtype) else v


def _jit_inputs(launch: Launch, arch: int):
    """(kernel, signature, constexprs, attrs, options) exactly as ``JITFunction.run`` computes them for a GPU of
    this arch (the binder and ``_pack_args`` are Triton's own, identical in 3.7 and 3.9)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(launch.kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_decode(a) for a in launch.args]
    kwargs = {k: _decode(v) for k, v in launch.kwargs.items()}
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return fn, signature, constexprs, attrs, options


def _variant(launch: Launch) -> Variant:
    fn, signature, constexprs, attrs, _ = _jit_inputs(launch, ARCHS[0])
    names = fn.arg_names
    cons = {names[k[0]]: c for k, c in constexprs.items()}
    return Variant(launch.kernel, {n: signature[n] for n in names if n not in cons},
                   cons, {names[k[0]]: "D" for k, a in attrs.items() if a}, launch=launch)


def specialize(launches: List[Launch]) -> List[Variant]:
    """The distinct variants of the launches (specialised for sm_90: the rules do not depend on the arch), in
    first-seen order, each with the cases that produce it and the first launch that does."""
    out: Dict[str, Variant] = {}
    for launch in launches:
        v = _variant(launch)
        out.setdefault(v.key(), v).cases.append(launch.case)
    for v in out.values():
        v.cases = sorted(set(v.cases))
    return list(out.values())


# --------------------------------------------------------------------------------------------------------
# Compiling a variant and reading its resources
# --------------------------------------------------------------------------------------------------------


def _cuobjdump() -> str:
    return triton.knobs.nvidia.cuobjdump.path


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> Dict[str, int]:
    """Registers, stack and local bytes per thread, static shared bytes, and — when there is a stack frame — the
    local-memory stores and loads in the SASS (spill code: these kernels declare no local arrays; the SASS dump
    costs 0.5 s, the resource summary 2 ms, so it is read only then)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        m = _RES.search(res)
        if m is None:
            raise RuntimeError(f"cannot read the resource usage of the cubin:\n{res}")
        regs, stack, shared, local = (int(g) for g in m.groups())
        sass = ""
        if stack or local:
            sass = subprocess.run([_cuobjdump(), "--dump-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
    return {"regs": regs, "stack": stack, "local": local, "static_shared": shared,
            "stl": len(re.findall(r"\bSTL(\.\w+)*\s", sass)), "ldl": len(re.findall(r"\bLDL(\.\w+)*\s", sass))}


@dataclass
class Result:
    variant: int  # index into the report's variants
    label: str
    kernel: str
    arch: int
    ok: bool
    error: str = ""
    seconds: float = 0.0
    resources: Dict[str, Any] = field(default_factory=dict)


def _mma(ptx: str) -> str:
    """The matrix instructions of a kernel: wgmma (Hopper), mma.sync (Ampere tensor cores) or none (FMA)."""
    kinds = [k for k, pat in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")) if pat in ptx]
    return "+".join(kinds) or "-"


def compile_variant(variant: Variant, arch: int, index: int = 0) -> Result:
    """Compile one variant (reproduced from one of its launches) for ``sm_<arch>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        fn, signature, constexprs, attrs, options = _jit_inputs(variant.launch, arch)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options.__dict__)
        res = cubin_resources(compiled.asm["cubin"])
        res.update(shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                   mma=_mma(compiled.asm["ptx"]))
        return Result(index, variant.label, variant.kernel, arch, True, seconds=time.perf_counter() - t0, resources=res)
    except Exception as e:  # noqa: BLE001 - the report names the variant and carries the compiler's message
        msg = f"{type(e).__name__}: {e}"
        return Result(index, variant.label, variant.kernel, arch, False, error=msg[-4000:],
                      seconds=time.perf_counter() - t0)


def _work(job: Tuple[Variant, int, int]) -> Result:
    return compile_variant(*job)


def compile_all(variants: List[Variant], archs=ARCHS, jobs: int = 1) -> List[Result]:
    work = [(v, a, i) for a in archs for i, v in enumerate(variants)]
    if jobs <= 1:
        return [_work(w) for w in work]
    # fork: the workers inherit the imported kernels; each compile is independent (the triton cache is
    # written atomically).
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_work, work, chunksize=1)


def run(archs=ARCHS, jobs: int = 1, modules=MODULES, full: bool = False) -> Dict[str, Any]:
    """Record, specialise and compile every variant (of every option combination with ``full``); a JSON-ready
    report."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("run the AOT compile without TRITON_INTERPRET=1 (the interpreter replaces @triton.jit)")
    t0 = time.perf_counter()
    launches = record(modules, full)
    variants = specialize(launches)
    t_rec = time.perf_counter() - t0
    results = compile_all(variants, archs, jobs)
    return {
        "triton": triton.__version__, "torch": torch.__version__, "archs": list(archs), "jobs": jobs, "full": full,
        "record_seconds": round(t_rec, 2), "seconds": round(time.perf_counter() - t0, 2),
        "kernels": [f"{m}:{k}" for m in modules
                    for k in kernels_of(importlib.import_module(f"fastpurify.kernels.{m}"))],
        "variants": [{"label": v.label, "kernel": v.kernel, "signature": v.signature, "attrs": v.attrs,
                      "constexprs": {k: _show(c) for k, c in v.constexprs.items()}, "cases": v.cases}
                     for v in variants],
        "results": [asdict(r) for r in results],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    p.add_argument("--module", action="append", choices=MODULES, help="only these kernels modules")
    p.add_argument("--full", action="store_true", help="every combination of the launchers' options")
    p.add_argument("--json", help="write the report here (default: stdout)")
    a = p.parse_args(argv)
    report = run(tuple(a.arch or ARCHS), a.jobs, tuple(a.module or MODULES), a.full)
    text = json.dumps(report, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    else:
        print(text)
    failed = [r for r in report["results"] if not r["ok"]]
    for r in failed:
        print(f"FAILED sm_{r['arch']} {r['label']}: {r['error'].splitlines()[0] if r['error'] else ''}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
