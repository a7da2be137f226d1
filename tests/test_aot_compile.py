"""Every Triton kernel variant the launchers produce compiles for sm_90 and sm_80 (DESIGN.md rule 6).

The interpreter that runs the Triton kernels in the rest of the suite is not the compiler: it accepted a
non-constexpr global in ``_dual_logit_loss_kernel`` and an fp64 ``tl.dot`` that Triton 3.7 rejects. Here the
variants are found by running each kernels module's ``aot_cases()`` through its launchers with every kernel
replaced by a recorder, specialised exactly as ``JITFunction.run`` would on a GPU, and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` — no GPU needed (LLVM and the ptxas inside
the triton wheel run on the CPU). ``tests/conftest.py`` sets ``TRITON_INTERPRET=1``, which makes ``@triton.jit``
build interpreter objects at import, so the compilation runs in a subprocess without it
(``python -m fastpurify.kernels.aot``). ``.ci/aot.sh`` runs this file again under triton 3.7.1, the version
torch 2.13.0's CUDA wheel pins.
"""

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

pytest.importorskip("triton")

from fastpurify.kernels import aot  # noqa: E402

# Constexpr flags that are constant on a GPU, with the reason.
CONSTANT_ON_GPU = {"UPCAST": "widens bf16/fp16 tiles for the interpreter's dot only (TRITON_INTERPRET=1)"}


def _kernels():
    import importlib

    return [f"{m}:{k}" for m in aot.MODULES for k in aot.kernels_of(importlib.import_module(f"fastpurify.kernels.{m}"))]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One compile of every variant for every arch (parallel processes: 2 on the 2-core CI machine)."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = max(1, min(4, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "fastpurify.kernels.aot", "--jobs", str(jobs), "--json", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), f"{' '.join(cmd)} wrote no report (exit {res.returncode}):\n{res.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_every_kernel_is_launched_by_a_case(report):
    launched = {v["kernel"] for v in report["variants"]}
    assert report["kernels"] == _kernels()
    missing = sorted(set(report["kernels"]) - launched)
    assert not missing, f"kernels that no aot_cases() launches (add a case beside the launcher): {missing}"


def test_every_flag_value_meets_every_dtype(report):
    """Within each kernel and data type (its first pointer's type and its dtype-valued constexprs), every boolean
    constexpr takes both values, unless the data type itself fixes it (FP64, LOWP) or it is constant on a GPU."""
    groups = defaultdict(lambda: defaultdict(dict))  # kernel -> data type -> flag -> values
    for v in report["variants"]:
        dtypes = tuple(t for t in v["signature"].values() if t.startswith("*"))[:1] + tuple(
            c for c in v["constexprs"].values() if isinstance(c, str))
        for name, c in v["constexprs"].items():
            if isinstance(c, bool):
                groups[v["kernel"]][dtypes].setdefault(name, set()).add(c)
    bad = []
    for kernel, by_dtype in groups.items():
        flags = {f for per in by_dtype.values() for f in per}
        for flag in sorted(flags - set(CONSTANT_ON_GPU)):
            seen = [per.get(flag, set()) for per in by_dtype.values()]
            if all(len(s) == 1 for s in seen) and len(set().union(*seen)) == 2:
                continue  # derived from the data type (e.g. FP64)
            bad += [f"{kernel} {flag}={sorted(s)} for {d}" for d, per in by_dtype.items()
                    if len(s := per.get(flag, set())) < 2]
    assert not bad, "flag values no case compiles:\n" + "\n".join(bad)


@pytest.mark.parametrize("kernel", _kernels())
def test_kernel_compiles(report, kernel):
    results = [r for r in report["results"] if r["kernel"] == kernel]
    archs = sorted({r["arch"] for r in results})
    assert archs == sorted(aot.ARCHS), f"{kernel}: compiled for {archs}"
    failed = [r for r in results if not r["ok"]]
    msg = "\n\n".join(f"sm_{r['arch']} {r['label']} (cases: {report['variants'][r['variant']]['cases'][:3]}):\n"
                      + "\n".join(r["error"].splitlines()[-12:]) for r in failed)
    assert not failed, f"{len(failed)}/{len(results)} variants of {kernel} fail to compile (triton " \
                       f"{report['triton']}):\n{msg}"


def _data_type(variant) -> str:
    ptrs = [t for t in variant["signature"].values() if t.startswith("*")]
    dts = [c for c in variant["constexprs"].values() if isinstance(c, str)]
    return (dts or ptrs or ["-"])[0].lstrip("*")


def test_no_variant_spills(report):
    """Local memory in a kernel is spill code (none of them declares a local array): no variant that a defense
    can run may spill. fp64 is exempt: it runs only in gradcheck and reference comparisons, never in a defense,
    and its IEEE divisions and square roots are subroutine calls around which triton 3.7.1 keeps one value on the
    stack in the L2 PGD sample kernel (8 bytes on sm_90, 16 on sm_80; none with 3.9)."""
    spills = [f"sm_{r['arch']} {r['label']}: {r['resources']}" for r in report["results"]
              if r["ok"] and (r["resources"]["local"] or r["resources"]["stl"] or r["resources"]["ldl"])
              and _data_type(report["variants"][r["variant"]]) != "fp64"]
    assert not spills, "variants that spill to local memory:\n" + "\n".join(spills)


def _constexpr_kwargs(launch, kernel_obj):
    import inspect

    names = {n for n, p in inspect.signature(kernel_obj.fn).parameters.items() if "constexpr" in str(p.annotation)}
    return tuple(sorted((k, str(v)) for k, v in launch.kwargs.items() if k in names))


@pytest.mark.parametrize("module", ["universal", "dual_logit"])
def test_batch_size_does_not_choose_the_binary(module, monkeypatch):
    """A constexpr that follows the batch size compiles a new binary for each size the JIT meets (a ragged last
    batch then pays a compile): the universal update's split count (1 to 88 on a 132-SM H100) and the dual-logit
    row sum's block (one per power of two) were such constexprs. Recorded in-process, nothing runs."""
    import importlib

    import torch

    mod = importlib.import_module(f"fastpurify.kernels.{module}")
    monkeypatch.setattr(mod, "_num_sms", lambda device: 132, raising=False)  # an H100's SM count
    sink = []
    with aot._recording(mod, sink):
        for b in range(1, 1100, 13):
            if module == "universal":
                delta, grad = aot.meta((1, 3, 32, 32)), aot.meta((b, 3, 32, 32))
                mod.universal_update_triton(delta, grad, 1, b, 0.1, True, 0.0, "l2", 1.0, False)
            else:
                z, y = aot.meta((b, 10)), aot.meta((b,), torch.int64)
                mod.dual_logit_loss_triton(z, z, y, y, y, 1.0, 1.0)
    binaries = defaultdict(set)
    for launch in sink:
        name = launch.kernel.split(":")[1]
        binaries[name].add(_constexpr_kwargs(launch, getattr(mod, name)))
    many = {k: len(v) for k, v in binaries.items() if len(v) > 2}  # at most split and unsplit
    assert not many, f"constexpr variants per kernel over batch sizes 1..1100: {many}"
