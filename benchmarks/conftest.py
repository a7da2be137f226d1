"""Benchmark configuration (DESIGN.md rule 8): every result says where it ran.

Run: ``pytest benchmarks --benchmark-json benchmarks/results/<device>/<name>.json`` then
``python benchmarks/summarize.py``. On CPU CI, ``pytest benchmarks --benchmark-disable`` is a smoke test.
Triton on CPU runs in its interpreter (numpy per program instance): its timings mean nothing, so CPU runs
never time the triton provider.

``compile-<mode>`` providers (``torch.compile`` of the eager reference, benchmarks/_compiled.py) carry the
``compiled`` marker; ``--compiled first`` (default) runs the first runnable one of each file that does not compile a
whole network (``compiled_model``), ``--compiled all`` every one, ``--compiled none`` none. Every timed case records
``os.getloadavg()`` before and after it (``loadavg_before`` / ``loadavg_after`` in ``extra_info``): the machine may be
shared.
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


def pytest_addoption(parser):
    parser.addoption("--compiled", choices=("none", "first", "all"), default="first",
                     help="torch.compile providers of the op benchmarks: the first of each file (default), all, none")


def pytest_configure(config):
    config.addinivalue_line("markers", "compiled: a torch.compile provider (selected by --compiled)")
    config.addinivalue_line("markers", "compiled_model: a torch.compile provider that compiles a network (minutes)")


@pytest.fixture(autouse=True)
def _loadavg(request):
    """The load average before and after each benchmark, in its extra_info."""
    bench = request.getfixturevalue("benchmark") if "benchmark" in request.fixturenames else None
    before = os.getloadavg()
    yield
    if bench is not None:
        bench.extra_info.update(loadavg_before=list(before), loadavg_after=list(os.getloadavg()))


def pytest_collection_modifyitems(config, items):
    which = config.getoption("--compiled", default="first")
    kept = set()
    skip_compiled = pytest.mark.skip(reason=f"torch.compile provider: run with --compiled all (--compiled {which})")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        elif "compiled" in item.keywords:
            first = which == "first" and item.fspath not in kept and "compiled_model" not in item.keywords
            if which == "all" or first:
                kept.add(item.fspath)
            else:
                item.add_marker(skip_compiled)
