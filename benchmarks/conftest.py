"""Benchmark configuration (DESIGN.md rule 8): every result says where it ran.

Run: ``pytest benchmarks --benchmark-json benchmarks/results/<device>/<name>.json`` then
``python benchmarks/summarize.py``. On CPU CI, ``pytest benchmarks --benchmark-disable`` is a smoke test.
Triton on CPU runs in its interpreter (numpy per program instance): its timings mean nothing, so CPU runs
never time the triton provider.
"""

import os
import platform
import subprocess
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _slug(s: str) -> str:
    return "-".join("".join(c.lower() if c.isalnum() else " " for c in s).split())


def device_tag() -> str:
    """Folder name under benchmarks/results/: the GPU's name, or the CPU model and thread count."""
    if HAS_CUDA:
        return _slug(torch.cuda.get_device_name(0))
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu-{_slug(model)}-{torch.get_num_threads()}t"


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(0) if HAS_CUDA else device_tag(),
        "device_tag": device_tag(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "threads": torch.get_num_threads(),
        "commit": commit,
    }


def sync(device) -> None:
    """Synchronise inside the timed callable so GPU timings cover the work, not the launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def env_info():
    return environment()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
