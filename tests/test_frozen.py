"""Frozen parameters (issue 13): a parameter with ``requires_grad=False`` is never changed by a defense — fast path or
reference — and the others still are. AWM puts no mask on a frozen conv weight, BCU neither re-initialises nor
trains a frozen parameter, BAERASE's unlearning optimiser gets the trainable parameters only; SAU and I-BAU step
only parameters that have gradients. Buffers (BatchNorm running statistics) are not parameters and are not covered:
a train-mode phase (BCU, BAERASE) still updates the running statistics of a frozen BatchNorm layer.
"""

import copy
import importlib

import pytest
import torch
from _tiny import tiny_cnn

import fastpurify
from fastpurify.data import synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

KW = {
    "sau": dict(epochs=1, batch_size=32),
    "ibau": dict(epochs=1, batch_size=32),
    "awm": dict(epochs=1, inner=2, batch_size=32),
    "baerase": dict(target=0, epochs=1, recovery_epochs=1, hidden_size=16, batch_size=32, stop_rate=None),
    "bcu": dict(epochs=1, batch_size=32),
}
FROZEN = ("0.weight", "0.bias", "1.weight", "1.bias")  # the first conv and its BatchNorm


def _defense(name, path):
    if path == "fast":
        return getattr(fastpurify, name)
    return importlib.import_module(f"fastpurify.reference.defenses.{name}").__dict__[name]


@pytest.fixture(scope="module")
def setup():
    model = tiny_cnn(32, seed=0).eval()
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    return model, synthetic_dataset(n=64, seed=3)


@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("name", list(KW))
def test_frozen_parameters_are_never_changed(setup, name, path):
    model, data = setup
    user = copy.deepcopy(model)
    before = {k: p.detach().clone() for k, p in user.named_parameters()}
    r = _defense(name, path)(user, data, progress=False, seed=0, **KW[name])
    after = dict(r.model.named_parameters())
    for k in FROZEN:
        assert torch.equal(after[k], before[k]), f"{path} {name} changed the frozen {k}"
        assert not after[k].requires_grad
    changed = [k for k in before if k not in FROZEN and not torch.equal(after[k], before[k])]
    # AWM changes conv weights only (θ ⊙ m); the others train every trainable parameter they reach
    expected = {"4.weight", "8.weight"} if name == "awm" else {"4.weight", "8.weight", "13.weight"}
    assert expected <= set(changed), (path, name, changed)
    assert [p.requires_grad for p in r.model.parameters()] == [p.requires_grad for p in model.parameters()]
    if name == "awm":
        assert r.info["masked_layers"] == ["4", "8"] and sorted(r.info["masks"]) == ["4", "8"]
    if name == "bcu":  # the frozen stem is not re-initialised, and not counted
        assert "stem" not in r.info["reinit_counts"]


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_awm_with_every_conv_frozen_says_so(setup, path):
    model, data = setup
    frozen = copy.deepcopy(model)
    for m in frozen.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.requires_grad_(False)
    msg = r"Conv2d layers \(mask_layers='conv'\), and all 3 are frozen \(requires_grad=False\).*unfreeze those weights"
    with pytest.raises(ValueError, match=msg):
        _defense("awm", path)(frozen, data, progress=False, **KW["awm"])
