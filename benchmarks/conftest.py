"""Benchmark configuration (DESIGN.md rule 8): every result says where it ran.

Run: ``pytest benchmarks --benchmark-json benchmarks/results/<device>/<name>.json`` then
``python benchmarks/summarize.py``. On CPU CI, ``pytest benchmarks --benchmark-disable`` is a smoke test.
Triton on CPU runs in its interpreter (numpy per program instance): its timings mean nothing, so CPU runs
never time the triton provider.
"""

import os

import torch

from ._env import ROOT, device_tag, environment  # noqa: F401  (re-exported for the benchmark files)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def sync(device) -> None:
    """Synchronise inside the timed callable so GPU timings cover the work, not the launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session", autouse=True)
def _no_tf32():
    """GPU benchmarks run fp32 exactly (DESIGN rule 7): torch 2.13 runs fp32 cuDNN convolutions in TF32 by default,
    which would make the eager masked-conv provider compute something else than the exact kernels it is compared
    with. The state is recorded in every result (env_info)."""
    if not HAS_CUDA:
        yield
        return
    from fastpurify.testing import no_tf32

    with no_tf32():
        yield


@pytest.fixture(scope="session")
def env_info():
    info = environment()
    if HAS_CUDA:
        from fastpurify.testing import tf32_state

        info["tf32"] = repr(tf32_state())
    return info


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
