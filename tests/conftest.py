"""Test configuration (DESIGN.md rules 6 and 7): without a CUDA device, Triton kernels run on CPU through the
interpreter, so TRITON_INTERPRET must be set before anything imports Triton; GPU-only tests carry
``@pytest.mark.gpu`` and are skipped, with a reason, when no CUDA device is present. With a CUDA device the whole
session runs with TF32 off (GPU references are compared at fp32 tolerances), and the defense tests take the
``device`` fixture: every available device, cuda marked ``gpu``."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

#: The devices a defense test runs on: the CPU always, CUDA (marked ``gpu``, so skipped with a reason here) when
#: one is present. Use the ``device`` fixture, or ``@pytest.mark.parametrize("device", DEVICES)``.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present); runs whenever one is")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _gpu_references_without_tf32():
    """DESIGN.md rule 7: torch runs fp32 cuDNN convolutions in TF32 by default (~1e-3 relative error), which would
    fail every fp32 comparison of a cuDNN reference with an exact kernel; off for the whole session on a GPU."""
    if not HAS_CUDA:
        yield
        return
    from fastpurify.testing import no_tf32

    with no_tf32():
        yield


@pytest.fixture(params=DEVICES)
def device(request):
    """Each available device in turn (``torch.device``): the defense tests' parameter."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; a FASTPURIFY_BACKEND in the caller's shell must not leak in."""
    monkeypatch.delenv("FASTPURIFY_BACKEND", raising=False)


@pytest.fixture(scope="session")
def backdoored():
    """A backdoored SmallVGG on the synthetic data, trained once per session (~30 s on 2 CPU cores):
    ACC ~97 % and ASR ~97 % (BadNets 4x4 patch, target 0, 10 % poisoning). The defender's clean set is a
    disjoint draw of 500 images; the test set 500 more."""
    from fastpurify.data import synthetic_dataset
    from fastpurify.metrics import evaluate
    from fastpurify.train import train_backdoored
    from fastpurify.triggers import PatchTrigger

    x, y = synthetic_dataset(n=3000, seed=0)
    trigger = PatchTrigger(4, 27, 27, 1.0)
    model, _ = train_backdoored("small_vgg", x, y, trigger=trigger, target=0, poison_rate=0.1, epochs=4,
                                augment=False, seed=0)
    xc, yc = synthetic_dataset(n=500, seed=5)
    xt, yt = synthetic_dataset(n=500, seed=0, split="test")
    before = evaluate(model, xt, yt, trigger=trigger, target=0)
    assert before.acc > 85 and before.asr > 85, f"fixture model not backdoored enough: {before}"
    return {"model": model.eval(), "x": xc, "y": yc, "x_test": xt, "y_test": yt, "trigger": trigger, "target": 0,
            "before": before}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (defense tests): on the shared 2-core machine two OpenMP threads stall
    whenever another process holds a core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
