"""The build: every CUDA kernel compiles with nvcc (torch-free .cu files), and importing fastpurify pulls in
neither Triton nor the compiled extension nor a device query (DESIGN.md rules 4-6)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def test_there_are_cuda_kernels():
    assert CU_FILES, "csrc/cuda holds no .cu file"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: cannot compile-check the CUDA kernels")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cuda_kernel_compiles(cu, tmp_path):
    # sm_90: the H100/H200 the kernels target; -Werror=all-warnings keeps the kernels warning-free;
    # --resource-usage (ptxas -v) shows spills: none is allowed (the fp32 L1 PGD sample kernels spilled 4 bytes).
    cmd = ["nvcc", "-c", "-std=c++20", "-O3", "-arch=sm_90", "-Werror", "all-warnings", "--resource-usage",
           f"-I{ROOT / 'csrc'}", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / (cu.stem + ".o")).stat().st_size > 0
    log = res.stdout + res.stderr
    assert "Compiling entry function" in log, f"no ptxas report from {' '.join(cmd)}:\n{log}"
    spills = re.findall(r"Function properties for (\w+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    bad = [f"{name}: {frame} bytes stack frame, {stores} bytes spill stores" for name, frame, stores in spills
           if int(frame) or int(stores)]
    assert not bad, "CUDA kernels that spill (benchmarks/results/aot/cuda-nvcc-*.md):\n" + "\n".join(bad)


def test_import_needs_nothing_optional():
    code = (
        "import sys, fastpurify, fastpurify.ops, fastpurify.backend\n"
        "bad = [m for m in ('triton', 'fastpurify._C', 'fastpurify.kernels.pgd', 'fastpurify.kernels.universal',\n"
        "                   'fastpurify.kernels.dual_logit', 'fastpurify.kernels.masked_conv',\n"
        "                   'fastpurify.kernels.cg') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized(), 'import queried the GPU'\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


def test_extension_is_built():
    """CI installs with the extension; a missing _C must fail the suite, not silently fall back."""
    from fastpurify import backend

    mod = backend.extension()
    for cpu, cuda in (("pgd_update_cpu_", "pgd_update_cuda_"), ("universal_update_cpu_", "universal_update_cuda_"),
                      ("dual_logit_loss_cpu", "dual_logit_loss_cuda"),
                      ("dual_logit_loss_backward_cpu", "dual_logit_loss_backward_cuda"),
                      ("masked_conv2d_cpu", "masked_conv2d_cuda"),
                      ("masked_conv2d_backward_cpu", "masked_conv2d_backward_cuda"),
                      ("build_masked_weights_cpu_", "build_masked_weights_cuda_"),
                      ("mask_grads_cpu_", "mask_grads_cuda_"),
                      ("masked_adam_clamp_cpu_", "masked_adam_clamp_cuda_"), ("cg_step_cpu_", "cg_step_cuda_"),
                      ("cg_direction_cpu_", "cg_direction_cuda_")):
        assert hasattr(mod, cpu)
        assert mod.has_cuda() == hasattr(mod, cuda)  # the flag tells the truth


# ---------------------------------------------------------------------------------------------------------------
# The CUDA build against a CUDA torch (issue 14 item 4): .ci/cuda_build.py builds the *_bind.cpp launchers and the
# kernels in a throwaway virtualenv and commits its summary; these tests keep that summary true to the tree.
# ---------------------------------------------------------------------------------------------------------------

CUDA_SUMMARY = ROOT / "benchmarks" / "results" / "cuda-build" / "summary.json"
CUDA_BUILD_CMD = "python3 .ci/cuda_build.py   (then commit benchmarks/results/cuda-build/)"


def _cuda_build():
    """.ci/cuda_build.py as a module (.ci is no package): the hash and the launcher recorder live there, once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastpurify_ci_cuda_build", ROOT / ".ci" / "cuda_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_summary() -> dict:
    import json

    assert CUDA_SUMMARY.is_file(), f"no CUDA build summary at {CUDA_SUMMARY}; run: {CUDA_BUILD_CMD}"
    return json.loads(CUDA_SUMMARY.read_text())


