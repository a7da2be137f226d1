"""Build of fastpurify._C (the C++ CPU kernels, plus the CUDA kernels when a CUDA toolchain is present).

Environment:
  FASTPURIFY_SKIP_EXT=1   build no extension (pure-Python install; ops fall back to triton/torch backends)
  FASTPURIFY_FORCE_CUDA=1 build the CUDA sources even when no GPU is visible (needs a CUDA-enabled torch + nvcc)

Install torch first, then: pip install --no-build-isolation -e .
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("FASTPURIFY_SKIP_EXT"):
        print("fastpurify: FASTPURIFY_SKIP_EXT=1, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        # An isolated build (pip without --no-build-isolation) has no torch: build the pure-Python package
        # rather than letting pip fetch a second torch of several GB. The ops then say how to fix it.
        print(
            "fastpurify: WARNING torch is not importable in the build environment; building no extension.\n"
            "            Install torch first, then: pip install --no-build-isolation -e .",
            file=sys.stderr,
        )
        return [], {}

    cpu_sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: BuildExtension adds the standard torch's own headers are written in (-std=c++20 for torch 2.13)
    # to both the C++ and the nvcc command lines. The -std=c++17 this forced made two lines of torch 2.13's
    # c10/core/AutogradState.h warn (bit-field initializers, -Wc++20-extensions) in each C++ translation unit:
    # 22 warnings in the CUDA build, none without it (.ci/cuda_build.py, benchmarks/results/cuda-build/).
    cxx_flags = ["-O3"]
    if sys.platform != "win32":
        cxx_flags += ["-fopenmp"] if not sys.platform == "darwin" else []
    define_macros = []

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if _flag("FASTPURIFY_FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError(
                f"FASTPURIFY_FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build; "
                "install a CUDA build of torch to compile the CUDA kernels"
            )
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("FASTPURIFY_FORCE_CUDA=1 but nvcc/CUDA_HOME was not found; set CUDA_HOME")
        with_cuda = True

    if with_cuda:
        sources = cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_bind.cpp"))
        define_macros.append(("FASTPURIFY_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "fastpurify._C",
            sources,
            define_macros=define_macros,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
        print("fastpurify: building fastpurify._C with CUDA", file=sys.stderr)
    else:
        ext = cpp_extension.CppExtension(
            "fastpurify._C",
            cpu_sources,
            define_macros=define_macros,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
        print("fastpurify: building fastpurify._C (C++ CPU kernels only)", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
