"""Test configuration (DESIGN.md rule 6): without a CUDA device, Triton kernels run on CPU through the
interpreter, so TRITON_INTERPRET must be set before anything imports Triton; GPU-only tests carry
``@pytest.mark.gpu`` and are skipped, with a reason, when no CUDA device is present."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present); runs whenever one is")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; a FASTPURIFY_BACKEND in the caller's shell must not leak in."""
    monkeypatch.delenv("FASTPURIFY_BACKEND", raising=False)