def test_cuda_build_summary_is_of_this_tree():
    """A change to csrc/ or setup.py cannot land without a fresh CUDA build check (DESIGN.md rule 6)."""
    cb = _cuda_build()
    summary = _cuda_summary()
    assert summary["passed"], f"the last CUDA build check failed: {summary['failures']}; fix, run: {CUDA_BUILD_CMD}"
    now = cb.input_digests(ROOT)
    if cb.inputs_hash(ROOT, now) != summary["inputs_hash"]:
        was = summary["inputs"]
        changed = sorted(p for p in set(now) | set(was) if now.get(p) != was.get(p))
        pytest.fail(f"csrc/ or setup.py changed since the last CUDA build check ({', '.join(changed)}); "
                    f"run: {CUDA_BUILD_CMD}")


def test_cuda_build_summary_covers_every_launcher():
    """The launchers the ops load now (found without a GPU or a CUDA build: each op's cuda loader runs against a
    recorder) are the ones the last CUDA build exported and checked: a new CUDA op in fastpurify/ops cannot
    escape the check by leaving csrc/ untouched."""
    summary = _cuda_summary()
    now = _cuda_build().requested_cuda_launchers()
    assert now == summary["check"]["ops"], f"the ops' CUDA launchers changed; run: {CUDA_BUILD_CMD}"
    assert sorted({n for names in now.values() for n in names}) == summary["check"]["exported"]
    assert summary["check"]["has_cuda"] and summary["check"]["torch_cuda"]


def test_cuda_launcher_recorder_sees_runtime_names(monkeypatch):
    """The recorder finds names built at run time (masked_conv's f"{name}_cuda_") and every op with a cuda
    loader; a new op's loader shows up, and the backend's real extension() is put back afterwards."""
    from fastpurify import backend

    cb = _cuda_build()
    real = backend.extension
    found = cb.requested_cuda_launchers()
    assert backend.extension is real
    assert found["build_masked_weights"] == ["build_masked_weights_cuda_"]  # an f-string in ops/masked_conv.py
    assert found["masked_conv2d"] == ["masked_conv2d_backward_cuda", "masked_conv2d_cuda"]
    assert set(found) == {n for n, s in backend.registered_ops().items() if "cuda" in s.impls}
    spec = backend.OpSpec(name="zz_probe", impls={"torch": lambda: None,
                                                   "cuda": lambda: backend.extension().zz_probe_cuda_},
                          dtypes={})
    monkeypatch.setitem(backend._OPS, "zz_probe", spec)
    assert cb.requested_cuda_launchers()["zz_probe"] == ["zz_probe_cuda_"]


def test_cuda_build_inputs_hash(tmp_path):
    """The hash sees every edit, addition, removal and rename under csrc/ and of setup.py, and nothing else
    (location, timestamps, files outside the inputs)."""
    cb = _cuda_build()
    a = tmp_path / "a"
    shutil.copytree(ROOT / "csrc", a / "csrc")
    shutil.copy(ROOT / "setup.py", a / "setup.py")
    base = cb.inputs_hash(a)
    assert base == cb.inputs_hash(ROOT)  # the same files elsewhere
    b = tmp_path / "b"
    shutil.copytree(a, b)
    os.utime(b / "setup.py", (0, 0))
    (b / "README.md").write_text("not an input")
    assert cb.inputs_hash(b) == base  # another place, other mtimes, a file that is not an input

    def changed(edit):
        c = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        shutil.copytree(a, c)
        edit(c)
        return cb.inputs_hash(c) != base

    first = cb.input_files(a)[0]
    assert changed(lambda c: (c / "setup.py").write_bytes((c / "setup.py").read_bytes() + b" "))
    assert changed(lambda c: (c / first).write_bytes((c / first).read_bytes().replace(b"\n", b"\r\n", 1)))
    assert changed(lambda c: (c / "csrc" / "cuda" / "new.cuh").write_text(""))  # an empty new header counts
    assert changed(lambda c: (c / first).unlink())
    assert changed(lambda c: (c / first).rename(c / (first + ".bak")))
